"""The exact kNN graph on a Dask cluster: the client plans, workers read and join.

The data path is the local one cut into tasks. The rows are cut into row
blocks of ``task_rows`` (seconds of work per task, a few MB of state);

1. a scan task per block finds bad rows and a digest of the values (the
   client reads no rows, only file headers);
2. a pair task per block pair ``(i, j), i <= j`` of the symmetric schedule
   (or per (query block, corpus block) in the query form) reads its blocks
   where it runs, normalises them and joins them with the exact engine's
   tiles into partial top-k states of both blocks, starting from the
   newest floors of its blocks (:mod:`.floors`); the client submits them
   in waves, row block after row block (:mod:`.waves`);
3. the partial states of a row block are merged as they are submitted,
   eight at a time (:func:`allknn.kernels.topk.merge_states`, associative
   and idempotent);
4. a finish task per row block decodes its state and writes its parquet
   part (or returns its arrays), and the client records the part in the
   manifest (:mod:`allknn.writers.parts`) as it completes.

Data is never scattered from the client (the few small arrays the client
makes, such as the approximate engine's centroids, travel inside task specs
that the scheduler keeps): a worker that dies loses only
results, which the scheduler recomputes from the source (``retries`` covers
tasks that fail with it). A resumed run skips every row block the manifest
records, and every task whose blocks are all recorded.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from allknn import _validate
from allknn._memory import (
    BLOCK_MULTIPLE,
    choose_block_rows,
    parse_memory,
    round_block_rows,
    tile_scratch_bytes,
)
from allknn.engines.dask.floors import FloorsBook
from allknn.engines.dask.tasks import (
    Block,
    JoinSpec,
    finish_task,
    forget_run,
    pair_task,
    scan_block,
)
from allknn.engines.dask.waves import (
    BOOKKEEPING,
    PairJob,
    in_flight_for,
    last_jobs_for,
    near,
    run_in_waves,
)
from allknn.engines.exact import EXACT_PAIR_DIMS_PER_SECOND
from allknn.engines.schedule import block_bounds
from allknn.readers.sources import ParquetSource, open_source
from allknn.topk.result import TopK
from allknn.writers.json_text import dumps
from allknn.writers.parts import MANIFEST, Manifest, PartLabels

logger = logging.getLogger("allknn")

TASK_ROWS = 16384
"""Rows per task block at most: a 16k x 16k block pair at 100 dimensions is
about a second of one core, the size Dask's guidance asks of a task."""

RETRIES = 3
"""Times a failed task is retried (a task lost with its worker is
recomputed by the scheduler without counting)."""

TaskCallback = Callable[[str, int], None]
"""Called on the client as tasks finish: ``("pair", pairs)``, ``("probe", rows)`` (the
approximate engine's rows searched) or ``("part", rows)``."""


class Input:
    """One side of the join: a source on shared storage, or a dask array."""

    def __init__(self, data: Any, *, name: str, column: str | None):
        self.name = name
        self.array = None
        if _is_dask_array(data):
            if data.ndim != 2 or 0 in data.shape or any(math.isnan(s) for s in data.shape):
                raise ValueError(f"{name} has shape {data.shape}; it needs known rows x dimensions, both > 0")
            self.array, self.source, self.shape = data, None, (int(data.shape[0]), int(data.shape[1]))
            self.description = f"dask array {data.name}"
        elif isinstance(data, str | os.PathLike):
            self.source = open_source(data, column=column, name=name)
            self.shape, self.description = self.source.shape, self.source.describe()
        else:
            raise TypeError(f"with client=, {name} must be a path every worker can read (.npy, zarr, "
                            f".parquet, a folder or glob of .parquet files) or a dask array, got "
                            f"{type(data).__name__}; save it with numpy.save, or pass client=None to "
                            f"search it here")
        self.blocks: list[Block] = []
        self.data: list[Any] = []

    def cut(self, client, task_rows: int) -> None:
        """Cut into blocks; a dask array's blocks are computed on the workers."""
        bounds = block_bounds(self.shape[0], task_rows)
        self.blocks = [Block(self.source, a, b) for a, b in bounds]
        if self.array is None:
            self.data = [None] * len(bounds)
        else:
            pieces = self.array.rechunk({0: task_rows, 1: -1}).to_delayed().ravel().tolist()
            self.data = client.compute(pieces)


