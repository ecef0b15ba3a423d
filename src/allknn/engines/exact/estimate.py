"""How long the exact engine would take here: timed tiles of the real rows."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from allknn._blas import single_threaded_blas
from allknn.engines.exact.blocks import dense_product
from allknn.engines.exact.plans import SelfJoinPlan, TilePlan
from allknn.engines.exact.sparse_layout import sparse_layout
from allknn.kernels.topk import new_state
from allknn.rows import NormalizedRows

TIMED_TILES_PER_THREAD = 4
"""Tile products timed per thread, three times (the fastest counts), to
measure this machine's BLAS speed."""


def selection_factor(k: int, dim: int) -> float:
    """Run time over the matrix-product floor of the same tiles: the fused
    selection, re-scoring and ordering on top of BLAS (fitted to the
    benchmark tables: 1.35x at k=10 and 100 dimensions, 1.23x at 384; 2.0x
    and 1.5x at k=100)."""
    return 1.0 + 0.35 * (k / 10) ** 0.4 * (dim / 100) ** -0.45


def seconds_per_tile(rows: np.ndarray, block_rows: int, threads: int) -> float:
    """Wall seconds of one ``block_rows`` square tile product per thread,
    measured with every thread busy (single-threaded BLAS each)."""
    block = np.ascontiguousarray(rows[:block_rows])
    other = np.array(rows[-block_rows:], dtype=np.float32)  # another array: numpy makes a @ a.T by syrk
    outs = [np.empty((block.shape[0], other.shape[0]), dtype=np.float32) for _ in range(threads)]

    def products(worker: int) -> None:
        for _ in range(TIMED_TILES_PER_THREAD):
            dense_product(block, other, outs[worker])

    best = np.inf
    with single_threaded_blas(), ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(products, range(threads)))  # warm-up
        for _ in range(3):
            started = time.perf_counter()
            list(pool.map(products, range(threads)))
            best = min(best, time.perf_counter() - started)
    return best / TIMED_TILES_PER_THREAD


TIMED_SHARE = 0.02
"""Share of a plan's tiles :func:`timed_share_seconds` runs to warm the state
up, and again to time."""


def timed_share_seconds(plan: TilePlan, k: int, *, threads: int) -> float:
    """Seconds all of ``plan``'s tiles would take, from a timed share of them.

    An evenly spread ``TIMED_SHARE`` of the tiles (at least eight per thread)
    warms the top-k state up, and a second such share is timed and scaled
    to all tiles. With fewer than sixteen tiles per thread, one tile per
    thread loads the kernels (or a device's) and all tiles are timed, from
    an empty state as in a run. The warmed state is still colder than in a
    real run (more candidates pass the thresholds), so the estimate errs
    high, by up to about 2x.
    """
    keys, thresholds = new_state(plan.n_queries, k)
    timed = plan.tasks
    if len(plan.tasks) >= 16 * threads:
        stride = max(2, min(round(1 / TIMED_SHARE), len(plan.tasks) // (8 * threads)))
        plan.run(keys, thresholds, threads=threads, tasks=plan.tasks[::stride])
        timed = plan.tasks[stride // 2 :: stride]
    else:
        plan.run(*new_state(plan.n_queries, k), threads=threads, tasks=plan.tasks[:threads])
    started = time.perf_counter()
    plan.run(keys, thresholds, threads=threads, tasks=timed)
    return (time.perf_counter() - started) * len(plan.tasks) / len(timed)


def estimate_sparse_self_join_seconds(corpus: NormalizedRows, k: int, *, block_rows: int, threads: int,
                                      budget: int) -> float:
    """Seconds the exact self-join of sparse rows would take, measured here:
    the plan built as a run builds it (layout choice included, and timed),
    then :func:`timed_share_seconds`."""
    started = time.perf_counter()
    layout = sparse_layout(corpus.rows, corpus.rows, k, skip_self=True, budget=budget, threads=threads)
    plan = SelfJoinPlan(corpus.rows, corpus.norms, block_rows=block_rows, layout=layout)
    setup = time.perf_counter() - started
    return setup + timed_share_seconds(plan, k, threads=threads)
