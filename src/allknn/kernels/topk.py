"""Fused top-k selection kernels (numba, ``nogil``) over similarity tiles.

The running top-k state of ``n`` rows is two arrays:

- ``keys`` (n, k) int64: one binary min-heap per row whose root (column 0)
  is the row's *worst* kept neighbour. A key packs a candidate
  ``(similarity s, row id j)`` into one integer, ``order(s) << 32 |
  (2**32 - 1 - j)``, where ``order`` maps float32 bits to int32 preserving
  order. Larger key = better candidate: higher similarity, then smaller id.
  One integer compare decides, ties included.
- ``thresholds`` (n,) float32: the similarity of each row's root, the value
  a candidate must reach; the fast path compares tile values against it.

Because the order is total, the final state does not depend on the order in
which tiles arrive: that is what makes results independent of block size,
thread count and row ordering. State rows and candidates are addressed by
row *id* (the row's number in the searched matrix), so the tiles may be made
from reordered rows. Ids must be below ``MAX_ROWS``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

MAX_ROWS = 2**32 - 1
"""Row ids are packed in 32 bits; id ``2**32 - 1`` marks an empty slot."""

EMPTY_ID = 2**32 - 1

CHUNK = 64
"""Columns checked per vectorised compare before any scalar work. The width
must be a compile-time constant for LLVM to vectorise the check."""

_NEG_INF_BITS = int(np.array(-np.inf, dtype=np.float32).view(np.int32))
EMPTY_KEY = (_NEG_INF_BITS ^ 0x7FFFFFFF) << 32
"""Key of an empty slot: similarity -inf, id ``EMPTY_ID``."""


def new_state(n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Return an empty top-k state for ``n`` rows.

    Returns
    -------
    keys : ndarray of shape (n, k), int64
        Filled with ``EMPTY_KEY``.
    thresholds : ndarray of shape (n,), float32
        Filled with ``-inf``.
    """
    return np.full((n, k), EMPTY_KEY, dtype=np.int64), np.full(n, -np.inf, dtype=np.float32)


def key_similarities(keys: np.ndarray) -> np.ndarray:
    """The float32 similarities packed in keys (``-inf`` for empty slots)."""
    order = keys >> 32
    bits = np.where(order >= 0, order, order ^ 0x7FFFFFFF).astype(np.int32)
    return bits.view(np.float32)


def key_ids(keys: np.ndarray) -> np.ndarray:
    """The row ids packed in keys (``EMPTY_ID`` for empty slots)."""
    return 0xFFFFFFFF - (keys & 0xFFFFFFFF)


def thresholds_of(keys: np.ndarray) -> np.ndarray:
    """Rebuild the thresholds of a state from its keys (e.g. after loading)."""
    return key_similarities(keys[:, 0]).copy()


@njit(nogil=True, cache=True, inline="always")
def _encode(bits, j):
    """Key of a candidate with float32 bit pattern ``bits`` and id ``j``."""
    b = np.int64(bits)
    if b == -2147483648:  # -0.0 ranks as +0.0
        b = 0
    if b < 0:
        b ^= 0x7FFFFFFF
    return (b << 32) | (0xFFFFFFFF - j)


@njit(nogil=True, cache=True, inline="always")
def _decode_id(key):
    return 0xFFFFFFFF - (key & 0xFFFFFFFF)


@njit(nogil=True, cache=True, inline="always")
def _similarity_bits(key):
    """Float32 bit pattern of the similarity packed in ``key``."""
    b = key >> 32
    if b < 0:
        b ^= 0x7FFFFFFF
    return np.int32(b)


@njit(nogil=True, cache=True, inline="always")
def _replace_root(keys, threshold_bits, r, key, k):
    """Put ``key`` (better than row ``r``'s root) in place of the root."""
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        right = child + 1
        if right < k and keys[r, right] < keys[r, child]:
            child = right
        if keys[r, child] >= key:
            break
        keys[r, pos] = keys[r, child]
        pos = child
    keys[r, pos] = key
    threshold_bits[r] = _similarity_bits(keys[r, 0])


@njit(nogil=True, cache=True, inline="always")
def _offer(keys, threshold_bits, r, bits, j, k):
    """Offer candidate ``(bits, j)`` to row ``r``: replace its root if better."""
    key = _encode(bits, j)
    if key > keys[r, 0]:
        _replace_root(keys, threshold_bits, r, key, k)


