"""Exact engine: tiled matrix products with fused top-k selection.

Self-join: only tiles ``(i, j)`` with ``i <= j`` of the symmetric similarity
matrix are computed; an off-diagonal tile feeds the rows of block ``i`` and,
transposed, the rows of block ``j``. Query join: every (query block, corpus
block) tile feeds the query rows only. Each worker thread makes a tile with
single-threaded BLAS into its own scratch buffer and consumes it at once
with a compiled kernel, while the tile is still in cache.

A plan's tasks are its tiles; running any subset of them, in any order and
on any number of threads, merges into the same top-k state, which is what
lets a run be checkpointed and resumed tile by tile
(:mod:`allknn.engines.tasks`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse

from allknn._blas import single_threaded_blas
from allknn._memory import round_block_rows
from allknn.engines.base import ProgressCallback
from allknn.engines.exact.blocks import Blocks, dense_tile
from allknn.engines.exact.sparse_blocks import (
    SparseBlocks,
    accumulate_tile,
    accumulated_tiles,
    sparse_product,
    untouched_pass,
)
from allknn.engines.exact.sparse_layout import PER_TILE, SparseLayout
from allknn.engines.schedule import Tile, query_tiles, run_tiles, symmetric_tiles
from allknn.engines.tasks import TaskPlan
from allknn.kernels.reference import unit_row_norms
from allknn.kernels.topk import merge_rows, merge_rows_and_columns, new_state
from allknn.topk.bounds import nomination_margin
from allknn.topk.scoring import scoring_rows


def _product(a, i: int, b, j: int, buffer: np.ndarray) -> np.ndarray:
    """Block ``i`` of ``a`` times block ``j`` of ``b`` transposed, in ``buffer``
    (:func:`~allknn.engines.exact.blocks.dense_tile` or
    :func:`~allknn.engines.exact.sparse_blocks.sparse_product`)."""
    if isinstance(a, SparseBlocks):
        return sparse_product(a, i, b, j, buffer)
    return dense_tile(a, i, b, j, buffer)


def _scoring(matrix, blocks, norms: np.ndarray) -> tuple:
    """Scoring rows of a matrix cut into ``blocks`` (the un-split rows of sparse blocks)."""
    return scoring_rows(blocks.full if isinstance(blocks, SparseBlocks) else matrix, norms)


def _margin(*matrices, precision: str = "fp32") -> np.float32:
    """The nomination margin of products of these unit-normalised matrices:
    a sparse similarity has at most as many non-zero terms as the shorter
    row of the pair."""
    if scipy.sparse.issparse(matrices[0]):
        terms = min(int(np.diff(m.indptr).max(initial=0)) for m in matrices)
    else:
        terms = matrices[0].shape[1]
    return nomination_margin(terms, precision)


def _blocks(matrix, block_rows: int, layout: SparseLayout | None):
    if scipy.sparse.issparse(matrix):
        return SparseBlocks(matrix, block_rows, PER_TILE if layout is None else layout)
    return Blocks(matrix, block_rows)


class TilePlan(TaskPlan):
    """Tiles of one join and how to run a subset of them."""

    tasks: list[Tile]
    block_rows: int
    ids: np.ndarray | None = None
    """Row id at each position of the (self-join) rows; None: the natural order."""
    layout: SparseLayout | None = None
    accumulated: np.ndarray | None = None
    """Tiles made by row-by-row accumulation (see :func:`accumulated_tiles`)."""
    after_tiles: Callable[[np.ndarray, np.ndarray, int], None] | None = None
    """What the tiles leave to do once all are merged (sparse accumulated
    tiles: :func:`untouched_pass`)."""

    def complete(self, keys: np.ndarray, thresholds: np.ndarray, *, threads: int) -> None:
        if self.after_tiles is not None:
            self.after_tiles(keys, thresholds, threads)

    def resume_state(self) -> dict[str, np.ndarray]:
        """The row order the tiles refer to and the sparse column layout."""
        return {**({} if self.ids is None else {"order": self.ids}),
                **({} if self.layout is None else self.layout.state())}

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
        tasks: Sequence[Tile] | None = None,
        on_task: ProgressCallback | None = None,
    ) -> None:
        """Merge tiles ``tasks`` (default all) into the top-k state, in place,
        on ``threads`` worker threads that each run single-threaded BLAS
        (see :meth:`TaskPlan.run`); the state is indexed by row id."""
        todo = self.tasks if tasks is None else tasks
        buffers = [np.empty(self.block_rows**2, dtype=np.float32) for _ in range(min(threads, len(todo)))]

        def work(tile: Tile, worker: int) -> None:
            self._work(tile, buffers[worker], keys, thresholds)
            if on_task is not None:
                on_task(tile, self.pairs(tile))

        with single_threaded_blas():
            run_tiles(todo, work, threads=len(buffers), blocks_of=self._blocks_of)


class SelfJoinPlan(TilePlan):
    """The symmetric self-join of unit-normalised rows.

    Parameters
    ----------
    normed : ndarray of shape (n, d), float32, C-contiguous, or csr_matrix
        Unit-normalised rows, in any order.
    norms : ndarray of shape (n,), float64
        Reference norms of the rows, by id.
    block_rows : int
        Rows per block, rounded up to a multiple of ``BLOCK_MULTIPLE``; a
        tile is ``block_rows`` squared.
    skip_self : bool
        Never offer a row to itself.
    ids : ndarray of shape (n,), int64, optional
        Id of the row at each position of ``normed`` (its state row and its
        index in results); default ``range(n)``.
    layout : allknn.engines.exact.sparse_layout.SparseLayout, optional
        For a sparse ``normed``: how its columns are split (default none
        set apart, each tile choosing; see :class:`SparseBlocks`).
    precision : {"fp32", "tf32", "bf16", "fp16"}
        The precision of the products (the nomination margin follows it;
        BLAS here is fp32, a device plan may round its inputs).
    """

    def __init__(
        self,
        normed: np.ndarray,
        norms: np.ndarray,
        *,
        block_rows: int,
        skip_self: bool = True,
        ids: np.ndarray | None = None,
        layout: SparseLayout | None = None,
        precision: str = "fp32",
    ):
        if ids is not None and scipy.sparse.issparse(normed):
            raise ValueError("sparse rows are joined in their own order; ids must be None")
        self.skip_self = skip_self
        self.ids, self.layout = ids, layout
        self.row_ids = np.arange(normed.shape[0], dtype=np.int64) if ids is None else ids
        self.n_queries = normed.shape[0]
        self.blocks = _blocks(normed, block_rows, layout)
        self.block_rows = self.blocks.block_rows
        self.tasks = symmetric_tiles(len(self.blocks))
        self.accumulated = accumulated_tiles(self.blocks, self.blocks)
        rows = _scoring(normed, self.blocks, norms)
        self.scoring = (rows, rows)
        self.margin = _margin(normed, precision=precision)
        self.after_tiles = untouched_pass(self.blocks, self.blocks, self.accumulated, self.scoring,
                                          skip_self=skip_self, margin=self.margin)

    def pairs(self, tile: Tile) -> int:
        rows, cols = self.blocks.rows(tile[0]), self.blocks.rows(tile[1])
        return rows * (rows + 1) // 2 if tile[0] == tile[1] else rows * cols

    def _work(self, tile: Tile, buffer: np.ndarray, keys: np.ndarray, thresholds: np.ndarray) -> None:
        if self.accumulated is not None and self.accumulated[tile]:
            accumulate_tile(self.blocks, tile[0], self.blocks, tile[1], self.row_ids, self.row_ids, keys,
                        thresholds, self.scoring, skip_self=self.skip_self,
                        both_sides=tile[0] != tile[1], margin=self.margin)
            return
        (i0, _), (j0, _) = self.blocks.bounds[tile[0]], self.blocks.bounds[tile[1]]
        product = _product(self.blocks, tile[0], self.blocks, tile[1], buffer)
        if tile[0] == tile[1]:
            merge_rows(product, i0, j0, self.row_ids, self.row_ids, keys, thresholds, self.skip_self, False,
                       self.scoring[0], self.scoring[1], self.margin)
        else:
            merge_rows_and_columns(product, i0, j0, self.row_ids, keys, thresholds, self.scoring[0],
                                   self.margin)

    def _blocks_of(self, tile: Tile) -> set[tuple[str, int]]:
        return {("block", tile[0]), ("block", tile[1])}


class QueryJoinPlan(TilePlan):
    """Every query row against every corpus row.

    Parameters
    ----------
    queries_normed : ndarray of shape (nq, d), float32, C-contiguous, or csr_matrix
        Unit-normalised query rows.
    normed : ndarray of shape (n, d), float32, C-contiguous, or csr_matrix
        Unit-normalised corpus rows.
    query_norms, norms : ndarray of shape (nq,) and (n,), float64
        Reference norms of the query and corpus rows.
    block_rows : int
        Rows per query block and per corpus block, rounded up to a
        multiple of ``BLOCK_MULTIPLE``.
    skip_self : bool
        Never pair query ``i`` with corpus row ``i`` (for ``Q`` equal to
        ``X``).
    layout : allknn.engines.exact.sparse_layout.SparseLayout, optional
        For sparse rows: how the columns are split (default none set
        apart, each tile choosing; see :class:`SparseBlocks`).
    precision : {"fp32", "tf32", "bf16", "fp16"}
        The precision of the products (the nomination margin follows it;
        BLAS here is fp32, a device plan may round its inputs).
    """

    def __init__(
        self,
        queries_normed: np.ndarray,
        normed: np.ndarray,
        query_norms: np.ndarray,
        norms: np.ndarray,
        *,
        block_rows: int,
        skip_self: bool = False,
        layout: SparseLayout | None = None,
        precision: str = "fp32",
    ):
        self.skip_self = skip_self
        self.layout = layout
        self.query_ids = np.arange(queries_normed.shape[0], dtype=np.int64)
        self.corpus_ids = np.arange(normed.shape[0], dtype=np.int64)
        self.n_queries = queries_normed.shape[0]
        self.query_blocks = _blocks(queries_normed, block_rows, layout)
        self.block_rows = self.query_blocks.block_rows
        self.corpus_blocks = _blocks(normed, block_rows, layout)
        self.tasks = query_tiles(len(self.query_blocks), len(self.corpus_blocks))
        self.accumulated = accumulated_tiles(self.query_blocks, self.corpus_blocks)
        self.scoring = (_scoring(queries_normed, self.query_blocks, query_norms),
                        _scoring(normed, self.corpus_blocks, norms))
        self.margin = _margin(queries_normed, normed, precision=precision)
        self.after_tiles = untouched_pass(self.query_blocks, self.corpus_blocks, self.accumulated,
                                          self.scoring, skip_self=skip_self, margin=self.margin)

    def pairs(self, tile: Tile) -> int:
        return self.query_blocks.rows(tile[0]) * self.corpus_blocks.rows(tile[1])

    def _work(self, tile: Tile, buffer: np.ndarray, keys: np.ndarray, thresholds: np.ndarray) -> None:
        if self.accumulated is not None and self.accumulated[tile]:
            accumulate_tile(self.query_blocks, tile[0], self.corpus_blocks, tile[1], self.query_ids,
                        self.corpus_ids, keys, thresholds, self.scoring, skip_self=self.skip_self,
                        both_sides=False, margin=self.margin)
            return
        i0, j0 = self.query_blocks.bounds[tile[0]][0], self.corpus_blocks.bounds[tile[1]][0]
        product = _product(self.query_blocks, tile[0], self.corpus_blocks, tile[1], buffer)
        merge_rows(product, i0, j0, self.query_ids, self.corpus_ids, keys, thresholds,
                   self.skip_self, False, self.scoring[0], self.scoring[1], self.margin)

    def _blocks_of(self, tile: Tile) -> set[tuple[str, int]]:
        return {("query", tile[0])}


class PairPlan(TilePlan):
    """Two row blocks of a symmetric schedule against each other, both sides
    offered: the off-diagonal task of a self-join cut into block pairs (a
    Dask task). The state has the rows of ``first`` then those of
    ``second``.

    Parameters
    ----------
    first, second : ndarray of shape (n1, d) and (n2, d), float32, C-contiguous
        Unit-normalised dense rows of the two blocks.
    first_norms, second_norms : ndarray of shape (n1,) and (n2,), float64
        Their reference norms.
    block_rows : int
        Rows per tile side.
    precision : {"fp32", "tf32", "bf16", "fp16"}
        The precision of the products (the nomination margin follows it).
    """

    def __init__(self, first: np.ndarray, second: np.ndarray, first_norms: np.ndarray,
                 second_norms: np.ndarray, *, block_rows: int, precision: str = "fp32"):
        both = self.both = np.concatenate([first, second])
        self.offset = first.shape[0]
        self.n_queries = both.shape[0]
        self.row_ids = np.arange(both.shape[0], dtype=np.int64)
        self.first = Blocks(both[: self.offset], block_rows)
        self.second = Blocks(both[self.offset :], block_rows)
        self.block_rows = self.first.block_rows
        self.tasks = query_tiles(len(self.first), len(self.second))
        self.scoring = scoring_rows(both, np.concatenate([first_norms, second_norms]))
        self.margin = _margin(both, precision=precision)

    def pairs(self, tile: Tile) -> int:
        return self.first.rows(tile[0]) * self.second.rows(tile[1])

    def _work(self, tile: Tile, buffer: np.ndarray, keys: np.ndarray, thresholds: np.ndarray) -> None:
        i0 = self.first.bounds[tile[0]][0]
        j0 = self.offset + self.second.bounds[tile[1]][0]
        product = dense_tile(self.first, tile[0], self.second, tile[1], buffer)
        merge_rows_and_columns(product, i0, j0, self.row_ids, keys, thresholds, self.scoring, self.margin)

    def _blocks_of(self, tile: Tile) -> set[tuple[str, int]]:
        return {("first", tile[0]), ("second", tile[1])}


def exact_top_keys(queries: np.ndarray, corpus: np.ndarray, k: int, *, block_rows: int,
                   threads: int) -> np.ndarray:
    """Top-k state of dense ``queries`` against ``corpus``, as sorted keys.

    The exact engine's query join, for internal uses that need candidates
    rather than a finished result (nearest cells, recall references).

    Parameters
    ----------
    queries : ndarray of shape (nq, d), float32
    corpus : ndarray of shape (n, d), float32
    k : int
        At most ``n``.

    Returns
    -------
    ndarray of shape (nq, k), int64
        Packed keys (see :mod:`allknn.kernels.topk`), best first: decode with
        :func:`allknn.kernels.topk.key_similarities` and ``key_ids``.
    """
    keys, thresholds = new_state(queries.shape[0], k)
    block_rows = min(block_rows, round_block_rows(max(queries.shape[0], corpus.shape[0])))
    queries, corpus = np.ascontiguousarray(queries), np.ascontiguousarray(corpus)
    QueryJoinPlan(queries, corpus, _norms(queries), _norms(corpus),
                  block_rows=block_rows).run(keys, thresholds, threads=threads)
    keys.sort(axis=1)
    return keys[:, ::-1]


def _norms(rows: np.ndarray) -> np.ndarray:
    norms = np.empty(rows.shape[0], dtype=np.float64)
    unit_row_norms(rows, norms)
    return norms
