"""Cluster ordering of rows: a speed device that must never change a result."""

from __future__ import annotations

import numpy as np
import pytest

import allknn
import allknn.engines.exact
from allknn.engines.kmeans import cluster_order
from allknn.kernels.topk import permute_rows
from conftest import REAL, assert_same_result, assert_topk_equal, clustered_with_duplicates, reference_topk


def test_cluster_order_is_a_seeded_permutation():
    X = clustered_with_duplicates(3000, 16, seed=4)
    A = (X / np.linalg.norm(X, axis=1, keepdims=True)).astype(np.float32)
    order = cluster_order(A, budget=10**9, seed=1)
    assert order.dtype == np.int64
    np.testing.assert_array_equal(np.sort(order), np.arange(3000))
    np.testing.assert_array_equal(order, cluster_order(A, budget=10**9, seed=1))


def test_permute_rows_in_place_and_back(rng):
    M = rng.standard_normal((500, 7)).astype(np.float32)
    order = rng.permutation(500).astype(np.int64)
    work = M.copy()
    permute_rows(work, order)
    np.testing.assert_array_equal(work, M[order])
    permute_rows(work, np.argsort(order))
    np.testing.assert_array_equal(work, M)


@pytest.fixture
def always_order(monkeypatch):
    """Order rows even for small inputs."""
    monkeypatch.setattr(allknn.engines.exact, "MIN_ROWS", 1)


def _search(X, k, *, order: bool, monkeypatch, **kwargs):
    with monkeypatch.context() as patch:
        patch.setattr(allknn.engines.exact, "MIN_ROWS", 1 if order else 10**12)
        return allknn.neighbors(X, k, **kwargs)


def test_ordering_does_not_change_the_result(monkeypatch):
    X = clustered_with_duplicates(2500, 12, seed=9)
    for block_rows in (64, 300, 4096):
        plain = _search(X, 9, order=False, monkeypatch=monkeypatch, block_rows=block_rows)
        ordered = _search(X, 9, order=True, monkeypatch=monkeypatch, block_rows=block_rows, threads=2)
        assert_same_result(plain, ordered)


def test_ordering_leaves_the_input_and_its_copy_untouched(always_order):
    X = clustered_with_duplicates(1200, 10, seed=2)
    before = X.copy()
    allknn.neighbors(X, 5, block_rows=128)
    np.testing.assert_array_equal(X, before)


def test_real_embeddings_with_ordering_match_reference(always_order):
    X = np.load(REAL)
    result = allknn.neighbors(X, 10, block_rows=512)
    ref = reference_topk(X.astype(np.float32), 10)
    assert_topk_equal(result, ref.similarities, ref.indices, full=ref.full)
    # real duplicates: every row with an exact copy lists neighbours at 1.0 first, by index,
    # its copies among them while there is room
    _, inverse, counts = np.unique(X, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.ravel()
    duplicated = np.flatnonzero(counts[inverse] > 1)
    assert duplicated.size > 100
    assert (result.similarities[duplicated, 0] == 1.0).all()
    for row in duplicated:
        at_one = result.indices[row][result.similarities[row] == 1.0]
        assert (np.diff(at_one) > 0).all()
        copies = set(np.flatnonzero(inverse == inverse[row]).tolist()) - {row}
        if at_one.size < 10:
            assert copies <= set(at_one.tolist()), row


@pytest.mark.slow
def test_default_ordering_above_threshold_matches_reference_rows():
    """n above the ordering threshold: sampled rows against float64 brute force."""
    X = clustered_with_duplicates(allknn.engines.exact.MIN_ROWS + 500, 24, seed=6, n_copies=200)
    result = allknn.neighbors(X, 12)
    rows = np.random.default_rng(3).choice(X.shape[0], size=300, replace=False)
    A = X.astype(np.float64) / np.linalg.norm(X.astype(np.float64), axis=1, keepdims=True)
    full = A[rows] @ A.T
    full[np.arange(rows.size), rows] = -np.inf
    order = np.argsort(-full, axis=1, kind="stable")[:, :12]
    sims = np.take_along_axis(full, order, axis=1)

    class Sub:
        indices = result.indices[rows]
        similarities = result.similarities[rows]

    assert_topk_equal(Sub, sims, order, full=full)


def test_cluster_order_gives_up_inside_a_tiny_budget():
    A = np.eye(3000, 16, dtype=np.float32) + 0.01
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    assert cluster_order(A, budget=10_000) is None
    assert cluster_order(A, budget=10**8) is not None
