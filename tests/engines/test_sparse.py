"""Sparse input: same contract as dense, never densified whole."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import allknn
from conftest import Interrupt, assert_same_result, assert_topk_equal, interrupt_after, reference_topk


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


def _stop_words_and_tail(n: int, d: int, seed: int, signed: bool = False) -> sp.csr_matrix:
    """TF-IDF-like rows: four frequent low-weight columns (stop words, in
    50%/30%/20%/12% of rows) and 2-6 words from a Zipf tail. Row 10 holds
    only stop words, row 11 a single one, rows 20-23 a column nobody else
    has (every similarity 0), row 31 repeats row 30."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, d - 4 + 1) ** 1.1
    rows, cols, values = [], [], []
    for i in range(n):
        stops = np.flatnonzero(rng.random(4) < [0.5, 0.3, 0.2, 0.12])
        words = 4 + rng.choice(d - 8, size=rng.integers(2, 7), p=zipf[:-4] / zipf[:-4].sum())
        cols += [*stops, *words]
        values += [*rng.uniform(0.05, 0.3, stops.size), *rng.uniform(0.3, 1.0, words.size)]
        rows += [i] * (stops.size + words.size)
    X = sp.csr_matrix((np.array(values, np.float32), (rows, cols)), shape=(n, d)).tolil()
    X[10], X[11] = 0, 0
    X[10, 0], X[10, 1], X[11, 2] = 0.2, 0.1, 1.0
    for row, column in zip(range(20, 24), range(d - 4, d), strict=True):
        X[row] = 0
        X[row, column] = 1.0
    X[31] = X[30]
    X = X.tocsr()
    X.sum_duplicates()
    if signed:
        X.data[rng.random(X.nnz) < 0.3] *= -1
    return X


def _forced_layout(monkeypatch, layout):
    import allknn.engines.exact

    monkeypatch.setattr(allknn.engines.exact, "sparse_layout", lambda *args, **kwargs: layout)


@pytest.mark.parametrize(("signed", "k"), [(False, 6), (True, 6), (False, 40)])
def test_every_layout_equals_the_reference(monkeypatch, signed, k):
    """Dense tiles, accumulation without a head and accumulation with a head
    of the stop-word columns all give the brute-force answer; each is
    independent of block size and threads bit for bit."""
    from allknn.engines.exact.sparse_layout import PER_TILE, SparseLayout

    X = _stop_words_and_tail(1200, 3000, seed=3, signed=signed)
    reference = reference_topk(X.toarray(), k)
    Q = X[:150]
    reference_q = reference_topk(X.toarray(), k, queries=Q.toarray())
    stop_words = np.arange(4)
    for layout in (PER_TILE, SparseLayout(stop_words, accumulate=False),
                   SparseLayout(stop_words, accumulate=True)):
        _forced_layout(monkeypatch, layout)
        result = allknn.neighbors(X, k, block_rows=256)
        assert_topk_equal(result, reference.similarities, reference.indices, full=reference.full)
        assert_same_result(allknn.neighbors(X, k, block_rows=64, threads=3), result)
        assert_same_result(allknn.neighbors(X, k, block_rows=1024, threads=1), result)
        np.testing.assert_array_equal(result.similarities[20:24], 0)  # nothing shared: zeros,
        smallest = np.arange(k + 1)
        np.testing.assert_array_equal(result.indices[20], smallest[smallest != 20][:k])  # smallest first
        queried = allknn.neighbors(X, k, queries=Q, block_rows=128)
        assert_topk_equal(queried, reference_q.similarities, reference_q.indices, full=reference_q.full)
        assert_same_result(allknn.neighbors(X, k, queries=Q, block_rows=64, threads=3), queried)


