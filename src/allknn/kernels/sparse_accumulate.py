"""Very sparse tiles: products accumulated per row and merged as they finish.

When few pairs of a tile share a column (short rows, large vocabularies), a
dense tile is mostly zeros that must still be cleared and scanned. Here
each query row's products go into one row-sized accumulator, and only the
candidates it touched are offered to the top-k state and cleared. Sums are
made in the same order as :func:`allknn.kernels.sparse_product.sparse_tile`,
so a pair gets the same float32 value on either path.

Pairs that share no column are never touched; their similarity is exactly
0. :func:`offer_zero_similarity` offers them where they matter (rows whose
k-th best is not positive), smallest index first, so the result equals
that of the dense path.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from allknn.kernels.sparse_product import clear_spans, fill_spans
from allknn.kernels.topk import _offer, offer_new


@njit(nogil=True, cache=True)
def accumulate_and_merge(indptr, indices, data, row0, n_rows, columns, starts, rows, values, spans,
                         row_ids, col0, col_ids, keys, thresholds, skip_self, both_sides, scratch,
                         touched, seen):
    """Make tile rows ``row0 : row0 + n_rows`` of CSR ``A`` against an
    indexed block ``B`` one at a time, and merge each into the state.

    Parameters
    ----------
    indptr, indices, data : ndarray
        CSR arrays of ``A`` (sorted column indices, float32 data).
    row0, n_rows : int
    columns, starts, rows, values : ndarray
        :class:`allknn.kernels.sparse_product.ColumnIndex` of ``B``.
    spans : ndarray of shape (d, 2), int32
        Zeroed scratch (see :func:`allknn.kernels.sparse_product.sparse_tile`).
    row_ids : ndarray of int64
        State row of each position of ``A``.
    col0 : int
        Position of ``B``'s first row.
    col_ids : ndarray of int64
        Id of each position of ``B``.
    keys, thresholds : ndarray
        Top-k state, updated in place.
    skip_self : bool
        Never offer a row to itself.
    both_sides : bool
        Also offer each pair to the candidate's own row (off-diagonal tiles
        of the self-join).
    scratch : ndarray of float32, touched : ndarray of int32, seen : ndarray of bool
        Row-sized scratch (at least ``B``'s rows), zero/False on entry and
        on return.
    """
    k = keys.shape[1]
    threshold_bits = thresholds.view(np.int32)
    scratch_bits = scratch.view(np.int32)
    fill_spans(spans, columns, starts)
    for i in range(n_rows):
        count = 0
        for p in range(indptr[row0 + i], indptr[row0 + i + 1]):
            column = indices[p]
            a = data[p]
            for q in range(spans[column, 0], spans[column, 1]):
                t = rows[q]
                if not seen[t]:
                    seen[t] = True
                    touched[count] = t
                    count += 1
                scratch[t] += a * values[q]
        r = row_ids[row0 + i]
        for m in range(count):
            t = touched[m]
            v = scratch[t]
            bits = scratch_bits[t]
            scratch[t] = 0.0
            seen[t] = False
            j = col_ids[col0 + t]
            if v >= thresholds[r] and not (skip_self and j == r):
                _offer(keys, threshold_bits, r, bits, j, k)
            if both_sides and v >= thresholds[j]:
                _offer(keys, threshold_bits, j, bits, r, k)
    clear_spans(spans, columns)


@njit(nogil=True, cache=True, inline="always")
def _share_a_column(a_indices, b_indices):
    """Whether two sorted index lists have a common element."""
    p = 0
    q = 0
    while p < a_indices.shape[0] and q < b_indices.shape[0]:
        if a_indices[p] == b_indices[q]:
            return True
        if a_indices[p] < b_indices[q]:
            p += 1
        else:
            q += 1
    return False


@njit(nogil=True, cache=True)
def offer_zero_similarity(q_indptr, q_indices, indptr, indices, keys, thresholds, skip_self):
    """Offer the pairs no tile touched (similarity exactly 0) where they count.

    A row whose k-th best similarity is not positive (or that has fewer
    than k neighbours) is offered, in increasing index order, the corpus
    rows sharing no column with it, until k were offered: by the index
    tie-break no later one could enter. A candidate already held (a dense
    tile offered it) is not added twice, so this is safe after either path.

    Parameters
    ----------
    q_indptr, q_indices : ndarray
        CSR structure of the query rows (state row ``i`` is query ``i``).
    indptr, indices : ndarray
        CSR structure of the corpus rows.
    keys, thresholds : ndarray
        Top-k state, updated in place.
    skip_self : bool
        Never offer query ``i`` corpus row ``i``.
    """
    k = keys.shape[1]
    threshold_bits = thresholds.view(np.int32)
    n = indptr.shape[0] - 1
    for r in range(keys.shape[0]):
        if thresholds[r] > 0:
            continue
        mine = q_indices[q_indptr[r] : q_indptr[r + 1]]
        offered = 0
        for j in range(n):
            if offered == k:
                break
            if skip_self and j == r:
                continue
            if _share_a_column(mine, indices[indptr[j] : indptr[j + 1]]):
                continue
            offer_new(keys, threshold_bits, r, np.int32(0), j, k)
            offered += 1
