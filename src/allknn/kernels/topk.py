"""Fused top-k selection kernels (numba, ``nogil``) over similarity tiles.

The running top-k state of ``n`` rows is two arrays, ``heap_sim`` (n, k)
float32 and ``heap_idx`` (n, k) int64. Each row is a binary min-heap whose
root (column 0) holds the row's *worst* kept neighbour, so the root value is
the threshold a candidate must beat. The order is total: a candidate
``(s, j)`` is better than ``(t, i)`` when ``s > t``, or ``s == t`` and
``j < i`` (ties go to the smaller index). Because the order is total, the
final state does not depend on the order in which tiles arrive, which is what
makes results independent of block size and thread count.

Empty slots hold ``(-inf, EMPTY)``; every finite candidate beats them.
"""

from __future__ import annotations

import numpy as np
from numba import njit

EMPTY = np.iinfo(np.int64).max


def new_state(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return an empty top-k state for ``n`` rows.

    Returns
    -------
    heap_sim : ndarray of shape (n, k), float32
        Filled with ``-inf``.
    heap_idx : ndarray of shape (n, k), int64
        Filled with the ``EMPTY`` sentinel.
    """
    heap_sim = np.full((n, k), -np.inf, dtype=np.float32)
    heap_idx = np.full((n, k), EMPTY, dtype=np.int64)
    return heap_sim, heap_idx


@njit(nogil=True, cache=True, inline="always")
def _sift_down(hs, hi, r, k):
    """Restore the heap property of row ``r`` after its root was replaced."""
    pos = 0
    s = hs[r, 0]
    i = hi[r, 0]
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        right = child + 1
        if right < k and (
            hs[r, right] < hs[r, child]
            or (hs[r, right] == hs[r, child] and hi[r, right] > hi[r, child])
        ):
            child = right
        cs = hs[r, child]
        ci = hi[r, child]
        if cs < s or (cs == s and ci > i):
            hs[r, pos] = cs
            hi[r, pos] = ci
            pos = child
        else:
            break
    hs[r, pos] = s
    hi[r, pos] = i


@njit(nogil=True, cache=True, inline="always")
def _offer(hs, hi, r, s, j, k):
    """Offer candidate ``(s, j)`` to row ``r``; return the row's new threshold."""
    root = hs[r, 0]
    if s > root or (s == root and j < hi[r, 0]):
        # A row may see the same candidate twice only through the two halves
        # of a diagonal tile, which the callers never visit both of.
        hs[r, 0] = s
        hi[r, 0] = j
        _sift_down(hs, hi, r, k)
    return hs[r, 0]


CHUNK = 64
"""Columns checked per vectorised compare before any scalar work. The width
must be a compile-time constant for LLVM to vectorise the check."""


@njit(nogil=True, cache=True, inline="always")
def _any_at_least(row, c0, t):
    """Whether any of ``row[c0 : c0 + CHUNK]`` is ``>= t`` (vectorises)."""
    hit = np.int32(0)
    for c in range(c0, c0 + CHUNK):
        hit |= np.int32(row[c] >= t)
    return hit != 0


@njit(nogil=True, cache=True, inline="always")
def _any_at_least_either(row, c0, t, col_threshold):
    """Whether any ``row[c] >= min(t, col_threshold[c])`` in the chunk."""
    hit = np.int32(0)
    for c in range(c0, c0 + CHUNK):
        u = col_threshold[c]
        u = t if t < u else u
        hit |= np.int32(row[c] >= u)
    return hit != 0


@njit(nogil=True, cache=True, inline="always")
def _walk_row(row, c0, c1, gr, col0, hs, hi, k, skip_diagonal):
    """Offer ``row[c0:c1]`` to row ``gr``; return its new threshold."""
    t = hs[gr, 0]
    for c in range(c0, c1):
        v = row[c]
        if v >= t:
            gc = col0 + c
            if skip_diagonal and gc == gr:
                continue
            t = _offer(hs, hi, gr, v, gc, k)
    return t


@njit(nogil=True, cache=True, inline="always")
def _walk_both(row, c0, c1, gr, col0, hs, hi, k, col_threshold):
    """Offer ``row[c0:c1]`` to row ``gr`` and to the columns; return the
    row's new threshold."""
    t = hs[gr, 0]
    for c in range(c0, c1):
        v = row[c]
        if v >= t:
            t = _offer(hs, hi, gr, v, col0 + c, k)
        if v >= col_threshold[c]:
            col_threshold[c] = _offer(hs, hi, col0 + c, v, gr, k)
    return t


@njit(nogil=True, cache=True)
def merge_rows(tile, row0, col0, hs, hi, skip_diagonal):
    """Merge a tile into the top-k state of its rows only.

    Each chunk of ``CHUNK`` values is first compared with the row threshold
    in one vectorised pass; only a chunk holding a survivor is walked
    element by element.

    Parameters
    ----------
    tile : ndarray of shape (bi, bj), float32, C-contiguous
        Similarities of rows ``row0 : row0 + bi`` to candidates
        ``col0 : col0 + bj``.
    row0, col0 : int
        Global index of the tile's first row and first candidate.
    hs, hi : ndarray of shape (n, k)
        Top-k state (float32 similarities, int64 indices), updated in place.
    skip_diagonal : bool
        Never offer candidate ``j`` to row ``j`` (self-exclusion).
    """
    bi, bj = tile.shape
    k = hs.shape[1]
    full = bj - bj % CHUNK
    for r in range(bi):
        gr = row0 + r
        row = tile[r]
        t = hs[gr, 0]
        for c0 in range(0, full, CHUNK):
            if _any_at_least(row, c0, t):
                t = _walk_row(row, c0, c0 + CHUNK, gr, col0, hs, hi, k, skip_diagonal)
        _walk_row(row, full, bj, gr, col0, hs, hi, k, skip_diagonal)


@njit(nogil=True, cache=True)
def merge_rows_and_columns(tile, row0, col0, hs, hi):
    """Merge an off-diagonal tile of a symmetric product into both sides.

    Row ``row0 + r`` is offered candidate ``col0 + c`` and, by symmetry,
    row ``col0 + c`` is offered candidate ``row0 + r``, in one pass over the
    tile. Row thresholds are scalars; column thresholds are a contiguous
    vector, so the common no-survivor case is one vectorised
    ``v >= min(row threshold, column threshold)`` per chunk.

    Parameters
    ----------
    tile : ndarray of shape (bi, bj), float32, C-contiguous
        Similarities of rows ``row0 : row0 + bi`` to rows ``col0 : col0 + bj``;
        the two ranges must not overlap.
    row0, col0 : int
        Global index of the tile's first row and first column.
    hs, hi : ndarray of shape (n, k)
        Top-k state, updated in place.
    """
    bi, bj = tile.shape
    k = hs.shape[1]
    full = bj - bj % CHUNK
    col_threshold = np.empty(bj, dtype=np.float32)
    for c in range(bj):
        col_threshold[c] = hs[col0 + c, 0]
    for r in range(bi):
        gr = row0 + r
        row = tile[r]
        t = hs[gr, 0]
        for c0 in range(0, full, CHUNK):
            if _any_at_least_either(row, c0, t, col_threshold):
                t = _walk_both(row, c0, c0 + CHUNK, gr, col0, hs, hi, k, col_threshold)
        _walk_both(row, full, bj, gr, col0, hs, hi, k, col_threshold)


@njit(nogil=True, cache=True)
def rescore_and_sort(normed, norms, queries_normed, query_norms, row0, hs, hi):
    """Re-score the kept candidates in float64 and sort each row best first.

    The similarity of a kept pair is recomputed as
    ``dot(q, x) / (|q| |x|)`` in float64 from the float32 normalised rows, so
    exact duplicates score exactly 1.0 and the final order depends only on
    the candidate set, not on the float32 rounding of the tile that found it.
    Rows are sorted by similarity descending, ties by smaller index, and
    empty slots (index ``EMPTY``) go last as ``(-1, NaN)``.

    Parameters
    ----------
    normed : ndarray of shape (m, d), float32
        Normalised corpus rows.
    norms : ndarray of shape (m,), float64
        Norms of ``normed`` rows (close to 1).
    queries_normed : ndarray of shape (n, d), float32
        Normalised query rows (``normed`` itself for the self-join).
    query_norms : ndarray of shape (n,), float64
    row0 : int
        First query row of ``hs``/``hi`` to process; the arrays passed are
        the slice being processed, ``queries_normed`` is indexed from it.
    hs, hi : ndarray of shape (b, k)
        Top-k state slice, rewritten in place as the sorted result.
    """
    b, k = hs.shape
    d = normed.shape[1]
    sims = np.empty(k, dtype=np.float64)
    for r in range(b):
        q = queries_normed[row0 + r]
        qn = query_norms[row0 + r]
        for m in range(k):
            j = hi[r, m]
            if j == EMPTY:
                sims[m] = -np.inf
                continue
            x = normed[j]
            acc = 0.0
            for t in range(d):
                acc += np.float64(q[t]) * np.float64(x[t])
            s = acc / (qn * norms[j])
            sims[m] = min(1.0, max(-1.0, s))
        # insertion sort, best first: larger sim, then smaller index
        for m in range(1, k):
            s = sims[m]
            j = hi[r, m]
            p = m - 1
            while p >= 0 and (sims[p] < s or (sims[p] == s and hi[r, p] > j)):
                sims[p + 1] = sims[p]
                hi[r, p + 1] = hi[r, p]
                p -= 1
            sims[p + 1] = s
            hi[r, p + 1] = j
        for m in range(k):
            if hi[r, m] == EMPTY:
                hi[r, m] = -1
                hs[r, m] = np.nan
            else:
                hs[r, m] = np.float32(sims[m])
