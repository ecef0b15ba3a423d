"""Working memory stays inside the ``max_memory`` budget."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import allknn
from allknn.datasets import make_clustered

MB = 10**6


def _peak_bytes(fn) -> tuple[object, int]:
    """Run ``fn`` under tracemalloc; return its result and the traced peak."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


@pytest.mark.slow
def test_peak_memory_within_budget():
    """200k x 64 rows, 32 MB budget: peak minus the normalised copy and the result stays below 32 MB."""
    n, d, k = 200_000, 64, 10
    X = make_clustered(n, d, n_clusters=300, seed=1)
    res, peak = _peak_bytes(lambda: allknn.neighbors(X, k, max_memory="32MB", threads=2))
    assert res.indices.shape == (n, k)
    unavoidable = n * d * 4 + n * k * (8 + 4)
    working = peak - unavoidable
    assert working < 32 * MB, f"working memory {working / MB:.1f} MB exceeds the 32 MB budget"
    # spot-check correctness of a few rows against brute force
    rows = np.arange(0, n, 20_000)
    A = X.astype(np.float64)
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    S = A[rows] @ A.T
    S[np.arange(rows.size), rows] = -np.inf
    best = -np.sort(-S, axis=1)[:, :k]
    np.testing.assert_allclose(res.similarities[rows], best, rtol=0, atol=1e-6)


def test_budget_too_small_for_minimum_tile_raises():
    """A budget that cannot hold the smallest tile is an error, before any work."""
    X = make_clustered(2_000, 64, n_clusters=10, seed=2)
    with pytest.raises(ValueError, match=r"max_memory=20000 bytes is too small for 2 thread\(s\) at 64 "
                                         r"dimensions; give at least \d+ bytes"):
        allknn.neighbors(X, 5, max_memory="20KB", threads=2)
    with pytest.raises(ValueError, match="too small for 1 thread"):
        allknn.neighbors(X, 5, max_memory="10KB", threads=1)


@pytest.mark.parametrize("n", [6_000, 40_000])
def test_small_budget_is_honoured(n):
    """A 4 MB budget, below and above the row-ordering threshold: working memory stays below it.

    Besides the normalised copy and the result, a few length-n vectors
    (norms, a row permutation and its inverse) are allowed for.
    """
    d, k = 16, 5
    X = make_clustered(n, d, n_clusters=40, seed=3)
    allknn.neighbors(X[:100], k, threads=2)  # compile or load the kernels outside the measurement
    budget = 4 * MB
    res, peak = _peak_bytes(lambda: allknn.neighbors(X, k, max_memory=budget, threads=2))
    working = peak - (n * d * 4 + n * k * 12) - 4 * n * 8
    assert working < budget, f"working memory {working / MB:.2f} MB exceeds the 4 MB budget"
    assert res.indices.shape == (n, k)


def test_explicit_block_rows_respects_budget():
    """An explicit block size may not take more than max_memory: honour it or raise."""
    n, d = 3_000, 8
    X = np.random.default_rng(4).standard_normal((n, d)).astype(np.float32)
    budget = 4 * MB
    try:
        res, peak = _peak_bytes(
            lambda: allknn.neighbors(X, 3, block_rows=3_000, max_memory=budget, threads=1)
        )
    except ValueError as exc:
        assert "max_memory" in str(exc)
        return
    working = peak - (n * d * 4 + n * 3 * 12)
    assert working < budget, f"block_rows=3000 used {working / MB:.1f} MB of working memory, budget 4 MB"
    assert res.indices.shape == (n, 3)