@njit(nogil=True, cache=True, inline="always")
def offer_new(keys, threshold_bits, r, bits, j, k):
    """:func:`_offer` for a candidate that may already be among the row's
    neighbours (found another way, with a float32 score rounded
    differently): then it is not offered again."""
    key = _encode(bits, j)
    if key <= keys[r, 0]:
        return
    for m in range(k):
        if _decode_id(keys[r, m]) == j:
            return
    _replace_root(keys, threshold_bits, r, key, k)


@njit(nogil=True, cache=True, inline="always")
def _any_at_least(row, c0, t):
    """Whether any of ``row[c0 : c0 + CHUNK]`` is ``>= t`` (vectorises)."""
    hit = np.int32(0)
    for c in range(c0, c0 + CHUNK):
        hit |= np.int32(row[c] >= t)
    return hit != 0


@njit(nogil=True, cache=True, inline="always")
def _any_at_least_either(row, c0, t, column_thresholds):
    """Whether any ``row[c] >= min(t, column_thresholds[c])`` in the chunk."""
    hit = np.int32(0)
    for c in range(c0, c0 + CHUNK):
        u = column_thresholds[c]
        u = t if t < u else u
        hit |= np.int32(row[c] >= u)
    return hit != 0


@njit(nogil=True, cache=True, inline="always")
def _walk_row(row, row_bits, c0, c1, r, col0, col_ids, keys, thresholds, threshold_bits, k, skip_self,
              unique):
    for c in range(c0, c1):
        if row[c] >= thresholds[r]:
            j = col_ids[col0 + c]
            if skip_self and j == r:
                continue
            if unique:
                offer_new(keys, threshold_bits, r, row_bits[c], j, k)
            else:
                _offer(keys, threshold_bits, r, row_bits[c], j, k)


@njit(nogil=True, cache=True)
def merge_rows(tile, row0, col0, row_ids, col_ids, keys, thresholds, skip_self, unique=False):
    """Merge a tile into the top-k state of its rows only.

    Each chunk of ``CHUNK`` values is first compared with the row threshold
    in one vectorised pass; only a chunk holding a survivor is walked
    element by element.

    Parameters
    ----------
    tile : ndarray of shape (bi, bj), float32, C-contiguous
        Similarities of rows ``row0 : row0 + bi`` to candidates
        ``col0 : col0 + bj`` (positions in the matrices multiplied).
    row0, col0 : int
        Position of the tile's first row and first candidate.
    row_ids : ndarray of int64
        State row of each query position.
    col_ids : ndarray of int64
        Id of each candidate position.
    keys : ndarray of shape (n, k), int64
    thresholds : ndarray of shape (n,), float32
        Top-k state, updated in place.
    skip_self : bool
        Never offer a candidate whose id equals the row's id.
    unique : bool
        Candidates may already be in the state (offered by another route
        than this tile); do not add them twice.
    """
    bi, bj = tile.shape
    k = keys.shape[1]
    full = bj - bj % CHUNK
    threshold_bits = thresholds.view(np.int32)
    tile_bits = tile.view(np.int32)
    for i in range(bi):
        r = row_ids[row0 + i]
        row = tile[i]
        row_bits = tile_bits[i]
        for c0 in range(0, full, CHUNK):
            if _any_at_least(row, c0, thresholds[r]):
                _walk_row(row, row_bits, c0, c0 + CHUNK, r, col0, col_ids, keys, thresholds,
                          threshold_bits, k, skip_self, unique)
        _walk_row(row, row_bits, full, bj, r, col0, col_ids, keys, thresholds, threshold_bits, k,
                  skip_self, unique)


@njit(nogil=True, cache=True, inline="always")
def _walk_both(row, row_bits, c0, c1, r, col0, ids, keys, thresholds, threshold_bits, k,
               column_thresholds):
    for c in range(c0, c1):
        v = row[c]
        if v >= thresholds[r]:
            _offer(keys, threshold_bits, r, row_bits[c], ids[col0 + c], k)
        if v >= column_thresholds[c]:
            j = ids[col0 + c]
            _offer(keys, threshold_bits, j, row_bits[c], r, k)
            column_thresholds[c] = thresholds[j]


