"""The approximate kNN graph on a Dask cluster (self-join), with measured recall.

1. Scan the blocks (bad rows), as the exact form does.
2. Fit the cells (spherical k-means, :func:`allknn.engines.approx.cells.cell_centroids`)
   on the client, on a seeded sample of rows read by tasks; (2b) choose
   the breadth from a pilot sample (below).
3. Assign: each row block task lists every row's ``probes`` nearest cells
   and writes the block's rows sorted by their own cell on shared storage;
   the cells' row counts are summed by a tree of tasks.
4. Regroup: the cells are cut into ranges of consecutive cells holding
   about a task's rows; a task per range gathers its cells' rows from
   every block's file.
5. Probe: each task takes a slice of one range's rows as queries and joins,
   cell by cell, the queries probing the cell with the cell's rows, by the
   exact engine's tiles (a cell larger than a task's rows in pieces), and
   writes the queries' finished search states. A row's whole search is in
   one task: no partial states travel, and no task holds more than a task
   block of queries and one of cell rows, however uneven the cells.
6. Finish each row block on a worker from the probing tasks' files (as the
   exact form): with ``output``, the worker writes the block's parquet
   part and the client records it in the manifest
   (:mod:`allknn.writers.parts`), with the keys found for the block's audit
   rows; the client never holds the result.
7. Audit: the recall on another seeded sample of rows against their exact
   neighbours (an exact query join of the sample on the cluster, submitted
   with the pilot's as soon as the samples are read, so that both run
   while the client fits the cells, the audit's at a lower priority than
   every task the client waits for), with its 95% interval, recorded in
   the manifest.

The stages meet through files in the scratch folder (see
:mod:`allknn.engines.dask.approx_tasks`), the client waiting for each stage
before the next: no task waits on another's result, so the graph has no
edge per (row block, cell), a lost worker loses no result, and the tasks
are about four per row block. Each row is written twice (assigned, then
regrouped) and each cell read by the probing tasks whose queries probe it.
Past ``SPREAD_ABOVE`` files, the regrouping and the finish read through a
two-step shuffle (:func:`spread`), so that no task opens every file of the
stage before.

A resumed run (``resume=True``, ``--resume``) takes the cells and the
breadth the first run kept in the folder (``_cells.npy`` and the
manifest), so that the parts it adds are those an uninterrupted run would
have written; the finished blocks' rows are still candidates but not
queries.

The breadth (``probes``, the cells each row searches) is chosen before the
assignment by a pilot sample, unless given: the pilot rows' exact
neighbours are joined on the cluster, each neighbour's cell is looked up,
and since a row finds exactly the neighbours in the cells it probes, the
pilot's recall at every breadth follows from where those cells rank among
the row's nearest: the smallest breadth whose pilot recall, less one
standard error, reaches ``recall_target`` is taken (stage 2b). The pilot
and the audit are disjoint samples, so the audit stays unbiased (below
``RECALL_SAMPLE_ROWS + PILOT_ROWS`` kept rows, too few for two samples,
the pilot is the audit sample, as in the local engine).

Refinement passes are left out on a cluster: each pass would read every
row's candidate lists across all blocks (an all-to-all exchange per pass).
Probing more cells reaches the same recall instead, at the cost of more
tile work (on the Debian rows, 67 of 504 cells for 0.95, where the local
engine refines), without any exchange.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from allknn import _validate
from allknn._memory import BLOCK_MULTIPLE, parse_memory
from allknn._optional import optional
from allknn.engines.approx.cells import cell_centroids, n_cells_for
from allknn.engines.approx.recall import estimate, row_recall
from allknn.engines.approx.search import DEFAULT_RECALL_TARGET, RECALL_SAMPLE_ROWS
from allknn.engines.dask.approx_tasks import (
    ROW_ARRAYS,
    SHARED_MARKER,
    add_counts,
    assign_task,
    cell_ranges,
    finish_block_task,
    probe_task,
    regroup_task,
    sample_task,
    save_plan,
    scratch_refusal,
    spread_task,
)
from allknn.engines.dask.run import (
    RETRIES,
    Input,
    TaskCallback,
    check_fresh_output,
    device_choice,
    device_params,
    part_labels,
    scan,
    scans_digest,
    task_sizes,
)
from allknn.engines.dask.tasks import Block, JoinSpec, merge_task, pair_task
from allknn.engines.dask.waves import MERGE_FAN_IN, near
from allknn.engines.kmeans import SAMPLE_ROWS, nearest_centroids
from allknn.kernels.topk import EMPTY_KEY, key_ids, key_similarities
from allknn.topk.result import RecallEstimate, TopK
from allknn.writers.atomic import atomic_path
from allknn.writers.parts import Manifest, PartLabels

logger = logging.getLogger("allknn")

PILOT_ROWS = 1000
"""Rows of the pilot sample that chooses the breadth."""

SPREAD_ABOVE = 64
"""Files a consumer of a stage reads directly at most (see :func:`spread`)."""

TASKS_PER_THREAD = 4
"""Probing tasks per worker thread at least (where there are rows enough),
so that uneven tasks even out."""

BACKGROUND = -1
"""Dask priority of the audit's exact join: below the tasks the client
waits for before the probing (the default, 0)."""

CELLS_FILE = "_cells.npy"
"""The centroids a parts folder's run searched with (for ``resume``)."""


