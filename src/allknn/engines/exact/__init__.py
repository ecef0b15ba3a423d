"""The exact engine: every pair scored, in tiles, on this machine's CPUs."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import ClassVar

import numpy as np

from allknn._memory import tile_scratch_bytes
from allknn.engines.base import Job
from allknn.engines.exact.estimate import (
    estimate_sparse_self_join_seconds,
    seconds_per_tile,
    selection_factor,
)
from allknn.engines.exact.plans import QueryJoinPlan, SelfJoinPlan, TilePlan
from allknn.engines.exact.sparse_layout import SparseLayout, sparse_layout
from allknn.engines.kmeans import MIN_ROWS, cluster_order
from allknn.engines.tasks import TiledEngine

EXACT_PAIR_DIMS_PER_SECOND = 5.5e10
"""Dense tile speed per thread, in (pairs x dimensions) per second, on the
benchmark machine (BENCHMARKS.md): a rough figure for other engines' models."""


class ExactEngine(TiledEngine):
    """Symmetric tiles (self-join) or query x corpus tiles, fused selection;
    tiles are the tasks (checkpoints, progress)."""

    name: ClassVar[str] = "exact"
    exact: ClassVar[bool] = True

    def refusal(self, job: Job) -> str | None:
        return None

    def working_bytes(self, job: Job) -> int:
        return tile_scratch_bytes(job.block_rows, job.dim, job.threads, sparse=job.sparse)

    def estimate_seconds(self, job: Job) -> float:
        """Dense rows: this machine's BLAS time for the plan's tiles
        (a few tiles timed on the real rows) times :func:`selection_factor`.
        Sparse rows: a timed sample of the real plan's tiles (self-join; a
        query join is scaled by its share of pairs)."""
        if not job.sparse:
            side = min(job.block_rows, job.corpus.rows.shape[0], job.queries.rows.shape[0])
            tiles = job.pairs / (side * side)
            per_tile = seconds_per_tile(job.corpus.rows, side, job.threads)
            return tiles * per_tile / job.threads * selection_factor(job.k, job.dim)
        seconds = estimate_sparse_self_join_seconds(
            job.corpus, min(job.k, job.corpus.rows.shape[0] - 1), block_rows=job.block_rows,
            threads=job.threads, budget=job.budget)
        n = job.corpus.rows.shape[0]
        return seconds * job.pairs / max(1, n * (n - 1) // 2)

    @contextmanager
    def plan(self, job: Job, saved: Mapping[str, np.ndarray] | None) -> Iterator[TilePlan]:
        """The tiles of ``job``.

        In a dense self-join of at least ``MIN_ROWS`` rows, the rows are
        grouped by cluster inside the ``with`` block, so that the top-k
        thresholds rise early (the result does not depend on that order);
        ``job.budget`` bounds the scratch memory of that clustering. Sparse
        rows get a column layout (:func:`sparse_layout`). A resumed run
        takes both from ``saved``; a sparse checkpoint without a layout gets
        a fresh one, since the result does not depend on it.
        """
        corpus, queries = job.corpus, job.queries
        if saved is not None:
            order = saved.get("order")
            order = order if order is not None and order.size else None  # earlier files: empty
        elif job.self_join and corpus.rows.shape[0] >= MIN_ROWS and not job.sparse:
            order = cluster_order(corpus.rows, budget=job.budget)
        else:
            order = None
        layout = None
        if job.sparse:
            layout = SparseLayout.from_state(saved or {}) or sparse_layout(
                queries.rows, corpus.rows, job.k, skip_self=job.skip_self, budget=job.budget,
                threads=job.threads)
        with corpus.reordered(order):
            yield self.make_plan(job, order, layout, saved)

    def make_plan(self, job: Job, order: np.ndarray | None, layout: SparseLayout | None,
                  saved: Mapping[str, np.ndarray] | None) -> TilePlan:
        """The tile plan of ``job`` with its rows in ``order`` (an engine
        with other tile products overrides this; ``saved`` is the resumed
        plan's state, whose order and layout are already applied)."""
        corpus, queries = job.corpus, job.queries
        if job.self_join:
            return SelfJoinPlan(corpus.rows, corpus.norms, block_rows=job.block_rows,
                                skip_self=job.skip_self, ids=order, layout=layout)
        return QueryJoinPlan(queries.rows, corpus.rows, queries.norms, corpus.norms,
                             block_rows=job.block_rows, layout=layout)
