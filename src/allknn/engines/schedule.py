"""Tile plans and a lock-free-per-row scheduler for running tiles in parallel.

A *tile* ``(i, j)`` is the product of row block ``i`` of the queries with
row block ``j`` of the corpus. In the self-join only tiles with ``i <= j``
exist; tile ``(i, j)`` updates the top-k state of blocks ``i`` and ``j``.
The scheduler hands a worker a tile only when no running tile touches the
same blocks, so kernels update the state without locks.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor

Tile = tuple[int, int]


def block_bounds(n: int, block_rows: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into consecutive ``(start, stop)`` blocks."""
    return [(s, min(s + block_rows, n)) for s in range(0, n, block_rows)]


def symmetric_tiles(n_blocks: int) -> list[Tile]:
    """All tiles ``(i, j)`` with ``i <= j``, in round-robin order.

    The order follows the circle method of a round-robin tournament, so
    consecutive tiles touch different blocks and two workers rarely wait on
    each other. Diagonal tiles come first.
    """
    tiles: list[Tile] = [(i, i) for i in range(n_blocks)]
    m = n_blocks + (n_blocks % 2)  # pad to even with a dummy block
    ring = list(range(m))
    for _ in range(m - 1):
        for a in range(m // 2):
            i, j = ring[a], ring[m - 1 - a]
            if i < n_blocks and j < n_blocks:
                tiles.append((min(i, j), max(i, j)))
        ring = [ring[0], ring[-1], *ring[1:-1]]
    return tiles


def query_tiles(n_query_blocks: int, n_corpus_blocks: int) -> list[Tile]:
    """All tiles of a query join, corpus block by corpus block.

    Consecutive tiles touch different query blocks (so workers do not wait)
    and share a corpus block (so it stays in cache).
    """
    return [(i, j) for j in range(n_corpus_blocks) for i in range(n_query_blocks)]


def run_tiles(
    tiles: Sequence[Tile],
    work: Callable[[Tile, int], None],
    *,
    threads: int,
    blocks_of: Callable[[Tile], Iterable[tuple[str, int]]],
) -> None:
    """Run ``work(tile, worker_id)`` for every tile on ``threads`` workers.

    Two tiles whose ``blocks_of`` keys intersect never run at the same time.
    Exceptions in a worker stop the others and are re-raised.

    Parameters
    ----------
    tiles : sequence of (int, int)
        Tiles to run, in preferred order.
    work : callable
        Does one tile; ``worker_id`` in ``range(threads)`` selects the
        worker's scratch buffers.
    threads : int
        Number of worker threads.
    blocks_of : callable
        Keys of the state blocks a tile writes.
    """
    if threads <= 1 or len(tiles) <= 1:
        for tile in tiles:
            work(tile, 0)
        return

    pending = deque(tiles)
    busy: set[tuple[str, int]] = set()
    cond = threading.Condition()
    failed: list[BaseException] = []

    def take() -> Tile | None:
        with cond:
            while True:
                if failed or not pending:
                    return None
                for pos, tile in enumerate(pending):
                    keys = set(blocks_of(tile))
                    if not keys & busy:
                        busy.update(keys)
                        del pending[pos]
                        return tile
                cond.wait()

    def release(tile: Tile) -> None:
        with cond:
            busy.difference_update(blocks_of(tile))
            cond.notify_all()

    def worker(worker_id: int) -> None:
        while (tile := take()) is not None:
            try:
                work(tile, worker_id)
            except BaseException as exc:  # re-raised in the caller
                with cond:
                    failed.append(exc)
                    cond.notify_all()
            finally:
                release(tile)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for future in [pool.submit(worker, w) for w in range(threads)]:
            future.result()
    if failed:
        raise failed[0]