def dask_approx_neighbors(X: Any, k: int, *, client, recall_target: float | None = None,
                          probes: int | None = None, cells: int | None = None, seed: int = 0,
                          max_memory: str | int = "1GB", invalid: str = "raise",
                          min_similarity: float | None = None, task_rows: int | None = None,
                          column: str | None = None, scratch: str | os.PathLike[str] | None = None,
                          output: str | os.PathLike[str] | None = None, resume: bool = False,
                          ids: Any = None, id_column: str | None = None, device: str | None = None,
                          precision: str | None = None, on_task: TaskCallback | None = None) -> TopK | None:
    """The approximate top-k of every row of ``X`` on a cluster (see the module docstring).

    Parameters are those of :func:`allknn.engines.dask.dask_neighbors`, with:

    recall_target : float, optional
        The pilot recall the breadth is chosen for (default 0.95; ignored
        with ``probes``, as locally).
    probes : int, optional
        Cells searched per row, instead of the pilot's choice.
    cells : int, optional
        Number of cells (default about ``2 sqrt(n)``).
    seed : int
        Seed of the samples (cells, pilot and audit).
    scratch : path-like, optional
        A folder every worker and this client read and write at the same
        path, for the stages' files (in a new subfolder, checked on every
        worker first, removed at the end); default this machine's
        temporary folder (enough for a cluster on one machine).
    output, resume, ids, id_column, on_task
        As for the exact form: the result as a parts folder written by the
        workers (the measured recall in its manifest's ``params``), resumed
        with the first run's cells and breadth; ``on_task("probe", rows)``
        as each probing task has searched its rows, and ``on_task("part",
        rows)`` as each row block is finished.
    device, precision
        As for the exact form: the probing tiles run with the torch engine
        on this device of every worker, with the same result bit for bit
        (the cells, the pilot and the audit stay on the CPU engine).

    Returns
    -------
    TopK or None
        ``recall`` holds the measured recall and its 95% interval;
        ``params`` the breadth and, when the pilot chose it, its recall
        (None with ``output``).
    """
    corpus = Input(X, name="X", column=column)
    invalid = _validate.check_invalid_choice(invalid)
    min_similarity = _validate.check_min_similarity(min_similarity)
    probes = _validate.check_optional_count(probes, "probes")
    cells = _validate.check_optional_count(cells, "cells")
    target = DEFAULT_RECALL_TARGET if recall_target is None else _validate.check_fraction(recall_target,
                                                                                             "recall_target")
    budget = parse_memory(max_memory)
    tiles = device_choice(client, device, precision)
    n = corpus.shape[0]
    block_rows, rows = task_sizes(budget, corpus.shape[1], k, n, task_rows=task_rows)
    corpus.cut(client, rows)
    if corpus.array is not None:
        raise TypeError("the approximate engine on a cluster reads a source on shared storage; pass a path")
    labels = part_labels(corpus, corpus, ids, None, id_column, output is not None, True)
    check_fresh_output(output, resume)
    with scratch_folder(client, scratch) as folder:
        scans, bad = scan(client, corpus, invalid)
        k = _validate.check_k(k, n - bad.size - 1, self_join=True)
        params = {"k": k, "method": "approx", "self_join": True, "exclude_self": True, "invalid": invalid,
                  "min_similarity": min_similarity, "engine": "dask", "task_rows": rows, "refine": 0,
                  "seed": seed}
        fingerprint = {**params, "given": {"probes": probes, "cells": cells,
                                           "recall_target": None if probes is not None else target},
                       "X": scans_digest(scans), **({"labels": labels.digests} if labels.arrays else {})}
        params.update(device_params(tiles))  # not in the fingerprint: every device gives the same result
        search = _Search(client, corpus, k, bad, seed=seed, budget=budget, rows=rows, block_rows=block_rows,
                         tiles=tiles)
        manifest = None
        if output is None:
            params.update(search.breadth(probes, cells, target))
        else:
            manifest = _output_manifest(output, resume=resume, fingerprint=fingerprint, params=params,
                                        labels=labels, search=search,
                                        choose=lambda: search.breadth(probes, cells, target))
            if manifest is None:
                return None  # finished, its recall measured: nothing to redo
        results, audit_keys = search.run(folder, params, manifest=manifest, min_similarity=min_similarity,
                                         labels=labels.columns, on_task=on_task)
        recall = search.audited_recall(audit_keys)
        params.update(recall=recall.estimate, recall_interval=list(recall.interval),
                      recall_rows=recall.sample_size)
        if manifest is not None:
            manifest.save(complete=True)
            return None
        indices = np.concatenate([results[b][0] for b in range(len(corpus.blocks))])
        similarities = np.concatenate([results[b][1] for b in range(len(corpus.blocks))])
        return TopK(indices=indices, similarities=similarities, n_corpus=n, params=params, recall=recall)