def test_layout_follows_the_data():
    """Stop words over a long tail: accumulated with the stop words as head.
    Many interactions per user over few items: dense tiles. Short rows over
    a large vocabulary: accumulated, no head. Dense rows: dense tiles."""
    from allknn.engines.exact.sparse_layout import sparse_layout

    def layout(X, k=6):
        rows = allknn.rows.sparse.normalize_sparse_rows(sp.csr_matrix(X), name="X", invalid="raise").rows
        return sparse_layout(rows, rows, k, skip_self=True, budget=10**9, threads=2)

    words = _stop_words_and_tail(1200, 3000, seed=3)
    text = layout(words)
    counts = np.bincount(words.indices, minlength=words.shape[1])
    assert text.accumulate and np.isin([0, 1, 2], text.columns).all()
    assert counts[text.columns].min() > np.delete(counts, text.columns).max()  # the densest
    busy = layout(_user_item(1000, 200, 40, seed=2))
    assert not busy.accumulate and busy.columns.size > 0
    short = layout(_very_sparse(1500, 3000, 3, seed=5, signed=False))
    assert short.accumulate and short.columns.size == 0
    crowded = layout(sp.random(600, 20, density=0.6, format="csr", random_state=1, dtype=np.float32))
    assert not crowded.accumulate and crowded.columns.size == 20


def test_set_apart_columns_respect_the_budget(interactions):
    from allknn.engines.exact.sparse_layout import sparse_layout

    rows = allknn.rows.sparse.normalize_sparse_rows(interactions, name="X", invalid="raise").rows
    everything = sparse_layout(rows, rows, 6, skip_self=True, budget=10**9, threads=1).columns
    assert everything.size > 2
    capped = sparse_layout(rows, rows, 6, skip_self=True, budget=4 * rows.shape[0] * 2, threads=1).columns
    assert capped.size <= 2
    counts = np.bincount(rows.indices, minlength=rows.shape[1])
    assert counts[capped].min() >= np.sort(counts)[-2]


def test_head_bounds_cover_the_head_dot_product():
    """fl(b_i * b_j) is at least the float32 head dot product, for signed,
    tiny and huge values and for long heads whose every partial sum rounds
    up; rows without head entries get 0."""
    from allknn.kernels.sparse_accumulate import _head_dot, head_bounds

    rng = np.random.default_rng(8)
    head = rng.standard_normal((300, 40)).astype(np.float32)
    head[:100] *= np.float32(1e-22)
    head[100:110] = head[100]  # equal rows: the dot product is the squared norm
    head[200:] *= np.float32(3e15)
    head[5] = 0
    bounds = head_bounds(head)
    assert bounds[5] == 0 and (np.delete(bounds, 5) > 0).all()
    for i in range(head.shape[0]):
        for j in range(head.shape[0]):
            assert abs(_head_dot(head[i], head[j])) <= bounds[i] * bounds[j]
    for h in (4096, 65536):
        for _ in range(20):
            row = np.full(h, rng.uniform(0.3, 1.0) / np.sqrt(h), dtype=np.float32)
            row[rng.random(h) < 0.2] *= np.float32(1 + rng.uniform(0, 1e-3))
            bound = head_bounds(row[None])[0]
            assert _head_dot(row, row) <= bound * bound


def test_pilot_counts_the_pairs_a_head_reaches():
    """count_head_reach against numpy: pairs with s + 2 b_i b_j >= t_i,
    t_i the k-th largest similarity of row i without itself."""
    from allknn.engines.exact.sparse_layout import _head_norms
    from allknn.kernels.sparse_pilot import count_head_reach

    X = allknn.rows.sparse.normalize_sparse_rows(_stop_words_and_tail(400, 900, seed=4), name="X",
                                             invalid="raise").rows
    heads = [np.array([0, 1]), np.array([0, 1, 2, 3]), np.arange(10)]
    bounds = _head_norms(X, heads)
    sample, k, stride = np.array([0, 7, 10, 20, 31, 399]), 5, 3
    csc = X.tocsc()
    counts = np.zeros(len(heads), dtype=np.int64)
    count_head_reach(X.indptr, X.indices, X.data, sample, True, X.shape[0], csc.indptr, csc.indices,
                     csc.data, k, bounds[:, sample], bounds[:, ::stride], stride, counts)
    S = (X @ X.T).toarray()
    expected = np.zeros(len(heads), dtype=np.int64)
    for h, head in enumerate(heads):
        norms = np.sqrt((X[:, head].toarray().astype(np.float64) ** 2).sum(axis=1))
        np.testing.assert_allclose(bounds[h], norms, rtol=1e-6)
        for r in sample:
            row = S[r].copy()
            row[r] = -np.inf
            t = np.sort(row)[-k]
            expected[h] += (row[::stride] + 2 * norms[r] * norms[::stride] >= t).sum()
    np.testing.assert_array_equal(counts, expected)


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
    import allknn.engines.exact.sparse_blocks as exact

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
    from allknn.engines.exact.plans import SelfJoinPlan

    X = _very_sparse(1500, 3000, 3, seed=5, signed=False)
    plan = SelfJoinPlan(X, np.ones(X.shape[0]), block_rows=256)
    assert plan.accumulated is not None and plan.accumulated.all()
    crowded = sp.random(600, 20, density=0.5, format="csr", random_state=1, dtype=np.float32)
    assert not SelfJoinPlan(crowded, np.ones(600), block_rows=256).accumulated.any()


