"""The result is a function of the data alone: the reference similarity, bit for bit.

Products only nominate candidates; whatever their rounding (another BLAS
kernel, tile shape, thread count, a GPU), the result is the top-k under the
reference similarity, ties by smaller index. These tests would catch a
result that depends on the CPU on any machine: tile products are moved by a
seeded random amount within the proven error bound, a committed golden file
fixes every index and similarity bit, and adversarial near-ties are checked
against a plain numpy implementation of the reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import allknn
import allknn.engines.approx.cells
import allknn.engines.exact.blocks
from allknn.engines.exact.sparse_layout import SparseLayout
from allknn.kernels.reference import dense_dot, sparse_dot, unit_row_norms
from allknn.rows import normalize_rows
from allknn.topk.bounds import nomination_margin, product_error
from conftest import (
    DATA,
    REAL,
    assert_exact,
    assert_same_result,
    clustered_with_duplicates,
    exact_reference_topk,
    reference_similarities,
    reference_unit_rows,
)

GOLDEN = DATA / "golden_debian4000_k10.npz"


# --------------------------------------------------------------------------- the reference itself


def test_kernel_reference_equals_the_numpy_reference(rng):
    """The compiled reference equals a plain numpy implementation of the
    written definition, for every dimension's lane remainder."""
    for d in (1, 7, 8, 9, 33, 384):
        X = rng.standard_normal((40, d)).astype(np.float32) * np.float32(10.0) ** rng.integers(-3, 3, (40, 1))
        normed = normalize_rows(X, name="X", block_rows=16, invalid="raise")
        unit, norms = reference_unit_rows(X)
        np.testing.assert_array_equal(normed.rows, unit)
        np.testing.assert_array_equal(normed.norms, norms)
        kernel_norms = np.empty(40)
        unit_row_norms(unit, kernel_norms)
        np.testing.assert_array_equal(kernel_norms, norms)
        dots = np.array([[dense_dot(unit, i, unit, j) for j in range(40)] for i in range(40)])
        cos = np.clip(dots / np.outer(norms, norms), -1, 1).astype(np.float32)
        np.testing.assert_array_equal(cos.view(np.int32), reference_similarities(X, X).view(np.int32))


def test_reference_dot_does_not_depend_on_the_order_of_summation(rng):
    """The grid sum is exact: any order of the columns gives the same bits."""
    a, b = (rng.standard_normal(384).astype(np.float32) / np.float32(20) for _ in range(2))
    base = dense_dot(a[None], 0, b[None], 0)
    for _ in range(5):
        order = rng.permutation(384)
        assert dense_dot(a[None, order], 0, b[None, order], 0) == base


def test_sparse_reference_equals_dense_reference(rng):
    """A sparse row sums its stored columns into the same lanes: the dense value."""
    X = sp.random(30, 50, density=0.3, format="csr", random_state=3, dtype=np.float32)
    dense = X.toarray()
    for i in range(30):
        for j in range(30):
            assert (sparse_dot(X.indptr, X.indices, X.data, i, X.indptr, X.indices, X.data, j)
                    == dense_dot(dense, i, dense, j))


def test_sparse_and_dense_input_give_identical_results():
    """The same matrix given dense or as CSR: bit-identical neighbours and similarities."""
    rng = np.random.default_rng(5)
    X = sp.random(500, 300, density=0.05, format="csr", random_state=5, dtype=np.float32)
    X = X[np.asarray(X.getnnz(axis=1)) > 0]
    X.data = np.round(X.data * 4) / 4 + 0.25  # many exact ties
    for k in (3, 15):
        assert_same_result(allknn.neighbors(X, k), allknn.neighbors(X.toarray(), k))
    Q = X[rng.choice(X.shape[0], 40, replace=False)]
    assert_same_result(allknn.neighbors(X, 5, queries=Q),
                       allknn.neighbors(X.toarray(), 5, queries=Q.toarray()))


def test_product_error_grows_with_terms_and_precision():
    assert product_error(100) < product_error(384) < product_error(384, "tf32") < product_error(384, "bf16")
    assert 100 * 2**-24 < product_error(100) < 110 * 2**-24
    assert nomination_margin(100) >= product_error(100) + 2**-23
    with pytest.raises(ValueError, match="too many"):
        product_error(2**24)


# --------------------------------------------------------------------------- perturbed products


def _perturbed_product(seed: int, terms: int | None = None):
    """A stand-in for the BLAS tile product: the float64 product rounded to
    float32, then moved by a seeded random amount within the error bound of
    ``terms`` non-zero products (default: every column)."""
    rng = np.random.default_rng(seed)

    def product(a, b, out):
        exact = (a.astype(np.float64) @ b.astype(np.float64).T).astype(np.float32)
        room = np.float32(product_error(terms or a.shape[1]) - 2.0**-21)
        out[...] = exact + rng.uniform(-1, 1, size=exact.shape).astype(np.float32) * room

    return product


@pytest.fixture
def perturbed(monkeypatch):
    """Patch every tile product (exact tiles, sparse dense tiles, probe tiles)."""

    def patch(seed: int, terms: int | None = None) -> None:
        product = _perturbed_product(seed, terms)
        monkeypatch.setattr(allknn.engines.exact.blocks, "dense_product", product)
        monkeypatch.setattr(allknn.engines.approx.cells, "dense_product", product)

    return patch


