"""``neighbors()``: validate, normalise, run the engine, return a TopK."""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from numpy.typing import ArrayLike

from allknn import _validate
from allknn._memory import choose_block_rows, parse_memory
from allknn._normalize import NormalizedRows, normalize_rows
from allknn._checkpoint import Checkpoint, Progress, fingerprint_matrix
from allknn.engines.exact import ProgressCallback, QueryJoinPlan, SelfJoinPlan, TilePlan
from allknn.kernels.topk import new_state, rescore_and_sort
from allknn.result import TopK

logger = logging.getLogger("allknn")

_RESCORE_ROWS = 8192


def neighbors(
    X: ArrayLike,
    k: int = 10,
    *,
    queries: ArrayLike | None = None,
    exclude_self: bool = True,
    max_memory: str | int = "1GB",
    threads: int | None = None,
    invalid: str = "raise",
    min_similarity: float | None = None,
    block_rows: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    on_tile: ProgressCallback | None = None,
) -> TopK:
    """Find the ``k`` most cosine-similar rows of ``X`` for every row.

    Exact: every pair is scored. The self-join computes only half of the
    symmetric similarity matrix; selection is fused into the product tiles.

    Parameters
    ----------
    X : array-like of shape (n, d)
        Corpus, any real dtype (float16/32/64 are read without a copy;
        memory maps are read block by block).
    k : int
        Neighbours per row, ``1 <= k <= n - 1`` in the self-join (``n``
        with ``exclude_self=False`` or with ``queries``).
    queries : array-like of shape (nq, d), optional
        Search these rows against ``X`` instead of ``X`` against itself.
        Passing ``X`` itself is the self-join.
    exclude_self : bool
        In the self-join, never list a row as its own neighbour (exact
        duplicates of it are other rows and are listed, with similarity 1).
    max_memory : str or int
        Budget for working memory beyond the inputs, their normalised
        float32 copies and the result, e.g. ``"1GB"`` or bytes.
    threads : int, optional
        Worker threads; default the usable CPUs. BLAS runs single-threaded
        inside each worker.
    invalid : {"raise", "drop"}
        All-zero rows and rows holding NaN or Inf raise ``ValueError``
        (default), or are dropped: a dropped query row gets index -1 and
        similarity NaN, and a dropped corpus row is nobody's neighbour.
    min_similarity : float, optional
        Neighbours less similar than this are masked (index -1, similarity
        NaN); rows keep their length ``k``.
    block_rows : int, optional
        Rows per tile side; default from ``max_memory`` and the cache. The
        result does not depend on it.
    checkpoint : path-like, optional
        Save progress to this file every few seconds; if the file exists
        (from a killed run with the same input and parameters) the run
        resumes from it and returns exactly what an uninterrupted run would.
        The file is left in place; delete it once the result is stored.
    on_tile : callable, optional
        ``on_tile(tile, pairs)`` after each finished tile (for progress),
        including, at the start, each tile restored from a checkpoint.

    Returns
    -------
    TopK
        ``indices`` (nq, k) int64 and ``similarities`` (nq, k) float32, best
        first. Ties are broken by the smaller index, so the result does not
        depend on ``block_rows``, ``threads`` or the query form. Final
        similarities are re-scored in float64 (exact duplicates score 1.0).

    Raises
    ------
    TypeError
        Non-numeric input, or ``k`` not an integer.
    ValueError
        Input not 2-D or empty, mismatched dimensions, zero or NaN/Inf rows
        (with ``invalid="raise"``), ``k`` out of range, a budget too small.
    """
    corpus = _validate.as_matrix(X, "X")
    self_join = queries is None or queries is X
    query_matrix = corpus if self_join else _validate.as_matrix(queries, "queries")
    _validate.check_same_width(corpus, query_matrix)
    n_threads = _validate.check_threads(threads)
    invalid = _validate.check_invalid_choice(invalid)
    budget = parse_memory(max_memory)
    if block_rows is None:
        block_rows = choose_block_rows(budget, corpus.shape[1], n_threads)
    elif int(block_rows) < 1:
        raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}")

    started = time.perf_counter()
    normed = normalize_rows(corpus, name="X", block_rows=block_rows, invalid=invalid)
    n_candidates = normed.rows.shape[0] - (1 if self_join and exclude_self else 0)
    k = _validate.check_k(k, n_candidates, self_join=self_join and exclude_self)
    if self_join:
        query_normed = normed
    else:
        query_normed = normalize_rows(query_matrix, name="queries", block_rows=block_rows, invalid=invalid)

    logger.debug(
        "exact %s: %d x %d against %d rows, k=%d, block_rows=%d, threads=%d",
        "self-join" if self_join else "query join", query_normed.rows.shape[0],
        corpus.shape[1], normed.rows.shape[0], k, block_rows, n_threads,
    )
    plan: TilePlan
    if self_join:
        plan = SelfJoinPlan(normed.rows, block_rows=block_rows, exclude_self=exclude_self)
    else:
        plan = QueryJoinPlan(query_normed.rows, normed.rows, block_rows=block_rows)
    params = {"k": k, "method": "exact", "exclude_self": bool(exclude_self and self_join),
              "invalid": invalid, "min_similarity": min_similarity}
    if checkpoint is None:
        heap_sim, heap_idx = new_state(query_normed.rows.shape[0], k)
        plan.run(heap_sim, heap_idx, threads=n_threads, on_tile=on_tile)
    else:
        fingerprint = {
            **params, "block_rows": block_rows, "X": fingerprint_matrix(corpus),
            "queries": None if self_join else fingerprint_matrix(query_matrix),
        }
        heap_sim, heap_idx = _run_with_checkpoint(
            plan, Checkpoint(checkpoint, fingerprint), k, threads=n_threads, on_tile=on_tile
        )
    finish(heap_sim, heap_idx, query_normed, normed, threads=n_threads)
    indices, similarities = _to_original_rows(heap_idx, heap_sim, query_normed, normed)
    if min_similarity is not None:
        below = ~(similarities >= min_similarity)  # NaN padding stays masked
        indices[below] = -1
        similarities[below] = np.nan
    logger.info("exact search of %d rows done in %.2f s", indices.shape[0], time.perf_counter() - started)
    return TopK(
        indices=indices,
        similarities=similarities,
        n_corpus=corpus.shape[0],
        params=params,
    )


