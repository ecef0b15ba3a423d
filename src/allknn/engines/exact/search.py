"""Run the exact engine on a job: row order, sparse layout, tiles, checkpoints."""

from __future__ import annotations

import logging
import time

import numpy as np

from allknn.engines.base import Job, ProgressCallback
from allknn.engines.exact.plans import QueryJoinPlan, SelfJoinPlan, TilePlan
from allknn.engines.exact.sparse_layout import sparse_layout
from allknn.engines.kmeans import MIN_ROWS, cluster_order
from allknn.kernels.topk import new_state, permute_rows
from allknn.rows import NormalizedRows, is_sparse
from allknn.writers.checkpoint import Checkpoint, Progress

logger = logging.getLogger("allknn")


def exact_search(job: Job, *, checkpoint: Checkpoint | None = None,
                 on_tile: ProgressCallback | None = None) -> np.ndarray:
    """Exact top-k state of every query row of ``job`` among its corpus rows.

    In the self-join the rows are first grouped by cluster (in place,
    undone before returning) so that the top-k thresholds rise early; the
    result does not depend on that order. ``job.budget`` bounds the scratch
    memory of that clustering.

    Returns
    -------
    ndarray of shape (nq, k), int64
        The top-k state (see :mod:`allknn.kernels.topk`), by kept row.
    """
    queries, corpus, k = job.queries, job.corpus, job.k
    self_join, threads, budget = job.self_join, job.threads, job.budget
    block_rows = job.block_rows
    progress = checkpoint.restore() if checkpoint is not None and checkpoint.exists() else None
    order = None
    if self_join:
        if progress is not None:
            order = progress.order
        elif corpus.rows.shape[0] >= MIN_ROWS and not is_sparse(corpus.rows):
            order = cluster_order(corpus.rows, budget=budget)
    layout = None
    if is_sparse(corpus.rows):
        if progress is None:
            layout = sparse_layout(queries.rows, corpus.rows, k, skip_self=job.skip_self,
                                   budget=budget, threads=threads)
        elif progress.layout is None:
            raise ValueError(f"checkpoint {checkpoint.path} was written by an older allknn that did not "
                             "save the sparse layout; delete it to start over")
        else:
            layout = progress.layout
    plan: TilePlan
    if self_join:
        if order is not None:
            permute_rows(corpus.rows, order)
        plan = SelfJoinPlan(corpus.rows, corpus.norms, block_rows=block_rows, skip_self=job.skip_self,
                            ids=order, layout=layout)
    else:
        plan = QueryJoinPlan(queries.rows, corpus.rows, queries.norms, corpus.norms, block_rows=block_rows,
                             layout=layout)
    try:
        if progress is None:
            progress = Progress(*new_state(plan.n_queries, k), done=set(), order=order, layout=layout)
        _run(plan, progress, threads=threads, checkpoint=checkpoint, on_tile=on_tile)
        if plan.skips_untouched_pairs:
            plan.offer_untouched(progress.keys, progress.thresholds, threads=threads)
    finally:
        if order is not None:
            permute_rows(corpus.rows, np.argsort(order))
    return progress.keys


def estimate_self_join_seconds(corpus: NormalizedRows, k: int, *, block_rows: int, threads: int,
                               budget: int, share: float = 0.02) -> float:
    """Seconds the exact self-join of sparse rows would take, measured here.

    The plan is built as a run builds it (layout choice included); an evenly
    spread ``share`` of its tiles (at least eight per thread) warms the
    top-k state up, and a second such share is timed and scaled to all
    tiles (all are timed when there are fewer than sixteen per thread). The
    state is still colder than in a real run (more candidates pass the
    thresholds), so the estimate errs high, by up to about 2x.
    """
    started = time.perf_counter()
    layout = sparse_layout(corpus.rows, corpus.rows, k, skip_self=True, budget=budget, threads=threads)
    plan = SelfJoinPlan(corpus.rows, corpus.norms, block_rows=block_rows, layout=layout)
    setup = time.perf_counter() - started
    keys, thresholds = new_state(plan.n_queries, k)
    timed = plan.tiles
    if len(plan.tiles) >= 16 * threads:
        stride = max(2, min(round(1 / share), len(plan.tiles) // (8 * threads)))
        plan.run(keys, thresholds, threads=threads, tiles=plan.tiles[::stride])
        timed = plan.tiles[stride // 2 :: stride]
    started = time.perf_counter()
    plan.run(keys, thresholds, threads=threads, tiles=timed)
    return setup + (time.perf_counter() - started) * len(plan.tiles) / len(timed)


def _run(
    plan: TilePlan,
    progress: Progress,
    *,
    threads: int,
    checkpoint: Checkpoint | None,
    on_tile: ProgressCallback | None,
) -> None:
    """Run the plan's unfinished tiles; with a checkpoint, in saved batches.

    Between two batches no tile is in flight, so each saved state is
    exactly the merge of the saved finished tiles.
    """
    if progress.done:
        logger.info("resuming: %d of %d tiles done", len(progress.done), len(plan.tiles))
        if on_tile is not None:
            for tile in plan.tiles:
                if tile in progress.done:
                    on_tile(tile, plan.pairs(tile))
    remaining = [tile for tile in plan.tiles if tile not in progress.done]
    if checkpoint is None:
        plan.run(progress.keys, progress.thresholds, threads=threads, tiles=remaining, on_tile=on_tile)
        return
    batch = max(4 * threads, len(plan.tiles) // 200)
    for start in range(0, len(remaining), batch):
        tiles = remaining[start : start + batch]
        plan.run(progress.keys, progress.thresholds, threads=threads, tiles=tiles, on_tile=on_tile)
        progress.done.update(tiles)
        if checkpoint.due():
            checkpoint.save(progress)
    checkpoint.save(progress)
