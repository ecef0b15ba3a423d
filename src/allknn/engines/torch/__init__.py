"""The torch engine: the exact engine's tiles with products in torch, on CPU or a GPU.

The plan, the schedule, the fused selection and the certificate are the
exact engine's; only the tile product differs (:mod:`.product`): torch on
``device``, in ``precision``, with the nomination margin of that precision.
So the result equals the exact engine's, bit for bit, in every precision.
Select it with ``backend="torch"`` or a ``device=``; ``method="auto"`` never
picks it. torch is the optional extra ``allknn[gpu]``; nothing else imports
it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from allknn.engines.base import Job
from allknn.engines.exact import ExactEngine
from allknn.engines.exact.plans import TilePlan
from allknn.engines.torch.plans import DeviceQueryJoinPlan, DeviceSelfJoinPlan
from allknn.engines.torch.product import PRECISIONS


def _check_device(value: object) -> str:
    if not isinstance(value, str) or not (value == "cpu" or value == "cuda" or value.startswith("cuda:")):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {value!r}")
    return value


def _check_resident(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"resident must be True or False (None: by free device memory), got {value!r}")
    return value


RESIDENT_SHARE = 0.5
"""The rows stay on the device when they take at most this share of its free memory."""


def _check_precision(value: object) -> str:
    if value != "auto" and value not in PRECISIONS:
        names = ", ".join(map(repr, PRECISIONS))
        raise ValueError(f"precision must be 'auto' or one of {names}, got {value!r}")
    return str(value)


class TorchEngine(ExactEngine):
    """Exact tiles, products by torch (see the module docstring)."""

    name: ClassVar[str] = "torch"
    auto: ClassVar[bool] = False
    options: ClassVar[Mapping[str, Any]] = {"device": _check_device, "precision": _check_precision,
                                            "resident": _check_resident}

    def refusal(self, job: Job) -> str | None:
        if job.sparse:
            return "supports dense rows only; use backend='numba' (the default) for sparse input"
        if importlib.util.find_spec("torch") is None:
            return "needs torch, which is not installed; pip install 'allknn[gpu]' (or torch itself)"
        if self._device(job).startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                return "found no CUDA device (torch.cuda.is_available() is False); use device='cpu'"
        return None

    def _device(self, job: Job) -> str:
        return job.options.get("device") or "cpu"

    def _resident(self, job: Job) -> bool:
        """Whether the rows stay on the device: the ``resident`` option, or
        whether they fit ``RESIDENT_SHARE`` of its free memory (always on CPU)."""
        chosen = job.options.get("resident")
        if chosen is not None:
            return chosen
        device = self._device(job)
        if not device.startswith("cuda"):
            return True
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(device))
        size = job.corpus.rows.nbytes + (0 if job.self_join else job.queries.rows.nbytes)
        return size <= RESIDENT_SHARE * free

    def _precision(self, job: Job) -> str:
        precision = job.options.get("precision") or "auto"
        if precision == "auto":
            return "fp32" if self._device(job) == "cpu" else "bf16"
        return precision

    def make_plan(self, job: Job, order: np.ndarray | None, layout) -> TilePlan:
        """Device plans: products and nominations on the device (:mod:`.plans`)."""
        options = {"device": self._device(job), "precision": self._precision(job), "k": job.k,
                   "resident": self._resident(job)}
        corpus, queries = job.corpus, job.queries
        if job.self_join:
            return DeviceSelfJoinPlan(corpus.rows, corpus.norms, block_rows=job.block_rows,
                                      skip_self=job.skip_self, ids=order, **options)
        return DeviceQueryJoinPlan(queries.rows, corpus.rows, queries.norms, corpus.norms,
                                   block_rows=job.block_rows, **options)

    @contextmanager
    def plan(self, job: Job, saved: Mapping[str, np.ndarray] | None) -> Iterator[TilePlan]:
        """The exact engine's plan; torch runs one thread per tile worker, and
        CUDA matmuls use TF32 tensor cores for the lower precisions (set for
        the whole run, before any tile, and put back after)."""
        import torch

        threads, tf32 = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
        torch.set_num_threads(1)
        torch.backends.cuda.matmul.allow_tf32 = self._precision(job) != "fp32"  # once, before any tile
        try:
            with super().plan(job, saved) as plan:
                yield plan
        finally:
            torch.set_num_threads(threads)
            torch.backends.cuda.matmul.allow_tf32 = tf32

    def search(self, job: Job, **options):
        found = super().search(job, **options)
        found.params.update(device=self._device(job), precision=self._precision(job))
        return found
