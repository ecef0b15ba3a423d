"""Fused top-k selection kernels (numba, ``nogil``) over similarity tiles.

The running top-k state of ``n`` rows is two arrays:

- ``keys`` (n, k) int64: one binary min-heap per row whose root (column 0)
  is the row's *worst* kept neighbour. A key packs a candidate
  ``(similarity s, row id j)`` into one integer, ``order(s) << 32 |
  (2**32 - 1 - j)``, where ``order`` maps float32 bits to int32 preserving
  order. Larger key = better candidate: higher similarity, then smaller id.
  One integer compare decides, ties included.
- ``thresholds`` (n,) float32: the similarity of each row's root, the value
  a candidate must reach.

Every key holds a *reference* similarity (:mod:`allknn.kernels.reference`),
never a tile value: a tile value only nominates a candidate when it reaches
the row's threshold less a margin that bounds the tile's rounding, and the
nominee is scored by the reference before it is offered. So the state is a
function of the candidates offered alone: the same whatever the BLAS
kernel, tile shape, thread count, row order or order of the tiles, and two
states merge exactly. State rows and candidates are addressed by row *id*
(the row's number in the searched matrix), so the tiles may be made from
reordered rows. Ids must be below ``MAX_ROWS``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from allknn.kernels.reference import similarity

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


def floored_state(floors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A top-k state whose rows hold ``k`` placeholders at ``floors``.

    A placeholder has the row's floor as similarity and id ``EMPTY_ID``,
    the lowest key of that similarity, so exactly the candidates at least
    as similar as the floor enter. With floors that are lower bounds of the
    rows' final k-th similarities (the threshold of another partial state
    of the same rows), the state misses no candidate of the final top-k,
    and skips the many below. Remove the placeholders left with
    :func:`renumber` before merging.

    Parameters
    ----------
    floors : ndarray of shape (n,), float32
        ``-inf``: no floor.
    k : int
    """
    floors = np.asarray(floors, dtype=np.float32)
    bits = floors.view(np.int32).astype(np.int64)
    bits[bits == -(2**31)] = 0  # -0.0 ranks as +0.0
    order = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    keys = np.repeat((order << 32)[:, None], k, axis=1)
    return np.ascontiguousarray(keys), floors.copy()


@njit(nogil=True, cache=True)
def renumber(keys, ids):
    """Replace each key's local candidate ``c`` by ``ids[c]``, and the
    placeholders of :func:`floored_state` by empty slots, in place, with
    no temporaries (a task's state leaves its worker this way; a worker
    started by a Dask nanny maps every large temporary afresh).

    Parameters
    ----------
    keys : ndarray of shape (n, k), int64
        A state whose candidates are numbered locally.
    ids : ndarray of int64
        Id of each local candidate, increasing (so that keys of equal
        similarity keep their order: ties still go to the smaller id).

    Returns
    -------
    ndarray
        ``keys``.
    """
    n, k = keys.shape
    for r in range(n):
        for m in range(k):
            keys[r, m] = _renumbered(keys[r, m], ids)
    return keys


@njit(nogil=True, cache=True, inline="always")
def _renumbered(key, ids):
    """``key`` with its local candidate ``c`` replaced by ``ids[c]``;
    ``EMPTY_KEY`` for an empty slot or a placeholder (id ``EMPTY_ID``)."""
    low = key & 0xFFFFFFFF
    if low == 0:
        return EMPTY_KEY
    return (key - low) | (0xFFFFFFFF - ids[0xFFFFFFFF - low])


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


