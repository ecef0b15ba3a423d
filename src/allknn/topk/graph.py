"""What people do with a kNN graph: its sparse forms, duplicate groups, in-degrees and hubs.

The functions take a result's ``indices`` (n, k) and ``similarities`` and
are reached through :class:`allknn.topk.result.TopK` methods. Similarities
are symmetric (the reference similarity of i and j is that of j and i), so
an edge listed by both ends carries one value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph

KINDS = ("knn", "mutual", "union")
WEIGHTS = ("similarity", "distance", "connectivity")
COMBINE = ("max", "mean")


def _edges(indices: np.ndarray, similarities: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    present = indices >= 0
    rows = np.repeat(np.arange(indices.shape[0], dtype=np.int64), present.sum(axis=1))
    return rows, indices[present].astype(np.int64), similarities[present].astype(np.float64)


def _weights(values: np.ndarray, weight: str) -> np.ndarray:
    if weight == "similarity":
        return values
    if weight == "distance":
        return np.maximum(1.0 - values, 0.0)
    return np.ones_like(values)


def knn_graph(indices: np.ndarray, similarities: np.ndarray, n_corpus: int, *, kind: str = "knn",
              weight: str = "similarity", combine: str = "max",
              self_join: bool = True) -> scipy.sparse.csr_matrix:
    """The kNN graph as a CSR matrix (see :meth:`allknn.topk.result.TopK.graph`)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    n = indices.shape[0]
    if kind != "knn" and not (self_join and n == n_corpus):
        raise ValueError(f"kind={kind!r} needs a self-join (rows and neighbours the same items); this "
                         f"result has {n} query rows against {n_corpus} corpus rows: use kind='knn'")
    rows, cols, values = _edges(indices, similarities)
    if kind == "knn":
        graph = scipy.sparse.csr_matrix((_weights(values, weight), (rows, cols)), shape=(n, n_corpus))
        graph.sort_indices()
        return graph
    forward, backward = rows * n + cols, cols * n + rows  # edge keys, both directions
    if kind == "mutual":
        keep = np.isin(forward, backward)
        keys, merged = forward[keep], values[keep]
    else:
        keys, inverse = np.unique(np.concatenate([forward, backward]), return_inverse=True)
        both = np.concatenate([values, values])
        if combine == "mean":
            merged = np.bincount(inverse, both) / np.bincount(inverse)
        else:
            merged = np.full(keys.size, -np.inf)
            np.maximum.at(merged, inverse, both)
    result = scipy.sparse.csr_matrix((merged, (keys // n, keys % n)), shape=(n, n))
    result.data = _weights(result.data, weight)
    result.sort_indices()
    return result


def duplicate_groups(indices: np.ndarray, similarities: np.ndarray, *, threshold: float = 1.0,
                     self_join: bool = True) -> list[np.ndarray]:
    """Groups of rows linked by edges of at least ``threshold`` (see
    :meth:`allknn.topk.result.TopK.duplicate_groups`)."""
    if not self_join:
        raise ValueError("duplicate_groups needs a self-join result (rows and neighbours the same items)")
    if not -1.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [-1, 1], got {threshold!r}")
    n = indices.shape[0]
    rows, cols, values = _edges(indices, similarities)
    close = values >= threshold
    graph = scipy.sparse.csr_matrix((np.ones(int(close.sum())), (rows[close], cols[close])), shape=(n, n))
    count, labels = scipy.sparse.csgraph.connected_components(graph, directed=True, connection="weak")
    sizes = np.bincount(labels, minlength=count)
    order = np.argsort(labels, kind="stable")
    members = np.split(order, np.cumsum(sizes)[:-1])
    groups = [group for group in members if group.size > 1]
    groups.sort(key=lambda group: (-group.size, group[0]))
    return groups


def in_degree(indices: np.ndarray, n_corpus: int) -> np.ndarray:
    """How often each corpus row is someone's neighbour, shape (n_corpus,), int64."""
    present = indices[indices >= 0]
    return np.bincount(present, minlength=n_corpus).astype(np.int64)


@dataclass(frozen=True)
class Hubs:
    """The rows that are most often someone's neighbour.

    Attributes
    ----------
    rows : ndarray of int64
        The ``top`` rows by in-degree, most first (ties by smaller row).
    in_degree : ndarray of int64
        Their in-degrees.
    skew : float
        Skewness of the whole in-degree distribution (0 for a symmetric
        one; strongly positive when a few rows are everybody's neighbour,
        the "hubness" of the embedding).
    """

    rows: np.ndarray
    in_degree: np.ndarray
    skew: float


def hubs(indices: np.ndarray, n_corpus: int, *, top: int = 20) -> Hubs:
    """The ``top`` hubs and the skewness of the in-degrees."""
    if isinstance(top, bool) or not isinstance(top, int | np.integer) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    degree = in_degree(indices, n_corpus)
    order = np.lexsort((np.arange(n_corpus), -degree))[:top]
    centred = degree - degree.mean()
    spread = np.sqrt(np.mean(centred**2))
    skew = float(np.mean(centred**3) / spread**3) if spread > 0 else 0.0
    return Hubs(rows=order.astype(np.int64), in_degree=degree[order], skew=skew)
