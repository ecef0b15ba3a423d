"""A scikit-learn estimator: cosine nearest neighbours, exact and fast.

``CosineNeighbors`` is a drop-in for
``NearestNeighbors(metric="cosine", algorithm="brute")`` and for
``KNeighborsTransformer(metric="cosine")``: same methods, same conventions
(``X=None`` excludes each sample itself, distances are ``1 - similarity``,
``transform`` adds one neighbour in ``"distance"`` mode for the sample
itself), so it plugs into pipelines, ``Isomap``, ``TSNE(metric="precomputed")``,
``DBSCAN``, HDBSCAN and UMAP. Requires the ``sklearn`` extra.
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
            result = neighbors(self._fit_X, int(k), max_memory=self.max_memory, threads=self._threads())
        else:
            X = validate_data(self, X, dtype=[np.float64, np.float32], accept_sparse="csr",
                              reset=False)
            if k > self.n_samples_fit_:
                raise ValueError(
                    f"Expected n_neighbors <= n_samples_fit, but n_neighbors = {k}, "
                    f"n_samples_fit = {self.n_samples_fit_}, n_samples = {X.shape[0]}"
                )
            result = neighbors(self._fit_X, int(k), queries=_another_object(X),
                               max_memory=self.max_memory, threads=self._threads())
        if not return_distance:
            return result.indices
        distances = (1.0 - result.similarities.astype(np.float64)).astype(self._fit_X.dtype)
        np.maximum(distances, 0.0, out=distances)
        return distances, result.indices

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
