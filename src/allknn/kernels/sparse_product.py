"""Sparse tile products written straight into a dense tile (numba, ``nogil``).

A tile of a sparse join is mostly dense (popular columns connect most
rows), so materialising it as a sparse matrix first costs more than the
arithmetic. Instead each corpus block is indexed once by column, and every
query row scatters its products into the dense tile. A query entry finds
its column's corpus entries through a per-thread table indexed by column
number (filled for the corpus block before the tile, cleared after): one
load instead of a binary search, which made tiles 3x faster. Each similarity is
summed over the pair's common columns in increasing column order whichever
side is the query, so a pair gets the same float32 value in every tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
from numba import njit


@dataclass(frozen=True)
class ColumnIndex:
    """The entries of a block of CSR rows, grouped by column.

    Attributes
    ----------
    columns : ndarray of shape (u,), int64
        The distinct columns present, ascending.
    starts : ndarray of shape (u + 1,), int64
        Entries of ``columns[c]`` are ``rows[starts[c] : starts[c + 1]]``.
    rows : ndarray of shape (nnz,), int32
        Row within the block of each entry, ascending per column.
    values : ndarray of shape (nnz,), float32
    """

    columns: np.ndarray
    starts: np.ndarray
    rows: np.ndarray
    values: np.ndarray


def column_index(block: scipy.sparse.csr_matrix) -> ColumnIndex:
    """Group a CSR block's entries by column (memory about that of the block)."""
    entry_rows = np.repeat(np.arange(block.shape[0], dtype=np.int32), np.diff(block.indptr))
    order = np.argsort(block.indices, kind="stable")
    columns, counts = np.unique(block.indices[order], return_counts=True)
    starts = np.zeros(columns.size + 1, dtype=np.int64)
    np.cumsum(counts, out=starts[1:])
    return ColumnIndex(columns.astype(np.int64), starts, entry_rows[order],
                       block.data[order].astype(np.float32))


@njit(nogil=True, cache=True)
def fill_spans(spans, columns, starts):
    """Point ``spans[c]`` at column ``c``'s entries, for the indexed columns."""
    for c in range(columns.shape[0]):
        spans[columns[c], 0] = starts[c]
        spans[columns[c], 1] = starts[c + 1]


@njit(nogil=True, cache=True)
def clear_spans(spans, columns):
    """Zero what :func:`fill_spans` set."""
    for c in range(columns.shape[0]):
        spans[columns[c], 0] = 0
        spans[columns[c], 1] = 0


@njit(nogil=True, cache=True)
def sparse_tile(indptr, indices, data, row0, n_rows, columns, starts, rows, values, out, spans):
    """``out += A[row0 : row0 + n_rows] @ B.T`` for CSR ``A`` and indexed ``B``.

    Parameters
    ----------
    indptr, indices, data : ndarray
        CSR arrays of ``A`` (sorted column indices, float32 data).
    row0, n_rows : int
        The rows of ``A`` in the tile.
    columns, starts, rows, values : ndarray
        :class:`ColumnIndex` of the corpus block ``B``.
    out : ndarray of shape (n_rows, rows of B), float32, C-contiguous
        The tile, added to (each pair's terms in increasing column order).
    spans : ndarray of shape (d, 2), int32
        Scratch, all zero on entry and on return: while the tile is made,
        row ``c`` holds the range of column ``c``'s entries in ``B``.
    """
    fill_spans(spans, columns, starts)
    for i in range(n_rows):
        target = out[i]
        for p in range(indptr[row0 + i], indptr[row0 + i + 1]):
            column = indices[p]
            a = data[p]
            for q in range(spans[column, 0], spans[column, 1]):
                target[rows[q]] += a * values[q]
    clear_spans(spans, columns)
