"""Exact engine: tiled matrix products with fused top-k selection.

Self-join: only tiles ``(i, j)`` with ``i <= j`` of the symmetric similarity
matrix are computed; an off-diagonal tile feeds the rows of block ``i`` and,
transposed, the rows of block ``j``. Query join: every (query block, corpus
block) tile feeds the query rows only. Each worker thread makes a tile with
single-threaded BLAS into its own scratch buffer and consumes it at once
with a compiled kernel, while the tile is still in cache.

A plan lists its tiles; running any subset of them, in any order and on any
number of threads, merges into the same top-k state, which is what lets a
run be checkpointed and resumed tile by tile.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from allknn.engines.schedule import (
    Tile,
    block_bounds,
    query_tiles,
    run_tiles,
    symmetric_tiles,
)
from allknn.kernels.topk import merge_rows, merge_rows_and_columns

ProgressCallback = Callable[[Tile, int], None]
"""Called after each tile with the tile and the number of pairs it scored."""


def _product(a: np.ndarray, b: np.ndarray, buffer: np.ndarray) -> np.ndarray:
    """Return ``a @ b.T`` written into the front of ``buffer``."""
    out = buffer[: a.shape[0] * b.shape[0]].reshape(a.shape[0], b.shape[0])
    np.matmul(a, b.T, out=out)
    return out


class TilePlan(ABC):
    """Tiles of one join and how to run a subset of them."""

    tiles: list[Tile]
    block_rows: int
    n_queries: int

    @abstractmethod
    def pairs(self, tile: Tile) -> int:
        """Number of (query, candidate) pairs a tile scores."""

    @abstractmethod
    def _work(self, tile: Tile, buffer: np.ndarray, keys: np.ndarray, thresholds: np.ndarray) -> None:
        """Make one tile into ``buffer`` and merge it into the state."""

    @abstractmethod
    def _blocks_of(self, tile: Tile) -> set[tuple[str, int]]:
        """Keys of the state blocks a tile writes."""

    def run(
        self,
        keys: np.ndarray,
        thresholds: np.ndarray,
        *,
        threads: int,
        tiles: Sequence[Tile] | None = None,
        on_tile: ProgressCallback | None = None,
    ) -> None:
        """Merge ``tiles`` (default all) into the top-k state, in place.

        Parameters
        ----------
        keys, thresholds : ndarray of shape (n_queries, k) and (n_queries,)
            Top-k state from :func:`allknn.kernels.topk.new_state`, indexed
            by row id.
        threads : int
            Worker threads (each runs single-threaded BLAS).
        tiles : sequence of (int, int), optional
            Subset of ``self.tiles`` to run.
        on_tile : callable, optional
            Called after each finished tile.
        """
        todo = self.tiles if tiles is None else tiles
        buffers = [np.empty(self.block_rows**2, dtype=np.float32) for _ in range(min(threads, len(todo)))]

        def work(tile: Tile, worker: int) -> None:
            self._work(tile, buffers[worker], keys, thresholds)
            if on_tile is not None:
                on_tile(tile, self.pairs(tile))

        with threadpool_limits(limits=1, user_api="blas"):
            run_tiles(todo, work, threads=len(buffers), blocks_of=self._blocks_of)


class SelfJoinPlan(TilePlan):
    """The symmetric self-join of unit-normalised rows.

    Parameters
    ----------
    normed : ndarray of shape (n, d), float32, C-contiguous
        Unit-normalised rows, in any order.
    block_rows : int
        Rows per block; a tile is at most ``block_rows`` squared.
    exclude_self : bool
        Never offer a row to itself.
    ids : ndarray of shape (n,), int64, optional
        Id of the row at each position of ``normed`` (its state row and its
        index in results); default ``range(n)``.
    """

    def __init__(
        self,
        normed: np.ndarray,
        *,
        block_rows: int,
        exclude_self: bool = True,
        ids: np.ndarray | None = None,
    ):
        self.normed = normed
        self.block_rows = block_rows
        self.exclude_self = exclude_self
        self.ids = np.arange(normed.shape[0], dtype=np.int64) if ids is None else ids
        self.n_queries = normed.shape[0]
        self.bounds = block_bounds(normed.shape[0], block_rows)
        self.tiles = symmetric_tiles(len(self.bounds))

    def pairs(self, tile: Tile) -> int:
        (i0, i1), (j0, j1) = self.bounds[tile[0]], self.bounds[tile[1]]
        if tile[0] == tile[1]:
            return (i1 - i0) * (i1 - i0 + 1) // 2
        return (i1 - i0) * (j1 - j0)

    def _work(self, tile: Tile, buffer: np.ndarray, keys: np.ndarray, thresholds: np.ndarray) -> None:
        (i0, i1), (j0, j1) = self.bounds[tile[0]], self.bounds[tile[1]]
        product = _product(self.normed[i0:i1], self.normed[j0:j1], buffer)
        if tile[0] == tile[1]:
            merge_rows(product, i0, j0, self.ids, self.ids, keys, thresholds, self.exclude_self)
        else:
            merge_rows_and_columns(product, i0, j0, self.ids, keys, thresholds)

    def _blocks_of(self, tile: Tile) -> set[tuple[str, int]]:
        return {("block", tile[0]), ("block", tile[1])}


class QueryJoinPlan(TilePlan):
    """Every query row against every corpus row.

    Parameters
    ----------
    queries_normed : ndarray of shape (nq, d), float32, C-contiguous
        Unit-normalised query rows.
    normed : ndarray of shape (n, d), float32, C-contiguous
        Unit-normalised corpus rows.
    block_rows : int
        Rows per query block and per corpus block.
    exclude_diagonal : bool
        Never pair query ``i`` with corpus row ``i`` (for ``Q`` equal to
        ``X``).
    """

    def __init__(
        self,
        queries_normed: np.ndarray,
        normed: np.ndarray,
        *,
        block_rows: int,
        exclude_diagonal: bool = False,
    ):
        self.queries_normed = queries_normed
        self.normed = normed
        self.block_rows = block_rows
        self.exclude_diagonal = exclude_diagonal
        self.query_ids = np.arange(queries_normed.shape[0], dtype=np.int64)
        self.corpus_ids = np.arange(normed.shape[0], dtype=np.int64)
        self.n_queries = queries_normed.shape[0]
        self.query_bounds = block_bounds(queries_normed.shape[0], block_rows)
        self.corpus_bounds = block_bounds(normed.shape[0], block_rows)
        self.tiles = query_tiles(len(self.query_bounds), len(self.corpus_bounds))

    def pairs(self, tile: Tile) -> int:
        (i0, i1), (j0, j1) = self.query_bounds[tile[0]], self.corpus_bounds[tile[1]]
        return (i1 - i0) * (j1 - j0)

    def _work(self, tile: Tile, buffer: np.ndarray, keys: np.ndarray, thresholds: np.ndarray) -> None:
        (i0, i1), (j0, j1) = self.query_bounds[tile[0]], self.corpus_bounds[tile[1]]
        product = _product(self.queries_normed[i0:i1], self.normed[j0:j1], buffer)
        merge_rows(product, i0, j0, self.query_ids, self.corpus_ids, keys, thresholds,
                   self.exclude_diagonal)

    def _blocks_of(self, tile: Tile) -> set[tuple[str, int]]:
        return {("query", tile[0])}
