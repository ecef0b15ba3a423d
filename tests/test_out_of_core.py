"""Memory-mapped input larger than the budget is streamed, never loaded whole."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import allknn
from allknn.datasets import make_clustered

MB = 10**6


@pytest.mark.slow
def test_memmap_larger_than_budget_stays_out_of_memory(tmp_path):
    n, d, k, budget = 80_000, 64, 5, 8 * MB
    X = make_clustered(n, d, seed=12)
    np.save(tmp_path / "x.npy", X)
    expected = allknn.neighbors(X, k, max_memory="1GB")
    del X
    mapped = np.load(tmp_path / "x.npy", mmap_mode="r")
    assert mapped.nbytes > 2 * budget
    tracemalloc.start()
    try:
        result = allknn.neighbors(mapped, k, max_memory=budget, threads=2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    result_bytes = n * k * (8 + 4)
    per_row_vectors = n * 8 * 3  # norms, ordering labels and permutation
    assert peak - result_bytes - per_row_vectors < budget, f"traced peak {peak / MB:.1f} MB"
    np.testing.assert_array_equal(result.indices, expected.indices)
    np.testing.assert_array_equal(result.similarities, expected.similarities)
