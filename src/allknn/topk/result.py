"""TopK: the result every engine returns, and its converters."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from allknn.topk.graph import Hubs, duplicate_groups, hubs, in_degree, knn_graph

if TYPE_CHECKING:
    import pandas as pd
    import scipy.sparse


@dataclass(frozen=True)
class RecallEstimate:
    """Recall@k of an approximate run, measured on a random sample of rows.

    Attributes
    ----------
    estimate : float
        Mean recall of the sampled rows.
    interval : tuple of float
        A 95% interval (low, high) for the recall of all rows.
    sample_size : int
        Rows measured.
    """

    estimate: float
    interval: tuple[float, float]
    sample_size: int

    def __str__(self) -> str:
        low, high = self.interval
        return f"recall@k {self.estimate:.4f} (95% interval {low:.4f}-{high:.4f}, {self.sample_size} rows)"



@dataclass(frozen=True, eq=False)
class TopK:
    """The k nearest neighbours of every query row, best first.

    Attributes
    ----------
    indices : ndarray of shape (n, k), int64
        Row numbers of the neighbours in the corpus, best first. ``-1``
        marks a missing neighbour (a dropped row, or masked by a similarity
        floor).
    similarities : ndarray of shape (n, k), float32
        Cosine similarities in [-1, 1], non-increasing along each row;
        ``NaN`` where ``indices`` is ``-1``.
    n_corpus : int
        Number of rows of the corpus (the column count of :meth:`to_csr`).
    params : dict
        The parameters of the run that made this result.
    recall : RecallEstimate or None
        For an approximate run, its recall@k measured against exact answers
        on a random sample of rows (``estimate``, 95% ``interval``,
        ``sample_size``); ``None`` for exact runs.
    """

    indices: np.ndarray
    similarities: np.ndarray
    n_corpus: int
    params: dict[str, Any] = field(default_factory=dict)
    recall: RecallEstimate | None = None

    @property
    def k(self) -> int:
        """Neighbours per row."""
        return int(self.indices.shape[1])

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __repr__(self) -> str:
        return f"TopK(n={len(self)}, k={self.k}, n_corpus={self.n_corpus})"

    def to_pandas(
        self, ids: Sequence[Any] | np.ndarray | None = None, *, query_ids: Sequence[Any] | None = None
    ) -> pd.DataFrame:
        """Return the long table: one row per (item, neighbour) pair.

        Parameters
        ----------
        ids : sequence of length n_corpus, optional
            Labels of the corpus rows; ``neighbor_id`` uses them, and so does
            ``id`` in a self-join (``params["self_join"]``). Default: row
            numbers.
        query_ids : sequence of length n, optional
            Labels of the query rows of a query join (default: row numbers).

        Returns
        -------
        pandas.DataFrame
            Columns ``id``, ``neighbor_id``, ``rank`` (1 = most similar,
            int32) and ``similarity`` (float32). Missing neighbours
            (index -1) are left out.
        """
        import pandas as pd

        n, k = self.indices.shape
        rows = np.repeat(np.arange(n, dtype=np.int64), k)
        ranks = np.tile(np.arange(1, k + 1, dtype=np.int32), n)
        flat = self.indices.ravel()
        present = flat >= 0
        rows, ranks, flat = rows[present], ranks[present], flat[present]
        if query_ids is None and self.params.get("self_join", False):
            query_ids = ids
        return pd.DataFrame(
            {
                "id": rows if query_ids is None else _labels(query_ids, n, "query_ids")[rows],
                "neighbor_id": flat if ids is None else _labels(ids, self.n_corpus, "ids")[flat],
                "rank": ranks,
                "similarity": self.similarities.ravel()[present],
            }
        )

    def save(self, path: str | os.PathLike[str], **options: Any) -> None:
        """Write the result atomically to ``.npz`` or ``.parquet`` (by extension).

        ``options`` are those of :func:`allknn.writers.save_result` (``ids``,
        ``query_ids``, ``min_similarity``, ``metadata``); read it back with
        :func:`allknn.load_result`.
        """
        from allknn.writers import save_result

        save_result(self, path, **options)

    def to_csr(self) -> scipy.sparse.csr_matrix:
        """Return the kNN graph as a sparse matrix of similarities.

        Returns
        -------
        scipy.sparse.csr_matrix of shape (n, n_corpus), float32
            Row ``i`` holds the similarities of row ``i``'s neighbours in
            their columns, in rank order (so columns are not sorted);
            missing neighbours are left out. A similarity of exactly 0 is
            stored explicitly.
        """
        import scipy.sparse

        present = self.indices >= 0
        indptr = np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int64)
        return scipy.sparse.csr_matrix(
            (self.similarities[present], self.indices[present], indptr),
            shape=(len(self), self.n_corpus),
        )


    @property
    def _self_join(self) -> bool:
        return bool(self.params.get("self_join", len(self) == self.n_corpus))

    def graph(self, kind: str = "knn", weight: str = "similarity", *, combine: str = "max"
              ) -> scipy.sparse.csr_matrix:
        """The kNN graph as a sparse matrix, in the form clustering, UMAP or matching want.

        Parameters
        ----------
        kind : {"knn", "mutual", "union"}
            ``"knn"``: row i's edges to its neighbours (directed, shape
            (n, n_corpus)). ``"mutual"``: i-j only when each is in the
            other's list. ``"union"``: i-j when either lists the other (the
            symmetrised graph). The last two need a self-join and are
            symmetric.
        weight : {"similarity", "distance", "connectivity"}
            Edge values: the similarity, ``1 - similarity`` (explicit zeros
            kept for duplicates), or 1.
        combine : {"max", "mean"}
            For ``"union"``: how the two ends' values of an edge combine
            (they are equal, the similarity being symmetric, unless the
            result was edited).

        Returns
        -------
        scipy.sparse.csr_matrix, float64, sorted indices
        """
        return knn_graph(self.indices, self.similarities, self.n_corpus, kind=kind, weight=weight,
                         combine=combine, self_join=self._self_join)

    def duplicate_groups(self, threshold: float = 1.0) -> list[np.ndarray]:
        """Groups of rows that are duplicates (similarity 1, the default) or
        near-duplicates (at least ``threshold``): the connected components
        of those edges, largest first (ties by smallest row), rows ascending.

        The graph only holds each row's ``k`` nearest, so a group of more
        than ``k + 1`` rows is found whole only through chains of edges: with
        many identical rows, a member may link to k others only. Raise ``k``
        to see large groups completely.

        Returns
        -------
        list of ndarray of int64
        """
        return duplicate_groups(self.indices, self.similarities, threshold=threshold,
                                self_join=self._self_join)

    def in_degree(self) -> np.ndarray:
        """How often each corpus row is someone's neighbour, shape (n_corpus,), int64."""
        return in_degree(self.indices, self.n_corpus)

    def hubs(self, top: int = 20) -> Hubs:
        """The ``top`` rows most often someone's neighbour, and the skewness
        of the in-degree distribution (see :class:`allknn.topk.graph.Hubs`)."""
        return hubs(self.indices, self.n_corpus, top=top)

    def report(self, path: str | os.PathLike[str], *, ids: Sequence[Any] | np.ndarray | None = None,
               title: str = "allknn run") -> None:
        """Write a self-contained one-page HTML report of the run (see
        :mod:`allknn.writers.report`; needs matplotlib)."""
        from allknn.writers.report import write_report

        write_report(self, path, ids=ids, title=title)

    def to_networkx(self, kind: str = "knn", weight: str = "similarity", *,
                    ids: Sequence[Any] | np.ndarray | None = None):
        """The graph as a networkx graph (``DiGraph`` for ``"knn"``, ``Graph``
        for ``"mutual"``/``"union"``), edge attribute ``weight``, nodes
        labelled by ``ids`` when given. Needs networkx."""
        from allknn._optional import optional

        networkx = optional("networkx", "to_networkx")
        graph = self.graph(kind, weight)
        out = networkx.from_scipy_sparse_array(
            graph, create_using=networkx.DiGraph if kind == "knn" else networkx.Graph)
        if ids is not None:
            out = networkx.relabel_nodes(out, dict(enumerate(_labels(ids, self.n_corpus, "ids").tolist())))
        return out


def _labels(values: Sequence[Any] | np.ndarray, expected: int, name: str) -> np.ndarray:
    labels = np.asarray(values)
    if labels.ndim != 1 or labels.shape[0] != expected:
        raise ValueError(
            f"{name} has {labels.shape[0] if labels.ndim else 0} entries but the result has "
            f"{expected} rows; pass one label per row"
        )
    return labels
