"""Pilot rows for choosing a sparse layout: how far each candidate head reaches.

A head (see :mod:`allknn.kernels.sparse_accumulate`) costs a head dot
product for every touched pair whose bound ``tail + b_i b_j`` reaches the
row's threshold, and a fallback scan over the rows with ``b_i b_j`` above
it. Both are counted here, for a few sample query rows with their exact
k-th similarity, by the pairs with ``s_ij + 2 b_i b_j >= t_i`` (the tail is
at most ``s_ij + b_i b_j``).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from allknn.kernels.topk import replace_smallest


@njit(nogil=True, cache=True)
def _kth_largest(values, heap):
    """The k-th largest of ``values`` (``k = len(heap) <= len(values)``),
    with ``heap`` as scratch (a min-heap of the largest values seen)."""
    heap[:] = -np.inf
    for v in values:
        if v > heap[0]:
            replace_smallest(heap, v)
    return heap[0]


@njit(nogil=True, cache=True)
def count_head_reach(q_indptr, q_indices, q_data, sample, skip_self, n, c_indptr, c_indices, c_data, k,
                     q_bounds, bounds, stride, counts):
    """Add, for each candidate head, the reached pairs of the sample rows.

    Parameters
    ----------
    q_indptr, q_indices, q_data : ndarray
        CSR arrays of the query rows.
    sample : ndarray of int64
        Query rows to measure.
    skip_self : bool
        Leave corpus row ``r`` out of query row ``r``'s neighbours.
    n : int
        Rows of the corpus.
    c_indptr, c_indices, c_data : ndarray
        CSC arrays of the corpus.
    k : int
        Neighbours per row (at most ``n - 1`` with ``skip_self``).
    q_bounds : ndarray of shape (heads, len(sample)), float32
        Head norms of the sample rows for each candidate head.
    bounds : ndarray of shape (heads, m), float32
        Head norms of corpus rows ``0, stride, 2 stride, ...``: the rows
        counted.
    stride : int
    counts : ndarray of shape (heads,), int64
        Added to.
    """
    similarities = np.zeros(n, dtype=np.float32)
    best = np.empty(k, dtype=np.float32)
    for m in range(sample.shape[0]):
        r = sample[m]
        for p in range(q_indptr[r], q_indptr[r + 1]):
            column = q_indices[p]
            a = q_data[p]
            for q in range(c_indptr[column], c_indptr[column + 1]):
                similarities[c_indices[q]] += a * c_data[q]
        if skip_self:
            similarities[r] = -np.inf
        threshold = _kth_largest(similarities, best)
        for h in range(bounds.shape[0]):
            reach = 2 * q_bounds[h, m]
            for jj in range(bounds.shape[1]):
                if similarities[jj * stride] + reach * bounds[h, jj] >= threshold:
                    counts[h] += 1
        similarities[:] = 0


@njit(nogil=True, cache=True)
def nested_row_sums(indptr, entry_rank, data, squares):
    """``squares[h, i] += sum of data**2`` over row ``i``'s entries of rank
    at most ``h`` (nested column sets; rank ``len(squares) - 1`` is none).

    Parameters
    ----------
    indptr : ndarray
        CSR row pointers.
    entry_rank : ndarray of int64
        Rank of each entry's column.
    data : ndarray
    squares : ndarray of shape (ranks + 1, n), float64
        Added to.
    """
    for i in range(indptr.shape[0] - 1):
        for p in range(indptr[i], indptr[i + 1]):
            v = np.float64(data[p])
            for h in range(entry_rank[p], squares.shape[0] - 1):
                squares[h, i] += v * v
