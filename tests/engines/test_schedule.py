"""Tile plans and the parallel tile scheduler."""

from __future__ import annotations

import threading
import time
from itertools import combinations_with_replacement, pairwise

import numpy as np
import pytest

from allknn.engines.exact.plans import QueryJoinPlan, SelfJoinPlan
from allknn.engines.schedule import block_bounds, query_tiles, run_tiles, symmetric_tiles


@pytest.mark.parametrize("n", range(1, 13))
def test_symmetric_tiles_cover_upper_triangle_once(n):
    """Every (i, j) with i <= j exactly once, diagonal first."""
    tiles = symmetric_tiles(n)
    assert len(tiles) == n * (n + 1) // 2
    assert sorted(tiles) == list(combinations_with_replacement(range(n), 2))
    assert tiles[:n] == [(i, i) for i in range(n)]
    assert all(0 <= i <= j < n for i, j in tiles)


def test_symmetric_tiles_zero_blocks():
    """No blocks, no tiles."""
    assert symmetric_tiles(0) == []


@pytest.mark.parametrize(("nq", "nc"), [(1, 1), (3, 5), (6, 2)])
def test_query_tiles_cover_every_pair_once(nq, nc):
    """Every (query block, corpus block) exactly once."""
    tiles = query_tiles(nq, nc)
    assert len(tiles) == len(set(tiles)) == nq * nc
    assert set(tiles) == {(i, j) for i in range(nq) for j in range(nc)}


@pytest.mark.parametrize(("n", "block_rows"), [(1, 1), (10, 3), (10, 10), (10, 64), (129, 64), (128, 64)])
def test_block_bounds_partition(n, block_rows):
    """Consecutive blocks of at most block_rows rows covering range(n)."""
    bounds = block_bounds(n, block_rows)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in pairwise(bounds))
    assert all(0 < stop - start <= block_rows for start, stop in bounds)
    assert len(bounds) == -(-n // block_rows)


def _pair_blocks(tile):
    return {("block", tile[0]), ("block", tile[1])}


class _Recorder:
    """A work function that records overlapping blocks and worker ids."""

    def __init__(self, blocks_of, pause: float = 0.002, fail_on=None):
        self.blocks_of = blocks_of
        self.pause = pause
        self.fail_on = fail_on
        self.lock = threading.Lock()
        self.busy: set = set()
        self.busy_workers: set[int] = set()
        self.done: list = []
        self.conflicts: list = []
        self.max_running = 0
        self.running = 0

    def __call__(self, tile, worker):
        keys = set(self.blocks_of(tile))
        with self.lock:
            if keys & self.busy:
                self.conflicts.append((tile, keys & self.busy))
            if worker in self.busy_workers:
                self.conflicts.append((tile, f"worker {worker} busy"))
            self.busy |= keys
            self.busy_workers.add(worker)
            self.running += 1
            self.max_running = max(self.max_running, self.running)
        try:
            time.sleep(self.pause)
            if tile == self.fail_on:
                raise RuntimeError(f"tile {tile} failed")
        finally:
            with self.lock:
                self.busy -= keys
                self.busy_workers.discard(worker)
                self.running -= 1
                self.done.append((tile, worker))


@pytest.mark.parametrize(("n_blocks", "threads"), [(6, 2), (7, 3), (9, 4)])
def test_run_tiles_never_overlaps_blocks(n_blocks, threads):
    """No two running tiles share a block or a worker id; every tile runs once."""
    tiles = symmetric_tiles(n_blocks)
    rec = _Recorder(_pair_blocks)
    run_tiles(tiles, rec, threads=threads, blocks_of=_pair_blocks)
    assert rec.conflicts == []
    assert sorted(t for t, _ in rec.done) == sorted(tiles)
    assert {w for _, w in rec.done} <= set(range(threads))
    assert rec.max_running >= 2, "tiles on disjoint blocks should run in parallel"


def test_run_tiles_serialises_tiles_on_one_block():
    """Tiles that all touch block 0 run one at a time."""
    tiles = [(0, j) for j in range(8)]
    rec = _Recorder(_pair_blocks)
    run_tiles(tiles, rec, threads=4, blocks_of=_pair_blocks)
    assert rec.conflicts == [] and rec.max_running == 1
    assert sorted(t for t, _ in rec.done) == tiles


@pytest.mark.parametrize("threads", [1, 3])
def test_run_tiles_reraises_worker_exception(threads):
    """A failing tile's exception reaches the caller and stops the run."""
    tiles = symmetric_tiles(8)
    rec = _Recorder(_pair_blocks, pause=0.005, fail_on=tiles[0])
    with pytest.raises(RuntimeError, match=r"tile \(0, 0\) failed"):
        run_tiles(tiles, rec, threads=threads, blocks_of=_pair_blocks)
    assert len(rec.done) < len(tiles)
    assert rec.running == 0


def test_self_join_plan_tiles_and_pairs():
    """Self-join plan: every unordered pair of rows (and each row with itself) scored once."""
    normed = np.zeros((300, 2), dtype=np.float32)
    plan = SelfJoinPlan(normed, np.ones(300), block_rows=50)  # rounded up to 64 rows: 5 blocks
    assert plan.block_rows == 64
    assert sorted(plan.tasks) == list(combinations_with_replacement(range(5), 2))
    assert sum(plan.pairs(t) for t in plan.tasks) == 300 * 301 // 2
    assert plan._blocks_of((1, 3)) == {("block", 1), ("block", 3)}


def test_query_plan_tiles_and_pairs():
    """Query plan: every (query, corpus) pair once; tiles write their query block only."""
    plan = QueryJoinPlan(np.zeros((150, 2), np.float32), np.zeros((300, 2), np.float32), np.ones(150),
                         np.ones(300), block_rows=64)
    assert sorted(plan.tasks) == [(i, j) for i in range(3) for j in range(5)]
    assert sum(plan.pairs(t) for t in plan.tasks) == 150 * 300
    assert plan._blocks_of((2, 4)) == {("query", 2)}