@contextlib.contextmanager
def scratch_folder(client, scratch: str | os.PathLike[str] | None) -> Iterator[str]:
    """A new folder in ``scratch`` (default this machine's temporary folder)
    that every worker reads and writes, removed at the end.

    Raises
    ------
    ValueError
        Naming the workers that do not see it (another machine's folder at
        that path, or none) or cannot write in it.
    """
    folder = tempfile.mkdtemp(prefix="allknn-scratch-", dir=None if scratch is None else os.fspath(scratch))
    try:
        token = uuid.uuid4().hex
        (Path(folder) / SHARED_MARKER).write_text(token)
        refusals = {address: reason for address, reason in client.run(scratch_refusal, folder, token).items()
                    if reason}
        if refusals:
            raise ValueError(f"the scratch folder {folder} is not shared with every worker: "
                             + "; ".join(f"worker {address} {reason}" for address, reason in refusals.items())
                             + "; give scratch= (--scratch) a folder that every worker and this client read "
                             "and write at the same path")
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _output_manifest(output: str | os.PathLike[str], *, resume: bool, fingerprint: dict[str, Any],
                     params: dict[str, Any], labels: PartLabels, search: _Search,
                     choose: Callable[[], dict[str, Any]]) -> Manifest | None:
    """The manifest of the parts folder ``output``, saved with the run's
    cells and breadth: on resume those the folder kept (into
    ``search.centroids`` and ``params``), else ``choose()``'s, kept in the
    folder (``CELLS_FILE``). None if the resumed folder is finished."""
    Path(output).mkdir(parents=True, exist_ok=True)
    manifest = Manifest(output, fingerprint, {})
    saved = manifest.resume() if resume else None
    if saved is not None and saved.get("complete") and len(manifest.parts) == len(search.corpus.blocks):
        return None
    cells_path = Path(output) / CELLS_FILE
    if saved is not None and "probes" in saved["params"]:
        search.centroids = _saved_cells(cells_path, saved["params"]["cells"], search.corpus.shape[1],
                                        finished=bool(manifest.parts))
        chosen = ("cells", "probes", "recall_target", "pilot_recall")
        params.update({name: saved["params"][name] for name in chosen if name in saved["params"]})
    if search.centroids is None:
        params.update(choose())
        with atomic_path(cells_path) as tmp, open(tmp, "wb") as handle:
            np.save(handle, search.centroids)
    n = search.corpus.shape[0]
    manifest.header = {"k": search.k, "n_rows": n, "n_corpus": n, "params": params, "labels": labels.columns}
    labels.write(output)
    manifest.save()
    return manifest


