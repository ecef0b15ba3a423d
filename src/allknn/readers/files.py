"""Read an embedding matrix (and optional row ids) from a file, chosen by extension.

Every reader returns the matrix in its stored float dtype without a float64
detour, memory-mapped wherever the format allows (``.npy``, ``.fvecs``,
contiguous HDF5 datasets), so a file larger than memory is streamed block
by block by the engine.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allknn._optional import optional
from allknn.readers.parquet import read_parquet

_SPARSE_KEYS = frozenset({"format", "shape", "data"})  # what scipy.sparse.save_npz writes for every format
_ANN_BENCHMARKS_TRAIN = "train"


@dataclass(frozen=True, eq=False)
class Embeddings:
    """An embedding matrix read from a file.

    Attributes
    ----------
    matrix : ndarray of shape (n, d), float16, float32 or float64
        The rows, in the dtype they are stored in. A read-only
        ``np.memmap`` for ``.npy``, ``.fvecs`` and contiguous HDF5 datasets,
        an in-memory array otherwise.
    ids : ndarray of shape (n,) or None
        Row labels (int64, or ``str`` objects), when the file has an id
        column; ``None`` means rows are known by their numbers.
    source : str
        Where the rows came from, for messages (the path, plus the column
        or dataset name).
    """

    matrix: np.ndarray
    ids: np.ndarray | None
    source: str


def load(
    path: str | os.PathLike[str],
    *,
    column: str | None = None,
    id_column: str | None = None,
    dataset: str | None = None,
) -> Embeddings:
    """Read an embedding matrix from ``path``; the format follows the extension.

    Parameters
    ----------
    path : path-like
        The file.
    column : str, optional
        Embedding column (``.parquet`` only).
    id_column : str, optional
        Column of unique row ids (``.parquet`` only).
    dataset : str, optional
        Array name (``.npz``) or dataset path (``.h5``/``.hdf5``).

    Returns
    -------
    Embeddings
        ``matrix`` (n, d) in the stored dtype, ``ids`` (n,) or None, and
        ``source``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        Unknown extension, an option that does not apply to the format, a
        truncated or corrupt file, a missing column or dataset, ragged or
        null rows, bad ids. Messages name the file and say the fix.
    TypeError
        Non-numeric data.
    ImportError
        If the format needs an optional package that is missing.

    Notes
    -----
    Formats by extension:

    ``.npy``
        Memory-mapped read-only (``np.load(path, mmap_mode="r")``).
    ``.npz``
        The array named ``dataset``, or the only array; read into memory.
        A file written by ``scipy.sparse.save_npz`` gives a CSR matrix.
    ``.parquet``
        ``column``: a list / large_list / fixed_size_list column of numbers;
        by default the only list column, else all float columns (one
        dimension per column). ``id_column`` gives the row ids. Read row
        group by row group into one preallocated matrix.
    ``.h5``, ``.hdf5``
        The dataset named ``dataset``; by default ``train`` (the
        ann-benchmarks layout), else the only 2-D dataset. A contiguous,
        uncompressed dataset is memory-mapped directly from the file; a
        chunked or compressed one is read into memory (re-save it with
        ``h5repack -l CONTI`` or as ``.npy`` to stream it instead).
    ``.fvecs``
        Records of a little-endian int32 dimension followed by that many
        float32; memory-mapped.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _OPTIONS:
        raise ValueError(
            f"cannot read {path}: unknown extension {path.suffix!r}; supported: {', '.join(_OPTIONS)}"
        )
    allowed = _OPTIONS[suffix]
    for option, value in {"column": column, "id_column": id_column, "dataset": dataset}.items():
        if value is not None and option not in allowed:
            fits = ", ".join(ext for ext, options in _OPTIONS.items() if option in options)
            instead = f"use {' or '.join(o + '=' for o in allowed)} instead" if allowed else "leave it out"
            raise ValueError(f"{option}= does not apply to {path} (it is for {fits} files); {instead}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}; check the path")
    if suffix == ".parquet":
        matrix, ids, source = read_parquet(path, column=column, id_column=id_column)
    else:
        (matrix, source), ids = _READERS[suffix](path, dataset), None
    return Embeddings(matrix=_check_matrix(matrix, source), ids=ids, source=source)


def _check_matrix(matrix: np.ndarray, source: str) -> np.ndarray:
    if matrix.dtype.kind not in "fiu":
        raise TypeError(
            f"{source} holds dtype {matrix.dtype}, not numbers; store the embeddings as float32"
        )
    if matrix.ndim != 2:
        raise ValueError(
            f"{source} has shape {matrix.shape}, but embeddings must be 2-D (rows x dimensions); "
            f"store them as one row per item"
        )
    if 0 in matrix.shape:
        raise ValueError(f"{source} has shape {matrix.shape}; it needs at least one row and one column")
    return matrix


def _corrupt(path: Path, exc: BaseException, writer: str) -> ValueError:
    return ValueError(
        f"{path} is not a readable {path.suffix} file ({exc}); it may be truncated or corrupt: "
        f"write it again with {writer}"
    )


