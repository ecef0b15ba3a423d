"""How a sparse join splits its columns: dense tiles, or accumulated tiles
with a per-row head of frequent columns.

Three layouts, each summing a pair's similarity the same way in every tile
(so results never depend on the block size):

- *dense*: the columns held by at least ``DENSE_COLUMN_DENSITY`` of the rows
  are multiplied with BLAS, the rest scattered into dense tiles. Right when
  most pairs share some column (user x item data with popular items).
- *accumulated, no head*: every tile chooses between a dense tile and
  row-by-row accumulation (see :mod:`allknn.kernels.sparse_accumulate`).
- *accumulated with a head*: a few frequent columns (stop words) are set
  apart as a dense head per row, so accumulation touches only the pairs
  sharing a rarer column; the head's share is bounded and added where it
  can matter.

The choice is a cost estimate in units of one accumulated product, per pair
of rows: a tile's products per pair, plus ``SPARSE_PRODUCT_SHARE`` per
pair for a dense tile, plus ``HEAD_TERM_COST`` per head column for each
pair a head reaches (measured on a few pilot rows,
:func:`allknn.kernels.sparse_pilot.count_head_reach`). The constants were
measured on a 2-core x86 machine; they only steer speed, never results.
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from allknn.kernels.sparse_pilot import count_head_reach, nested_row_sums

DENSE_COLUMN_DENSITY = 0.1
"""Columns stored in at least this share of rows are multiplied densely in
dense tiles. Scattering a column costs about 1 ns per pair of its entries,
a dense BLAS product about 0.02 ns per pair of rows, so a column is cheaper
dense once more than about a tenth of the rows hold it."""

SPARSE_PRODUCT_SHARE = 0.25
"""A dense tile costs about as much as this many accumulated products per
pair (clearing, scanning and merging it): a tile with fewer products per
pair is cheaper accumulated."""

HEAD_DENSITIES = (0.2, 0.14, 0.1, 0.07, 0.05, 0.035, 0.025, 0.018, 0.013, 0.01)
"""Candidate heads: the columns held by at least this share of the rows
(steps of about 1.4x)."""

HEAD_TERM_COST = 0.015
"""Cost of one head column in a head dot product, in accumulated products
(fitted on the TF-IDF matrices with and without stop words: 0.008-0.015;
the upper end, since the pilot counts at final thresholds and a run meets
lower ones first)."""

PILOT_ROWS = 64
"""Query rows whose exact k-th similarity measures the heads' reach."""

PILOT_CANDIDATES = 8192
"""Corpus rows (evenly spaced) counted for each pilot row."""


@dataclass(frozen=True)
class SparseLayout:
    """How a sparse join splits its columns.

    Attributes
    ----------
    columns : ndarray of int64
        Columns set apart (ascending, possibly empty).
    accumulate : bool
        True: the columns are a per-row head added to accumulated tiles
        (every tile accumulated if there are any; otherwise each tile
        chooses). False: they are multiplied with BLAS in dense tiles.
    """

    columns: np.ndarray
    accumulate: bool

    def state(self) -> dict[str, np.ndarray]:
        """The layout as arrays, for a checkpoint."""
        return {"layout_columns": self.columns, "layout_accumulate": np.array(self.accumulate)}

    @classmethod
    def from_state(cls, saved: Mapping[str, np.ndarray]) -> SparseLayout | None:
        """The layout :meth:`state` saved, or None if ``saved`` holds none."""
        if "layout_columns" not in saved:
            return None
        return cls(np.asarray(saved["layout_columns"], dtype=np.int64), bool(saved["layout_accumulate"]))


PER_TILE = SparseLayout(np.zeros(0, dtype=np.int64), accumulate=True)
"""No column set apart; each tile chooses between a dense tile and accumulation."""


def _densest(counts: np.ndarray, threshold: float, limit: int) -> np.ndarray:
    """Columns with at least ``threshold`` entries, the densest ``limit``, ascending."""
    chosen = np.flatnonzero(counts >= max(threshold, 1))
    if chosen.size > limit:
        chosen = np.sort(chosen[np.argsort(-counts[chosen], kind="stable")[:limit]])
    return chosen.astype(np.int64)


