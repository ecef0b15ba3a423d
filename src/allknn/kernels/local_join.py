"""Neighbour-of-neighbour refinement of a kNN graph (the NN-descent local join).

Two rows that are both neighbours of a third row are often neighbours of
each other. One refinement pass gathers, for every row ``v``, a candidate
list: its current neighbours and the rows that have ``v`` as a neighbour
(reverse neighbours), at most ``max_candidates`` of each kind, sampled by a
seeded hash. It then scores every pair inside each list and offers each
pair to both of its rows. Only pairs with at least one *new* member (a
neighbour that arrived since the previous pass) are scored, so later passes
cost less as the graph settles.

A pass runs in chunks of rows. Within a chunk, pairs are scored in parallel
against the thresholds as they stood when the chunk began, and the pairs
that could enter a top-k are then merged, each thread owning the state rows
``r`` with ``r % threads == t``. So no two threads touch a row at once, and
the result does not depend on the thread count: the candidates offered are
fixed by the chunking, and a row's top-k does not depend on the order of
its offers.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from allknn.kernels.reference import similarity
from allknn.kernels.topk import EMPTY_ID, offer_new

CHUNK_PAIRS = 2**19
"""Pairs scored before their offers are merged (at most two 12-byte records
each); a chunk ends at the row that reaches it."""


@njit(nogil=True, cache=True, inline="always")
def _priority(u, v, seed):
    """Seeded pseudo-random priority of the edge ``{u, v}`` (splitmix64 of
    the ordered pair, so both directions get the same priority)."""
    a, b = (u, v) if u < v else (v, u)
    z = np.uint64(a) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(b) + np.uint64(seed)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@njit(nogil=True, cache=True)
def reverse_neighbours(ids, is_new):
    """Every row's reverse neighbours (the rows listing it), with flags.

    Parameters
    ----------
    ids : ndarray of shape (n, k), uint32
        Current neighbours (``EMPTY_ID`` for empty slots).
    is_new : ndarray of shape (n, k), bool

    Returns
    -------
    starts : ndarray of shape (n + 1,), int64
        Row ``u``'s reverse neighbours are ``rows[starts[u] : starts[u + 1]]``.
    rows : ndarray of uint32
    flags : ndarray of bool
        Whether each of those edges is new.
    """
    n, k = ids.shape
    starts = np.zeros(n + 1, dtype=np.int64)
    for v in range(n):
        for m in range(k):
            u = np.int64(ids[v, m])
            if u != EMPTY_ID and u != v:
                starts[u + 1] += 1
    for u in range(n):
        starts[u + 1] += starts[u]
    fill = starts[:-1].copy()
    rows = np.empty(starts[n], dtype=np.uint32)
    flags = np.empty(starts[n], dtype=np.bool_)
    for v in range(n):
        for m in range(k):
            u = np.int64(ids[v, m])
            if u != EMPTY_ID and u != v:
                rows[fill[u]] = v
                flags[fill[u]] = is_new[v, m]
                fill[u] += 1
    return starts, rows, flags


@njit(nogil=True, cache=True, inline="always")
def _keep_lowest(pool, priorities, size, out, v):
    """Write the (at most ``out.shape[1]``) members of ``pool[:size]`` with
    the lowest priorities to ``out[v]``; return how many."""
    limit = out.shape[1]
    if size <= limit:
        for t in range(size):
            out[v, t] = pool[t]
        return size
    order = np.argsort(priorities[:size], kind="mergesort")
    for t in range(limit):
        out[v, t] = pool[order[t]]
    return limit


@njit(nogil=True, cache=True)
def candidate_lists(ids, is_new, starts, reverse, reverse_new, seed, v0, v1, new, old, new_counts,
                    old_counts):
    """Sample the new and old candidates of rows ``v0 : v1``.

    A row's candidates are its neighbours and its reverse neighbours, each
    once (new if any of its edges to the row is new); of each kind, the
    ``new.shape[1]`` with the lowest seeded edge priority are kept.

    Parameters
    ----------
    ids, is_new : ndarray of shape (n, k)
        As in :func:`reverse_neighbours`.
    starts, reverse, reverse_new
        From :func:`reverse_neighbours`.
    seed : int
    v0, v1 : int
    new, old : ndarray of shape (n, max_candidates), uint32
        Output candidate rows; the first ``new_counts[v]``
        (``old_counts[v]``) of row ``v`` are valid.
    new_counts, old_counts : ndarray of shape (n,), int64
    """
    k = ids.shape[1]
    most = k
    for v in range(v0, v1):
        most = max(most, k + starts[v + 1] - starts[v])
    pool = np.empty(most, dtype=np.int64)
    pool_new = np.empty(most, dtype=np.bool_)
    fresh = np.empty(most, dtype=np.int64)
    stale = np.empty(most, dtype=np.int64)
    fresh_priority = np.empty(most, dtype=np.uint64)
    stale_priority = np.empty(most, dtype=np.uint64)
    for v in range(v0, v1):
        size = 0
        for m in range(k):
            u = np.int64(ids[v, m])
            if u != EMPTY_ID and u != v:
                pool[size] = u
                pool_new[size] = is_new[v, m]
                size += 1
        for at in range(starts[v], starts[v + 1]):
            u = np.int64(reverse[at])
            duplicate = False
            for t in range(size):
                if pool[t] == u:
                    pool_new[t] |= reverse_new[at]
                    duplicate = True
                    break
            if not duplicate:
                pool[size] = u
                pool_new[size] = reverse_new[at]
                size += 1
        a = 0
        b = 0
        for t in range(size):
            if pool_new[t]:
                fresh[a] = pool[t]
                fresh_priority[a] = _priority(v, pool[t], seed)
                a += 1
            else:
                stale[b] = pool[t]
                stale_priority[b] = _priority(v, pool[t], seed)
                b += 1
        new_counts[v] = _keep_lowest(fresh, fresh_priority, a, new, v)
        old_counts[v] = _keep_lowest(stale, stale_priority, b, old, v)


@njit(nogil=True, cache=True, fastmath={"reassoc", "contract"})
def _dot(a, b):
    """Float32 dot product (not inlined: numba's IR inlining would drop the
    fastmath flags that let LLVM vectorise it)."""
    acc = np.float32(0.0)
    for t in range(a.shape[0]):
        acc += a[t] * b[t]
    return acc


@njit(nogil=True, cache=True)
def join_lists(rows, positions, new, old, new_counts, old_counts, thresholds, visit, v0, v1,
               offsets, targets, candidates, similarities, used, scoring, margin):
    """Score the pairs of the candidate lists of rows ``visit[v0 : v1]``.

    A pair ``(a, b)`` whose float32 dot product reaches a side's threshold
    less ``margin`` is scored by the reference, and recorded with that
    similarity ``s`` once for each side whose threshold ``s`` reaches:
    target ``a``, candidate ``b`` and the other way round. The records of row ``visit[i]`` go to
    ``offsets[i - v0]`` onwards and their number to ``used[i - v0]``.

    Parameters
    ----------
    rows : ndarray of shape (n, d), float32
        Unit-normalised rows, row id ``i`` at ``positions[i]``.
    positions : ndarray of shape (n,), int64
    new, old, new_counts, old_counts
        From :func:`candidate_lists`.
    thresholds : ndarray of shape (n,), float32
        Current k-th similarity of every row (read only).
    visit : ndarray of shape (n,), int64
        Order of the rows (similar rows together keep their candidates'
        vectors in cache).
    v0, v1 : int
    offsets : ndarray of int64
        Start of each row's records (room for two per pair).
    targets, candidates : ndarray of uint32
    similarities : ndarray of float32
        Records: state row, candidate id, similarity.
    used : ndarray of int64
    scoring : tuple
        ``rows`` as scoring rows, norms by id
        (:func:`allknn.topk.scoring.scoring_rows`).
    margin : float32
        Nomination margin of the float32 dot product.
    """
    d = rows.shape[1]
    size = new.shape[1] + old.shape[1]
    gathered = np.empty((size, d), dtype=np.float32)
    members = np.empty(size, dtype=np.int64)
    limits = np.empty(size, dtype=np.float32)
    for i in range(v0, v1):
        v = visit[i]
        a = new_counts[v]
        used[i - v0] = 0
        if a == 0:
            continue
        m = a + old_counts[v]
        for t in range(a):
            members[t] = new[v, t]
        for t in range(a, m):
            members[t] = old[v, t - a]
        for t in range(m):
            gathered[t] = rows[positions[members[t]]]
            limits[t] = thresholds[members[t]]
        out = offsets[i - v0]
        for p in range(a):
            x = members[p]
            for q in range(p + 1, m):
                y = members[q]
                v = _dot(gathered[p], gathered[q])
                if v < limits[p] - margin and v < limits[q] - margin:
                    continue
                s = similarity(scoring, scoring, positions[x], positions[y], x, y)
                if s >= limits[p]:
                    targets[out] = x
                    candidates[out] = y
                    similarities[out] = s
                    out += 1
                if s >= limits[q]:
                    targets[out] = y
                    candidates[out] = x
                    similarities[out] = s
                    out += 1
        used[i - v0] = out - offsets[i - v0]


@njit(nogil=True, cache=True)
def merge_records(offsets, used, targets, candidates, similarities, keys, thresholds, part, parts):
    """Offer the recorded pairs whose target ``r`` has ``r % parts == part``.

    A candidate already among the row's neighbours is not offered twice.
    """
    k = keys.shape[1]
    threshold_bits = thresholds.view(np.int32)
    bits = similarities.view(np.int32)
    for v in range(used.shape[0]):
        for at in range(offsets[v], offsets[v] + used[v]):
            r = np.int64(targets[at])
            if r % parts != part:
                continue
            offer_new(keys, threshold_bits, r, bits[at], np.int64(candidates[at]), k)


@njit(nogil=True, cache=True)
def new_flags(ids, previous):
    """Whether each neighbour in ``ids`` is absent from the row's ``previous``."""
    n, k = ids.shape
    flags = np.ones((n, k), dtype=np.bool_)
    for v in range(n):
        for m in range(k):
            for q in range(previous.shape[1]):
                if previous[v, q] == ids[v, m]:
                    flags[v, m] = False
                    break
    return flags
