"""Row sources that a cluster's workers read block by block from shared storage.

A source is a small, picklable description of where the rows are (paths,
shape), never the rows themselves: a task reads its block where it runs, so
a lost worker loses no data and the client reads no rows. Blocks are row
ranges of the whole source; a folder or glob of parquet files is one source
whose rows are the files' rows in file-name order, and a zarr array reads
the chunks its blocks overlap (chunks of whole rows read fastest).
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allknn._optional import optional
from allknn.readers.ids import read_ids
from allknn.readers.parquet import parquet_id_values, parquet_row_count, read_parquet_rows


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

    def read_ids(self, id_column: str) -> np.ndarray:
        """The values of ``id_column`` over all files, one unique id per row.

        Raises
        ------
        ValueError
            A file without the column, a null id, or a repeated id.
        """
        values = [parquet_id_values(Path(path), id_column) for path in self.paths]
        return read_ids(np.concatenate(values), self.shape[0], name=f"id column {id_column!r} of "
                        f"{self.describe()}")


@dataclass(frozen=True)
class ZarrSource:
    """A 2-D zarr array (format 2 or 3), in a store folder or inside a group."""

    path: str
    array: str | None
    """The array's path inside the group at ``path`` (None: ``path`` is the array)."""
    shape: tuple[int, int]
    dtype: str

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, shape (stop - start, d), as stored."""
        return np.asarray(_open_zarr(self.path, self.array)[start:stop])

    def describe(self) -> str:
        return self.path if self.array is None else f"{self.path} (array {self.array})"


RowSource = NpySource | ParquetSource | ZarrSource


def _is_zarr(path: Path) -> bool:
    return path.is_dir() and (path.suffix.lower() == ".zarr" or (path / "zarr.json").is_file()
                              or (path / ".zarray").is_file() or (path / ".zgroup").is_file())


def _open_zarr(path: str, array: str | None):
    zarr = optional("zarr", "reading zarr arrays")
    node = zarr.open(path, mode="r")
    return node if array is None else node[array]


def _zarr_source(path: Path, array: str | None, name: str) -> ZarrSource:
    """Describe the zarr array at ``path`` (an array, or a group holding ``array``)."""
    zarr = optional("zarr", "reading zarr arrays")
    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:  # zarr raises its own types for unreadable metadata
        raise ValueError(f"{path} cannot be read as a zarr store ({exc}); check the store") from None
    if isinstance(node, zarr.Group):
        arrays = sorted(key for key, value in node.arrays())
        if array is None:
            if len(arrays) != 1:
                raise ValueError(f"the zarr group {path} holds the arrays {arrays}; name one with column= "
                                 f"(--column)")
            array = arrays[0]
        try:
            member = node[array]  # a child, or a path "sub/emb" through subgroups
        except KeyError:
            member = None
        if not isinstance(member, zarr.Array):
            raise ValueError(f"the zarr group {path} has no array {array!r}; it holds {arrays} (name an "
                             f"array of a subgroup by its path, e.g. 'group/array')")
        node = member
    elif array is not None:
        raise ValueError(f"{path} is a zarr array, not a group; leave out column=")
    if node.ndim != 2 or 0 in node.shape:
        raise ValueError(f"{name} at {path} has shape {node.shape}; it needs rows x dimensions, both > 0")
    if np.dtype(node.dtype).kind != "f":
        raise ValueError(f"{name} at {path} holds {node.dtype} values; store the embeddings as float16, "
                         f"float32 or float64")
    return ZarrSource(str(path.resolve()), array, (int(node.shape[0]), int(node.shape[1])),
                      np.dtype(node.dtype).str)


def open_source(source: str | os.PathLike[str], *, column: str | None = None, name: str = "X") -> RowSource:
    """Describe the rows at ``source`` from its header or footers alone.

    Parameters
    ----------
    source : path-like
        A ``.npy`` file, a zarr store (an array, or a group with one), a
        ``.parquet`` file, a folder of ``.parquet`` files or a glob of them;
        every worker must be able to read it at the same path.
    column : str, optional
        The parquet embedding column (default: the only list column, else
        every float column), or the array of a zarr group.
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
    if _is_zarr(path):
        return _zarr_source(path, column, name)
    if path.is_dir():
        files = sorted(str(p) for p in path.glob("*.parquet"))
    elif any(char in text for char in "*?["):
        files = sorted(glob.glob(text))
    elif path.is_file() and path.suffix.lower() == ".parquet":
        files = [text]
    elif path.exists():
        raise ValueError(f"{name}={text!r}: a cluster reads .npy files, zarr arrays, .parquet files, folders "
                         f"or globs of .parquet files, or a dask array; convert it to .npy")
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
