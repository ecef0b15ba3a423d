"""The approximate kNN graph on a Dask cluster (self-join), with measured recall.

1. Scan the blocks (bad rows), as the exact form does.
2. Fit the cells (spherical k-means, :func:`allknn.engines.approx.cells.cell_centroids`)
   on the client, on a seeded sample of rows read by tasks; (2b) choose
   the breadth from a pilot sample (below).
3. Assign: each row block task lists every row's ``probes`` nearest cells
   and writes the rows as shards by group of cells on shared storage
   (:mod:`allknn.engines.dask.approx_tasks`).
4. Probe: one task per group joins the rows probing each of its cells with
   the rows in it, by the exact engine's tiles.
5. Gather each row block's partial states, finish it (as the exact form).
6. Audit: the recall on another seeded sample of rows against their exact
   neighbours (an exact query join of the sample on the cluster), with its
   95% interval.

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
row's candidate lists across all blocks (an all-to-all exchange per pass),
while probing a few more cells reaches the same recall with one more read
of the shards.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from typing import Any

import numpy as np

from allknn import _validate
from allknn._memory import choose_block_rows, parse_memory, round_block_rows
from allknn.engines.approx.cells import cell_centroids, n_cells_for
from allknn.engines.approx.recall import estimate, row_recall
from allknn.engines.approx.search import DEFAULT_RECALL_TARGET, RECALL_SAMPLE_ROWS
from allknn.engines.dask.approx_tasks import assign_task, gather_block_task, probe_group_task, sample_task
from allknn.engines.dask.run import RETRIES, Input, scan, task_rows_for
from allknn.engines.dask.tasks import Block, JoinSpec, finish_task, merge_task, pair_task
from allknn.engines.kmeans import SAMPLE_ROWS, nearest_centroids
from allknn.kernels.topk import EMPTY_KEY, key_ids, key_similarities
from allknn.topk.result import TopK

logger = logging.getLogger("allknn")

PILOT_ROWS = 1000
"""Rows of the pilot sample that chooses the breadth."""

def dask_approx_neighbors(X: Any, k: int, *, client, recall_target: float | None = None,
                          probes: int | None = None, cells: int | None = None, seed: int = 0,
                          max_memory: str | int = "1GB", invalid: str = "raise",
                          min_similarity: float | None = None, task_rows: int | None = None,
                          column: str | None = None, scratch: str | os.PathLike[str] | None = None) -> TopK:
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
        A folder every worker can read and write, where the shards live
        (in a new subfolder, removed at the end); default this machine's
        temporary folder (enough for a cluster on one machine).

    Returns
    -------
    TopK
        ``recall`` holds the measured recall and its 95% interval;
        ``params`` the breadth and, when the pilot chose it, its recall.
    """
    corpus = Input(X, name="X", column=column)
    invalid = _validate.check_invalid_choice(invalid)
    min_similarity = _validate.check_min_similarity(min_similarity)
    probes = _validate.check_optional_count(probes, "probes")
    target = DEFAULT_RECALL_TARGET if recall_target is None else _validate.check_fraction(recall_target,
                                                                                             "recall_target")
    budget = parse_memory(max_memory)
    n, dim = corpus.shape
    block_rows = round_block_rows(choose_block_rows(budget // 2, dim, 1))
    rows = task_rows_for(budget, dim, k if isinstance(k, int) else 1, block_rows, n) if task_rows is None \
        else round_block_rows(_validate.check_optional_count(task_rows, "task_rows"))
    block_rows = min(block_rows, rows)
    corpus.cut(client, rows)
    if corpus.array is not None:
        raise TypeError("the approximate engine on a cluster reads a source on shared storage; pass a path")
    _, bad = scan(client, corpus, invalid)
    k = _validate.check_k(k, n - bad.size - 1, self_join=True)
    folder = tempfile.mkdtemp(prefix="allknn-shards-") if scratch is None else tempfile.mkdtemp(
        prefix="allknn-shards-", dir=os.fspath(scratch))
    try:
        return _search(client, corpus, k, bad, folder, probes=probes, target=target, cells=cells, seed=seed,
                       budget=budget, rows=rows, block_rows=block_rows, invalid=invalid,
                       min_similarity=min_similarity)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _held(client, small: np.ndarray) -> Any:
    """A small client-side array as a task whose spec holds it: unlike
    scattered data, the scheduler recomputes it if every worker holding it
    is lost."""
    return client.submit(np.array, small, pure=False)


def _read_rows(client, corpus: Input, wanted: np.ndarray, block_rows: int) -> np.ndarray:
    """The normalised rows ``wanted`` (sorted kept row numbers), read by tasks."""
    parts = client.gather([client.submit(sample_task, block, wanted, block_rows, pure=False)
                           for block in corpus.blocks])
    return np.concatenate([part[0] for part in parts])


def _exact_neighbours(client, corpus: Input, sample: np.ndarray, k: int, block_rows: int) -> np.ndarray:
    """Exact top-k keys of the rows ``sample`` (sorted), themselves left out,
    best first: a query join of the sample against every block on the cluster."""
    rows = _held(client, _read_rows(client, corpus, sample, block_rows))
    spec = JoinSpec(k=k + 1, skip_self=False, block_rows=block_rows, threads=1)
    parts = [client.submit(pair_task, spec, block, None, None, None, Block(None, 0, sample.size), rows,
                           pure=False, retries=RETRIES) for block in corpus.blocks]
    keys = client.submit(merge_task, *[(part, 0) for part in parts], pure=False).result()
    keys[key_ids(keys) == sample[:, None]] = EMPTY_KEY  # a row is not its own neighbour
    return np.sort(keys, axis=1)[:, :0:-1]  # the k best (larger keys are better), best first


def _pilot_breadth(client, corpus: Input, pilot: np.ndarray, centroids: np.ndarray, k: int, target: float,
                   block_rows: int) -> tuple[int, float]:
    """The smallest breadth whose pilot recall, less one standard error,
    reaches ``target`` (see the module docstring), and that recall.

    A row probing its ``p`` nearest cells finds exactly its neighbours
    whose cell is among them, so the pilot recall at every ``p`` follows
    from the rank of each exact neighbour's cell for its row (ranked here
    by float32 products; the assignment's reference ranking may order
    near-ties otherwise, which the audit then measures).
    """
    keys = _exact_neighbours(client, corpus, pilot, k, block_rows)
    neighbours = np.where(keys == EMPTY_KEY, -1, key_ids(keys))
    listed = np.unique(neighbours[neighbours >= 0])
    cell_of = nearest_centroids(_read_rows(client, corpus, listed, block_rows), centroids, 1)[:, 0]
    cells = cell_of[np.minimum(np.searchsorted(listed, neighbours), listed.size - 1)]  # each neighbour's cell
    similarities = _read_rows(client, corpus, pilot, block_rows) @ centroids.T
    ranks = np.argsort(np.argsort(-similarities, axis=1, kind="stable"), axis=1, kind="stable")
    found_at = np.take_along_axis(ranks, cells, axis=1)  # probes needed to find each neighbour, less one
    found_at[neighbours < 0] = centroids.shape[0]  # no neighbour there: never found
    n_cells = centroids.shape[0]
    found = np.zeros((pilot.size, n_cells + 2))
    np.add.at(found, (np.repeat(np.arange(pilot.size), k), found_at.ravel() + 1), 1.0 / k)
    recall_at = np.cumsum(found, axis=1)[:, 1:-1]  # recall_at[:, p - 1]: each pilot row's recall at p probes
    cautious = recall_at.mean(axis=0) - recall_at.std(axis=0, ddof=1) / np.sqrt(pilot.size) \
        if pilot.size > 1 else recall_at.mean(axis=0)
    reached = np.flatnonzero(cautious >= target)
    probes = int(reached[0]) + 1 if reached.size else n_cells
    logger.info("approx on the cluster: %d probe(s) of %d cells, pilot recall %.4f (less one standard error)",
                probes, n_cells, cautious[probes - 1])
    return probes, float(recall_at[:, probes - 1].mean())


def _search(client, corpus: Input, k: int, bad: np.ndarray, folder: str, *, probes: int | None, target: float,
            cells: int | None, seed: int, budget: int, rows: int, block_rows: int, invalid: str,
            min_similarity: float | None) -> TopK:
    """The stages 2 to 6 of the module docstring, shards in ``folder``."""
    n = corpus.shape[0]
    kept_rows = np.setdiff1d(np.arange(n), bad)
    rng = np.random.default_rng(seed)
    # cells, fitted on a sample read by tasks
    sample = np.sort(rng.choice(kept_rows, min(SAMPLE_ROWS, kept_rows.size), replace=False))
    sample_rows = _read_rows(client, corpus, sample, block_rows)
    n_cells = min(cells or n_cells_for(kept_rows.size), sample_rows.shape[0])
    centroids = cell_centroids(sample_rows, n_cells, budget=budget, seed=seed)
    n_cells = centroids.shape[0]
    # disjoint audit and pilot samples (the pilot is the audit on small inputs)
    picks = rng.permutation(kept_rows)
    audit = np.sort(picks[:RECALL_SAMPLE_ROWS])
    pilot = np.sort(picks[RECALL_SAMPLE_ROWS : RECALL_SAMPLE_ROWS + PILOT_ROWS]) \
        if kept_rows.size >= RECALL_SAMPLE_ROWS + PILOT_ROWS else audit
    pilot_recall = None
    if probes is None:
        probes, pilot_recall = _pilot_breadth(client, corpus, pilot, centroids, k, target, block_rows)
    probes = min(probes, n_cells)
    # a group's query shard holds the rows probing any of its cells, about
    # probes times its own rows: groups of task_rows / probes rows keep it a task's size
    cells_per_group = max(1, round(rows * n_cells / max(kept_rows.size, 1) / probes))
    centroids_future = _held(client, centroids)

    # assignment: shards by group of cells
    assigned = client.gather([client.submit(assign_task, block, b, centroids_future, probes, cells_per_group,
                                            folder, block_rows, pure=False, retries=RETRIES)
                              for b, block in enumerate(corpus.blocks)])
    holders: dict[int, tuple[list[int], list[int]]] = {}
    for b, (corpus_groups, query_groups) in enumerate(assigned):
        for g in corpus_groups:
            holders.setdefault(g, ([], []))[0].append(b)
        for g in query_groups:
            holders.setdefault(g, ([], []))[1].append(b)
    probed = {g: client.submit(probe_group_task, g, holding, asking, folder, k, cells_per_group, block_rows,
                               rows, pure=False, retries=RETRIES)
              for g, (holding, asking) in holders.items() if asking}

    # each row block: gather, finish
    params = {"k": k, "method": "approx", "self_join": True, "exclude_self": True, "invalid": invalid,
              "min_similarity": min_similarity, "engine": "dask", "task_rows": rows, "cells": n_cells,
              "probes": probes, "refine": 0, "seed": seed,
              **({} if pilot_recall is None else {"recall_target": target, "pilot_recall": pilot_recall})}
    states, finished = [], []
    for b, block in enumerate(corpus.blocks):
        block_bad = bad[(bad >= block.start) & (bad < block.stop)]
        state = client.submit(gather_block_task, block, block_bad, k,
                              *[(probed[g], b) for g in assigned[b][1]], pure=False, retries=RETRIES)
        states.append(state)
        finished.append(client.submit(finish_task, state, block, block_bad, min_similarity=min_similarity,
                                      folder=None, part=b, n_corpus=n, n_rows=n, labels={}, params=params,
                                      pure=False))

    # audit: exact neighbours of another sample, joined on the cluster
    truth = key_similarities(_exact_neighbours(client, corpus, audit, k, block_rows))
    kth = truth[:, k - 1]

    results = client.gather(finished)
    indices = np.concatenate([r[0] for r in results])
    similarities = np.concatenate([r[1] for r in results])
    searched = np.concatenate(client.gather(states))  # the search before min_similarity, by kept row
    found = key_similarities(np.sort(searched[np.searchsorted(kept_rows, audit)], axis=1)[:, ::-1])
    recall = estimate(row_recall(np.where(np.isinf(found), np.nan, found), kth))
    params.update(recall=recall.estimate, recall_interval=list(recall.interval))
    return TopK(indices=indices, similarities=similarities, n_corpus=n, params=params, recall=recall)
