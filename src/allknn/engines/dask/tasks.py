"""What the Dask workers run: read and normalise row blocks, join block
pairs into partial top-k states, merge them, finish a row block.

Every function here is a plain module function of small arguments (a
:class:`Block` names a range of a source on shared storage), so a task that
is lost with its worker, or run twice, is simply run again: a partial state
holds reference keys only, and :func:`allknn.kernels.topk.merge_states` is
associative and idempotent, so the merged state and the written part are
the same bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from allknn._blas import single_threaded_blas
from allknn.engines.exact.plans import PairPlan, QueryJoinPlan, SelfJoinPlan
from allknn.kernels.topk import (
    floored_state,
    merge_states,
    new_state,
    renumber,
    thresholds_of,
)
from allknn.readers.sources import RowSource
from allknn.rows.dense import normalize_dense_rows, row_norms
from allknn.topk.finish import mask_below, place_rows, sorted_neighbours
from allknn.writers.parts import write_part


@dataclass(frozen=True)
class Block:
    """Rows ``start:stop`` of a source (``data`` given instead for a dask array)."""

    source: RowSource | None
    start: int
    stop: int


@dataclass(frozen=True)
class JoinSpec:
    """What every pair task of one run needs besides its blocks."""

    k: int
    skip_self: bool
    block_rows: int
    threads: int
    cache_bytes: int = 0
    """Bytes of recently read normalised blocks a worker process keeps
    (:class:`RecentBlocks`), so that the next task of the run on the same
    block does not read and normalise it again."""
    run: str = ""
    """The run's token: cached blocks serve that run only (a later run may
    read a rewritten file at the same path)."""
    device: str | None = None
    """Run the tiles on this torch device of the worker (``"cuda"``, or
    ``"cpu"`` for CPU torch), in ``precision``; None: the CPU engine."""
    precision: str = "fp32"
    device_tasks: int = 1
    """Tasks that may run at once on one device: the threads of every
    worker process that shares it (:func:`allknn.engines.dask.run.device_choice`),
    each task's tiles sized from that share of its free memory."""


@dataclass(frozen=True)
class BlockScan:
    """What a first pass over a block found."""

    zero_rows: np.ndarray
    nonfinite_rows: np.ndarray
    digest: str


def _raw(block: Block, data: np.ndarray | None) -> np.ndarray:
    if data is not None:
        return np.asarray(data)
    try:
        return block.source.read(block.start, block.stop)
    except (OSError, ValueError) as exc:
        raise OSError(f"worker {socket.gethostname()} (pid {os.getpid()}) cannot read rows "
                      f"{block.start}..{block.stop - 1} of {block.source.describe()}: {exc}; every worker "
                      f"must read the input at the same path") from exc


def scan_block(block: Block, data: np.ndarray | None = None) -> BlockScan:
    """Bad rows (global row numbers) and a digest of a block's values."""
    raw = _raw(block, data)
    norms = row_norms(raw, 4096)
    finite = np.isfinite(norms)
    digest = hashlib.blake2b(f"{raw.shape}|{raw.dtype.str}".encode(), digest_size=16)
    digest.update(np.ascontiguousarray(raw).tobytes())
    return BlockScan(block.start + np.flatnonzero(finite & (norms == 0)),
                     block.start + np.flatnonzero(~finite), digest.hexdigest())


def normalised_block(block: Block, data: np.ndarray | None, block_rows: int):
    """The block's kept rows, unit-normalised, their norms and global ids."""
    raw = _raw(block, data)
    norms = row_norms(raw, block_rows)
    if not (np.isfinite(norms) & (norms > 0)).any():
        return np.zeros((0, raw.shape[1]), np.float32), np.zeros(0), np.zeros(0, np.int64)
    rows = normalize_dense_rows(raw, name="X", block_rows=block_rows, invalid="drop")
    kept = np.arange(raw.shape[0], dtype=np.int64) if rows.kept is None else rows.kept
    return rows.rows, rows.norms, block.start + kept


