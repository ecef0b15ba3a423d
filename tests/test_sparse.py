"""Sparse input: same contract as dense, never densified whole."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import allknn
from conftest import assert_same_result, assert_topk_equal, reference_topk


def _user_item(n_users: int, n_items: int, per_user: int, seed: int) -> sp.csr_matrix:
    """Power-law item popularity, a few interactions per user, float32 counts."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.9
    rows = np.repeat(np.arange(n_users), per_user)
    cols = rng.choice(n_items, size=rows.size, p=popularity / popularity.sum())
    counts = rng.integers(1, 5, size=rows.size).astype(np.float32)
    return sp.csr_matrix((counts, (rows, cols)), shape=(n_users, n_items))


@pytest.fixture
def interactions() -> sp.csr_matrix:
    X = _user_item(900, 300, 6, seed=1).tolil()
    X[5] = X[7]  # a duplicate user
    return X.tocsr()


@pytest.mark.parametrize("fmt", ["csr", "csc", "coo", "csr_array"])
def test_sparse_formats_equal_the_dense_reference(interactions, fmt):
    X = interactions.asformat(fmt) if fmt != "csr_array" else sp.csr_array(interactions)
    result = allknn.neighbors(X, 8, threads=2)
    ref = reference_topk(interactions.toarray(), 8)
    assert_topk_equal(result, ref.similarities, ref.indices, full=ref.full)
    assert result.similarities[5, 0] == 1.0 and result.indices[5, 0] == 7


def test_sparse_matches_dense_input_tie_aware(interactions):
    sparse = allknn.neighbors(interactions, 6)
    dense = allknn.neighbors(interactions.toarray(), 6)
    assert_topk_equal(sparse, dense.similarities, dense.indices)


@pytest.mark.parametrize("block_rows", [64, 128, 1024])
@pytest.mark.parametrize("threads", [1, 3])
def test_sparse_independent_of_block_rows_and_threads(interactions, block_rows, threads):
    assert_same_result(allknn.neighbors(interactions, 7, block_rows=block_rows, threads=threads),
                       allknn.neighbors(interactions, 7))


def test_sparse_query_form_and_mixed_input(interactions):
    Q = interactions[:120]
    sparse_q = allknn.neighbors(interactions, 5, queries=Q)
    ref = reference_topk(interactions.toarray(), 5, queries=Q.toarray())
    assert_topk_equal(sparse_q, ref.similarities, ref.indices, full=ref.full)
    assert_same_result(allknn.neighbors(interactions, 5, queries=Q.toarray()), sparse_q)


def test_empty_rows_raise_or_drop(interactions):
    X = interactions.tolil()
    X[[3, 40]] = 0
    X = X.tocsr()
    with pytest.raises(ValueError, match=r"X has 2 all-zero row\(s\).*\(rows 3, 40\).*invalid='drop'"):
        allknn.neighbors(X, 4)
    result = allknn.neighbors(X, 4, invalid="drop")
    assert (result.indices[[3, 40]] == -1).all() and np.isnan(result.similarities[[3, 40]]).all()
    assert not np.isin(result.indices, [3, 40]).any()
    ref = reference_topk(X.toarray(), 4, drop_invalid=True)
    assert_topk_equal(result, ref.similarities, ref.indices, full=ref.full)


def test_nan_in_sparse_data_is_named(interactions):
    X = interactions.copy()
    X.data[X.indptr[9]] = np.nan
    with pytest.raises(ValueError, match=r"1 row\(s\) containing NaN or Inf \(rows 9\)"):
        allknn.neighbors(X, 3)


def test_millions_of_columns_in_bounded_memory():
    """A 3-million-word vocabulary: never densified (a dense block would be GBs)."""
    rng = np.random.default_rng(4)
    n, vocab, per_row = 2000, 3_000_000, 12
    rows = np.repeat(np.arange(n), per_row)
    cols = rng.integers(0, vocab, size=rows.size)
    cols[::3] = rng.integers(0, 50, size=cols[::3].size)  # shared frequent words
    X = sp.csr_matrix((rng.random(rows.size, dtype=np.float32) + 0.1, (rows, cols)), shape=(n, vocab))
    result = allknn.neighbors(X, 5, max_memory="64MB")
    sample = np.arange(0, n, 97)
    Xn = X.multiply(1 / np.sqrt(X.multiply(X).sum(axis=1))).tocsr()
    S = (Xn[sample] @ Xn.T).toarray()
    S[np.arange(sample.size), sample] = -np.inf
    best = -np.sort(-S, axis=1)[:, :5]
    np.testing.assert_allclose(result.similarities[sample], best, rtol=0, atol=1e-6)


