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

    def __init__(self, n_neighbors: int = 5, *, mode: str = "distance", max_memory: str | int = "1GB",
                 n_jobs: int | None = None):
        self.n_neighbors = n_neighbors
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
            result = neighbors(self._fit_X, int(k), max_memory=self.max_memory, threads=self._threads(),
                               invalid=self._invalid(self._fit_X))
            zero_queries = self._zero_fit
        else:
            X = validate_data(self, X, dtype=[np.float64, np.float32], accept_sparse="csr",
                              reset=False)
            if k > self.n_samples_fit_:
                raise ValueError(
                    f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, "
                    f"n_samples_fit = {self.n_samples_fit_}, n_samples = {X.shape[0]}"
                )
            result = neighbors(self._fit_X, int(k), queries=_another_object(X),
                               max_memory=self.max_memory, threads=self._threads(),
                               invalid=self._invalid(self._fit_X, X))
            zero_queries = _zero_rows(X)
        indices, similarities = result.indices, result.similarities
        if self._zero_fit.size or zero_queries.size:
            indices, similarities = _with_zero_rows(indices, similarities, self._zero_fit, zero_queries,
                                                    self_join=X is None)
        if not return_distance:
            return indices
        distances = (1.0 - similarities.astype(np.float64)).astype(self._fit_X.dtype)
        np.maximum(distances, 0.0, out=distances)
        return distances, indices

    def _invalid(self, *matrices) -> str:
        """Drop the zero rows from the search when there are any (they are
        added back as similarity-0 candidates)."""
        return "drop" if any(_zero_rows(m).size for m in matrices) else "raise"

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