def _saved_cells(path: Path, cells: int, dim: int, *, finished: bool) -> np.ndarray | None:
    """The centroids a folder's first run kept (None: none kept and no part
    written yet, so they may be fitted again).

    Raises
    ------
    ValueError
        If parts were written but their cells are missing or damaged
        (new parts would be searched with other cells).
    """
    try:
        centroids = np.load(path)
        if centroids.shape == (cells, dim) and centroids.dtype == np.float32:
            return centroids
        problem = f"holds an array of shape {centroids.shape}, not the run's {cells} x {dim} cells"
    except (OSError, ValueError) as exc:
        problem = f"cannot be read ({exc})"
    if not finished:
        return None
    raise ValueError(f"{path} {problem}: the finished parts were searched with the cells it held, so the "
                     f"run cannot be resumed; delete the folder to start over")


def _held(client, small: np.ndarray) -> Any:
    """A small client-side array as a task whose spec holds it: unlike
    scattered data, the scheduler recomputes it if every worker holding it
    is lost."""
    return client.submit(np.array, small, pure=False)


def spread(client, folder: str, inputs: list[str], boundaries: np.ndarray, names: tuple[str, ...], kind: str,
           task_rows: int, n_keys: int) -> list[list[str]]:
    """The files each consumer of filed ``inputs`` reads (consumer ``i``
    takes keys ``boundaries[i]:boundaries[i + 1]``): the inputs themselves,
    or past ``SPREAD_ABOVE`` of them, the files of a two-step shuffle.

    Each first-step task (:func:`~allknn.engines.dask.approx_tasks.spread_task`)
    reads one of about ``sqrt(inputs)`` groups of inputs for the keys of
    one of about ``sqrt(consumers)`` runs of consumers, so a consumer opens
    ``sqrt(inputs)`` files instead of every input (37M file opens become
    about 1M at 100M rows) and each task still holds about a task's rows.
    """
    consumers = len(boundaries) - 1
    if len(inputs) <= SPREAD_ABOVE:
        return [inputs] * consumers
    width, run = math.isqrt(len(inputs) - 1) + 1, math.isqrt(consumers - 1) + 1
    groups = [inputs[i : i + width] for i in range(0, len(inputs), width)]
    files: list[list[str]] = []
    futures = []
    for j, first in enumerate(range(0, consumers, run)):
        stop = min(first + run, consumers)
        keys = int(boundaries[first]), int(boundaries[stop])
        names_j = [f"spread-{kind}-{i}-{j}" for i in range(len(groups))]
        futures += [client.submit(spread_task, folder, group, name, *keys, n_keys, names, kind, task_rows,
                                  pure=False, retries=RETRIES)
                    for group, name in zip(groups, names_j, strict=True)]
        files += [names_j] * (stop - first)
    client.gather(futures)
    return files


def _tree(client, combine, parts: list[Any]) -> Any:
    """One future of ``combine`` over ``parts``, ``MERGE_FAN_IN`` at a time."""
    while True:
        parts = [client.submit(combine, *parts[i : i + MERGE_FAN_IN], pure=False, retries=RETRIES)
                 for i in range(0, len(parts), MERGE_FAN_IN)]
        if len(parts) == 1:
            return parts[0]


