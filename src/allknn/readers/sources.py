"""Row sources that a cluster's workers read block by block from shared storage.

A source is a small, picklable description of where the rows are (paths,
shape), never the rows themselves: a task reads its block where it runs, so
a lost worker loses no data and the client reads no rows. Blocks are row
ranges of the whole source; a folder or glob of parquet files is one source
whose rows are the files' rows in file-name order.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allknn.readers.parquet import parquet_row_count, read_parquet_rows

SOURCE_SUFFIXES = (".npy", ".parquet")


@dataclass(frozen=True)
class NpySource:
    """A ``.npy`` file, read through a memory map."""

    path: str
    shape: tuple[int, int]
    dtype: str

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, shape (stop - start, d), as stored."""
        return np.array(np.load(self.path, mmap_mode="r")[start:stop])

    def describe(self) -> str:
        return self.path


@dataclass(frozen=True)
class ParquetSource:
    """Parquet files (one embedding column, or one float column per dimension)."""

    paths: tuple[str, ...]
    starts: tuple[int, ...]
    """First row of each file, and the total row count last."""
    dim: int
    column: str | None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.starts[-1], self.dim)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` across the files, shape (stop - start, d)."""
        parts = []
        for path, first, end in zip(self.paths, self.starts[:-1], self.starts[1:], strict=True):
            if end > start and first < stop:
                parts.append(read_parquet_rows(Path(path), column=self.column,
                                               start=max(start, first) - first, stop=min(stop, end) - first))
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def describe(self) -> str:
        return self.paths[0] if len(self.paths) == 1 else f"{len(self.paths)} parquet files under " \
            f"{os.path.commonpath(self.paths)}"


RowSource = NpySource | ParquetSource


def open_source(source: str | os.PathLike[str], *, column: str | None = None, name: str = "X") -> RowSource:
    """Describe the rows at ``source`` from its header or footers alone.

    Parameters
    ----------
    source : path-like
        A ``.npy`` file, a ``.parquet`` file, a folder of ``.parquet`` files
        or a glob of them; every worker must be able to read it at the same
        path.
    column : str, optional
        The parquet embedding column (default: the only list column, else
        every float column).
    name : str
        ``"X"`` or ``"queries"``, for messages.

    Raises
    ------
    FileNotFoundError
        Nothing at ``source`` (or no parquet file in the folder or glob).
    ValueError
        Another format, a matrix that is not 2-D, a corrupt header.
    """
    text = os.fspath(source)
    path = Path(text)
    if path.suffix.lower() == ".npy" and path.is_file():
        if column is not None:
            raise ValueError(f"column= does not apply to {path} (it is for .parquet files); leave it out")
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path} cannot be read as a .npy file ({exc}); check the file") from None
        if array.ndim != 2 or 0 in array.shape:
            raise ValueError(f"{name} at {path} has shape {array.shape}; it needs rows x dimensions, "
                             f"both > 0")
        return NpySource(str(path.resolve()), (int(array.shape[0]), int(array.shape[1])), array.dtype.str)
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.parquet"))
    elif any(char in text for char in "*?["):
        files = sorted(glob.glob(text))
    elif path.is_file() and path.suffix.lower() == ".parquet":
        files = [text]
    elif path.exists():
        raise ValueError(f"{name}={text!r}: a cluster reads .npy files, .parquet files, folders or globs of "
                         f".parquet files, or a dask array; convert it to .npy")
    else:
        raise FileNotFoundError(f"no such file or folder: {text}; every worker must read {name} at this path")
    if not files:
        raise FileNotFoundError(f"{text} holds no .parquet file")
    files = [str(Path(f).resolve()) for f in files]
    counts = [parquet_row_count(Path(f)) for f in files]
    if sum(counts) == 0:
        raise ValueError(f"{text} has no rows; it needs at least one embedding")
    first = next(f for f, c in zip(files, counts, strict=True) if c)
    dim = read_parquet_rows(Path(first), column=column, start=0, stop=1).shape[1]
    return ParquetSource(tuple(files), tuple(int(s) for s in np.concatenate([[0], np.cumsum(counts)])), dim,
                         column)