@njit(nogil=True, cache=True)
def merge_rows_and_columns(tile, row0, col0, ids, keys, thresholds):
    """Merge an off-diagonal tile of a symmetric product into both sides.

    Row ``ids[row0 + i]`` is offered candidate ``ids[col0 + c]`` and, by
    symmetry, the other way round, in one pass over the tile. Row
    thresholds are scalars; column thresholds are gathered into a
    contiguous vector, so the common no-survivor case is one vectorised
    ``v >= min(row threshold, column threshold)`` per chunk.

    Parameters
    ----------
    tile : ndarray of shape (bi, bj), float32, C-contiguous
        Similarities of positions ``row0 : row0 + bi`` to positions
        ``col0 : col0 + bj``; the two ranges must not overlap.
    row0, col0 : int
        Position of the tile's first row and first column.
    ids : ndarray of int64
        Id (state row) of each position.
    keys : ndarray of shape (n, k), int64
    thresholds : ndarray of shape (n,), float32
        Top-k state, updated in place.
    """
    bi, bj = tile.shape
    k = keys.shape[1]
    full = bj - bj % CHUNK
    threshold_bits = thresholds.view(np.int32)
    tile_bits = tile.view(np.int32)
    column_thresholds = np.empty(bj, dtype=np.float32)
    for c in range(bj):
        column_thresholds[c] = thresholds[ids[col0 + c]]
    for i in range(bi):
        r = ids[row0 + i]
        row = tile[i]
        row_bits = tile_bits[i]
        for c0 in range(0, full, CHUNK):
            if _any_at_least_either(row, c0, thresholds[r], column_thresholds):
                _walk_both(row, row_bits, c0, c0 + CHUNK, r, col0, ids, keys, thresholds,
                           threshold_bits, k, column_thresholds)
        _walk_both(row, row_bits, full, bj, r, col0, ids, keys, thresholds, threshold_bits, k,
                   column_thresholds)


_INSERTION_SORT_MAX = 32


@njit(nogil=True, cache=True)
def _sort_best_first(sims, ids):
    """Sort ``sims`` descending with ties by smaller id, ``ids`` alongside."""
    k = sims.shape[0]
    if k > _INSERTION_SORT_MAX:
        by_id = np.argsort(ids, kind="mergesort")
        order = by_id[np.argsort(-sims[by_id], kind="mergesort")]
        sims[:] = sims[order]
        ids[:] = ids[order]
        return
    for m in range(1, k):
        s = sims[m]
        j = ids[m]
        p = m - 1
        while p >= 0 and (sims[p] < s or (sims[p] == s and ids[p] > j)):
            sims[p + 1] = sims[p]
            ids[p + 1] = ids[p]
            p -= 1
        sims[p + 1] = s
        ids[p + 1] = j


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _dot64(a, b):
    """Float64 dot product of two float32 vectors (vectorised; the summation
    order is fixed by the code, so results are reproducible). Not inlined:
    numba's IR inlining would compile it with the caller's flags, without
    fastmath, and LLVM would then not vectorise it."""
    acc = 0.0
    for t in range(a.shape[0]):
        acc += np.float64(a[t]) * np.float64(b[t])
    return acc


@njit(nogil=True, cache=True)
def rescore_and_sort(normed, norms, queries_normed, query_norms, rows, keys, similarities):
    """Decode state rows into the sorted result, re-scored in float64.

    The similarity of each kept pair is recomputed as
    ``dot(q, x) / (|q| |x|)`` in float64 from the float32 normalised rows,
    so exact duplicates score exactly 1.0 and the final order depends only
    on the candidate set, not on the float32 rounding of the tile that found
    it. Rows are sorted by similarity descending, ties by smaller index;
    empty slots go last as ``(-1, NaN)``.

    Parameters
    ----------
    normed : ndarray of shape (m, d), float32
        Normalised corpus rows, indexed by id.
    norms : ndarray of shape (m,), float64
        Norms of ``normed`` rows (close to 1).
    queries_normed : ndarray of shape (n, d), float32
        Normalised query rows (``normed`` itself for the self-join).
    query_norms : ndarray of shape (n,), float64
    rows : ndarray of int64
        State rows to process, in this order (rows whose neighbours overlap
        should come together: the candidates' vectors then stay in cache).
    keys : ndarray of shape (n, k), int64
        State; the processed rows are rewritten in place as neighbour
        indices.
    similarities : ndarray of shape (n, k), float32
        Output similarities of the processed rows.
    """
    k = keys.shape[1]
    sims = np.empty(k, dtype=np.float64)
    ids = np.empty(k, dtype=np.int64)
    for r in rows:
        q = queries_normed[r]
        qn = query_norms[r]
        for m in range(k):
            j = _decode_id(keys[r, m])
            ids[m] = j
            if j != EMPTY_ID:
                sims[m] = _clip(_dot64(q, normed[j]) / (qn * norms[j]))
            else:
                sims[m] = -np.inf
        _sort_best_first(sims, ids)
        _store_row(keys, similarities, r, sims, ids)


