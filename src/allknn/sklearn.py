"""A scikit-learn estimator: cosine nearest neighbours, exact and fast.

``CosineNeighbors`` is a drop-in for
``NearestNeighbors(metric="cosine", algorithm="brute")`` and for
``KNeighborsTransformer(metric="cosine")``: same methods, same conventions
(``X=None`` excludes each sample itself, distances are ``1 - similarity``,
``transform`` adds one neighbour in ``"distance"`` mode for the sample
itself), so it plugs into pipelines, ``Isomap``, ``TSNE(metric="precomputed")``,
``DBSCAN``, HDBSCAN and UMAP. Requires the ``sklearn`` extra.

All-zero samples (users without interactions in a user x item matrix) are
treated as scikit-learn treats them for cosine: similarity 0, distance 1,
to every sample (themselves included), ties by smaller index. This is the
estimator's convention only; :func:`allknn.neighbors` keeps refusing zero
rows by default, since they have no direction.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

try:
    from sklearn.base import BaseEstimator, TransformerMixin
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "allknn.sklearn needs scikit-learn >= 1.6: pip install 'allknn[sklearn]'"
    ) from exc

from allknn.api import neighbors

_MODES = ("distance", "connectivity")


def _another_object(X):
    """The same data in a new object (no copy), so :func:`allknn.neighbors`
    treats it as queries and keeps each sample itself, as sklearn does."""
    if scipy.sparse.issparse(X):
        return scipy.sparse.csr_matrix((X.data, X.indices, X.indptr), shape=X.shape)
    return X.view()


def _zero_rows(X) -> np.ndarray:
    """Row numbers of the all-zero rows, shape (z,), int64."""
    if scipy.sparse.issparse(X):
        counts = np.asarray((X != 0).sum(axis=1)).ravel()
        return np.flatnonzero(counts == 0).astype(np.int64)
    return np.flatnonzero(~np.asarray(X != 0).any(axis=1)).astype(np.int64)


def _with_zero_rows(indices: np.ndarray, similarities: np.ndarray, zero_fit: np.ndarray,
                    zero_queries: np.ndarray, *, self_join: bool) -> tuple[np.ndarray, np.ndarray]:
    """Merge the zero training rows in as similarity-0 candidates of every
    query row; a zero query row is at similarity 0 from every training row,
    so its candidates are the first rows.

    Parameters
    ----------
    indices, similarities : ndarray of shape (nq, k)
        The search without zero rows (-1 / NaN where a row found fewer).
    zero_fit, zero_queries : ndarray of int64
        The zero training rows and query rows, ascending.
    self_join : bool
        Query ``i`` is training row ``i``: never its own neighbour.

    Returns
    -------
    indices, similarities : ndarray of shape (nq, k)
        Best first; equal similarities by smaller index.
    """
    nq, k = indices.shape
    zeros = zero_fit[: k + 1]
    extra = np.full((nq, k + 1), -1, dtype=np.int64)
    extra[:, : zeros.size] = zeros
    extra[zero_queries] = np.arange(k + 1)
    if self_join:
        extra[extra == np.arange(nq)[:, None]] = -1  # a row is not its own neighbour
    candidates = np.concatenate([indices, extra], axis=1)
    values = np.concatenate([similarities, np.zeros(extra.shape, np.float32)], axis=1)
    values = np.where(candidates < 0, -np.inf, values)
    order = np.lexsort((np.where(candidates < 0, np.iinfo(np.int64).max, candidates), -values), axis=1)[:, :k]
    picked = np.take_along_axis(candidates, order, axis=1)
    chosen = np.take_along_axis(values, order, axis=1).astype(np.float32)
    chosen[picked < 0] = np.nan
    return picked, chosen


class CosineNeighbors(TransformerMixin, BaseEstimator):
    """Exact k nearest neighbours by cosine distance, computed by allknn.

    Parameters
    ----------
    n_neighbors : int, default=5
        Neighbours per sample for :meth:`kneighbors` and :meth:`transform`.
    radius : float, default=1.0
        Cosine distance of :meth:`radius_neighbors` (``1 - similarity``).
    mode : {"distance", "connectivity"}, default="distance"
        Graph type returned by :meth:`transform`.
    max_memory : str or int, default="1GB"
        Working-memory budget (see :func:`allknn.neighbors`).
    n_jobs : int or None, default=None
        Worker threads; ``None`` or ``-1`` uses every usable CPU.

    Attributes
    ----------
    n_features_in_ : int
    n_samples_fit_ : int
    """

    def __init__(self, n_neighbors: int = 5, *, radius: float = 1.0, mode: str = "distance",
                 max_memory: str | int = "1GB", n_jobs: int | None = None):
        self.n_neighbors = n_neighbors
        self.radius = radius
        self.mode = mode
        self.max_memory = max_memory
        self.n_jobs = n_jobs

    def fit(self, X, y=None) -> CosineNeighbors:
        """Store the training samples.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : ignored
        """
        X = validate_data(self, X, dtype=[np.float64, np.float32], accept_sparse="csr")
        self._fit_X = X
        self._zero_fit = _zero_rows(X)
        self.n_samples_fit_ = X.shape[0]
        return self

    def _threads(self) -> int | None:
        return None if self.n_jobs in (None, -1) else max(1, int(self.n_jobs))

    def kneighbors(self, X=None, n_neighbors: int | None = None, return_distance: bool = True):
        """The nearest training samples of each query sample.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), optional
            Queries; ``None`` means the training samples, each excluding
            itself (exact duplicates of it are other samples).
        n_neighbors : int, optional
            Default ``self.n_neighbors``.
        return_distance : bool
            Also return the distances.

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries, n_neighbors)
            Cosine distances ``1 - similarity``, ascending (only with
            ``return_distance``), in the training data's float dtype.
        neigh_ind : ndarray of shape (n_queries, n_neighbors), int64
        """
        check_is_fitted(self, "_fit_X")
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or k <= 0:
            raise ValueError(f"Expected n_neighbors > 0, got {k!r}")
        if X is None:
            if k >= self.n_samples_fit_:
                raise ValueError(
                    f"Expected n_neighbors < n_samples_fit, but n_neighbors = {k}, "
                    f"n_samples_fit = {self.n_samples_fit_}, n_samples = {self.n_samples_fit_}"
                )
            zero_queries = self._zero_fit
        else:
            X = validate_data(self, X, dtype=[np.float64, np.float32], accept_sparse="csr",
                              reset=False)
            if k > self.n_samples_fit_:
                raise ValueError(
                    f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, "
                    f"n_samples_fit = {self.n_samples_fit_}, n_samples = {X.shape[0]}"
                )
            zero_queries = _zero_rows(X)
        indices, similarities = self._search(X, int(k), zero_queries)
        if self._zero_fit.size or zero_queries.size:
            indices, similarities = _with_zero_rows(indices, similarities, self._zero_fit, zero_queries,
                                                    self_join=X is None)
        if not return_distance:
            return indices
        distances = (1.0 - similarities.astype(np.float64)).astype(self._fit_X.dtype)
        np.maximum(distances, 0.0, out=distances)
        return distances, indices

    def _search(self, X, k: int, zero_queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """allknn's search among the non-zero rows (zero rows dropped, added
        back as similarity-0 candidates by :func:`_with_zero_rows`), ``k``
        columns, -1 / NaN where there are fewer candidates."""
        n_queries = self.n_samples_fit_ if X is None else X.shape[0]
        candidates = self.n_samples_fit_ - self._zero_fit.size - (1 if X is None else 0)
        found = min(k, candidates)
        indices = np.full((n_queries, k), -1, dtype=np.int64)
        similarities = np.full((n_queries, k), np.nan, dtype=np.float32)
        if found < 1 or zero_queries.size == n_queries:
            return indices, similarities
        invalid = "drop" if self._zero_fit.size or zero_queries.size else "raise"
        result = neighbors(self._fit_X, found, queries=None if X is None else _another_object(X),
                           max_memory=self.max_memory, threads=self._threads(), invalid=invalid)
        indices[:, :found], similarities[:, :found] = result.indices, result.similarities
        return indices, similarities

    def kneighbors_graph(self, X=None, n_neighbors: int | None = None, mode: str = "connectivity"):
        """The kNN graph as a sparse matrix.

        Returns
        -------
        scipy.sparse.csr_matrix of shape (n_queries, n_samples_fit)
            Cosine distances (``mode="distance"``, explicit zeros kept) or
            ones (``"connectivity"``) at each sample's neighbours.
        """
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        k = self.n_neighbors if n_neighbors is None else n_neighbors
        distances, indices = self.kneighbors(X, k, return_distance=True)
        n_queries = indices.shape[0]
        data = distances.ravel() if mode == "distance" else np.ones(indices.size)
        indptr = np.arange(0, n_queries * indices.shape[1] + 1, indices.shape[1])
        shape = (n_queries, self.n_samples_fit_)
        return scipy.sparse.csr_matrix((data, indices.ravel(), indptr), shape=shape)

    def radius_neighbors(self, X=None, radius: float | None = None, return_distance: bool = True,
                         sort_results: bool = False):
        """Every training sample within cosine distance ``radius`` of each query sample.

        Exact: each row is searched with a growing ``k`` (doubling, from
        ``max(n_neighbors, 16)``) until its list reaches past the radius.

        Parameters
        ----------
        X : array-like of shape (n_queries, n_features), optional
            ``None``: the training samples, each excluding itself.
        radius : float, optional
            Default ``self.radius``; neighbours at a distance ``<= radius``.
        return_distance : bool
        sort_results : bool
            Accepted for scikit-learn's signature; results are always
            sorted by distance (ties by smaller index).

        Returns
        -------
        neigh_dist : ndarray of shape (n_queries,), object
            Arrays of distances (only with ``return_distance``).
        neigh_ind : ndarray of shape (n_queries,), object
            Arrays of int64 indices.
        """
        check_is_fitted(self, "_fit_X")
        radius = self.radius if radius is None else radius
        if isinstance(radius, bool) or not isinstance(radius, int | float | np.number) or not radius >= 0:
            raise ValueError(f"radius must be a non-negative number, got {radius!r}")
        if X is not None:
            X = validate_data(self, X, dtype=[np.float64, np.float32], accept_sparse="csr", reset=False)
        n_queries = self.n_samples_fit_ if X is None else X.shape[0]
        most = self.n_samples_fit_ - 1 if X is None else self.n_samples_fit_
        distances = np.empty(n_queries, dtype=object)
        indices = np.empty(n_queries, dtype=object)
        todo = np.arange(n_queries)
        k = min(most, max(self.n_neighbors, 16))
        while todo.size:
            dist, ind = self._rows_kneighbors(X, todo, k)
            complete = (dist[:, -1] > radius) | (k >= most)
            for row, d, i in zip(todo[complete], dist[complete], ind[complete], strict=True):
                inside = d <= radius
                distances[row], indices[row] = d[inside], i[inside]
            todo = todo[~complete]
            k = min(most, 2 * k)
        return (distances, indices) if return_distance else indices

    def _rows_kneighbors(self, X, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`kneighbors` of some query rows (training rows for ``X=None``, each itself excluded)."""
        if X is not None:
            return self.kneighbors(X[rows], k)
        if rows.size == self.n_samples_fit_:
            return self.kneighbors(None, k)
        dist, ind = self.kneighbors(self._fit_X[rows], min(k + 1, self.n_samples_fit_))
        other = ind != rows[:, None]
        keep = np.cumsum(other, axis=1) <= k  # the first k entries that are not the row itself
        chosen = other & keep
        return dist[chosen].reshape(rows.size, k), ind[chosen].reshape(rows.size, k)

    def radius_neighbors_graph(self, X=None, radius: float | None = None, mode: str = "connectivity",
                               sort_results: bool = False):
        """:meth:`radius_neighbors` as a sparse matrix of shape (n_queries, n_samples_fit):
        distances (``mode="distance"``, explicit zeros kept) or ones."""
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        distances, indices = self.radius_neighbors(X, radius, return_distance=True)
        lengths = np.array([i.size for i in indices], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        columns = np.concatenate([*indices, np.zeros(0, np.int64)])
        data = np.concatenate([*distances, np.zeros(0)]) if mode == "distance" else np.ones(columns.size)
        return scipy.sparse.csr_matrix((data, columns, indptr), shape=(indices.size, self.n_samples_fit_))

    def transform(self, X):
        """Graph of each sample's neighbours among the training samples.

        As scikit-learn's ``KNeighborsTransformer``: in ``"distance"`` mode
        each row has ``n_neighbors + 1`` entries, the sample itself counted
        as its own first neighbour when it was in the training data.

        Returns
        -------
        scipy.sparse.csr_matrix of shape (n_samples, n_samples_fit)
        """
        check_is_fitted(self, "_fit_X")
        if self.mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {self.mode!r}")
        extra = int(self.mode == "distance")
        return self.kneighbors_graph(X, self.n_neighbors + extra, mode=self.mode)

    def fit_transform(self, X, y=None):
        """``fit(X).transform(X)``."""
        return self.fit(X).transform(X)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.allow_nan = False
        tags.input_tags.sparse = True
        return tags
