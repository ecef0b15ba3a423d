"""Dense rows: unit-normalised once, block by block, finding zero and NaN/Inf rows."""

from __future__ import annotations

import tempfile

import numpy as np

from allknn._validate import rows_to_keep
from allknn.kernels.reference import dense_row_norms, unit_row_norms
from allknn.rows.normalized import NormalizedRows


def row_norms(data: np.ndarray, block_rows: int) -> np.ndarray:
    """Input norms (:func:`allknn.kernels.reference.dense_row_norms`) of the
    rows of ``data``, read ``block_rows`` at a time as float64.

    Returns
    -------
    ndarray of shape (n,), float64
        NaN or Inf for rows holding NaN or Inf.
    """
    norms = np.empty(data.shape[0], dtype=np.float64)
    for start in range(0, data.shape[0], block_rows):
        block = np.ascontiguousarray(data[start : start + block_rows], dtype=np.float64)
        dense_row_norms(block, norms[start : start + block.shape[0]])
    return norms


def _allocate(shape: tuple[int, int], on_disk: bool) -> np.ndarray:
    """A float32 matrix in memory, or in an already-unlinked temporary file.

    The file is removed from its folder at once, so nothing is left behind
    even if the process is killed; the mapping keeps it alive until freed.
    """
    if not on_disk:
        return np.empty(shape, dtype=np.float32)
    with tempfile.NamedTemporaryFile(prefix="allknn-normalised-", suffix=".npy") as handle:
        rows = np.lib.format.open_memmap(handle.name, mode="w+", dtype=np.float32, shape=shape)
    return rows


def normalize_dense_rows(
    data: np.ndarray, *, name: str, block_rows: int, invalid: str, on_disk: bool = False
) -> NormalizedRows:
    """Normalise the rows of ``data`` into a new float32 matrix.

    ``data`` is read one block at a time (it may be a memory map of any
    real dtype), so the only full-size allocation is the float32 result.

    Parameters
    ----------
    data : ndarray of shape (n, d), real dtype
    name : str
        Name used in error messages (``"X"`` or ``"queries"``).
    block_rows : int
        Rows converted at once (bounds the float64 scratch).
    invalid : {"raise", "drop"}
        What to do with all-zero rows and rows holding NaN or Inf.
    on_disk : bool
        Keep the normalised copy in a memory-mapped temporary file (for
        inputs larger than memory) instead of in memory.

    Raises
    ------
    ValueError
        If there are such rows and ``invalid="raise"``, naming how many and
        the first row numbers; or if no row is left after dropping.
    """
    norms = row_norms(data, block_rows)
    kept = rows_to_keep(norms, name=name, invalid=invalid)

    n_kept = data.shape[0] if kept is None else kept.size
    rows = _allocate((n_kept, data.shape[1]), on_disk)
    for start in range(0, n_kept, block_rows):
        stop = min(start + block_rows, n_kept)
        if kept is None:
            block = np.asarray(data[start:stop], dtype=np.float64)
            block_norms = norms[start:stop]
        else:
            block = np.asarray(data[kept[start:stop]], dtype=np.float64)
            block_norms = norms[kept[start:stop]]
        rows[start:stop] = block / block_norms[:, None]
    own_norms = np.empty(n_kept, dtype=np.float64)
    for start in range(0, n_kept, block_rows):
        unit_row_norms(rows[start : start + block_rows], own_norms[start : start + block_rows])
    return NormalizedRows(rows=rows, norms=own_norms, kept=kept, n_original=data.shape[0])