def _is_dask_array(data: Any) -> bool:
    array = type(data).__module__.startswith("dask.array")
    return array and hasattr(data, "chunks")


def task_rows_for(budget: int, dim: int, k: int, block_rows: int, n_rows: int) -> int:
    """Rows per task block: two blocks (float64 while normalised, float32
    rows) and their states fit in ``budget`` beside the tile scratch, at
    most ``TASK_ROWS`` and the rows there are, a multiple of 64.

    Raises
    ------
    ValueError
        If not even one tile's rows fit.
    """
    per_row = 2 * (dim * (8 + 4) + 3 * 8 * k)
    room = budget - tile_scratch_bytes(block_rows, dim, 1)
    rows = min(TASK_ROWS, max(0, room) // per_row, round_block_rows(n_rows))
    rows -= rows % BLOCK_MULTIPLE
    if rows < min(block_rows, round_block_rows(n_rows)):
        need = tile_scratch_bytes(block_rows, dim, 1) + block_rows * per_row
        raise ValueError(f"max_memory={budget} bytes is too small for one task at {dim} dimensions; give at "
                         f"least {need} bytes")
    return int(rows)


def task_sizes(budget: int, dim: int, k: object, n_rows: int, *, task_rows: int | None,
               block_rows: int | None = None) -> tuple[int, int]:
    """The tile side and the rows per task block of a cluster run: as
    given (rounded up to a multiple of 64), else from ``budget``
    (:func:`task_rows_for`); the tile no larger than a task block."""
    if block_rows is None:
        block_rows = choose_block_rows(budget // 2, dim, 1)
    block_rows = round_block_rows(block_rows)
    if task_rows is None:
        rows = task_rows_for(budget, dim, k if isinstance(k, int) else 1, block_rows, n_rows)
    else:
        rows = round_block_rows(_validate.check_optional_count(task_rows, "task_rows"))
    return min(block_rows, rows), rows


def check_fresh_output(output: str | os.PathLike[str] | None, resume: bool) -> None:
    """Refuse to write over an earlier run's parts folder unless resuming it."""
    if output is not None and not resume and (Path(output) / MANIFEST).exists():
        raise ValueError(f"{output} holds the output of an earlier run; pass resume=True (--resume) to "
                         f"continue it, or write to another folder")


def dask_neighbors(
    X: Any,
    k: int,
    *,
    client,
    queries: Any = None,
    exclude_self: bool = True,
    max_memory: str | int = "1GB",
    invalid: str = "raise",
    min_similarity: float | None = None,
    block_rows: int | None = None,
    task_rows: int | None = None,
    column: str | None = None,
    output: str | os.PathLike[str] | None = None,
    resume: bool = False,
    ids: Any = None,
    query_ids: Any = None,
    id_column: str | None = None,
    in_flight: int | None = None,
    device: str | None = None,
    precision: str | None = None,
    on_task: TaskCallback | None = None,
) -> TopK | None:
    """The exact top-k of every row of ``X`` (or of ``queries``), on a cluster.

    Parameters are those of :func:`allknn.neighbors`, with:

    X, queries : path-like or dask array
        A path every worker can read (``.npy``, ``.parquet``, a folder or
        glob of ``.parquet`` files) or a ``dask.array``.
    client : distributed.Client
    max_memory : str or int
        Working memory of one task (a worker runs one task per thread);
        each worker process also keeps up to this much of the blocks it
        read last, for the run's next tasks on them.
    task_rows : int, optional
        Rows per task block, rounded up to a multiple of 64 (default from
        ``max_memory``, at most ``TASK_ROWS``).
    column : str, optional
        The parquet embedding column.
    output : path-like, optional
        Write the result as a folder of parquet parts and a manifest
        (:mod:`allknn.writers.parts`) instead of returning it.
    resume : bool
        With ``output``: keep the parts a killed run of the same input and
        parameters recorded, and compute the rest.
    ids, query_ids : sequence, optional
        With ``output``: labels of the rows of ``X`` and of ``queries``,
        written in the parts instead of row numbers (as
        :meth:`TopK.save` does); the folder keeps them once.
    id_column : str, optional
        With ``output``: take the labels from this column of the parquet
        sources instead.
    device : str, optional
        Run every task's tiles with the torch engine on this device of its
        worker (``"cuda"``: one GPU per worker, e.g. dask-cuda's
        ``LocalCUDACluster``; ``"cpu"``: CPU torch), bit for bit the same
        result. Default: the CPU engine.
    precision : str, optional
        The products' precision on ``device`` (as for
        :func:`allknn.neighbors`; ``"auto"``: bf16 on CUDA, fp32 on CPU).
    in_flight : int, optional
        Unfinished pair tasks at most; the next are submitted as these
        finish (default: each worker thread's task and a quarter of a
        second of work behind it, see :func:`allknn.engines.dask.waves.in_flight_for`).
    on_task : callable, optional
        Progress: ``on_task(kind, count)`` on the client as tasks finish.

    Returns
    -------
    TopK or None
        The result (None with ``output``), equal bit for bit to the local
        engine's.
    """
    self_join = queries is None
    corpus = Input(X, name="X", column=column)
    query = corpus if self_join else Input(queries, name="queries", column=column)
    _validate.check_same_width(np.empty((0, corpus.shape[1])), np.empty((0, query.shape[1])))
    invalid = _validate.check_invalid_choice(invalid)
    min_similarity = _validate.check_min_similarity(min_similarity)
    budget = parse_memory(max_memory)
    tiles = device_choice(client, device, precision)
    block_rows, rows = task_sizes(budget, corpus.shape[1], k, max(corpus.shape[0], query.shape[0]),
                                  task_rows=task_rows, block_rows=block_rows)
    for side in {id(corpus): corpus, id(query): query}.values():
        side.cut(client, rows)
    labels = part_labels(corpus, query, ids, query_ids, id_column, output is not None, self_join)
    check_fresh_output(output, resume)

    scans, bad = {}, {}
    for side in {id(corpus): corpus, id(query): query}.values():
        scans[side.name], bad[side.name] = scan(client, side, invalid)
    n_candidates = corpus.shape[0] - bad["X"].size - (1 if self_join and exclude_self else 0)
    k = _validate.check_k(k, n_candidates, self_join=self_join and exclude_self)

    params = {"k": k, "method": "exact", "self_join": self_join,
              "exclude_self": self_join and bool(exclude_self), "invalid": invalid,
              "min_similarity": min_similarity, "engine": "dask", "task_rows": rows, "block_rows": block_rows}
    fingerprint = {**params, "X": scans_digest(scans["X"]),
                   "queries": None if self_join else scans_digest(scans["queries"]),
                   **({"labels": labels.digests} if labels.arrays else {})}
    params.update(device_params(tiles))  # not in the fingerprint: every device gives the same result
    manifest = None
    if output is not None:
        Path(output).mkdir(parents=True, exist_ok=True)
        header = {"k": k, "n_rows": query.shape[0], "n_corpus": corpus.shape[0], "params": params,
                  "labels": labels.columns}
        manifest = Manifest(output, fingerprint, header)
        if resume:
            manifest.resume()
        labels.write(output)
        manifest.save()
    done = set() if manifest is None else set(manifest.parts)
    token = hashlib.blake2b(dumps(fingerprint).encode(), digest_size=8).hexdigest()
    run = f"{token}-{uuid.uuid4().hex[:8]}"
    spec = JoinSpec(k=k, skip_self=self_join and bool(exclude_self), block_rows=block_rows, threads=1,
                    cache_bytes=budget, run=run, **tiles)

    todo = [b for b in range(len(query.blocks)) if b not in done]
    nthreads = client.nthreads()  # every worker (scheduler_info lists 5 in some releases)
    threads = sum(nthreads.values())
    task_seconds = rows * rows * corpus.shape[1] / EXACT_PAIR_DIMS_PER_SECOND  # a rough CPU figure
    in_flight = _validate.check_optional_count(in_flight, "in_flight") or in_flight_for(threads, task_seconds)
    floors = FloorsBook(client, retries=RETRIES, key=token)
    submit = _Submitter(client, spec, token, floors, list(nthreads))
    expected = {b: len(corpus.blocks) for b in todo}  # a row block meets every corpus block once
    if not todo:
        jobs = iter(())
    elif self_join:
        jobs = submit.self_join_jobs(corpus, set(todo))
    else:
        jobs = submit.query_join_jobs(query, corpus, todo, lead=in_flight // len(corpus.blocks) + 1)
    folder = None if output is None else str(Path(output).resolve())

    def finish(b: int, state: Any) -> Any:
        block = query.blocks[b]
        block_bad = bad[query.name][(bad[query.name] >= block.start) & (bad[query.name] < block.stop)]
        return client.submit(finish_task, state, block, block_bad, min_similarity=min_similarity,
                             folder=folder, part=b, n_corpus=corpus.shape[0], n_rows=query.shape[0],
                             labels=labels.columns, params=params, key=f"allknn-finish-{b}-{token}",
                             retries=RETRIES, priority=BOOKKEEPING)

    events = run_in_waves(client, jobs, expected, in_flight=in_flight, last_jobs=last_jobs_for(threads),
                          finish=finish, retries=RETRIES, key=token, floors=floors)
    results = {}
    try:
        for kind, count, value in events:
            if kind == "pair":
                if on_task is not None:
                    on_task("pair", count)
                continue
            if manifest is not None:
                manifest.add(count, value)
            else:
                results[count] = value
            if on_task is not None:
                on_task("part", query.blocks[count].stop - query.blocks[count].start)
    except BaseException:
        if manifest is not None:
            manifest.flush()  # the parts recorded since the last rewrite
        raise
    finally:
        events.close()  # submits nothing more when the loop stops early
        with contextlib.suppress(Exception):  # a lost cluster keeps nothing anyway
            client.run(forget_run, run)
    if manifest is not None:
        manifest.save(complete=True)
        return None
    indices = np.concatenate([results[b][0] for b in range(len(query.blocks))])
    similarities = np.concatenate([results[b][1] for b in range(len(query.blocks))])
    return TopK(indices=indices, similarities=similarities, n_corpus=corpus.shape[0], params=params)


class _Submitter:
    """The pair tasks of a run, as :class:`PairJob` s in row-block order,
    each starting from the newest floors of its blocks (:mod:`.floors`)."""

    def __init__(self, client, spec: JoinSpec, token: str, floors: FloorsBook, workers: list[str]):
        self.client, self.spec, self.token, self.floors = client, spec, token, floors
        self.workers = workers

    def _pair(self, name: str, priority: int, *args, **kwargs) -> Any:
        return self.client.submit(pair_task, self.spec, *args, key=f"allknn-pair-{name}-{self.token}",
                                  retries=RETRIES, priority=priority, **kwargs)

    def _first(self, i: int, name: str, priority: int, *args) -> Any:
        """Submit row block ``i``'s first task (its own join, or its query
        block against corpus block 0), whose state floors its later ones.

        It and its floors task are restricted loosely to a worker in turn
        (:func:`.waves.near`): unrestricted, Dask queued these tasks on the
        scheduler while the pairs, which depend on floors, went straight to
        the workers and ran first, and the last first tasks, with every
        pair waiting for them, ran at the end while one worker idled.
        """
        restriction = near(self.workers, i)
        future = self._pair(name, priority, *args, **restriction)
        self.floors.first(i, future, **restriction)
        return future

    def self_join_jobs(self, corpus: Input, todo: set[int]) -> Iterator[PairJob]:
        """Own joins first (their thresholds floor the pairs), then the pairs
        ``(i, j), i < j`` row by row, skipping those of finished blocks only."""
        blocks, data = corpus.blocks, corpus.data

        def pair(i: int, j: int, priority: int) -> Any:
            return self._pair(f"{i}-{j}", priority, blocks[i], blocks[j], data[i], data[j],
                              floors=(self.floors.best(i), self.floors.best(j)))

        for i in range(len(blocks)):
            yield PairJob(lambda p, i=i: self._first(i, f"{i}-{i}", p, blocks[i], None, data[i]),
                          ((i, 0),) if i in todo else (), _pairs(blocks[i], None), first=True)
        for i in range(len(blocks)):
            for j in range(i + 1, len(blocks)):
                if i not in todo and j not in todo:
                    continue
                targets = tuple((b, side) for side, b in enumerate((i, j)) if b in todo)
                yield PairJob(lambda p, i=i, j=j: pair(i, j, p), targets, _pairs(blocks[i], blocks[j]))

    def query_join_jobs(self, query: Input, corpus: Input, todo: list[int], *,
                        lead: int) -> Iterator[PairJob]:
        """Every (query block, corpus block) task, query block by query
        block. A query block's task against corpus block 0 floors its other
        tasks, so it is submitted ``lead`` query blocks ahead of them
        (about one window of unfinished tasks: it has finished when they
        start, and the first states held at once stay few)."""
        cblocks, cdata = corpus.blocks, corpus.data

        def first(i: int, priority: int) -> Any:
            args = (cblocks[0], None, cdata[0], None, query.blocks[i], query.data[i])
            if len(cblocks) == 1:  # nothing to floor
                return self._pair(f"{i}-0", priority, *args)
            return self._first(i, f"{i}-0", priority, *args)

        def task(i: int, j: int, priority: int) -> Any:
            return self._pair(f"{i}-{j}", priority, cblocks[j], None, cdata[j], None, query.blocks[i],
                              query.data[i], floors=(self.floors.best(i),))

        def first_job(i: int) -> PairJob:
            return PairJob(lambda p: first(i, p), ((i, 0),), _pairs(query.blocks[i], cblocks[0]), first=True)

        for at, i in enumerate(todo):
            if at == 0:
                yield from (first_job(b) for b in todo[:lead])
            if at + lead < len(todo):
                yield first_job(todo[at + lead])
            for j in range(1, len(cblocks)):
                yield PairJob(lambda p, i=i, j=j: task(i, j, p), ((i, 0),),
                              _pairs(query.blocks[i], cblocks[j]))


def device_choice(client, device: str | None, precision: str | None) -> dict[str, Any]:
    """The tasks' torch device and precision (none: the CPU engine), checked
    on every worker, and how many tasks may run at once on one device.

    Returns
    -------
    dict
        ``device``, ``precision`` and ``device_tasks`` (the fields of
        :class:`JoinSpec`), or nothing for the CPU engine.

    Raises
    ------
    ValueError
        A bad device or precision, several devices, or workers without
        torch or without the device (naming them).
    """
    if device is None:
        if precision is not None:
            raise ValueError("precision= is for the tiles on a device; give device= too")
        return {}
    from allknn.engines.torch import TorchEngine, resolved_precision
    from allknn.engines.torch.devices import parse_devices

    devices = parse_devices(device)
    if len(devices) > 1:
        raise ValueError(f"on a cluster each worker uses one device; give one (got {device!r}) and start "
                         f"one worker per GPU")
    precision = resolved_precision(devices[0], TorchEngine.options["precision"](precision or "auto"))
    checks = client.run(_device_check, devices[0])
    missing = {address: reason for address, (reason, _) in checks.items() if reason}
    if missing:
        raise ValueError("; ".join(f"worker {address} {reason}" for address, reason in missing.items()))
    nthreads = client.nthreads()
    shared = device_tasks({address: found for address, (_, found) in checks.items()},
                          {address: nthreads.get(address, 1) for address in checks})
    return {"device": devices[0], "precision": precision, "device_tasks": shared}


def device_params(tiles: dict[str, Any]) -> dict[str, Any]:
    """What a run's :func:`device_choice` adds to its result's params: the
    device and the precision."""
    return {name: tiles[name] for name in ("device", "precision") if name in tiles}


def device_tasks(devices: dict[str, str | None], threads: dict[str, int]) -> int:
    """The most tasks that may run at once on one device: the threads of
    the workers that found the same physical device (``devices``: an
    identity per worker address, None where it has none of its own, as
    CPU torch), summed per device.

    Two worker processes on one GPU (``dask worker --nworkers 2`` on a
    one-GPU machine) each see the device's whole free memory; sized from
    it, their tiles would take it twice.
    """
    per_device: dict[str, int] = {}
    alone = [threads[address] for address, found in devices.items() if found is None]
    for address, found in devices.items():
        if found is not None:
            per_device[found] = per_device.get(found, 0) + threads[address]
    return max([*per_device.values(), *alone, 1])


def _device_check(device: str) -> tuple[str | None, str | None]:
    """Why this worker cannot run tiles on ``device`` (None: it can), and
    which physical device it is (host and GPU UUID; None for the CPU), run
    on each worker."""
    try:
        import torch
    except ImportError:
        return "has no torch; pip install 'allknn[gpu]' on every worker", None
    if not device.startswith("cuda"):
        return None, None
    if not torch.cuda.is_available():
        return "has no CUDA device (torch.cuda.is_available() is False)", None
    index = torch.device(device).index
    if index is not None and index >= torch.cuda.device_count():
        return f"has {torch.cuda.device_count()} CUDA device(s), so no {device}", None
    properties = torch.cuda.get_device_properties(torch.cuda.current_device() if index is None else index)
    return None, f"{socket.gethostname()}/{getattr(properties, 'uuid', properties.name)}"


def part_labels(corpus: Input, query: Input, ids: Any, query_ids: Any, id_column: str | None, output: bool,
            self_join: bool) -> PartLabels:
    """The checked labels of the parts (from ``ids``/``query_ids`` or the sources' ``id_column``)."""
    given = ids is not None or query_ids is not None
    if (given or id_column is not None) and not output:
        raise ValueError("ids label the rows of the parts written to output=; without output= the result "
                         "holds row numbers: pass the ids to res.to_pandas(ids=...) or res.save(ids=...)")
    if id_column is not None:
        if given:
            raise ValueError("give ids either with id_column= or with ids=/query_ids=, not both")
        for side in {id(corpus): corpus, id(query): query}.values():
            if not isinstance(side.source, ParquetSource):
                raise ValueError(f"id_column= reads a column of parquet files, and {side.name} is "
                                 f"{side.description}; pass ids= instead")
        ids = corpus.source.read_ids(id_column)
        query_ids = None if self_join else query.source.read_ids(id_column)
    return PartLabels.check(ids, query_ids, n_corpus=corpus.shape[0], n_rows=query.shape[0],
                            self_join=self_join)


def scan(client, side: Input, invalid: str) -> tuple[list, np.ndarray]:
    """Scan every block of ``side`` on the cluster: the scans, and the bad
    rows (raising for them with ``invalid="raise"``, as locally)."""
    run = uuid.uuid4().hex[:8]
    scans = client.gather([client.submit(scan_block, block, data, retries=RETRIES,
                                         key=f"allknn-scan-{side.name}-{i}-{run}")
                           for i, (block, data) in enumerate(zip(side.blocks, side.data, strict=True))])
    zeros = np.concatenate([found.zero_rows for found in scans])
    nonfinite = np.concatenate([found.nonfinite_rows for found in scans])
    if invalid == "raise":
        _validate.raise_for_bad_rows(side.name, zeros, nonfinite)
    if zeros.size + nonfinite.size == side.shape[0]:
        _validate.raise_if_no_valid_rows(side.name, side.shape[0])
    return scans, np.union1d(zeros, nonfinite)


def _pairs(first: Block, second: Block | None) -> int:
    n = first.stop - first.start
    return n * (n - 1) // 2 if second is None else n * (second.stop - second.start)


def scans_digest(scans) -> str:
    """One digest of a side's values, from its blocks' scans."""
    digest = hashlib.blake2b(digest_size=16)
    for scan in scans:
        digest.update(scan.digest.encode())
    return digest.hexdigest()