def merge_states(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The top-k state holding the best keys of two states of the same rows.

    Associative, commutative and idempotent: a key both states hold (the
    same candidate offered twice, by a repeated task) counts once, since
    equal candidates have equal keys.

    Parameters
    ----------
    a, b : ndarray of shape (n, k), int64
        Keys of two states (any heap order).

    Returns
    -------
    ndarray of shape (n, k), int64
        The ``k`` largest distinct keys of each row of both, sorted
        ascending (a valid heap: the root is the worst), led by
        ``EMPTY_KEY`` where there are fewer; rebuild the thresholds with
        :func:`thresholds_of`.
    """
    if a.shape != b.shape:
        raise ValueError(f"states of shapes {a.shape} and {b.shape} do not merge")
    return _merged_rows(np.ascontiguousarray(a, dtype=np.int64), np.ascontiguousarray(b, dtype=np.int64))


@njit(nogil=True, cache=True, inline="always")
def _sorted_row(keys, r, out):
    """Row ``r`` of ``keys`` into ``out``, insertion-sorted ascending (a
    heap row is half sorted, a merged row already sorted)."""
    for m in range(keys.shape[1]):
        key = keys[r, m]
        at = m
        while at > 0 and out[at - 1] > key:
            out[at] = out[at - 1]
            at -= 1
        out[at] = key


@njit(nogil=True, cache=True)
def _merged_rows(a, b):
    """:func:`merge_states` row by row: both rows sorted, then merged from
    the top, each distinct key once, until ``k`` are taken."""
    n, k = a.shape
    out = np.empty((n, k), dtype=np.int64)
    x = np.empty(k, dtype=np.int64)
    y = np.empty(k, dtype=np.int64)
    for r in range(n):
        _sorted_row(a, r, x)
        _sorted_row(b, r, y)
        i, j, at = k - 1, k - 1, k - 1
        while at >= 0 and (i >= 0 or j >= 0):
            if j < 0 or (i >= 0 and x[i] >= y[j]):
                key = x[i]
                i -= 1
            else:
                key = y[j]
                j -= 1
            if at == k - 1 or key != out[r, at + 1]:
                out[r, at] = key
                at -= 1
        for m in range(at, -1, -1):
            out[r, m] = EMPTY_KEY
    return out


@njit(nogil=True, cache=True)
def merge_found(keys, rows, found, ids):
    """Merge ``found`` into rows ``rows`` of ``keys``, in place.

    ``found[t]`` is a state of row ``rows[t]`` made from a
    :func:`floored_state` (placeholders left in), its candidates numbered
    locally: candidate ``c`` is row ``ids[c]``. The same as
    ``keys[rows] = merge_states(keys[rows], found')``, ``found'`` being
    ``found`` without its placeholders and with ``ids[c]`` for ``c``, in
    one pass: each candidate that beats the row's worst and is not held
    yet is inserted in order, the worst dropped (a floored state holds few).

    Parameters
    ----------
    keys : ndarray of shape (n, k), int64
        Rows sorted ascending, no real key twice (as :func:`merge_states`
        and this function leave them).
    rows : ndarray of shape (m,), int64
        Distinct rows of ``keys``.
    found : ndarray of shape (m, k2), int64
    ids : ndarray of int64
        Id of each local candidate.
    """
    k = keys.shape[1]
    for t in range(rows.shape[0]):
        r = rows[t]
        for m in range(found.shape[1]):
            key = _renumbered(found[t, m], ids)
            if key == EMPTY_KEY or key <= keys[r, 0]:  # no better than the worst (or the worst itself)
                continue
            held = False
            for x in range(1, k):
                if keys[r, x] == key:
                    held = True
                    break
            if held:
                continue
            at = 0
            while at + 1 < k and keys[r, at + 1] < key:
                keys[r, at] = keys[r, at + 1]
                at += 1
            keys[r, at] = key


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
def _any_at_least_either(row, c0, t, column_floors):
    """Whether any ``row[c] >= min(t, column_floors[c])`` in the chunk."""
    hit = np.int32(0)
    for c in range(c0, c0 + CHUNK):
        u = column_floors[c]
        u = t if t < u else u
        hit |= np.int32(row[c] >= u)
    return hit != 0


@njit(nogil=True, cache=True, inline="always")
def offer_exact(keys, threshold_bits, r, s, j, k, unique):
    """Offer candidate ``j`` with reference similarity ``s`` (float32) to row ``r``."""
    bits = np.float32(s).view(np.int32)
    if unique:
        offer_new(keys, threshold_bits, r, bits, j, k)
    else:
        _offer(keys, threshold_bits, r, bits, j, k)


@njit(nogil=True, cache=True, inline="always")
def _walk_row(row, c0, c1, r, i, row0, col0, col_ids, keys, thresholds, threshold_bits, k, skip_self,
              unique, queries, corpus, margin, start):
    for c in range(c0, c1):
        if row[c] >= max(thresholds[r] - margin, start):
            j = col_ids[col0 + c]
            if skip_self and j == r:
                continue
            s = similarity(queries, corpus, row0 + i, col0 + c, r, j)
            if s >= thresholds[r]:
                offer_exact(keys, threshold_bits, r, s, j, k, unique)


@njit(nogil=True, cache=True, inline="always")
def replace_smallest(heap, v):
    """Put ``v`` in place of the root of ``heap``, a min-heap of floats
    whose root ``v`` exceeds, and sift it down."""
    k = heap.shape[0]
    pos = 0
    while True:
        child = 2 * pos + 1
        if child >= k:
            break
        if child + 1 < k and heap[child + 1] < heap[child]:
            child += 1
        if heap[child] >= v:
            break
        heap[pos] = heap[child]
        pos = child
    heap[pos] = v


@njit(nogil=True, cache=True, inline="always")
def _start_floor(row, top, r, col0, col_ids, skip_self, margin):
    """A nomination floor for a row whose state is not yet full: the
    ``k``-th largest value of its tile row (``k = top.size``; the row's own
    column left out with ``skip_self``) less twice ``margin``, or ``-inf``
    if the tile has fewer than ``k`` candidates.

    Those ``k`` candidates have reference similarities of at least that
    value less ``margin``, so the row's final ``k``-th similarity does too,
    and any candidate of its final top-k has a tile value at least the
    floor: walking only the values at or above it scores a handful of
    candidates instead of every one that beats the rising threshold of an
    empty state, and leaves the same state.
    """
    top[:] = -np.inf  # a min-heap of the largest values seen
    bj = row.shape[0]
    full = bj - bj % CHUNK
    for c0 in range(0, bj, CHUNK):
        if c0 < full and not _any_at_least(row, c0, top[0]):
            continue
        for c in range(c0, min(c0 + CHUNK, bj)):
            v = row[c]
            if v > top[0] and not (skip_self and col_ids[col0 + c] == r):
                replace_smallest(top, v)
    return top[0] - (margin + margin)


@njit(nogil=True, cache=True)
def merge_rows(tile, row0, col0, row_ids, col_ids, keys, thresholds, skip_self, unique, queries, corpus,
               margin):
    """Merge a tile into the top-k state of its rows only.

    Each chunk of ``CHUNK`` values is first compared with the row's floor
    (its threshold less ``margin``) in one vectorised pass; only a chunk
    holding a survivor is walked element by element, and each survivor is
    scored by the reference (:func:`allknn.kernels.reference.similarity`)
    before it is offered. So the state holds reference similarities only,
    whatever rounding made the tile. A row whose state is not yet full
    (threshold ``-inf``) is first floored at its tile's ``k``-th value less
    two margins (:func:`_start_floor`), so that its first tile scores about
    ``k`` candidates rather than every one that beats a rising threshold.

    Parameters
    ----------
    tile : ndarray of shape (bi, bj), float32, C-contiguous
        Products of rows ``row0 : row0 + bi`` with candidates ``col0 : col0
        + bj`` (positions in the matrices multiplied), each within
        ``margin`` less 2**-23 of the reference similarity.
    row0, col0 : int
        Position of the tile's first row and first candidate.
    row_ids : ndarray of int64
        State row (id) of each query position.
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
    queries, corpus : tuple
        Scoring rows of the two sides, by position (see
        :func:`allknn.topk.scoring.scoring_rows`).
    margin : float32
        How far below its threshold a tile value may still be a candidate
        (:func:`allknn.topk.bounds.nomination_margin`).
    """
    bi, bj = tile.shape
    k = keys.shape[1]
    full = bj - bj % CHUNK
    threshold_bits = thresholds.view(np.int32)
    top = np.empty(k, dtype=np.float32)
    for i in range(bi):
        r = row_ids[row0 + i]
        row = tile[i]
        start = np.float32(-np.inf)
        if thresholds[r] == -np.inf:
            start = _start_floor(row, top, r, col0, col_ids, skip_self, margin)
        floor = max(thresholds[r] - margin, start)
        for c0 in range(0, full, CHUNK):
            if _any_at_least(row, c0, floor):
                _walk_row(row, c0, c0 + CHUNK, r, i, row0, col0, col_ids, keys, thresholds, threshold_bits,
                          k, skip_self, unique, queries, corpus, margin, start)
                floor = max(thresholds[r] - margin, start)
        if full < bj:
            _walk_row(row, full, bj, r, i, row0, col0, col_ids, keys, thresholds, threshold_bits, k,
                      skip_self, unique, queries, corpus, margin, start)


@njit(nogil=True, cache=True)
def offer_nominees(tile_rows, tile_cols, row0, col0, row_ids, col_ids, keys, thresholds, skip_self, queries,
                   corpus, both_sides):
    """Score nominated pairs of a tile by the reference and offer them.

    The nominations were made elsewhere (on a device, from a tile that
    never reaches the host); each pair is scored here, so the state holds
    reference similarities only.

    Parameters
    ----------
    tile_rows, tile_cols : ndarray of int64
        The nominated pairs, as positions in the tile.
    row0, col0 : int
        Position of the tile's first row and column.
    row_ids, col_ids : ndarray of int64
        Id of each position of the two sides.
    keys, thresholds : ndarray
        Top-k state, updated in place.
    skip_self : bool
        Never pair ids that are equal.
    queries, corpus : tuple
        Scoring rows of the two sides, by position.
    both_sides : bool
        Offer each pair to the column's row too (an off-diagonal tile of a
        self-join).
    """
    k = keys.shape[1]
    threshold_bits = thresholds.view(np.int32)
    for t in range(tile_rows.shape[0]):
        i = row0 + tile_rows[t]
        j = col0 + tile_cols[t]
        r = row_ids[i]
        c = col_ids[j]
        if skip_self and r == c:
            continue
        s = similarity(queries, corpus, i, j, r, c)
        if s >= thresholds[r]:
            offer_exact(keys, threshold_bits, r, s, c, k, False)
        if both_sides and s >= thresholds[c]:
            offer_exact(keys, threshold_bits, c, s, r, k, False)


@njit(nogil=True, cache=True, inline="always")
def _walk_both(row, c0, c1, r, i, row0, col0, ids, keys, thresholds, threshold_bits, k, column_floors,
               rows, margin):
    for c in range(c0, c1):
        v = row[c]
        mine = v >= thresholds[r] - margin
        theirs = v >= column_floors[c]
        if not (mine or theirs):
            continue
        j = ids[col0 + c]
        s = similarity(rows, rows, row0 + i, col0 + c, r, j)
        if mine and s >= thresholds[r]:
            offer_exact(keys, threshold_bits, r, s, j, k, False)
        if theirs and s >= thresholds[j]:
            offer_exact(keys, threshold_bits, j, s, r, k, False)
            column_floors[c] = thresholds[j] - margin


@njit(nogil=True, cache=True)
def merge_rows_and_columns(tile, row0, col0, ids, keys, thresholds, rows, margin):
    """Merge an off-diagonal tile of a symmetric product into both sides.

    Row ``ids[row0 + i]`` is offered candidate ``ids[col0 + c]`` and, by
    symmetry, the other way round, in one pass over the tile. Row floors
    are scalars; column floors are gathered into a contiguous vector, so the
    common no-survivor case is one vectorised ``v >= min(row floor, column
    floor)`` per chunk. A survivor is scored once by the reference (which
    is symmetric) and offered to the sides it can enter.

    Parameters
    ----------
    tile : ndarray of shape (bi, bj), float32, C-contiguous
        Products of positions ``row0 : row0 + bi`` with positions ``col0 :
        col0 + bj``; the two ranges must not overlap.
    row0, col0 : int
        Position of the tile's first row and first column.
    ids : ndarray of int64
        Id (state row) of each position.
    keys : ndarray of shape (n, k), int64
    thresholds : ndarray of shape (n,), float32
        Top-k state, updated in place.
    rows : tuple
        Scoring rows by position (:func:`allknn.topk.scoring.scoring_rows`).
    margin : float32
        As in :func:`merge_rows`.
    """
    bi, bj = tile.shape
    k = keys.shape[1]
    full = bj - bj % CHUNK
    threshold_bits = thresholds.view(np.int32)
    column_floors = np.empty(bj, dtype=np.float32)
    for c in range(bj):
        column_floors[c] = thresholds[ids[col0 + c]] - margin
    for i in range(bi):
        r = ids[row0 + i]
        row = tile[i]
        floor = thresholds[r] - margin
        for c0 in range(0, full, CHUNK):
            if _any_at_least_either(row, c0, floor, column_floors):
                _walk_both(row, c0, c0 + CHUNK, r, i, row0, col0, ids, keys, thresholds, threshold_bits, k,
                           column_floors, rows, margin)
                floor = thresholds[r] - margin
        if full < bj:
            _walk_both(row, full, bj, r, i, row0, col0, ids, keys, thresholds, threshold_bits, k,
                       column_floors, rows, margin)


@njit(nogil=True, cache=True)
def decode_rows(keys, similarities, r0, r1):
    """Turn state rows ``r0 : r1`` into the result, in place.

    Each row's keys are sorted best first (higher similarity, then smaller
    id: larger key) and replaced by the neighbour ids (-1 for empty slots,
    which come last); ``similarities`` gets their reference similarities
    (NaN for empty slots).

    Parameters
    ----------
    keys : ndarray of shape (n, k), int64
        State; rows ``r0 : r1`` become neighbour indices.
    similarities : ndarray of shape (n, k), float32
        Output.
    r0, r1 : int
    """
    k = keys.shape[1]
    for r in range(r0, r1):
        row = np.sort(keys[r])
        for m in range(k):
            key = row[k - 1 - m]
            j = _decode_id(key)
            if j == EMPTY_ID:
                keys[r, m] = -1
                similarities[r, m] = np.nan
            else:
                keys[r, m] = j
                similarities[r, m] = _key_similarity(key)


@njit(nogil=True, cache=True, inline="always")
def _key_similarity(key):
    return np.int32(_similarity_bits(key)).view(np.float32)


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
