"""The approximate engine: cells (spherical k-means), probing, refinement, measured recall."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from allknn import _validate
from allknn.engines.approx.search import RECALL_SAMPLE_ROWS, approx_search, approx_working_bytes
from allknn.engines.base import Engine, Found, Job, ProgressCallback
from allknn.engines.exact import EXACT_PAIR_DIMS_PER_SECOND

ROWS_SCANNED_PER_SQRT_N = 8
"""At recall 0.95 a row is scanned against about this many times sqrt(n)
corpus rows (some 16 of the 2 sqrt(n) cells, BENCHMARKS.md)."""


class ApproxEngine(Engine):
    """Cells probed round by round, neighbour-of-neighbour refinement, a
    pilot sample choosing the breadth and an audit sample measuring recall."""

    name: ClassVar[str] = "approx"
    exact: ClassVar[bool] = False
    options: ClassVar[Mapping[str, Any]] = {
        "recall_target": lambda value: _validate.check_fraction(value, "recall_target"),
        "probes": lambda value: _validate.check_optional_count(value, "probes"),
        "refine": lambda value: _validate.check_count(value, "refine"),
        "cells": lambda value: _validate.check_optional_count(value, "cells"),
    }

    def check_combination(self, options: Mapping[str, Any]) -> None:
        if options.get("refine") is not None and options.get("probes") is None:
            raise ValueError("refine= needs probes=; with recall_target the engine chooses its passes itself")

    def refusal(self, job: Job) -> str | None:
        if job.sparse:
            return "supports dense rows only; use method='exact' for sparse input"
        if job.options.get("refine") and not job.self_join:
            return ("cannot refine a query join: refine= works in the self-join only (it follows the "
                    "corpus's own kNN graph)")
        return None

    def working_bytes(self, job: Job) -> int:
        return approx_working_bytes(job)

    def estimate_seconds(self, job: Job) -> float:
        """Probing tiles at the exact engine's speed per pair, plus the two
        exact samples (pilot and audit)."""
        n, nq = job.corpus.rows.shape[0], job.queries.rows.shape[0]
        pairs = nq * min(n, ROWS_SCANNED_PER_SQRT_N * n**0.5) + 2 * min(nq, RECALL_SAMPLE_ROWS) * n
        return pairs * job.dim / (EXACT_PAIR_DIMS_PER_SECOND * job.threads)

    def search(self, job: Job, *, checkpoint: Any = None, on_tile: ProgressCallback | None = None) -> Found:
        keys, recall, plan = approx_search(job)
        params = {"recall": recall.estimate, "recall_interval": list(recall.interval), "cells": plan.cells,
                  "probes": plan.probes, "refine": plan.refine, "seed": job.seed}
        return Found(keys=keys, params=params, recall=recall)
