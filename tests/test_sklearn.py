"""The scikit-learn estimator: sklearn's own checks and equality with NearestNeighbors."""

from __future__ import annotations

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn")
from sklearn.neighbors import KNeighborsTransformer, NearestNeighbors  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

from allknn.datasets import make_clustered  # noqa: E402
from allknn.sklearn import CosineNeighbors  # noqa: E402


@parametrize_with_checks([CosineNeighbors(), CosineNeighbors(mode="connectivity", n_neighbors=3)])
def test_sklearn_estimator_checks(estimator, check):
    """scikit-learn's own checks pass whole (zero rows included)."""
    check(estimator)


@pytest.mark.parametrize("queries", [False, True])
def test_users_without_interactions_as_in_sklearn(queries):
    """The seed case: NearestNeighbors(metric="cosine") on a user x item
    matrix where some users have no interactions. Zero rows are at distance
    1 from everyone, ties by smaller index."""
    import scipy.sparse as sp
    from sklearn.neighbors import NearestNeighbors

    rng = np.random.default_rng(3)
    M = sp.random(2000, 500, density=0.01, random_state=3, format="lil", dtype=np.float64)
    empty = rng.choice(2000, 100, replace=False)
    M[empty] = 0
    M = M.tocsr()
    M.eliminate_zeros()
    Q = M[:300] if queries else None
    want_d, want_i = NearestNeighbors(n_neighbors=10, metric="cosine", algorithm="brute").fit(M).kneighbors(Q)
    got_d, got_i = CosineNeighbors(n_neighbors=10).fit(M).kneighbors(Q)
    np.testing.assert_allclose(got_d, want_d, atol=1e-6)
    for row in range(got_i.shape[0]):  # the same neighbours wherever the distance decides
        clear = want_d[row] < want_d[row, -1] - 1e-6
        assert set(got_i[row][clear]) == set(want_i[row][clear])
    zero_queries = np.intersect1d(empty, np.arange(got_i.shape[0]))
    for row in zero_queries:  # distance 1 to all: the first rows, itself excluded without queries
        expected = [j for j in range(12) if queries or j != row][:10]
        assert got_i[row].tolist() == expected
        assert (got_d[row] == 1.0).all()


def _assert_same_neighbours(dist, ind, want_dist, want_ind, atol=1e-5):
    np.testing.assert_allclose(dist, want_dist, rtol=0, atol=atol)
    # indices may differ only among near-equal distances
    differ = ind != want_ind
    assert np.allclose(dist[differ], want_dist[differ], atol=atol)


@pytest.mark.parametrize("queries", [False, True])
def test_equals_sklearn_nearest_neighbors(queries):
    X = make_clustered(1500, 24, n_clusters=15, seed=4).astype(np.float64)
    X[40] = X[41]
    Q = make_clustered(200, 24, n_clusters=15, seed=5).astype(np.float64) if queries else None
    ours = CosineNeighbors(n_neighbors=8).fit(X)
    theirs = NearestNeighbors(n_neighbors=8, metric="cosine", algorithm="brute").fit(X)
    dist, ind = ours.kneighbors(Q)
    want_dist, want_ind = theirs.kneighbors(Q)
    _assert_same_neighbours(dist, ind, want_dist, want_ind)
    assert dist.dtype == np.float64 and ind.dtype == np.int64


def test_transform_matches_kneighbors_transformer():
    X = make_clustered(800, 16, n_clusters=10, seed=6)
    ours = CosineNeighbors(n_neighbors=5, mode="distance").fit_transform(X)
    theirs = KNeighborsTransformer(n_neighbors=5, mode="distance", metric="cosine").fit_transform(X)
    assert ours.shape == theirs.shape == (800, 800)
    assert ours.nnz == theirs.nnz == 800 * 6
    np.testing.assert_allclose(np.sort(ours.data), np.sort(theirs.data), atol=1e-5)
    connectivity = CosineNeighbors(n_neighbors=5, mode="connectivity").fit_transform(X)
    assert connectivity.nnz == 800 * 5 and (connectivity.data == 1).all()


def test_plugs_into_dbscan_with_a_precomputed_graph():
    from sklearn.cluster import DBSCAN
    from sklearn.pipeline import make_pipeline

    X = make_clustered(600, 12, n_clusters=4, spread=0.05, seed=2)
    pipeline = make_pipeline(CosineNeighbors(n_neighbors=10), DBSCAN(eps=0.05, metric="precomputed"))
    labels = pipeline.fit_predict(X)
    reference = make_pipeline(
        KNeighborsTransformer(n_neighbors=10, metric="cosine"), DBSCAN(eps=0.05, metric="precomputed")
    ).fit_predict(X)
    np.testing.assert_array_equal(labels, reference)


def test_bad_n_neighbors_and_mode():
    est = CosineNeighbors(n_neighbors=3).fit(np.eye(5) + 0.1)
    with pytest.raises(ValueError, match="n_neighbors < n_samples_fit"):
        est.kneighbors(n_neighbors=5)
    with pytest.raises(ValueError, match="Expected n_neighbors > 0"):
        est.kneighbors(n_neighbors=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        est.kneighbors_graph(mode="weights")


def test_sparse_input_equals_sklearn():
    import scipy.sparse as sp

    X = sp.random(700, 400, density=0.03, format="csr", random_state=3, dtype=np.float64)
    X = X[np.diff(X.indptr) > 0]
    dist, ind = CosineNeighbors(n_neighbors=6).fit(X).kneighbors()
    theirs = NearestNeighbors(n_neighbors=6, metric="cosine", algorithm="brute").fit(X)
    want_dist, want_ind = theirs.kneighbors()
    _assert_same_neighbours(dist, ind, want_dist, want_ind)


@pytest.mark.parametrize("queries", [False, True])
def test_radius_neighbors_as_in_sklearn(queries):
    """Every neighbour within the radius, however many (growing k), as
    NearestNeighbors(metric="cosine").radius_neighbors; zero rows at
    distance 1."""
    X = make_clustered(600, 12, seed=5).astype(np.float64)
    X[[10, 11, 12, 13]] = X[10]  # duplicates at distance 0
    X[[20, 21]] = 0.0
    Q = X[::6] if queries else None
    for radius in (0.05, 0.4, 1.0):
        ours = CosineNeighbors(n_neighbors=3).fit(X)
        want_d, want_i = NearestNeighbors(radius=radius, metric="cosine", algorithm="brute").fit(
            X).radius_neighbors(Q)
        got_d, got_i = ours.radius_neighbors(Q, radius=radius)
        assert got_i.shape == want_i.shape
        for row in range(got_i.shape[0]):
            far = np.abs(want_d[row] - radius) > 1e-6  # clear of the boundary
            assert set(want_i[row][far]) <= set(got_i[row])
            assert np.all(np.diff(got_d[row]) >= 0) and np.all(got_d[row] <= radius)
            assert len(got_i[row]) - len(want_i[row][far]) <= (~far).sum()
        graph = ours.radius_neighbors_graph(Q, radius=radius, mode="distance")
        assert graph.nnz == sum(len(i) for i in got_i)
    many = CosineNeighbors(n_neighbors=2).fit(X).radius_neighbors(Q, radius=2.0, return_distance=False)
    assert all(len(i) == X.shape[0] - (0 if queries else 1) for i in many)  # all, past any k