def _run_with_checkpoint(
    plan: TilePlan, checkpoint: Checkpoint, k: int, *, threads: int, on_tile: ProgressCallback | None
) -> tuple[np.ndarray, np.ndarray]:
    """Run a plan in batches of tiles, saving the state between batches.

    Between two batches no tile is in flight, so the saved state is exactly
    the merge of the saved finished tiles.
    """
    if checkpoint.exists():
        progress = checkpoint.restore()
        logger.info("resuming from %s: %d of %d tiles done", checkpoint.path, len(progress.done),
                    len(plan.tiles))
        if on_tile is not None:
            for tile in plan.tiles:
                if tile in progress.done:
                    on_tile(tile, plan.pairs(tile))
    else:
        progress = Progress(*new_state(plan.n_queries, k), done=set())
    remaining = [tile for tile in plan.tiles if tile not in progress.done]
    batch = max(4 * threads, len(plan.tiles) // 200)
    for start in range(0, len(remaining), batch):
        tiles = remaining[start : start + batch]
        plan.run(progress.heap_sim, progress.heap_idx, threads=threads, tiles=tiles, on_tile=on_tile)
        progress.done.update(tiles)
        if checkpoint.due():
            checkpoint.save(progress)
    checkpoint.save(progress)
    return progress.heap_sim, progress.heap_idx


def finish(
    heap_sim: np.ndarray,
    heap_idx: np.ndarray,
    queries: NormalizedRows,
    corpus: NormalizedRows,
    *,
    threads: int,
) -> None:
    """Turn a top-k state into the sorted, float64-rescored result in place."""
    def rescore(start: int) -> None:
        stop = start + _RESCORE_ROWS
        rescore_and_sort(
            corpus.rows, corpus.norms, queries.rows, queries.norms, start,
            heap_sim[start:stop], heap_idx[start:stop],
        )

    starts = range(0, heap_sim.shape[0], _RESCORE_ROWS)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(rescore, starts))


def _to_original_rows(
    indices: np.ndarray, similarities: np.ndarray, queries: NormalizedRows, corpus: NormalizedRows
) -> tuple[np.ndarray, np.ndarray]:
    """Map kept-row numbers back to input row numbers; dropped queries get -1/NaN."""
    if corpus.kept is not None:
        present = indices >= 0
        indices[present] = corpus.kept[indices[present]]
    if queries.kept is None:
        return indices, similarities
    full_indices = np.full((queries.n_original, indices.shape[1]), -1, dtype=np.int64)
    full_similarities = np.full((queries.n_original, indices.shape[1]), np.nan, dtype=np.float32)
    full_indices[queries.kept] = indices
    full_similarities[queries.kept] = similarities
    return full_indices, full_similarities