class RecentBlocks:
    """The normalised blocks this worker process read last for a run, least
    recently used dropped first, within a byte budget; read-only arrays,
    shared by the process's task threads."""

    def __init__(self) -> None:
        self._blocks: OrderedDict[tuple[str, Block, int], tuple[np.ndarray, ...]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, block: Block, data: np.ndarray | None, spec: JoinSpec) -> tuple[np.ndarray, ...]:
        """:func:`normalised_block`, from the cache where it holds the block for this run."""
        budget = spec.cache_bytes
        if data is not None or budget <= 0:  # a dask array's block comes with its task
            return normalised_block(block, data, spec.block_rows)
        key = (spec.run, block, spec.block_rows)
        with self._lock:
            if key in self._blocks:
                self._blocks.move_to_end(key)
                return self._blocks[key]
        found = normalised_block(block, None, spec.block_rows)
        for array in found:
            array.flags.writeable = False
        size = sum(array.nbytes for array in found)
        with self._lock:
            if key not in self._blocks and size <= budget:
                self._blocks[key], self._bytes = found, self._bytes + size
            while self._bytes > budget:
                _, dropped = self._blocks.popitem(last=False)
                self._bytes -= sum(array.nbytes for array in dropped)
        return found

    def clear(self, run: str) -> None:
        """Drop the blocks of ``run`` (at its end, on every worker)."""
        with self._lock:
            for key in [key for key in self._blocks if key[0] == run]:
                self._bytes -= sum(array.nbytes for array in self._blocks.pop(key))


def forget_run(run: str) -> None:
    """Drop this worker process's cached blocks of ``run`` (``client.run``)."""
    RECENT_BLOCKS.clear(run)


RECENT_BLOCKS = RecentBlocks()
"""This worker process's cache of normalised blocks."""


def pair_task(spec: JoinSpec, first: Block, second: Block | None, first_data: np.ndarray | None = None,
              second_data: np.ndarray | None = None, query: Block | None = None,
              query_data: np.ndarray | None = None,
              floors: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, ...]:
    """Partial top-k states of one task, keys by global row number.

    Self-join: ``second=None`` joins block ``first`` with itself and
    returns its state; otherwise the two blocks against each other,
    returning both states. Query form: ``query`` rows against corpus block
    ``first``, returning the query block's state.

    A pair of blocks, or a query block, may start from ``floors``, one
    array per returned state (:mod:`allknn.engines.dask.floors`: lower
    bounds of the rows' final k-th similarities, so that only candidates
    that can still make the top-k are kept; see
    :func:`allknn.kernels.topk.floored_state`).

    Returns
    -------
    tuple of ndarray of shape (kept rows, k), int64
    """
    with single_threaded_blas(), device_settings(spec):
        rows, norms, ids = RECENT_BLOCKS.get(first, first_data, spec)
        if query is not None:
            q_rows, q_norms, _ = RECENT_BLOCKS.get(query, query_data, spec)
            keys, thresholds = _start(q_rows.shape[0], spec.k, floors)
            if rows.shape[0] and q_rows.shape[0]:
                query_plan(spec, q_rows, rows, q_norms, norms).run(keys, thresholds, threads=spec.threads)
            return (renumber(keys, ids),)
        if second is None:
            keys, thresholds = new_state(rows.shape[0], spec.k)
            if rows.shape[0]:
                _self_plan(spec, rows, norms).run(keys, thresholds, threads=spec.threads)
            return (renumber(keys, ids),)
        other, other_norms, other_ids = RECENT_BLOCKS.get(second, second_data, spec)
        keys, thresholds = _start(rows.shape[0] + other.shape[0], spec.k, floors)
        if rows.shape[0] and other.shape[0]:
            _pair_plan(spec, rows, other, norms, other_norms).run(keys, thresholds, threads=spec.threads)
        keys = renumber(keys, np.concatenate([ids, other_ids]))
        return keys[: rows.shape[0]], keys[rows.shape[0] :]


