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

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse
from threadpoolctl import threadpool_limits

from allknn._memory import round_block_rows
from allknn.engines.base import ProgressCallback
from allknn.engines.exact.sparse_layout import PER_TILE, SPARSE_PRODUCT_SHARE, SparseLayout, split_columns
from allknn.engines.schedule import (
    Tile,
    block_bounds,
    query_tiles,
    run_tiles,
    symmetric_tiles,
)
from allknn.kernels.reference import unit_row_norms
from allknn.kernels.sparse_accumulate import accumulate_and_merge, head_bounds, offer_untouched_pairs
from allknn.kernels.sparse_product import column_index, sparse_tile
from allknn.kernels.topk import merge_rows, merge_rows_and_columns, new_state
from allknn.topk.bounds import nomination_margin
from allknn.topk.scoring import scoring_rows

_UNTOUCHED_ROWS = 4096
"""Query rows per task when offering untouched pairs."""


class Blocks:
    """A matrix cut into row blocks of ``block_rows`` rows (the last may be short).

    Parameters
    ----------
    matrix : ndarray of shape (n, d), float32, C-contiguous
    block_rows : int
        Rows per block, rounded up to a multiple of ``BLOCK_MULTIPLE``.
    """

    def __init__(self, matrix: np.ndarray, block_rows: int):
        self.matrix = matrix
        self.block_rows = block_rows = round_block_rows(block_rows)
        self.bounds = block_bounds(matrix.shape[0], block_rows)

    def __len__(self) -> int:
        return len(self.bounds)

    def block(self, i: int) -> np.ndarray:
        """Rows of block ``i``, shape (rows, d)."""
        start, stop = self.bounds[i]
        return self.matrix[start:stop]

    def rows(self, i: int) -> int:
        """Number of rows in block ``i``."""
        start, stop = self.bounds[i]
        return stop - start


