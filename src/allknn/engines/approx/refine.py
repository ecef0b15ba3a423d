"""Neighbour-of-neighbour refinement passes over a self-join state (the
NN-descent local join), run on threads; the kernels are in
:mod:`allknn.kernels.local_join`, whose docstring describes a pass."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from allknn.kernels.local_join import (
    CHUNK_PAIRS,
    candidate_lists,
    join_lists,
    merge_records,
    new_flags,
    reverse_neighbours,
)
from allknn.kernels.topk import key_ids
from allknn.topk.bounds import nomination_margin
from allknn.topk.scoring import scoring_rows


def neighbour_ids(keys: np.ndarray) -> np.ndarray:
    """The ids of a state as uint32 (``EMPTY_ID`` for empty slots), shape (n, k)."""
    return key_ids(keys).astype(np.uint32)


def refine_bytes(n: int, k: int, max_candidates: int) -> int:
    """Peak scratch of :func:`refine` for ``n`` rows, with the caller's two
    id snapshots: ids (and their int64 decoding), flags, reverse lists,
    candidate lists, pair counts, and the records of one chunk at most (two
    per pair)."""
    ids = n * k * (4 + 4 + 8 + 1)
    reverse = n * 8 + n * k * 5
    lists = 2 * n * max_candidates * 4 + 3 * n * 8
    most_pairs = max_candidates * (max_candidates - 1) // 2 + max_candidates * max_candidates
    records = 2 * (CHUNK_PAIRS + most_pairs) * 12 + 3 * n * 8
    return ids + reverse + lists + records


def _sample_candidates(keys, previous, max_candidates, seed, pool, threads):
    """:func:`candidate_lists` of all rows, in parallel slices."""
    n = keys.shape[0]
    ids = neighbour_ids(keys)
    is_new = np.ones(ids.shape, dtype=np.bool_) if previous is None else new_flags(ids, previous)
    starts, reverse, reverse_new = reverse_neighbours(ids, is_new)
    new = np.empty((n, max_candidates), dtype=np.uint32)
    old = np.empty((n, max_candidates), dtype=np.uint32)
    new_counts = np.empty(n, dtype=np.int64)
    old_counts = np.empty(n, dtype=np.int64)
    step = -(-n // (8 * threads))
    list(pool.map(
        lambda s: candidate_lists(ids, is_new, starts, reverse, reverse_new, seed, s,
                                  min(n, s + step), new, old, new_counts, old_counts),
        range(0, n, step)))
    return new, old, new_counts, old_counts


def refinement_pass(
    rows: np.ndarray,
    positions: np.ndarray,
    order: np.ndarray,
    keys: np.ndarray,
    thresholds: np.ndarray,
    previous: np.ndarray | None,
    norms: np.ndarray,
    *,
    max_candidates: int,
    seed: int,
    threads: int,
) -> int:
    """One local-join pass over the self-join state ``keys``/``thresholds``.

    Parameters
    ----------
    rows : ndarray of shape (n, d), float32
        Unit-normalised rows, row id ``i`` (state row ``i``) at ``positions[i]``.
    positions : ndarray of shape (n,), int64
    order : ndarray of shape (n,), int64
        The inverse of ``positions``: row ids are visited in this order.
    keys : ndarray of shape (n, k), int64
    thresholds : ndarray of shape (n,), float32
        Top-k state, updated in place.
    previous : ndarray of shape (n, k), uint32, or None
        :func:`neighbour_ids` when the previous pass began (None: all new).
    norms : ndarray of shape (n,), float64
        Reference norms of the rows, by id.
    max_candidates : int
        Most new and most old candidates per row.
    seed : int
    threads : int

    Returns
    -------
    int
        Pairs scored.
    """
    with ThreadPoolExecutor(max_workers=threads) as pool:
        lists = _sample_candidates(keys, previous, max_candidates, seed, pool, threads)
        new_counts, old_counts = lists[2], lists[3]
        pairs = new_counts * (new_counts - 1) // 2 + new_counts * old_counts
        for v0, v1 in _chunks(pairs[order]):
            _join_and_merge(rows, positions, order[v0:v1], lists, pairs, keys, thresholds, pool,
                            threads, scoring_rows(rows, norms))
    return int(pairs.sum())


def _chunks(visited_pairs: np.ndarray) -> list[tuple[int, int]]:
    """Consecutive ranges of visited rows with about ``CHUNK_PAIRS`` pairs each."""
    total = np.cumsum(visited_pairs)
    ends = np.searchsorted(total, np.arange(1, total[-1] // CHUNK_PAIRS + 1) * CHUNK_PAIRS) + 1
    bounds = np.unique(np.r_[0, ends, visited_pairs.size])
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True))


def _join_and_merge(rows, positions, visit, lists, pairs, keys, thresholds, pool, threads,
                    scoring) -> None:
    """Score the pairs of the rows ``visit`` in parallel slices, then merge
    the records, each thread owning the state rows ``r % threads``."""
    new, old, new_counts, old_counts = lists
    offsets = np.zeros(visit.size + 1, dtype=np.int64)
    np.cumsum(2 * pairs[visit], out=offsets[1:])
    targets = np.empty(offsets[-1], dtype=np.uint32)
    candidates = np.empty(offsets[-1], dtype=np.uint32)
    similarities = np.empty(offsets[-1], dtype=np.float32)
    used = np.zeros(visit.size, dtype=np.int64)
    step = -(-visit.size // threads)

    def join(s: int) -> None:
        join_lists(rows, positions, new, old, new_counts, old_counts, thresholds, visit, s,
                   min(visit.size, s + step), offsets[s:], targets, candidates, similarities,
                   used[s:], scoring, nomination_margin(rows.shape[1]))

    def merge(part: int) -> None:
        merge_records(offsets, used, targets, candidates, similarities, keys, thresholds, part,
                      threads)

    list(pool.map(join, range(0, visit.size, step)))
    list(pool.map(merge, range(threads)))
