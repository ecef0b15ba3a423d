"""Very sparse tiles: products accumulated per row and merged as they finish.

When few pairs of a tile share a column (short rows, large vocabularies), a
dense tile is mostly zeros that must still be cleared and scanned. Here
each query row's products go into one row-sized accumulator, and only the
candidates it touched are nominated to the top-k state (scored by the
reference, see :func:`allknn.kernels.topk.merge_rows`) and cleared.

A few frequent columns (stop words) would touch most pairs. They can be
set apart as a small dense *head* per row: a pair's similarity is then its
*tail* sum (the other columns, accumulated) plus the dot product of the two
heads, computed only when the Cauchy-Schwarz bound ``tail + |head_i|
|head_j|`` can reach a threshold. Pairs sharing no tail column are never
touched; their similarity is the head dot alone (exactly 0 without heads:
the reference of rows sharing no column is exactly 0).
:func:`offer_untouched_pairs` offers them where they matter once all tiles
are merged: rows whose k-th best is below their head bound, then rows whose
k-th best is not positive (zeros, smallest index first). The result equals
that of making every pair.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from allknn.kernels.reference import similarity
from allknn.kernels.sparse_product import clear_spans, fill_spans
from allknn.kernels.topk import offer_exact

HEAD_BOUND_FLOOR = 2.0**-60
"""Absolute margin on non-zero head norms, for subnormal products."""


def head_bounds(head: np.ndarray) -> np.ndarray:
    """Upper bounds of the row norms of ``head``, 0 for rows without a head.

    ``fl(b_i * b_j)`` is at least the float32 head dot product of rows
    ``i`` and ``j`` whatever its rounding: a float32 sum of ``h`` products
    is within ``h u / (1 - h u)`` (``u = 2**-24``) of the exact dot product
    relative to ``|a| |b|``, so each norm gets a relative margin of ``(h +
    4) u``, and :data:`HEAD_BOUND_FLOOR` for subnormal products.

    Parameters
    ----------
    head : ndarray of shape (n, h), float32

    Returns
    -------
    ndarray of shape (n,), float32
    """
    norms = np.sqrt(np.einsum("ij,ij->i", head, head, dtype=np.float64))
    slack = (head.shape[1] + 4) * 2.0**-24
    bounds = np.where(norms > 0, norms * (1 + slack) + HEAD_BOUND_FLOOR, 0.0)
    rounded = bounds.astype(np.float32)
    return np.where(rounded < bounds, np.nextafter(rounded, np.float32(np.inf)), rounded)


@njit(nogil=True, cache=True)
def _head_dot(a, b):
    """Float32 dot product of two head rows, in column order (no
    reassociation: the same value wherever it is computed)."""
    s = np.float32(0.0)
    for c in range(a.shape[0]):
        s += a[c] * b[c]
    return s


@njit(nogil=True, cache=True)
def accumulate_and_merge(indptr, indices, data, row0, n_rows, columns, starts, rows, values, spans,
                         row_ids, col0, col_ids, keys, thresholds, skip_self, both_sides, scratch,
                         touched, seen, q_head, q_bounds, head, bounds, queries, corpus, margin):
    """Make tile rows ``row0 : row0 + n_rows`` of CSR ``A`` against an
    indexed block ``B`` one at a time, and merge each into the state.

    Parameters
    ----------
    indptr, indices, data : ndarray
        CSR arrays of ``A``'s tail (sorted column indices, float32 data).
    row0, n_rows : int
    columns, starts, rows, values : ndarray
        :class:`allknn.kernels.sparse_product.ColumnIndex` of ``B``'s tail.
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
    q_head, head : ndarray of shape (positions, h), float32
        Heads of ``A`` and ``B`` by position (``h`` may be 0).
    q_bounds, bounds : ndarray of shape (positions,), float32
        Their :func:`head_bounds`.
    queries, corpus : tuple
        Scoring rows of ``A`` and ``B`` (the un-split CSR rows, by
        position; see :func:`allknn.topk.scoring.scoring_rows`).
    margin : float32
        Nomination margin (see :func:`allknn.kernels.topk.merge_rows`).
    """
    k = keys.shape[1]
    with_heads = head.shape[1] > 0
    threshold_bits = thresholds.view(np.int32)
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
        reach = q_bounds[row0 + i]
        for m in range(count):
            t = touched[m]
            seen[t] = False
            j = col_ids[col0 + t]
            if with_heads:
                ceiling = scratch[t] + reach * bounds[col0 + t]
                if ceiling < thresholds[r] - margin and not (  # thresholds[j]: read only if needed
                        both_sides and ceiling >= thresholds[j] - margin):
                    scratch[t] = 0.0
                    continue
                scratch[t] += _head_dot(q_head[row0 + i], head[col0 + t])
            v = scratch[t]
            scratch[t] = 0.0
            mine = v >= thresholds[r] - margin and not (skip_self and j == r)
            theirs = both_sides and v >= thresholds[j] - margin
            if not (mine or theirs):
                continue
            s = similarity(queries, corpus, row0 + i, col0 + t, r, j)
            if mine and s >= thresholds[r]:
                offer_exact(keys, threshold_bits, r, s, j, k, False)
            if theirs and s >= thresholds[j]:
                offer_exact(keys, threshold_bits, j, s, r, k, False)
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
def offer_untouched_pairs(r0, r1, q_indptr, q_indices, q_head, q_bounds, indptr, indices, head, bounds,
                          by_bound, keys, thresholds, skip_self, queries, corpus, margin):
    """Offer the pairs no tile touched (no common tail column) where they count.

    Their similarity is the head dot product. For each query row ``r`` in
    ``r0 : r1``:

    1. Corpus rows are visited by decreasing head bound while ``fl(q_bounds[r]
       * bounds[j])`` can reach the row's threshold; an untouched one is
       offered its head dot product.
    2. If the row's k-th best is then still not positive (or it has fewer
       than k neighbours), the untouched rows that pass 1 did not see (one
       side without a head: similarity exactly 0) are offered in increasing
       index order until k were: by the index tie-break no later one could
       enter.

    A candidate already held is not added twice.

    Parameters
    ----------
    r0, r1 : int
        Query rows (state rows) to finish.
    q_indptr, q_indices : ndarray
        CSR structure of the query rows' tails.
    q_head, q_bounds : ndarray
        Query heads and their :func:`head_bounds`.
    indptr, indices : ndarray
        CSR structure of the corpus rows' tails.
    head, bounds : ndarray
        Corpus heads and their :func:`head_bounds`.
    by_bound : ndarray of int64
        Corpus rows with a head, by decreasing bound.
    keys, thresholds : ndarray
        Top-k state, updated in place.
    skip_self : bool
        Never offer query ``r`` corpus row ``r``.
    queries, corpus : tuple
        Scoring rows (the un-split CSR rows; see
        :func:`allknn.topk.scoring.scoring_rows`).
    margin : float32
        Nomination margin (see :func:`allknn.kernels.topk.merge_rows`).
    """
    k = keys.shape[1]
    threshold_bits = thresholds.view(np.int32)
    n = indptr.shape[0] - 1
    for r in range(r0, r1):
        mine = q_indices[q_indptr[r] : q_indptr[r + 1]]
        reach = q_bounds[r]
        if reach > 0:
            for m in range(by_bound.shape[0]):
                j = by_bound[m]
                if reach * bounds[j] < thresholds[r] - margin:
                    break
                if skip_self and j == r:
                    continue
                if _head_dot(q_head[r], head[j]) < thresholds[r] - margin:
                    continue
                if not _share_a_column(mine, indices[indptr[j] : indptr[j + 1]]):
                    s = similarity(queries, corpus, r, j, r, j)
                    if s >= thresholds[r]:
                        offer_exact(keys, threshold_bits, r, s, j, k, True)
        if thresholds[r] > 0:
            continue
        offered = 0
        for j in range(n):
            if offered == k:
                break
            if (skip_self and j == r) or (reach > 0 and bounds[j] > 0):
                continue
            if _share_a_column(mine, indices[indptr[j] : indptr[j + 1]]):
                continue
            offer_exact(keys, threshold_bits, r, np.float32(0.0), j, k, True)
            offered += 1
