"""Sparse rows cut into blocks for the exact engine: set-apart columns,
per-block column indexes, accumulated tiles and the untouched-pair finish."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse

from allknn._memory import round_block_rows
from allknn.engines.exact.blocks import Blocks, dense_tile
from allknn.engines.exact.sparse_layout import SPARSE_PRODUCT_SHARE, SparseLayout, split_columns
from allknn.engines.schedule import block_bounds
from allknn.kernels.sparse_accumulate import accumulate_and_merge, head_bounds, offer_untouched_pairs
from allknn.kernels.sparse_product import column_index, sparse_tile

_UNTOUCHED_ROWS = 4096
"""Query rows per task when offering untouched pairs."""


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


def accumulate_tile(a: SparseBlocks, i: int, b: SparseBlocks, j: int, row_ids: np.ndarray,
                col_ids: np.ndarray, keys: np.ndarray, thresholds: np.ndarray, scoring: tuple, *,
                skip_self: bool, both_sides: bool, margin: np.float32) -> None:
    """Tile ``(i, j)`` through :func:`accumulate_and_merge`."""
    m, index = a.matrix, b.by_column[j]
    scratch, touched, seen = b.row_scratch()
    accumulate_and_merge(m.indptr, m.indices, m.data, a.bounds[i][0], a.rows(i), index.columns,
                         index.starts, index.rows, index.values, b.spans(), row_ids, b.bounds[j][0],
                         col_ids, keys, thresholds, skip_self, both_sides, scratch, touched, seen,
                         a.head, a.head_bounds, b.head, b.head_bounds, scoring[0], scoring[1], margin)


def untouched_pass(queries, corpus, accumulated: np.ndarray | None, scoring: tuple, *, skip_self: bool,
                   margin: np.float32) -> Callable[[np.ndarray, np.ndarray, int], None] | None:
    """What a join with accumulated tiles does once all its tiles are
    merged: offer the pairs no tile touched (``(keys, thresholds, threads)``
    -> None); None when no tile is accumulated."""
    if accumulated is None or not accumulated.any():
        return None

    def offer(keys: np.ndarray, thresholds: np.ndarray, threads: int) -> None:
        offer_untouched(queries, corpus, keys, thresholds, scoring, skip_self=skip_self, margin=margin,
                        threads=threads)

    return offer


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


def sparse_product(a: SparseBlocks, i: int, b: SparseBlocks, j: int, buffer: np.ndarray) -> np.ndarray:
    rows, cols = a.rows(i), b.rows(j)
    if a.dense is not None:
        out = dense_tile(a.dense, i, b.dense, j, buffer)
    else:
        out = buffer[: rows * cols].reshape(rows, cols)
        out.fill(0.0)
    m, index = a.matrix, b.by_column[j]
    sparse_tile(m.indptr, m.indices, m.data, a.bounds[i][0], rows, index.columns, index.starts,
                index.rows, index.values, out, b.spans())
    return out
