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

import dataclasses
import importlib.util
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import numpy as np

from allknn.engines.base import Job
from allknn.engines.exact import ExactEngine
from allknn.engines.exact.estimate import timed_share_seconds
from allknn.engines.exact.plans import TilePlan
from allknn.engines.torch.devices import (
    CUDA_LANES,
    device_block_rows,
    free_device_bytes,
    lanes_for,
    parse_devices,
)
from allknn.engines.torch.plans import DeviceQueryJoinPlan, DeviceSelfJoinPlan
from allknn.engines.torch.product import PRECISIONS, torch_settings
from allknn.rows import NormalizedRows


def _check_device(value: object) -> str:
    return ",".join(parse_devices(value))


def _check_resident(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"resident must be True or False (None: by free device memory), got {value!r}")
    return value


ESTIMATE_BLOCKS = 8
"""Row blocks of the rows the time estimate's plan holds (the first ones)."""

RESIDENT_SHARE = 0.5
"""The rows stay on the device when they take at most this share of its free memory."""


def resolved_precision(device: str, precision: str | None) -> str:
    """The products' precision on ``device`` (its first, if several):
    ``precision``, or for ``"auto"`` (and None) fp32 on CPU, bf16 on CUDA."""
    if precision not in (None, "auto"):
        return precision
    return "fp32" if device.split(",")[0].strip() == "cpu" else "bf16"


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
        devices = self._devices(job)
        if devices[0].startswith("cuda"):
            import torch

            if not torch.cuda.is_available():
                return "found no CUDA device (torch.cuda.is_available() is False); use device='cpu'"
            missing = [d for d in devices if torch.device(d).index is not None
                       and torch.device(d).index >= torch.cuda.device_count()]
            if missing:
                return (f"found {torch.cuda.device_count()} CUDA device(s), so {', '.join(missing)} does not "
                        f"exist")
        return None

    def _devices(self, job: Job) -> tuple[str, ...]:
        return parse_devices(job.options.get("device") or "cpu")

    def _free_bytes(self, job: Job) -> int | None:
        """Free memory of the CUDA device with the least (None on the CPU)."""
        devices = self._devices(job)
        if not devices[0].startswith("cuda"):
            return None
        return min(free_device_bytes(device) for device in devices)

    def _rows_bytes(self, job: Job) -> int:
        return job.corpus.rows.nbytes + (0 if job.self_join else job.queries.rows.nbytes)

    def _resident(self, job: Job) -> bool:
        """Whether the rows stay on the devices: the ``resident`` option, or
        whether they fit ``RESIDENT_SHARE`` of the free memory (always on CPU)."""
        chosen = job.options.get("resident")
        if chosen is not None:
            return chosen
        free = self._free_bytes(job)
        return free is None or self._rows_bytes(job) <= RESIDENT_SHARE * free

    def _block_rows(self, job: Job, resident: bool, saved: Mapping[str, np.ndarray] | None) -> int:
        """The tile side: a resumed plan's; on the CPU the job's (from
        ``max_memory``); on CUDA from the free device memory
        (:func:`device_block_rows`), unless ``block_rows=`` was given."""
        if saved is not None:  # a checkpoint from before tiles were sized by the device: the job's
            return int(saved["block_rows"][0]) if "block_rows" in saved else job.block_rows
        free = self._free_bytes(job)
        if free is None or job.block_rows_given:
            return job.block_rows
        n_rows = max(job.corpus.rows.shape[0], job.queries.rows.shape[0])
        return device_block_rows(free - (self._rows_bytes(job) if resident else 0), job.dim, CUDA_LANES,
                                 n_rows, streamed_budget=None if resident else job.budget)

    def _precision(self, job: Job) -> str:
        return resolved_precision(self._devices(job)[0], job.options.get("precision"))

    def make_plan(self, job: Job, order: np.ndarray | None, layout,
                  saved: Mapping[str, np.ndarray] | None) -> TilePlan:
        """Device plans: products and nominations on the devices' lanes (:mod:`.plans`)."""
        precision, resident = self._precision(job), self._resident(job)
        options = {"lanes": lanes_for(self._devices(job), precision, job.threads), "precision": precision,
                   "k": job.k, "resident": resident, "block_rows": self._block_rows(job, resident, saved)}
        corpus, queries = job.corpus, job.queries
        if job.self_join:
            return DeviceSelfJoinPlan(corpus.rows, corpus.norms, skip_self=job.skip_self, ids=order,
                                      **options)
        return DeviceQueryJoinPlan(queries.rows, corpus.rows, queries.norms, corpus.norms, **options)

    def estimate_seconds(self, job: Job) -> float:
        """The device plan's tiles timed on its devices, in its precision,
        scaled to the job's pairs.

        The plan holds the first ``ESTIMATE_BLOCKS`` row blocks only (of the
        queries and of the corpus), tiles as large as a run's, so that the
        estimate takes bounded time and memory whatever the input; a share
        of its tiles is timed
        (:func:`~allknn.engines.exact.estimate.timed_share_seconds`). Left
        out: the copy of the rows to the devices and the run's grouping of
        the rows by cluster, which raises the thresholds sooner (so the
        estimate errs high).
        """
        sample = self._first_blocks(job)
        with torch_settings(self._precision(job)):
            plan = self.make_plan(sample, None, None, None)
            seconds = timed_share_seconds(plan, sample.k, threads=job.threads)
        return seconds * job.pairs / max(1, sample.pairs)

    def _first_blocks(self, job: Job) -> Job:
        """``job`` on its first ``ESTIMATE_BLOCKS`` row blocks, tiles sized for the whole job."""
        block_rows = self._block_rows(job, self._resident(job), None)
        rows = ESTIMATE_BLOCKS * block_rows

        def first(side: NormalizedRows) -> NormalizedRows:
            return NormalizedRows(rows=side.rows[:rows], norms=side.norms[:rows], kept=None,
                                  n_original=min(rows, side.rows.shape[0]))

        corpus = first(job.corpus)
        queries = corpus if job.self_join else first(job.queries)
        k = min(job.k, corpus.rows.shape[0] - (1 if job.skip_self else 0))
        return dataclasses.replace(job, corpus=corpus, queries=queries, k=k, block_rows=block_rows,
                                   block_rows_given=True)

    @contextmanager
    def plan(self, job: Job, saved: Mapping[str, np.ndarray] | None) -> Iterator[TilePlan]:
        """The exact engine's plan, under :func:`.product.torch_settings`."""
        with torch_settings(self._precision(job)), super().plan(job, saved) as plan:
            yield plan

    def search(self, job: Job, **options):
        found = super().search(job, **options)
        found.params.update(device=",".join(self._devices(job)), precision=self._precision(job))
        return found