def _start(n: int, k: int, floors: tuple[np.ndarray, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """An empty state of ``n`` rows, or one floored at ``floors`` (concatenated)."""
    return new_state(n, k) if floors is None else floored_state(np.concatenate(floors), k)


def device_settings(spec: JoinSpec):
    """torch's settings for the spec's precision while a task's tiles run on a device (else nothing)."""
    if spec.device is None:
        return contextlib.nullcontext()
    from allknn.engines.torch.product import torch_settings

    return torch_settings(spec.precision)


def _device_options(spec: JoinSpec, *rows: np.ndarray) -> dict:
    from allknn.engines.torch.devices import task_plan_options

    return task_plan_options(spec.device, spec.precision, spec.k, spec.threads, spec.block_rows, rows,
                             tasks_at_once=spec.device_tasks)


def _self_plan(spec: JoinSpec, rows: np.ndarray, norms: np.ndarray):
    if spec.device is None:
        return SelfJoinPlan(rows, norms, block_rows=spec.block_rows, skip_self=spec.skip_self)
    from allknn.engines.torch.plans import DeviceSelfJoinPlan

    return DeviceSelfJoinPlan(rows, norms, skip_self=spec.skip_self, ids=None, **_device_options(spec, rows))


def query_plan(spec: JoinSpec, queries: np.ndarray, rows: np.ndarray, query_norms: np.ndarray,
                norms: np.ndarray):
    """The tiles of ``queries`` against ``rows``: the CPU engine's, or the
    torch engine's on the spec's device."""
    if spec.device is None:
        return QueryJoinPlan(queries, rows, query_norms, norms, block_rows=spec.block_rows)
    from allknn.engines.torch.plans import DeviceQueryJoinPlan

    return DeviceQueryJoinPlan(queries, rows, query_norms, norms, **_device_options(spec, queries, rows))


def _pair_plan(spec: JoinSpec, first: np.ndarray, second: np.ndarray, first_norms: np.ndarray,
               second_norms: np.ndarray):
    if spec.device is None:
        return PairPlan(first, second, first_norms, second_norms, block_rows=spec.block_rows)
    from allknn.engines.torch.plans import DevicePairPlan

    return DevicePairPlan(first, second, first_norms, second_norms, **_device_options(spec, first, second))


def timed_pair_task(spec: JoinSpec, first: Block, second: Block | None,
                    floors: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> tuple[tuple[np.ndarray, ...], float]:
    """:func:`pair_task` and the seconds it took where it ran (for estimates)."""
    started = time.perf_counter()
    result = pair_task(spec, first, second, floors=floors)
    return result, time.perf_counter() - started


def floors_task(state: tuple[np.ndarray, ...] | np.ndarray) -> np.ndarray:
    """The thresholds of a row block's state: the first of a :func:`pair_task`
    result (an own join's, or a query join's), or a :func:`merge_task` result;
    lower bounds of the rows' final ``k``-th similarities."""
    return thresholds_of(state if isinstance(state, np.ndarray) else state[0])


def timed_floors_task(own: tuple[tuple[np.ndarray], float]) -> np.ndarray:
    """:func:`floors_task` of a :func:`timed_pair_task`."""
    return floors_task(own[0])


def warm_up(spec: JoinSpec) -> None:
    """Load the compiled kernels in this worker (outside any timing)."""
    rows = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
    source = np.asarray(rows)
    pair_task(spec, Block(None, 0, 150), Block(None, 150, 300), source[:150], source[150:])


def merge_task(*parts: tuple[tuple[np.ndarray, ...], int] | np.ndarray) -> np.ndarray:
    """Merge partial states: each part is a merged state, or a pair task's
    result and which of its states to take."""
    states = [part if isinstance(part, np.ndarray) else part[0][part[1]] for part in parts]
    merged = states[0]
    for state in states[1:]:
        merged = merge_states(merged, state)
    return merged


def finish_task(keys: np.ndarray, block: Block, bad_rows: np.ndarray, *, min_similarity: float | None,
                folder: str | None, part: int, n_corpus: int, n_rows: int, labels: dict[str, str | None],
                params: dict) -> tuple[np.ndarray, np.ndarray] | dict:
    """A row block's result from its merged state: its part written to
    ``folder`` with the folder's ``labels`` (returning the manifest entry),
    or its arrays."""
    indices, similarities = sorted_neighbours(keys.copy())
    kept = np.setdiff1d(np.arange(block.start, block.stop), bad_rows) - block.start if bad_rows.size else None
    indices, similarities = place_rows(indices, similarities, kept, block.stop - block.start)
    indices, similarities = mask_below(indices, similarities, min_similarity)
    if folder is None:
        return indices, similarities
    return write_part(folder, part, block.start, indices, similarities, n_corpus=n_corpus, params=params,
                      n_rows=n_rows, labels=labels)