def test_interrupted_run_with_a_head_resumes_identically(tmp_path):
    """The saved tiles and the remaining ones sum pairs the same way: the
    layout is saved with the state and restored on resume."""
    from allknn.engines.exact.sparse_layout import sparse_layout

    X = _stop_words_and_tail(1200, 3000, seed=3)
    rows = allknn.rows.sparse.normalize_sparse_rows(X, name="X", invalid="raise").rows
    assert sparse_layout(rows, rows, 6, skip_self=True, budget=10**9, threads=2).columns.size > 0
    options = {"block_rows": 128, "checkpoint": tmp_path / "s.ckpt", "checkpoint_every": 0.0}
    with pytest.raises(Interrupt):
        allknn.neighbors(X, 6, on_tile=interrupt_after(9), **options)
    assert (tmp_path / "s.ckpt").exists()
    assert_same_result(allknn.neighbors(X, 6, threads=1, **options), allknn.neighbors(X, 6, block_rows=128))


def test_resume_keeps_the_layout_of_the_saved_tiles(tmp_path, monkeypatch):
    """The layout depends on max_memory (the head is capped by it), so a
    resumed run may be offered another one; it finishes with the layout the
    saved tiles were made with (here: a head, then dense tiles offered)."""
    from allknn.engines.exact.sparse_layout import SparseLayout, sparse_layout

    X = _stop_words_and_tail(3000, 3000, seed=3)
    rows = allknn.rows.sparse.normalize_sparse_rows(X, name="X", invalid="raise").rows
    capped = sparse_layout(rows, rows, 6, skip_self=True, budget=41_000, threads=1)  # three columns
    assert capped.columns.size == 3
    assert sparse_layout(rows, rows, 6, skip_self=True, budget=10**9, threads=1).columns.size > 3
    head, dense = SparseLayout(np.arange(4), accumulate=True), SparseLayout(np.arange(4), accumulate=False)
    options = {"block_rows": 64, "threads": 1, "checkpoint": tmp_path / "s.ckpt", "checkpoint_every": 0.0}
    _forced_layout(monkeypatch, head)
    with pytest.raises(Interrupt):
        allknn.neighbors(X, 6, on_tile=interrupt_after(150), **options)
    uninterrupted = allknn.neighbors(X, 6, block_rows=64, threads=1)
    _forced_layout(monkeypatch, dense)
    resumed = allknn.neighbors(X, 6, **options)
    assert_same_result(resumed, uninterrupted)
    reference = reference_topk(X.toarray(), 6)
    assert_topk_equal(resumed, reference.similarities, reference.indices, full=reference.full)


def test_checkpoint_without_a_layout_resumes(tmp_path):
    """A sparse checkpoint from before layouts were saved resumes with a
    fresh layout: the result does not depend on the layout, so it equals
    the uninterrupted run."""
    path = tmp_path / "s.ckpt"
    X = _stop_words_and_tail(600, 2000, seed=1)
    with pytest.raises(Interrupt):
        allknn.neighbors(X, 4, block_rows=64, threads=1, checkpoint=path, checkpoint_every=0.0,
                         on_tile=interrupt_after(20))
    with np.load(path) as saved:
        assert "layout_columns" in saved.files
        kept = {name: saved[name] for name in saved.files if not name.startswith("layout_")}
        assert 0 < saved["done"].shape[0] < 55
    with open(path, "wb") as handle:
        np.savez(handle, **kept)
    resumed = allknn.neighbors(X, 4, block_rows=64, checkpoint=path)
    assert_same_result(resumed, allknn.neighbors(X, 4, block_rows=64))