def _read_npy(path: Path, dataset: str | None) -> tuple[np.ndarray, str]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise _corrupt(path, exc, "numpy.save") from None
    if not isinstance(array, np.ndarray):
        array.close()
        raise ValueError(f"{path} is a .npz archive, not a .npy file; rename it to .npz")
    return array, str(path)


def _read_npz(path: Path, dataset: str | None) -> tuple[np.ndarray, str]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise _corrupt(path, exc, "numpy.savez") from None
    if not hasattr(archive, "files"):
        raise ValueError(f"{path} is a .npy file, not a .npz archive; rename it to .npy")
    with archive:
        if _SPARSE_KEYS <= set(archive.files):
            import scipy.sparse

            try:
                matrix = scipy.sparse.load_npz(path).tocsr()
            except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
                raise _corrupt(path, exc, "scipy.sparse.save_npz") from None
            return matrix, f"{path} (sparse {matrix.format})"
        name = _pick(archive.files, dataset, path, what="array")
        try:
            return archive[name], f"{path} (array {name!r})"
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise _corrupt(path, exc, "numpy.savez") from None


def _pick(names: list[str], wanted: str | None, path: Path, *, what: str) -> str:
    """The name ``wanted``, or the only name; else an error listing the names."""
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"{path} has no {what} {wanted!r}; its {what}s are: {', '.join(names)}")
        return wanted
    if len(names) == 1:
        return names[0]
    listed = ", ".join(names) if names else "none"
    raise ValueError(f"{path} has {len(names)} {what}s ({listed}); pass dataset= to choose one")


def _read_hdf5(path: Path, dataset: str | None) -> tuple[np.ndarray, str]:
    h5py = optional("h5py", f"reading {path.suffix} files")
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise ValueError(
            f"{path} is not a readable HDF5 file ({exc}); it may be truncated or corrupt: write it again"
        ) from None
    with handle:
        shapes: dict[str, tuple[int, ...]] = {}
        handle.visititems(lambda name, item: shapes.update({name: item.shape})
                          if isinstance(item, h5py.Dataset) else None)
        if dataset is None and _ANN_BENCHMARKS_TRAIN in shapes:
            dataset = _ANN_BENCHMARKS_TRAIN
        if dataset is None:
            two_d = [name for name, shape in shapes.items() if len(shape) == 2]
            if len(two_d) != 1:
                listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items()) or "none"
                raise ValueError(
                    f"{path} has {len(two_d)} 2-D datasets (datasets: {listed}); pass dataset= to choose one"
                )
            dataset = two_d[0]
        name = _pick(list(shapes), dataset, path, what="dataset")
        data = handle[name]
        source = f"{path} (dataset {name!r})"
        offset = data.id.get_offset()
        contiguous = data.chunks is None and data.compression is None and offset is not None
        if contiguous and data.dtype.kind in "fiu":
            return np.memmap(path, dtype=data.dtype, mode="r", offset=offset, shape=data.shape), source
        return data[()], source


def _read_fvecs(path: Path, dataset: str | None) -> tuple[np.ndarray, str]:
    size = path.stat().st_size
    if size < 4:
        raise ValueError(f"{path} is not an .fvecs file: it has {size} bytes, too few for one record")
    dim = int(np.fromfile(path, dtype="<i4", count=1)[0])
    if dim <= 0:
        raise ValueError(f"{path} is not an .fvecs file: its first record has dimension {dim}")
    record = 4 + 4 * dim
    if size % record:
        raise ValueError(
            f"{path} is truncated or not an .fvecs file: with dimension {dim} (from the first record) "
            f"every record has {record} bytes, so the size must be a multiple of {record}, but it is "
            f"{size} bytes ({size // record} whole records and {size % record} bytes more); write it again"
        )
    records = np.memmap(path, dtype=np.dtype([("dim", "<i4"), ("vector", "<f4", (dim,))]), mode="r")
    bad = np.flatnonzero(records["dim"] != dim)
    if bad.size:
        raise ValueError(
            f"{path} has records of different dimensions: record {bad[0]} has {records['dim'][bad[0]]}, "
            f"record 0 has {dim} ({bad.size} records differ); every record must have the same dimension"
        )
    return records["vector"], str(path)


_OPTIONS: dict[str, tuple[str, ...]] = {
    ".npy": (),
    ".npz": ("dataset",),
    ".parquet": ("column", "id_column"),
    ".h5": ("dataset",),
    ".hdf5": ("dataset",),
    ".fvecs": (),
}
"""Supported extensions and the options of :func:`load` each one takes."""

_READERS: dict[str, Callable[[Path, str | None], tuple[np.ndarray, str]]] = {
    ".npy": _read_npy,
    ".npz": _read_npz,
    ".h5": _read_hdf5,
    ".hdf5": _read_hdf5,
    ".fvecs": _read_fvecs,
}
"""Readers of the formats without columns: ``(path, dataset) -> (matrix, source)``."""