class SparseBlocks:
    """A CSR matrix cut into row blocks, some columns set apart.

    With a dense layout (``layout.accumulate`` false) the set-apart columns
    form a dense matrix multiplied with BLAS like :class:`Blocks`; with an
    accumulated layout they form each row's head (see
    :mod:`allknn.kernels.sparse_accumulate`). The other entries (the tail)
    stay sparse, and each block of them is indexed by column so a tile is
    made by scattering (see :mod:`allknn.kernels.sparse_product`) or by
    accumulating row by row. A pair's similarity is summed the same way in
    every tile.

    Parameters
    ----------
    matrix : csr_matrix of shape (n, d), float32, sorted indices
    block_rows : int
        Rows per block, rounded up to a multiple of ``BLOCK_MULTIPLE``.
    layout : allknn.engines.exact.sparse_layout.SparseLayout
    """

    def __init__(self, matrix: scipy.sparse.csr_matrix, block_rows: int, layout: SparseLayout):
        self.block_rows = round_block_rows(block_rows)
        self.bounds = block_bounds(matrix.shape[0], self.block_rows)
        self.layout = layout
        self.full = matrix
        self.dense = None
        head = np.zeros((matrix.shape[0], 0), dtype=np.float32)
        if layout.columns.size:
            head, matrix = split_columns(matrix, layout.columns)
            if not layout.accumulate:
                self.dense = Blocks(head, self.block_rows)
                head = head[:, :0]
        self.head, self.head_bounds = head, head_bounds(head)
        self.matrix = matrix
        self.by_column = [column_index(matrix[a:b]) for a, b in self.bounds]
        self._scratch = threading.local()

    def __len__(self) -> int:
        return len(self.bounds)

    def rows(self, i: int) -> int:
        """Number of rows in block ``i``."""
        start, stop = self.bounds[i]
        return stop - start

    def spans(self) -> np.ndarray:
        """This thread's column table for :func:`sparse_tile`, shape (d, 2), int32."""
        table = getattr(self._scratch, "spans", None)
        if table is None:
            table = self._scratch.spans = np.zeros((self.matrix.shape[1], 2), dtype=np.int32)
        return table

    def row_scratch(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This thread's zeroed accumulator, touched list and flags for
        :func:`accumulate_and_merge` (one block row long)."""
        scratch = getattr(self._scratch, "row", None)
        if scratch is None:
            scratch = self._scratch.row = (np.zeros(self.block_rows, dtype=np.float32),
                                           np.zeros(self.block_rows, dtype=np.int32),
                                           np.zeros(self.block_rows, dtype=np.bool_))
        return scratch

    def column_counts(self) -> scipy.sparse.csr_matrix:
        """Entries of each column in each block (tail), shape (blocks, d)."""
        m = self.matrix
        block_of_entry = np.repeat(np.arange(m.shape[0]) // self.block_rows, np.diff(m.indptr))
        return scipy.sparse.csr_matrix((np.ones(m.nnz), (block_of_entry, m.indices)),
                                       shape=(len(self), m.shape[1]))


def accumulated_tiles(a, b) -> np.ndarray | None:
    """Which tiles of ``a`` x ``b`` to accumulate row by row (cost per
    product) rather than make dense (cost per pair: clear and scan), as a
    (blocks of a, blocks of b) bool array; None for dense blocks or a
    dense-tile layout. With heads every tile is accumulated; without, the
    products of tile ``(i, j)`` are counted exactly as ``sum over columns of
    count_i * count_j`` and compared with its pairs."""
    if not isinstance(a, SparseBlocks) or not a.layout.accumulate:
        return None
    if a.head.shape[1]:
        return np.ones((len(a), len(b)), dtype=bool)
    counts_a = a.column_counts()
    counts_b = counts_a if b is a else b.column_counts()
    products = (counts_a @ counts_b.T).toarray()
    sizes_a = np.diff(np.asarray(a.bounds), axis=1)[:, 0]
    sizes_b = np.diff(np.asarray(b.bounds), axis=1)[:, 0]
    return products < SPARSE_PRODUCT_SHARE * np.outer(sizes_a, sizes_b)


def _accumulate(a: SparseBlocks, i: int, b: SparseBlocks, j: int, row_ids: np.ndarray,
                col_ids: np.ndarray, keys: np.ndarray, thresholds: np.ndarray, scoring: tuple, *,
                skip_self: bool, both_sides: bool, margin: np.float32) -> None:
    """Tile ``(i, j)`` through :func:`accumulate_and_merge`."""
    m, index = a.matrix, b.by_column[j]
    scratch, touched, seen = b.row_scratch()
    accumulate_and_merge(m.indptr, m.indices, m.data, a.bounds[i][0], a.rows(i), index.columns,
                         index.starts, index.rows, index.values, b.spans(), row_ids, b.bounds[j][0],
                         col_ids, keys, thresholds, skip_self, both_sides, scratch, touched, seen,
                         a.head, a.head_bounds, b.head, b.head_bounds, scoring[0], scoring[1], margin)


def offer_untouched(queries: SparseBlocks, corpus: SparseBlocks, keys: np.ndarray,
                    thresholds: np.ndarray, scoring: tuple, *, skip_self: bool, margin: np.float32,
                    threads: int) -> None:
    """Finish accumulated joins: :func:`offer_untouched_pairs` for every
    query row, in row chunks on ``threads`` threads (rows are independent)."""
    q, c = queries.matrix, corpus.matrix
    with_head = np.flatnonzero(corpus.head_bounds > 0)
    by_bound = with_head[np.argsort(-corpus.head_bounds[with_head], kind="stable")].astype(np.int64)

    def finish(r0: int) -> None:
        offer_untouched_pairs(r0, min(r0 + _UNTOUCHED_ROWS, q.shape[0]), q.indptr, q.indices,
                              queries.head, queries.head_bounds, c.indptr, c.indices, corpus.head,
                              corpus.head_bounds, by_bound, keys, thresholds, skip_self, scoring[0],
                              scoring[1], margin)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(finish, range(0, q.shape[0], _UNTOUCHED_ROWS)))


def dense_product(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out = a @ b.T`` in float32 (BLAS): the products that nominate
    candidates, within :func:`allknn.topk.bounds.product_error` of the
    reference."""
    np.matmul(a, b.T, out=out)


def _product(a, i: int, b, j: int, buffer: np.ndarray) -> np.ndarray:
    """Block ``i`` of ``a`` times block ``j`` of ``b`` transposed, in ``buffer``.

    Dense (:class:`Blocks`): one BLAS product. Sparse
    (:class:`SparseBlocks` on both sides): the dense columns' product, then
    the sparse entries of block ``i`` scattered onto it through block
    ``j``'s column index.
    """
    if isinstance(a, SparseBlocks):
        return _sparse_product(a, i, b, j, buffer)
    out = buffer[: a.rows(i) * b.rows(j)].reshape(a.rows(i), b.rows(j))
    dense_product(a.block(i), b.block(j), out)
    return out


def _sparse_product(a: SparseBlocks, i: int, b: SparseBlocks, j: int, buffer: np.ndarray) -> np.ndarray:
    rows, cols = a.rows(i), b.rows(j)
    if a.dense is not None:
        out = _product(a.dense, i, b.dense, j, buffer)
    else:
        out = buffer[: rows * cols].reshape(rows, cols)
        out.fill(0.0)
    m, index = a.matrix, b.by_column[j]
    sparse_tile(m.indptr, m.indices, m.data, a.bounds[i][0], rows, index.columns, index.starts,
                index.rows, index.values, out, b.spans())
    return out


def _scoring(matrix, blocks, norms: np.ndarray) -> tuple:
    """Scoring rows of a matrix cut into ``blocks`` (the un-split rows of sparse blocks)."""
    return scoring_rows(blocks.full if isinstance(blocks, SparseBlocks) else matrix, norms)


def _margin(*matrices) -> np.float32:
    """The nomination margin of products of these unit-normalised matrices:
    a sparse similarity has at most as many non-zero terms as the shorter
    row of the pair."""
    if scipy.sparse.issparse(matrices[0]):
        terms = min(int(np.diff(m.indptr).max(initial=0)) for m in matrices)
    else:
        terms = matrices[0].shape[1]
    return nomination_margin(terms)


def _blocks(matrix, block_rows: int, layout: SparseLayout | None):
    if scipy.sparse.issparse(matrix):
        return SparseBlocks(matrix, block_rows, PER_TILE if layout is None else layout)
    return Blocks(matrix, block_rows)


class TilePlan(ABC):
    """Tiles of one join and how to run a subset of them."""

    tiles: list[Tile]
    block_rows: int
    n_queries: int
    accumulated: np.ndarray | None = None
    """Tiles made by row-by-row accumulation (see :func:`accumulated_tiles`)."""

    @property
    def skips_untouched_pairs(self) -> bool:
        """Whether some tiles never offer the pairs sharing no tail column
        (their similarity is the head dot product, or exactly 0 without
        heads): the caller then runs :meth:`offer_untouched`."""
        return self.accumulated is not None and bool(self.accumulated.any())

    @abstractmethod
    def offer_untouched(self, keys: np.ndarray, thresholds: np.ndarray, *, threads: int) -> None:
        """After all tiles, when :attr:`skips_untouched_pairs`: offer the
        pairs no tile touched (see :func:`offer_untouched`)."""

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
    normed : ndarray of shape (n, d), float32, C-contiguous, or csr_matrix
        Unit-normalised rows, in any order.
    norms : ndarray of shape (n,), float64
        Reference norms of the rows, by id.
    block_rows : int
        Rows per block, rounded up to a multiple of ``BLOCK_MULTIPLE``; a
        tile is ``block_rows`` squared.
    exclude_self : bool
        Never offer a row to itself.
    ids : ndarray of shape (n,), int64, optional
        Id of the row at each position of ``normed`` (its state row and its
        index in results); default ``range(n)``.
    layout : allknn.engines.exact.sparse_layout.SparseLayout, optional
        For a sparse ``normed``: how its columns are split (default none
        set apart, each tile choosing; see :class:`SparseBlocks`).
    """

    def __init__(
        self,
        normed: np.ndarray,
        norms: np.ndarray,
        *,
        block_rows: int,
        exclude_self: bool = True,
        ids: np.ndarray | None = None,
        layout: SparseLayout | None = None,
    ):
        if ids is not None and scipy.sparse.issparse(normed):
            raise ValueError("sparse rows are joined in their own order; ids must be None")
        self.exclude_self = exclude_self
        self.ids = np.arange(normed.shape[0], dtype=np.int64) if ids is None else ids
        self.n_queries = normed.shape[0]
        self.blocks = _blocks(normed, block_rows, layout)
        self.block_rows = self.blocks.block_rows
        self.tiles = symmetric_tiles(len(self.blocks))
        self.accumulated = accumulated_tiles(self.blocks, self.blocks)
        self.scoring = _scoring(normed, self.blocks, norms)
        self.margin = _margin(normed)

    def offer_untouched(self, keys: np.ndarray, thresholds: np.ndarray, *, threads: int) -> None:
        offer_untouched(self.blocks, self.blocks, keys, thresholds, (self.scoring, self.scoring),
                        skip_self=self.exclude_self, margin=self.margin, threads=threads)

    def pairs(self, tile: Tile) -> int:
        rows, cols = self.blocks.rows(tile[0]), self.blocks.rows(tile[1])
        return rows * (rows + 1) // 2 if tile[0] == tile[1] else rows * cols

    def _work(self, tile: Tile, buffer: np.ndarray, keys: np.ndarray, thresholds: np.ndarray) -> None:
        if self.accumulated is not None and self.accumulated[tile]:
            _accumulate(self.blocks, tile[0], self.blocks, tile[1], self.ids, self.ids, keys,
                        thresholds, (self.scoring, self.scoring), skip_self=self.exclude_self,
                        both_sides=tile[0] != tile[1], margin=self.margin)
            return
        (i0, _), (j0, _) = self.blocks.bounds[tile[0]], self.blocks.bounds[tile[1]]
        product = _product(self.blocks, tile[0], self.blocks, tile[1], buffer)
        if tile[0] == tile[1]:
            merge_rows(product, i0, j0, self.ids, self.ids, keys, thresholds, self.exclude_self, False,
                       self.scoring, self.scoring, self.margin)
        else:
            merge_rows_and_columns(product, i0, j0, self.ids, keys, thresholds, self.scoring, self.margin)

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
    exclude_diagonal : bool
        Never pair query ``i`` with corpus row ``i`` (for ``Q`` equal to
        ``X``).
    layout : allknn.engines.exact.sparse_layout.SparseLayout, optional
        For sparse rows: how the columns are split (default none set
        apart, each tile choosing; see :class:`SparseBlocks`).
    """

    def __init__(
        self,
        queries_normed: np.ndarray,
        normed: np.ndarray,
        query_norms: np.ndarray,
        norms: np.ndarray,
        *,
        block_rows: int,
        exclude_diagonal: bool = False,
        layout: SparseLayout | None = None,
    ):
        self.exclude_diagonal = exclude_diagonal
        self.query_ids = np.arange(queries_normed.shape[0], dtype=np.int64)
        self.corpus_ids = np.arange(normed.shape[0], dtype=np.int64)
        self.n_queries = queries_normed.shape[0]
        self.query_blocks = _blocks(queries_normed, block_rows, layout)
        self.block_rows = self.query_blocks.block_rows
        self.corpus_blocks = _blocks(normed, block_rows, layout)
        self.tiles = query_tiles(len(self.query_blocks), len(self.corpus_blocks))
        self.accumulated = accumulated_tiles(self.query_blocks, self.corpus_blocks)
        self.scoring = (_scoring(queries_normed, self.query_blocks, query_norms),
                        _scoring(normed, self.corpus_blocks, norms))
        self.margin = _margin(queries_normed, normed)

    def offer_untouched(self, keys: np.ndarray, thresholds: np.ndarray, *, threads: int) -> None:
        offer_untouched(self.query_blocks, self.corpus_blocks, keys, thresholds, self.scoring,
                        skip_self=self.exclude_diagonal, margin=self.margin, threads=threads)

    def pairs(self, tile: Tile) -> int:
        return self.query_blocks.rows(tile[0]) * self.corpus_blocks.rows(tile[1])

    def _work(self, tile: Tile, buffer: np.ndarray, keys: np.ndarray, thresholds: np.ndarray) -> None:
        if self.accumulated is not None and self.accumulated[tile]:
            _accumulate(self.query_blocks, tile[0], self.corpus_blocks, tile[1], self.query_ids,
                        self.corpus_ids, keys, thresholds, self.scoring, skip_self=self.exclude_diagonal,
                        both_sides=False, margin=self.margin)
            return
        i0, j0 = self.query_blocks.bounds[tile[0]][0], self.corpus_blocks.bounds[tile[1]][0]
        product = _product(self.query_blocks, tile[0], self.corpus_blocks, tile[1], buffer)
        merge_rows(product, i0, j0, self.query_ids, self.corpus_ids, keys, thresholds,
                   self.exclude_diagonal, False, self.scoring[0], self.scoring[1], self.margin)

    def _blocks_of(self, tile: Tile) -> set[tuple[str, int]]:
        return {("query", tile[0])}


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