@njit(nogil=True, cache=True, inline="always")
def _clip(s):
    return min(1.0, max(-1.0, s))


@njit(nogil=True, cache=True, inline="always")
def _store_row(keys, similarities, r, sims, ids):
    """Write a sorted row: ids into ``keys`` (-1 when empty), float32 sims."""
    for m in range(keys.shape[1]):
        if ids[m] == EMPTY_ID:
            keys[r, m] = -1
            similarities[r, m] = np.nan
        else:
            keys[r, m] = ids[m]
            similarities[r, m] = np.float32(sims[m])


@njit(nogil=True, cache=True, inline="always")
def _sparse_dot64(a_indices, a_data, b_indices, b_data):
    """Float64 dot product of two sparse rows with sorted column indices."""
    acc = 0.0
    p = 0
    q = 0
    while p < a_indices.shape[0] and q < b_indices.shape[0]:
        if a_indices[p] == b_indices[q]:
            acc += np.float64(a_data[p]) * np.float64(b_data[q])
            p += 1
            q += 1
        elif a_indices[p] < b_indices[q]:
            p += 1
        else:
            q += 1
    return acc


@njit(nogil=True, cache=True)
def rescore_and_sort_sparse(indptr, indices, data, norms, q_indptr, q_indices, q_data, query_norms,
                            rows, keys, similarities):
    """:func:`rescore_and_sort` for CSR rows (sorted column indices).

    Parameters
    ----------
    indptr, indices, data : ndarray
        CSR arrays of the normalised corpus (float32 data).
    norms : ndarray of shape (m,), float64
    q_indptr, q_indices, q_data : ndarray
        CSR arrays of the normalised queries.
    query_norms : ndarray of shape (n,), float64
    rows, keys, similarities
        As in :func:`rescore_and_sort`.
    """
    k = keys.shape[1]
    sims = np.empty(k, dtype=np.float64)
    ids = np.empty(k, dtype=np.int64)
    for r in rows:
        q0, q1 = q_indptr[r], q_indptr[r + 1]
        for m in range(k):
            j = _decode_id(keys[r, m])
            ids[m] = j
            if j != EMPTY_ID:
                x0, x1 = indptr[j], indptr[j + 1]
                dot = _sparse_dot64(q_indices[q0:q1], q_data[q0:q1], indices[x0:x1], data[x0:x1])
                sims[m] = _clip(dot / (query_norms[r] * norms[j]))
            else:
                sims[m] = -np.inf
        _sort_best_first(sims, ids)
        _store_row(keys, similarities, r, sims, ids)


@njit(nogil=True, cache=True)
def compact_rows(flat, row_length, rows, cols):
    """Move the ``rows x cols`` top-left part of a ``(?, row_length)``
    C-ordered matrix stored in ``flat`` to the front of ``flat``, C-ordered.

    Rows move forward only, so each row is read before it is overwritten.
    """
    for r in range(rows):
        src = r * row_length
        dst = r * cols
        for c in range(cols):
            flat[dst + c] = flat[src + c]


@njit(nogil=True, cache=True)
def permute_rows(matrix, order):
    """Reorder rows in place so that new row ``r`` is old row ``order[r]``.

    Follows the permutation's cycles with one row of scratch, so the
    reordering needs no second copy of the matrix.

    Parameters
    ----------
    matrix : ndarray of shape (n, d)
    order : ndarray of shape (n,), int64
        A permutation of ``range(n)``.
    """
    n = matrix.shape[0]
    done = np.zeros(n, dtype=np.bool_)
    scratch = np.empty(matrix.shape[1], dtype=matrix.dtype)
    for start in range(n):
        if done[start]:
            continue
        scratch[:] = matrix[start]
        current = start
        while True:
            done[current] = True
            source = order[current]
            if source == start:
                matrix[current] = scratch
                break
            matrix[current] = matrix[source]
            current = source