class _Search:
    """The stages of the module docstring for one input, on one client."""

    def __init__(self, client, corpus: Input, k: int, bad: np.ndarray, *, seed: int, budget: int, rows: int,
                 block_rows: int, tiles: dict[str, Any]):
        self.client, self.corpus, self.k, self.bad = client, corpus, k, bad
        self.tiles = tiles  # the probing tiles' device and precision (none: the CPU engine)
        self.budget, self.rows, self.block_rows = budget, rows, block_rows
        self.kept_rows = np.setdiff1d(np.arange(corpus.shape[0]), bad)
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.sample = np.sort(rng.choice(self.kept_rows, min(SAMPLE_ROWS, self.kept_rows.size),
                                         replace=False))
        # disjoint audit and pilot samples (the pilot is the audit on small inputs)
        picks = rng.permutation(self.kept_rows)
        self.audit = np.sort(picks[:RECALL_SAMPLE_ROWS])
        self.pilot = np.sort(picks[RECALL_SAMPLE_ROWS : RECALL_SAMPLE_ROWS + PILOT_ROWS]) \
            if self.kept_rows.size >= RECALL_SAMPLE_ROWS + PILOT_ROWS else self.audit
        self.centroids: np.ndarray | None = None
        self._audit_truth: Any = None
        self._kept: tuple[np.ndarray, np.ndarray] | None = None

    def read_rows(self, wanted: np.ndarray, *, keep: bool = False) -> np.ndarray:
        """The normalised rows ``wanted`` (sorted kept row numbers): from
        the rows read last with ``keep``, if they are all there, else read
        by a task per block (a pass over the input), and kept with ``keep``."""
        if self._kept is not None:
            ids, rows = self._kept
            at = np.minimum(np.searchsorted(ids, wanted), ids.size - 1)
            if np.array_equal(ids[at], wanted):
                return rows[at]
        client = self.client
        parts = client.gather([client.submit(sample_task, block, wanted, self.block_rows, pure=False)
                               for block in self.corpus.blocks])
        rows = np.concatenate([part[0] for part in parts])
        if keep:
            self._kept = (wanted, rows)
        return rows

    def exact_keys(self, sample_rows: np.ndarray, *, priority: int = 0) -> Any:
        """A future of the exact top-(k + 1) keys of ``sample_rows`` (as
        :meth:`read_rows` gives them): a query join against every block,
        its tasks at Dask ``priority``."""
        rows = _held(self.client, sample_rows)
        spec = JoinSpec(k=self.k + 1, skip_self=False, block_rows=self.block_rows, threads=1)
        query = Block(None, 0, sample_rows.shape[0])
        client = self.client
        parts = [(client.submit(pair_task, spec, block, None, None, None, query, rows, pure=False,
                                retries=RETRIES, priority=priority), 0) for block in self.corpus.blocks]
        return _tree(client, merge_task, parts)

    def neighbours(self, keys: np.ndarray, sample: np.ndarray) -> np.ndarray:
        """The k best of :meth:`exact_keys`, the rows themselves left out, best first."""
        keys = np.where(key_ids(keys) == sample[:, None], EMPTY_KEY, keys)
        return np.sort(keys, axis=1)[:, :0:-1]  # the k best of k + 1 (larger keys are better)

    def audited_recall(self, audit_keys: dict[int, list[int]]) -> RecallEstimate:
        """The recall of the keys found for the audit rows (``audit_keys``,
        by row), against their exact k-th similarities."""
        found = key_similarities(np.sort(np.array([audit_keys[row] for row in self.audit], np.int64),
                                         axis=1)[:, ::-1])
        kth = key_similarities(self.neighbours(self._audit_truth.result(), self.audit))[:, self.k - 1]
        return estimate(row_recall(np.where(np.isinf(found), np.nan, found), kth))

    def breadth(self, probes: int | None, cells: int | None, target: float) -> dict[str, Any]:
        """Fit the cells (:attr:`centroids`) and choose the breadth: the params they make."""
        # one pass over the input for the three samples (cells, pilot, audit)
        self.read_rows(np.union1d(np.union1d(self.sample, self.pilot), self.audit), keep=True)
        # the pilot's and the audit's exact joins run on the workers while the cells are fitted here,
        # the audit's behind every task the client waits for (it is needed at the end only)
        pilot = None if probes is not None else self.exact_keys(self.read_rows(self.pilot))
        self._audit_truth = pilot if pilot is not None and self.audit is self.pilot else \
            self.exact_keys(self.read_rows(self.audit), priority=BACKGROUND)
        sample_rows = self.read_rows(self.sample)
        n_cells = min(cells or n_cells_for(self.kept_rows.size), sample_rows.shape[0])
        self.centroids = cell_centroids(sample_rows, n_cells, budget=self.budget, seed=self.seed)
        n_cells = self.centroids.shape[0]
        chosen: dict[str, Any] = {"cells": n_cells}
        if pilot is not None:
            probes, chosen["pilot_recall"] = self._pilot_breadth(pilot.result(), target)
            chosen["recall_target"] = target
        chosen["probes"] = min(probes, n_cells)
        return chosen

    def _pilot_breadth(self, truth: np.ndarray, target: float) -> tuple[int, float]:
        """The smallest breadth whose pilot recall, less one standard error,
        reaches ``target`` (see the module docstring), and that recall;
        ``truth``: the pilot's :meth:`exact_keys`.

        A row probing its ``p`` nearest cells finds exactly its neighbours
        whose cell is among them, so the pilot recall at every ``p`` follows
        from the rank of each exact neighbour's cell for its row (ranked here
        by float32 products; the assignment's reference ranking may order
        near-ties otherwise, which the audit then measures).
        """
        pilot, k, centroids = self.pilot, self.k, self.centroids
        pilot_rows = self.read_rows(pilot)  # ranked against the cells
        keys = self.neighbours(truth, pilot)
        neighbours = np.where(keys == EMPTY_KEY, -1, key_ids(keys))
        listed = np.unique(neighbours[neighbours >= 0])
        cell_of = nearest_centroids(self.read_rows(listed), centroids, 1)[:, 0]
        cells = cell_of[np.minimum(np.searchsorted(listed, neighbours), listed.size - 1)]  # each neighbour's
        similarities = pilot_rows @ centroids.T
        ranks = np.argsort(np.argsort(-similarities, axis=1, kind="stable"), axis=1, kind="stable")
        found_at = np.take_along_axis(ranks, cells, axis=1)  # probes needed to find each neighbour, less one
        found_at[neighbours < 0] = centroids.shape[0]  # no neighbour there: never found
        n_cells = centroids.shape[0]
        found = np.zeros((pilot.size, n_cells + 2))
        np.add.at(found, (np.repeat(np.arange(pilot.size), k), found_at.ravel() + 1), 1.0 / k)
        recall_at = np.cumsum(found, axis=1)[:, 1:-1]  # recall_at[:, p - 1]: each pilot row's recall at p
        cautious = recall_at.mean(axis=0) - recall_at.std(axis=0, ddof=1) / np.sqrt(pilot.size) \
            if pilot.size > 1 else recall_at.mean(axis=0)
        reached = np.flatnonzero(cautious >= target)
        probes = int(reached[0]) + 1 if reached.size else n_cells
        logger.info("approx on the cluster: %d probe(s) of %d cells, pilot recall %.4f (less one standard "
                    "error)", probes, n_cells, cautious[probes - 1])
        return probes, float(recall_at[:, probes - 1].mean())

    def _query_rows(self) -> int:
        """Query rows per probing task: a range's rows (a task block), since
        the cells a task reads are those its queries probe, and rows of the
        same few cells probe much the same cells; fewer where that leaves
        under ``TASKS_PER_THREAD`` tasks per worker thread."""
        threads = sum(self.client.nthreads().values())
        by_threads = -(-self.kept_rows.size // (TASKS_PER_THREAD * max(threads, 1)))
        return max(BLOCK_MULTIPLE, min(self.rows, by_threads))

    def run(self, folder: str, params: dict[str, Any], *, manifest: Manifest | None,
            min_similarity: float | None, labels: dict[str, str | None],
            on_task: TaskCallback | None) -> tuple[dict[int, Any], dict[int, list[int]]]:
        """Assign, regroup, probe and finish every row block not in
        ``manifest`` (stages 3 to 6), their files in ``folder`` (and the
        audit's exact join, where :meth:`breadth` did not submit it: a
        resumed run).

        Returns
        -------
        results : dict
            Without ``manifest``: each row block's (indices, similarities).
        audit_keys : dict
            The keys found for each audit row (from the manifest's entries
            for the blocks it records).
        """
        client, blocks, k, n = self.client, self.corpus.blocks, self.k, self.corpus.shape[0]
        done = {} if manifest is None else dict(manifest.parts)
        audit_keys = {row: keys for entry in done.values()
                      for row, keys in zip(entry["audit_rows"], entry["audit_keys"], strict=True)}
        if self._audit_truth is None:  # resumed with the cells and breadth kept
            self._audit_truth = self.exact_keys(self.read_rows(self.audit), priority=BACKGROUND)
        self._kept = None  # the samples are read
        todo = [b for b in range(len(blocks)) if b not in done]
        if not todo:
            return {}, audit_keys
        probes = params["probes"]
        centroids = _held(client, self.centroids)
        workers = list(client.nthreads())  # else Dask runs every assignment where the centroids are
        counts = _tree(client, add_counts, [client.submit(assign_task, block, b, centroids, probes, folder,
                                                          self.block_rows, pure=False, retries=RETRIES,
                                                          **near(workers, b))
                                            for b, block in enumerate(blocks)]).result()
        range_starts = cell_ranges(counts, self.rows)
        assigned = spread(client, folder, [f"assigned-{b}" for b in range(len(blocks))], range_starts,
                          ROW_ARRAYS, "cell", self.rows, counts.size)
        sizes = client.gather([client.submit(regroup_task, r, int(first), int(stop), assigned[r], folder,
                                             pure=False, retries=RETRIES)
                               for r, (first, stop) in enumerate(itertools.pairwise(range_starts))])
        queries = self._query_rows()
        save_plan(folder, range_starts, np.array(sorted(done), dtype=np.int64))
        spec = JoinSpec(k=k + 1, skip_self=False, block_rows=self.block_rows, threads=1, **self.tiles)
        tasks = [(t, r, start, min(start + queries, size)) for t, (r, start, size) in enumerate(
            (r, start, size) for r, size in enumerate(sizes) for start in range(0, size, queries))]
        # the most query rows first, submitted and run, so that the short tasks fill the last gaps
        tasks.sort(key=lambda task: task[2] - task[3])
        probing = [client.submit(probe_task, t, r, start, stop, folder, spec, self.rows, len(blocks),
                                 pure=False, retries=RETRIES, priority=stop - start)
                   for t, r, start, stop in tasks]
        as_completed = optional("distributed", "running on a Dask cluster").as_completed
        n_probing = len(probing)
        for future in as_completed(probing):  # every states file written
            searched = future.result()
            if on_task is not None:
                on_task("probe", searched)
        del probing, future  # released: a worker lost later does not make the scheduler probe again
        states = spread(client, folder, [f"states-{t}" for t in range(n_probing)],
                        np.arange(len(blocks) + 1), ("ids", "keys"), "block", self.rows, len(blocks))
        pending = {}  # finish task key -> (future, row block, its audit rows)
        for b in todo:
            block = blocks[b]
            block_bad = self.bad[(self.bad >= block.start) & (self.bad < block.stop)]
            audited = self.audit[(self.audit >= block.start) & (self.audit < block.stop)]
            future = client.submit(finish_block_task, block, b, block_bad, audited, folder, states[b], k,
                                   min_similarity=min_similarity,
                                   folder=None if manifest is None else str(manifest.folder.resolve()),
                                   part=b, n_corpus=n, n_rows=n, labels=labels, params=params, pure=False,
                                   retries=RETRIES)
            pending[future.key] = (future, b, audited)
        results = {}
        try:
            for future in as_completed([future for future, _, _ in pending.values()]):
                _, b, audited = pending.pop(future.key)  # released once its part is recorded
                value, keys = future.result()
                audit_keys.update(zip(audited.tolist(), keys, strict=True))
                if manifest is None:
                    results[b] = value
                else:
                    manifest.add(b, {**value, "audit_rows": audited.tolist(), "audit_keys": keys})
                if on_task is not None:
                    on_task("part", blocks[b].stop - blocks[b].start)
        finally:  # stopped early: the rest is not wanted (and its files are about to go)
            client.cancel([future for future, _, _ in pending.values()])
            if manifest is not None:
                manifest.flush()  # the parts recorded since the last rewrite
        return results, audit_keys