@pytest.mark.parametrize("seed", [0, 1])
def test_perturbed_products_give_the_identical_dense_result(perturbed, seed):
    X = clustered_with_duplicates(700, 24, seed=3)
    Q = X[::7] + np.float32(1e-3)
    base_self = allknn.neighbors(X, 7, block_rows=128, threads=2)
    base_query = allknn.neighbors(X, 7, queries=Q, block_rows=128, threads=2)
    perturbed(seed)
    assert_same_result(allknn.neighbors(X, 7, block_rows=64, threads=2), base_self)
    assert_same_result(allknn.neighbors(X, 7, queries=Q, block_rows=192, threads=1), base_query)
    assert_exact(base_self, exact_reference_topk(X, 7))


def test_perturbed_products_give_the_identical_sparse_result(perturbed, monkeypatch):
    """Sparse rows multiplied as dense tiles over all their columns, perturbed."""
    X = sp.random(400, 60, density=0.15, format="csr", random_state=2, dtype=np.float32)
    X = X[np.asarray(X.getnnz(axis=1)) > 0]
    X.data = np.round(X.data * 3) + 1
    base = allknn.neighbors(X, 6, block_rows=128)
    everything = SparseLayout(np.arange(X.shape[1], dtype=np.int64), accumulate=False)
    monkeypatch.setattr(allknn.engines.exact, "sparse_layout", lambda *args, **kwargs: everything)
    perturbed(7, terms=int(np.diff(X.indptr).max()))  # the bound of the stored values a row has
    assert_same_result(allknn.neighbors(X, 6, block_rows=64), base)
    assert_same_result(base, allknn.neighbors(X.toarray(), 6))


def test_perturbed_products_give_the_identical_approximate_result(perturbed):
    X = np.load(REAL)[:3000].astype(np.float32)
    options = {"method": "approx", "probes": 3, "refine": 1, "cells": 40, "seed": 4}
    base = allknn.neighbors(X, 10, threads=2, block_rows=256, **options)
    perturbed(3)
    assert_same_result(allknn.neighbors(X, 10, threads=1, block_rows=64, **options), base)


# --------------------------------------------------------------------------- golden file


def test_golden_file_reproduced_bit_for_bit():
    """4000 real rows, k=10: every machine returns exactly these indices and
    similarity bits (made once and checked against the numpy reference)."""
    X = np.load(REAL)
    golden = np.load(GOLDEN)
    for block_rows, threads in ((1024, 2), (192, 1)):
        res = allknn.neighbors(X, 10, block_rows=block_rows, threads=threads)
        np.testing.assert_array_equal(res.indices, golden["indices"])
        np.testing.assert_array_equal(res.similarities.view(np.int32), golden["similarity_bits"])


# --------------------------------------------------------------------------- adversarial near-ties


def _near_ties(n: int, d: int, *, spread: float, seed: int) -> np.ndarray:
    """Row 0 and ``n - 1`` candidates whose similarity to it lies within
    ``spread`` of 0.8: many equal in float32, some apart by less than its ulp."""
    rng = np.random.default_rng(seed)
    axis = np.zeros(d)
    axis[0] = 1.0
    other = rng.standard_normal((n - 1, d))
    other[:, 0] = 0
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    c = 0.8 + rng.uniform(-spread, spread, size=n - 1)
    rows = c[:, None] * axis + np.sqrt(1 - c * c)[:, None] * other
    return np.vstack([axis, rows]).astype(np.float32)


@pytest.mark.parametrize("spread", [1e-7, 1e-6])
def test_near_ties_within_1e7_of_the_cut(spread):
    X = _near_ties(400, 16, spread=spread, seed=int(spread * 1e7))
    ref = exact_reference_topk(X, 10, queries=X[:1])
    s = ref.full[0]
    assert (np.abs(s - ref.similarities[0, -1]) < 2e-7).sum() > 20, "many near-ties at the cut"
    for block_rows, threads in ((64, 1), (1024, 2)):
        assert_exact(allknn.neighbors(X, 10, queries=X[:1], block_rows=block_rows, threads=threads), ref)
    assert_exact(allknn.neighbors(X, 10, block_rows=64, threads=2), exact_reference_topk(X, 10))


def test_duplicate_group_far_larger_than_k():
    """80 copies of one row among others: each copy lists the 5 smallest other copies."""
    rng = np.random.default_rng(9)
    X = rng.standard_normal((300, 12)).astype(np.float32)
    copies = np.sort(rng.choice(300, 80, replace=False))
    X[copies] = X[copies[0]] * rng.choice(np.float32([0.5, 1, 2, 4]), size=(80, 1))  # exact scalings
    res = allknn.neighbors(X, 5, block_rows=64, threads=2)
    assert_exact(res, exact_reference_topk(X, 5))
    assert (res.similarities[copies] == 1.0).all()
    for row in copies[:10]:
        np.testing.assert_array_equal(res.indices[row], [c for c in copies if c != row][:5])


def test_rows_where_every_candidate_ties():
    """Every row identical: each lists the k smallest other indices at 1.0."""
    X = np.tile(np.float32([[0.3, -0.1, 0.7]]), (150, 1))
    res = allknn.neighbors(X, 4, block_rows=64, threads=2)
    assert_exact(res, exact_reference_topk(X, 4))
    assert (res.similarities == 1.0).all()
