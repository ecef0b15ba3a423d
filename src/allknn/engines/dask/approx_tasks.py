"""What the Dask workers run for the approximate engine: sample, assign rows
to cells and write them as shards, probe a group of cells, gather a row
block's partial states.

Cells are grouped into consecutive ranges (a *group*, about one task's rows).
The assignment of row block ``b`` writes, for every group ``g`` it touches,
the rows whose cell is in ``g`` (``corpus-g-b``) and the rows that probe a
cell of ``g`` (``query-g-b``, with their probe lists). The probing task of
``g`` reads only the shards of ``g`` and joins, cell by cell, the rows that
probe the cell with the rows in it, by the exact engine's tiles.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from allknn.engines.dask.tasks import Block, finish_task, normalised_block, to_global_ids
from allknn.engines.exact.plans import QueryJoinPlan
from allknn.engines.kmeans import nearest_centroids
from allknn.kernels.topk import EMPTY_KEY, key_ids, merge_states, new_state
from allknn.writers.atomic import atomic_path


def sample_task(block: Block, wanted: np.ndarray, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The normalised kept rows of ``block`` among global rows ``wanted``, and their ids."""
    rows, _, ids = normalised_block(block, None, block_rows)
    keep = np.isin(ids, wanted)
    return rows[keep], ids[keep]


def _save(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def assign_task(block: Block, index: int, centroids: np.ndarray, probes: int, cells_per_group: int,
                folder: str, block_rows: int, queries: bool = True) -> tuple[dict[int, int], dict[int, int]]:
    """Write block ``index``'s shards (see the module docstring); its query
    shards only with ``queries`` (a resumed run skips the finished blocks'
    rows as queries, and still needs them as candidates).

    Returns
    -------
    corpus_rows, query_rows : dict of int to int
        For each group it wrote a corpus (query) shard of, the shard's rows.
    """
    with threadpool_limits(limits=1, user_api="blas"):
        rows, norms, ids = normalised_block(block, None, block_rows)
        order = (nearest_centroids(rows, centroids, probes) if rows.shape[0]
                 else np.zeros((0, probes), np.int32))
    labels = order[:, 0] if rows.shape[0] else np.zeros(0, np.int32)
    groups = labels // cells_per_group
    probed_groups = order // cells_per_group
    corpus_rows, query_rows = {}, {}
    for g in np.unique(groups):
        inside = groups == g
        _save(Path(folder) / f"corpus-{g}-{index}.npz", rows=rows[inside], norms=norms[inside],
              ids=ids[inside], labels=labels[inside])
        corpus_rows[int(g)] = int(inside.sum())
    for g in np.unique(probed_groups) if queries else ():
        asks = (probed_groups == g).any(axis=1)
        _save(Path(folder) / f"query-{g}-{index}.npz", rows=rows[asks], norms=norms[asks], ids=ids[asks],
              probes=order[asks])
        query_rows[int(g)] = int(asks.sum())
    return corpus_rows, query_rows


def shard_chunks(shard_rows: dict[int, int], limit: int) -> list[list[int]]:
    """Cut a group's shards (block -> rows) into runs of blocks of at most
    ``limit`` rows together (a shard holds one block's rows, at most
    ``limit``), so that no probing task holds more than a task's rows of
    either side, however large its cells."""
    chunks: list[list[int]] = [[]]
    held = 0
    for block in sorted(shard_rows):
        if held + shard_rows[block] > limit and chunks[-1]:
            chunks.append([])
            held = 0
        chunks[-1].append(block)
        held += shard_rows[block]
    return chunks if chunks[-1] else []


def _load(folder: str, kind: str, group: int, blocks: list[int]) -> dict[str, np.ndarray]:
    parts = []
    for b in blocks:
        with np.load(os.path.join(folder, f"{kind}-{group}-{b}.npz")) as saved:
            parts.append({name: saved[name] for name in saved.files})
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def probe_group_task(group: int, corpus_blocks: list[int], query_blocks: list[int], folder: str, k: int,
                     block_rows: int, task_rows: int) -> dict[int, tuple[np.ndarray, ...]]:
    """Join, cell by cell of ``group``, the rows probing the cell (from the
    query shards of ``query_blocks``) with its rows (from the corpus shards
    of ``corpus_blocks``).

    Returns
    -------
    dict of row block -> (query ids, keys)
        Partial top-k states of the query rows, keys by global row number,
        the row itself left out.
    """
    queries = _load(folder, "query", group, query_blocks)
    keys = new_state(queries["ids"].size, k + 1)[0]
    corpus = _load(folder, "corpus", group, corpus_blocks)
    with threadpool_limits(limits=1, user_api="blas"):
        for cell in np.unique(corpus["labels"]):
            members = corpus["labels"] == cell
            asking = np.flatnonzero((queries["probes"] == cell).any(axis=1))
            if not asking.size:
                continue
            state, thresholds = new_state(asking.size, k + 1)
            plan = QueryJoinPlan(np.ascontiguousarray(queries["rows"][asking]),
                                 np.ascontiguousarray(corpus["rows"][members]), queries["norms"][asking],
                                 corpus["norms"][members], block_rows=block_rows)
            plan.run(state, thresholds, threads=1)
            keys[asking] = merge_states(keys[asking], to_global_ids(state, corpus["ids"][members]))
    own = key_ids(keys) == queries["ids"][:, None]
    keys[own] = EMPTY_KEY
    keys = np.sort(keys, axis=1)[:, 1:]  # the row itself, or the worst of k + 1
    blocks = queries["ids"] // task_rows
    return {int(b): (queries["ids"][blocks == b], keys[blocks == b]) for b in np.unique(blocks)}


def gather_block_task(block: Block, bad_rows: np.ndarray, k: int,
                      *parts: tuple[dict[int, tuple[np.ndarray, np.ndarray]], int]) -> np.ndarray:
    """A row block's state from the probing tasks' parts (each a probing
    result and this block's number in it): keys of its kept rows, in order."""
    kept = np.setdiff1d(np.arange(block.start, block.stop), bad_rows)
    keys = new_state(kept.size, k)[0]
    for result, b in parts:
        ids, part_keys = result[b]
        positions = np.searchsorted(kept, ids)
        keys[positions] = merge_states(keys[positions], part_keys)
    return keys


def finish_with_audit(keys: np.ndarray, block: Block, bad_rows: np.ndarray, audit_rows: np.ndarray,
                      **finish: object) -> tuple[object, list[list[int]]]:
    """:func:`~allknn.engines.dask.tasks.finish_task` of a row block, and the
    keys its search found for the audit rows ``audit_rows`` among its kept
    rows (before ``min_similarity``), as lists of int for the manifest."""
    kept = np.setdiff1d(np.arange(block.start, block.stop), bad_rows)
    audit_keys = keys[np.searchsorted(kept, audit_rows)].tolist()
    return finish_task(keys, block, bad_rows, **finish), audit_keys