def sparse_layout(queries: scipy.sparse.csr_matrix, corpus: scipy.sparse.csr_matrix, k: int, *,
                  skip_self: bool, budget: int, threads: int) -> SparseLayout:
    """Choose the layout of a sparse join (see the module docstring).

    Depends on the matrices, ``k`` and ``budget``, never on blocks or
    threads; a checkpoint keeps the layout its tiles were made with.

    Parameters
    ----------
    queries, corpus : csr_matrix of shape (nq, d) and (n, d)
        Unit-normalised rows (the same object for a self-join).
    k : int
    skip_self : bool
        Self-join excluding each row from its own neighbours.
    budget : int
        Bytes the dense copies of the set-apart columns (float32, of the
        corpus and, in a query join, of the queries) may take.
    threads : int
        Threads for the pilot rows.
    """
    n, nq = corpus.shape[0], queries.shape[0]
    counts = np.bincount(corpus.indices, minlength=corpus.shape[1])
    shares = counts / n * (counts if queries is corpus else
                           np.bincount(queries.indices, minlength=corpus.shape[1])) / nq
    limit = budget // (4 * (n if queries is corpus else n + nq))
    dense = _densest(counts, DENSE_COLUMN_DENSITY * n, limit)
    options = [(shares.sum(), PER_TILE),
               (shares.sum() - shares[dense].sum() + SPARSE_PRODUCT_SHARE,
                SparseLayout(dense, accumulate=False))]
    heads = []
    for density in HEAD_DENSITIES:
        head = _densest(counts, density * n, limit)
        if head.size and (not heads or head.size > heads[-1].size):
            heads.append(head)
    if heads and shares.sum() - shares[heads[-1]].sum() < min(cost for cost, _ in options):
        reach = _head_reach(queries, corpus, heads, k, skip_self=skip_self, threads=threads)
        options += [(shares.sum() - shares[head].sum() + HEAD_TERM_COST * head.size * share,
                     SparseLayout(head, accumulate=True)) for head, share in zip(heads, reach, strict=True)]
    return min(options, key=lambda option: option[0])[1]


def _head_norms(matrix: scipy.sparse.csr_matrix, heads: list[np.ndarray]) -> np.ndarray:
    """Row norms of each candidate head (nested column sets), shape (heads, n), float32."""
    rank = np.full(matrix.shape[1], len(heads), dtype=np.int64)
    for h in range(len(heads) - 1, -1, -1):
        rank[heads[h]] = h
    squares = np.zeros((len(heads) + 1, matrix.shape[0]), dtype=np.float64)
    nested_row_sums(matrix.indptr, rank[matrix.indices], matrix.data, squares)
    return np.sqrt(squares[:-1]).astype(np.float32)


def _head_reach(queries, corpus, heads, k, *, skip_self, threads) -> np.ndarray:
    """Share of (query, corpus row) pairs each head reaches, on the pilot rows.

    Returns
    -------
    ndarray of shape (len(heads),), float64
    """
    n, nq = corpus.shape[0], queries.shape[0]
    sample = np.unique(np.linspace(0, nq - 1, min(nq, PILOT_ROWS)).astype(np.int64))
    stride = max(1, n // PILOT_CANDIDATES)
    bounds = _head_norms(corpus[::stride], heads)
    q_bounds = _head_norms(queries[sample], heads)
    csc = corpus.tocsc()
    parts = np.array_split(np.arange(sample.size), max(1, min(threads, sample.size)))
    counts = np.zeros((len(parts), len(heads)), dtype=np.int64)

    def count(part: int) -> None:
        rows = parts[part]
        count_head_reach(queries.indptr, queries.indices, queries.data, sample[rows], skip_self, n,
                         csc.indptr, csc.indices, csc.data, k, q_bounds[:, rows], bounds, stride,
                         counts[part])

    with ThreadPoolExecutor(max_workers=len(parts)) as pool:
        list(pool.map(count, range(len(parts))))
    return counts.sum(axis=0) / (sample.size * bounds.shape[1])


def split_columns(matrix: scipy.sparse.csr_matrix, columns: np.ndarray):
    """Split a CSR matrix into a dense part (the given columns) and the rest.

    Returns
    -------
    head : ndarray of shape (n, len(columns)), float32, C-contiguous
    tail : csr_matrix of shape (n, d)
        The matrix without those columns' entries (column numbers kept).
    """
    head = np.ascontiguousarray(matrix[:, columns].toarray(), dtype=np.float32)
    tail = matrix.copy()
    tail.data[np.isin(tail.indices, columns)] = 0
    tail.eliminate_zeros()
    return head, tail