def test_sparse_checkpoint_fingerprint_sees_values(interactions, tmp_path):
    path = tmp_path / "s.ckpt"
    allknn.neighbors(interactions, 4, checkpoint=path)
    changed = interactions.copy()
    changed.data[0] += 1
    with pytest.raises(ValueError, match="X: checkpoint has"):
        allknn.neighbors(changed, 4, checkpoint=path)


def test_dense_columns_split_matches_pure_scatter(interactions, monkeypatch):
    import allknn._sparse

    assert allknn._sparse.dense_columns(interactions, 10**9).size > 0  # the fixture has popular items
    hybrid = allknn.neighbors(interactions, 6)
    monkeypatch.setattr(allknn._sparse, "DENSE_COLUMN_DENSITY", 2.0)  # nothing dense
    assert allknn._sparse.dense_columns(interactions, 10**9).size == 0
    scatter = allknn.neighbors(interactions, 6)
    assert_topk_equal(hybrid, scatter.similarities, scatter.indices)
    assert_same_result(allknn.neighbors(interactions, 6, block_rows=64, threads=3), scatter)


def test_dense_columns_respect_the_budget(interactions):
    from allknn._sparse import dense_columns

    everything = dense_columns(interactions, 10**9)
    capped = dense_columns(interactions, 4 * interactions.shape[0] * 2)  # room for two columns
    assert capped.size == 2 and np.isin(capped, everything).all()
    counts = np.bincount(interactions.indices, minlength=interactions.shape[1])
    assert counts[capped].min() >= np.sort(counts[everything])[-2]


def _very_sparse(n: int, d: int, per_row: int, seed: int, signed: bool) -> sp.csr_matrix:
    """Short rows over many columns (most pairs share none); some rows share
    nothing with anybody, so zero-similarity neighbours matter."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(n), per_row)
    cols = rng.integers(0, d - 5 * per_row, size=rows.size)
    cols[: 5 * per_row] = d - 1 - np.arange(5 * per_row)  # five rows with columns nobody else has
    values = rng.random(rows.size).astype(np.float32) + 0.1
    if signed:
        values[rng.random(rows.size) < 0.5] *= -1
    matrix = sp.csr_matrix((values, (rows, cols)), shape=(n, d))
    matrix.sum_duplicates()
    return matrix


@pytest.mark.parametrize("signed", [False, True])
def test_accumulated_tiles_equal_dense_tiles_and_the_reference(monkeypatch, signed):
    """Row-by-row accumulation (chosen for very sparse tiles) gives bit for
    bit the dense-tile result, including the zero-similarity neighbours of
    rows with fewer than k positive ones (smallest index first, ahead of
    negative ones)."""
    import allknn.engines.exact as exact

    X = _very_sparse(1500, 3000, 3, seed=5, signed=signed)
    k = 6
    monkeypatch.setattr(exact, "SPARSE_PRODUCT_SHARE", 0.0)  # dense tiles everywhere
    dense = allknn.neighbors(X, k, block_rows=256)
    monkeypatch.setattr(exact, "SPARSE_PRODUCT_SHARE", 10.0**9)  # accumulate everywhere
    accumulated = allknn.neighbors(X, k, block_rows=256)
    assert_same_result(accumulated, dense)
    assert_same_result(allknn.neighbors(X, k, block_rows=64, threads=3), accumulated)
    reference = reference_topk(X.toarray(), k)
    assert_topk_equal(accumulated, reference)
    assert (accumulated.similarities[:5] == 0).all()  # the isolated rows: zeros, smallest indices
    np.testing.assert_array_equal(accumulated.indices[0], [1, 2, 3, 4, 5, 6])
    Q = X[:200]
    monkeypatch.setattr(exact, "SPARSE_PRODUCT_SHARE", 0.0)
    dense_q = allknn.neighbors(X, k, queries=Q, block_rows=128)
    monkeypatch.setattr(exact, "SPARSE_PRODUCT_SHARE", 10.0**9)
    assert_same_result(allknn.neighbors(X, k, queries=Q, block_rows=128), dense_q)


def test_very_sparse_tiles_are_accumulated():
    """The per-tile choice: tiles of short rows over a large vocabulary are
    accumulated, tiles with dense columns are not."""
    from allknn.engines.exact import SelfJoinPlan

    X = _very_sparse(1500, 3000, 3, seed=5, signed=False)
    plan = SelfJoinPlan(X, block_rows=256)
    assert plan.accumulated is not None and plan.accumulated.all()
    crowded = sp.random(600, 20, density=0.5, format="csr", random_state=1, dtype=np.float32)
    assert not SelfJoinPlan(crowded, block_rows=256).accumulated.any()
