"""The exact engine: every pair scored, in tiles, on this machine's CPUs."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar

import numpy as np
from threadpoolctl import threadpool_limits

from allknn._memory import working_bytes
from allknn.engines.base import Engine, Found, Job, ProgressCallback
from allknn.engines.exact.blocks import dense_product
from allknn.engines.exact.search import estimate_self_join_seconds, exact_search

EXACT_PAIR_DIMS_PER_SECOND = 5.5e10
"""Dense tile speed per thread, in (pairs x dimensions) per second, on the
benchmark machine (BENCHMARKS.md): a rough figure for other engines' models."""

TIMED_TILES_PER_THREAD = 4
"""Tile products timed per thread, three times (the fastest counts), to
measure this machine's BLAS speed."""


def selection_factor(k: int, dim: int) -> float:
    """Run time over the matrix-product floor of the same tiles: the fused
    selection, re-scoring and ordering on top of BLAS (fitted to the
    benchmark tables: 1.35x at k=10 and 100 dimensions, 1.23x at 384; 2.0x
    and 1.5x at k=100)."""
    return 1.0 + 0.35 * (k / 10) ** 0.4 * (dim / 100) ** -0.45


def _seconds_per_tile(rows: np.ndarray, block_rows: int, threads: int) -> float:
    """Wall seconds of one ``block_rows`` square tile product per thread,
    measured with every thread busy (single-threaded BLAS each)."""
    block = np.ascontiguousarray(rows[:block_rows])
    other = np.array(rows[-block_rows:], dtype=np.float32)  # another array: numpy makes a @ a.T by syrk
    outs = [np.empty((block.shape[0], other.shape[0]), dtype=np.float32) for _ in range(threads)]

    def products(worker: int) -> None:
        for _ in range(TIMED_TILES_PER_THREAD):
            dense_product(block, other, outs[worker])

    best = np.inf
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(products, range(threads)))  # warm-up
        for _ in range(3):
            started = time.perf_counter()
            list(pool.map(products, range(threads)))
            best = min(best, time.perf_counter() - started)
    return best / TIMED_TILES_PER_THREAD


class ExactEngine(Engine):
    """Symmetric tiles (self-join) or query x corpus tiles, fused selection,
    any subset of tiles per run (checkpoints)."""

    name: ClassVar[str] = "exact"
    exact: ClassVar[bool] = True
    checkpoints: ClassVar[bool] = True

    def refusal(self, job: Job) -> str | None:
        return None

    def working_bytes(self, job: Job) -> int:
        return working_bytes(job.block_rows, job.dim, job.threads, sparse=job.sparse)

    def estimate_seconds(self, job: Job) -> float:
        """Dense rows: this machine's BLAS time for the plan's tiles
        (a few tiles timed on the real rows) times :func:`selection_factor`.
        Sparse rows: a timed sample of the real plan's tiles (self-join; a
        query join is scaled by its share of pairs)."""
        if not job.sparse:
            side = min(job.block_rows, job.corpus.rows.shape[0], job.queries.rows.shape[0])
            tiles = job.pairs / (side * side)
            per_tile = _seconds_per_tile(job.corpus.rows, side, job.threads)
            return tiles * per_tile / job.threads * selection_factor(job.k, job.dim)
        seconds = estimate_self_join_seconds(job.corpus, min(job.k, job.corpus.rows.shape[0] - 1),
                                             block_rows=job.block_rows, threads=job.threads,
                                             budget=job.budget)
        n = job.corpus.rows.shape[0]
        return seconds * job.pairs / max(1, n * (n - 1) // 2)

    def search(self, job: Job, *, checkpoint: Any = None, on_tile: ProgressCallback | None = None) -> Found:
        return Found(keys=exact_search(job, checkpoint=checkpoint, on_tile=on_tile))
