"""Approximate engine: partition into cells, then join exactly inside them.

The corpus is split into cells by spherical k-means (centroids fitted on a
sample); every query row is searched against the rows of its ``probes``
nearest cells, with dense tile products and the exact engine's fused
kernels. Probing goes round by round: in round ``p`` each query row visits
its ``p``-th nearest cell, so within a round the tasks (cells) touch
disjoint query rows and run in parallel without locks, and each candidate
is offered to a row at most once. With a recall target, rounds continue
until a pilot sample of rows reaches it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np

from allknn._blas import single_threaded_blas
from allknn.engines.exact.blocks import dense_product
from allknn.engines.kmeans import fit_centroids
from allknn.engines.schedule import run_tiles
from allknn.kernels.topk import merge_rows
from allknn.rows import NormalizedRows
from allknn.topk.bounds import nomination_margin
from allknn.topk.scoring import scoring_rows

MAX_PROBES = 64


def n_cells_for(n: int) -> int:
    """Default number of cells: about ``2 sqrt(n)``, at least 1."""
    return max(1, min(n, int(2 * np.sqrt(n))))


def cell_centroids(normed: np.ndarray, n_cells: int, *, budget: int, seed: int) -> np.ndarray:
    """Centroids of the cells (see :func:`allknn.engines.kmeans.fit_centroids`).

    Raises
    ------
    ValueError
        If the budget cannot hold the sample that fits them.
    """
    centroids = fit_centroids(normed, n_cells, budget=budget, seed=seed)
    if centroids is None:
        raise ValueError(
            f"max_memory={budget} bytes is too small to fit {n_cells} cells; raise max_memory "
            f"or pass fewer cells"
        )
    return centroids


class CellIndex:
    """Which corpus rows each cell holds, as an order that makes every
    cell's rows contiguous.

    Parameters
    ----------
    centroids : ndarray of shape (n_cells, d), float32
    labels : ndarray of shape (n,), int
        Cell of each corpus row (its nearest centroid).

    Attributes
    ----------
    rows : ndarray of shape (n, d), float32, or None
        The corpus rows grouped by cell, inside :meth:`grouping` only.
    order : ndarray of shape (n,), int64
        Original row id at each position.
    positions : ndarray of shape (n,), int64
        Position of each original row id (the inverse of ``order``).
    starts : ndarray of shape (n_cells + 1,), int64
        First position of each cell.
    """

    def __init__(self, centroids: np.ndarray, labels: np.ndarray):
        self.centroids = centroids
        n_cells = centroids.shape[0]
        self.order = np.argsort(labels, kind="stable").astype(np.int64)
        self.positions = np.empty_like(self.order)
        self.positions[self.order] = np.arange(self.order.size)
        counts = np.bincount(labels, minlength=n_cells)
        self.starts = np.zeros(n_cells + 1, dtype=np.int64)
        np.cumsum(counts, out=self.starts[1:])
        self.rows: np.ndarray | None = None

    @property
    def n_cells(self) -> int:
        return self.centroids.shape[0]

    @contextmanager
    def grouping(self, corpus: NormalizedRows) -> Iterator[CellIndex]:
        """The index with :attr:`rows`: ``corpus`` grouped by cell for the
        ``with`` block (in place, see :meth:`NormalizedRows.reordered`)."""
        with corpus.reordered(self.order) as rows:
            self.rows = rows
            try:
                yield self
            finally:
                self.rows = None


def probe_rounds(
    queries: np.ndarray,
    query_positions: np.ndarray | None,
    query_norms: np.ndarray,
    index: CellIndex,
    corpus_norms: np.ndarray,
    keys: np.ndarray,
    thresholds: np.ndarray,
    rounds: range,
    probe_order: np.ndarray,
    *,
    block_rows: int,
    threads: int,
    skip_self: bool,
    unique: bool = False,
) -> None:
    """Run probing rounds ``rounds``: each query row against one more cell.

    Parameters
    ----------
    queries : ndarray of shape (nq, d), float32
        Unit-normalised query rows (state row ``i`` is query ``i``).
    query_positions : ndarray of shape (nq,), int64, or None
        Where query ``i`` is in ``queries`` (the self-join's queries are
        the index's grouped rows); None: at ``i``.
    query_norms : ndarray of shape (nq,), float64
        Reference norms of the queries, by id.
    index : CellIndex
    corpus_norms : ndarray of shape (n,), float64
        Reference norms of the corpus rows, by id.
    keys, thresholds : ndarray
        Top-k state of the queries, updated in place (ids are corpus rows).
    rounds : range
        Which probe ranks to run (columns of ``probe_order``).
    probe_order : ndarray of shape (nq, max_probes), int32
        Cells of each query row, nearest first.
    block_rows : int
        Most query rows and corpus rows in one tile.
    threads : int
    skip_self : bool
        Never pair query ``i`` with corpus row ``i`` (self-join).
    unique : bool
        The state may already hold candidates from these cells (after a
        refinement pass); do not add them twice.
    """
    buffers = [np.empty(block_rows * block_rows, dtype=np.float32) for _ in range(threads)]
    corpus = scoring_rows(index.rows, corpus_norms)
    margin = nomination_margin(queries.shape[1])
    for probe in rounds:
        cells = probe_order[:, probe]
        by_cell = np.argsort(cells, kind="stable")
        bounds = np.searchsorted(cells[by_cell], np.arange(index.n_cells + 1))
        tasks = [(int(c), 0) for c in range(index.n_cells) if bounds[c + 1] > bounds[c]]

        def work(task: tuple[int, int], worker: int, by_cell=by_cell, bounds=bounds) -> None:
            cell = task[0]
            query_ids = by_cell[bounds[cell] : bounds[cell + 1]].astype(np.int64)
            c0, c1 = index.starts[cell], index.starts[cell + 1]
            for q0 in range(0, query_ids.size, block_rows):
                chunk = query_ids[q0 : q0 + block_rows]
                block = queries[chunk if query_positions is None else query_positions[chunk]]
                for s in range(c0, c1, block_rows):
                    members = index.rows[s : min(s + block_rows, c1)]
                    out = buffers[worker][: chunk.size * members.shape[0]].reshape(chunk.size, -1)
                    dense_product(block, members, out)
                    merge_rows(out, 0, s, chunk, index.order, keys, thresholds, skip_self, unique,
                               scoring_rows(block, query_norms), corpus, margin)

        with single_threaded_blas():
            run_tiles(tasks, work, threads=threads, blocks_of=lambda t: {t[0]})
