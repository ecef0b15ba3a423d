"""The exact engine against the brute-force reference, and its numerical contract."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import allknn
from allknn.datasets import make_clustered
from allknn.engines.exact.plans import QueryJoinPlan
from allknn.engines.kmeans import MIN_ROWS
from allknn.kernels.topk import merge_rows, merge_rows_and_columns, new_state
from allknn.rows import normalize_rows
from allknn.topk.bounds import nomination_margin, product_error
from allknn.topk.finish import sorted_neighbours
from allknn.topk.scoring import scoring_rows
from conftest import (
    REAL,
    assert_exact,
    assert_same_result,
    assert_topk_equal,
    assert_topk_strict,
    assert_well_formed,
    exact_reference_topk,
    reference_similarities,
    reference_topk,
)


def _matrix(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if kind == "gaussian":
        return rng.standard_normal((n, d)).astype(np.float32)
    if kind == "clustered":
        return make_clustered(n, d, n_clusters=max(1, n // 25), seed=seed)
    # small integers: many exact ties and duplicates; no zero rows
    X = rng.integers(-2, 3, size=(n, d))
    X[:, 0] = np.where(X[:, 0] == 0, 1, X[:, 0])
    return X


# --------------------------------------------------------------------------- reference


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["gaussian", "clustered", "integers"]),
    n=st.integers(2, 120),
    d=st.integers(1, 48),
    block_rows=st.integers(1, 140),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_self_join_matches_reference(kind, n, d, block_rows, threads, seed, data):
    """Any shape, k, block size and thread count: the reference's answer."""
    X = _matrix(kind, n, d, seed)
    k = data.draw(st.integers(1, n - 1), label="k")
    res = allknn.neighbors(X, k, block_rows=block_rows, threads=threads)
    assert_well_formed(res, n_queries=n, k=k, self_join=True)
    assert_topk_equal(res, reference_topk(X, k))


@settings(max_examples=25, deadline=None)
@given(
    kind=st.sampled_from(["gaussian", "clustered", "integers"]),
    n=st.integers(1, 120),
    nq=st.integers(1, 60),
    d=st.integers(1, 48),
    block_rows=st.integers(1, 140),
    threads=st.sampled_from([1, 2, 3]),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_query_join_matches_reference(kind, n, nq, d, block_rows, threads, seed, data):
    """The query form over random shapes, k up to n."""
    X = _matrix(kind, n, d, seed)
    Q = _matrix(kind, nq, d, seed + 1)
    k = data.draw(st.integers(1, n), label="k")
    res = allknn.neighbors(X, k, queries=Q, block_rows=block_rows, threads=threads)
    assert_well_formed(res, n_queries=nq, k=k)
    assert res.n_corpus == n
    assert_topk_equal(res, reference_topk(X, k, queries=Q))


@pytest.mark.parametrize("kind", ["gaussian", "clustered", "integers"])
@pytest.mark.parametrize(
    ("n", "d", "k", "block_rows", "threads"),
    [
        (500, 24, 10, 64, 2),  # block divides nothing: 7 full blocks + 52
        (500, 24, 10, 100, 3),  # divides n
        (500, 24, 10, 7, 2),  # many small, odd tiles
        (500, 24, 10, 500, 1),  # exactly one tile
        (500, 24, 10, 501, 2),  # larger than n
        (500, 24, 10, None, 2),  # default from the budget
        (257, 65, 30, 65, 3),  # widths one past the vectorised chunk
        (130, 5, 129, 64, 2),  # k = n - 1
    ],
)
def test_self_join_parametrized(kind, n, d, k, block_rows, threads):
    """Hand-picked tilings of the self-join."""
    X = _matrix(kind, n, d, seed=n + d + k)
    res = allknn.neighbors(X, k, block_rows=block_rows, threads=threads)
    assert_well_formed(res, n_queries=n, k=k, self_join=True)
    assert_topk_equal(res, reference_topk(X, k))


@pytest.mark.parametrize("kind", ["gaussian", "clustered"])
@pytest.mark.parametrize(
    ("n", "nq", "k", "block_rows", "threads"),
    [(400, 150, 12, 64, 2), (400, 150, 12, 33, 3), (400, 150, 400, 128, 2), (70, 300, 5, 1000, 1)],
)
def test_query_join_parametrized(kind, n, nq, k, block_rows, threads):
    """Hand-picked tilings of the query join, including k = n."""
    X = _matrix(kind, n, 16, seed=1)
    Q = _matrix(kind, nq, 16, seed=2)
    res = allknn.neighbors(X, k, queries=Q, block_rows=block_rows, threads=threads)
    assert_well_formed(res, n_queries=nq, k=k)
    assert_topk_equal(res, reference_topk(X, k, queries=Q))


def test_real_embeddings_with_duplicates():
    """Real float16 sentence embeddings with duplicate rows: the reference,
    bit for bit; every exact duplicate is a neighbour of similarity 1.0,
    listed by index among the neighbours of that similarity."""
    X = np.load(REAL)[:600]
    k = 8
    res = allknn.neighbors(X, k, block_rows=256, threads=2)
    assert_well_formed(res, n_queries=X.shape[0], k=k, self_join=True)
    assert_exact(res, exact_reference_topk(X, k))
    _, inverse, counts = np.unique(X, axis=0, return_inverse=True, return_counts=True)
    assert (counts > 1).sum() >= 4, "the slice should hold duplicate groups"
    for group in np.flatnonzero(counts > 1):
        members = np.flatnonzero(inverse.ravel() == group)
        for m in members:
            others = [x for x in members if x != m]
            at_one = res.indices[m][res.similarities[m] == 1.0]
            assert np.all(np.diff(at_one) > 0), "ties at 1.0 go by index"
            if at_one.size < k:  # room left: every duplicate is listed
                assert set(others) <= set(at_one.tolist())


def test_large_self_join_uses_row_ordering_and_stays_exact():
    """Above the ordering threshold the result equals the unordered query path and the reference."""
    n = MIN_ROWS + 300
    X = make_clustered(n, 8, n_clusters=40, seed=5)
    X[n - 1] = X[3]  # a duplicate far apart
    k = 5
    res = allknn.neighbors(X, k, threads=2)
    assert_well_formed(res, n_queries=n, k=k, self_join=True)
    assert res.indices[3, 0] == n - 1 and res.indices[n - 1, 0] == 3
    assert_same_result(res, _query_engine_self_join(X, k, block_rows=1024))
    rows = np.random.default_rng(0).choice(n, size=150, replace=False)
    sample = reference_topk(X, k, rows=rows)
    sub = allknn.TopK(res.indices[rows], res.similarities[rows], n_corpus=n)
    assert_topk_equal(sub, sample)


def test_reference_check_is_not_vacuous(gaussian):
    """The tie-aware check rejects a swapped neighbour and a wrong similarity."""
    ref = reference_topk(gaussian, 5)
    good = allknn.neighbors(gaussian, 5)
    assert_topk_equal(good, ref)
    swapped = good.indices.copy()
    swapped[3, 0] = ref.indices[3, 4] if ref.indices[3, 4] != swapped[3, 0] else ref.indices[3, 1]
    for bad in (
        allknn.TopK(swapped, good.similarities, n_corpus=good.n_corpus),
        allknn.TopK(good.indices, good.similarities + np.float32(1e-5), n_corpus=good.n_corpus),
        allknn.TopK(np.roll(good.indices, 1, axis=0), good.similarities, n_corpus=good.n_corpus),
    ):
        with pytest.raises(AssertionError):
            assert_topk_equal(bad, ref)


# --------------------------------------------------------------------------- independence


@pytest.mark.parametrize("big_group", [False, True], ids=["pairs", "group-larger-than-k"])
def test_independent_of_block_rows_and_threads(clustered_dups, big_group):
    """Bit-identical results for every tiling and thread count (also when k cuts a duplicate group)."""
    X = clustered_dups.copy()
    k = 8
    if big_group:
        X[np.arange(100, 900, 61)] = X[37]  # 14 copies of row 37, spread over many blocks
    base = allknn.neighbors(X, k, block_rows=1024, threads=1)
    assert_topk_equal(base, reference_topk(X, k))
    for block_rows in (7, 64, 100, 1024):
        for threads in (1, 2, 4):
            res = allknn.neighbors(X, k, block_rows=block_rows, threads=threads)
            try:
                assert_same_result(res, base)
            except AssertionError as exc:
                raise AssertionError(f"block_rows={block_rows}, threads={threads}: {exc}") from None


def test_query_form_independent_of_block_rows_and_threads(clustered_dups):
    """The query join too: identical for every tiling and thread count."""
    X = clustered_dups
    Q = X[::3].copy()
    base = allknn.neighbors(X, 9, queries=Q, block_rows=1024, threads=1)
    for block_rows in (7, 64, 100):
        for threads in (2, 4):
            res = allknn.neighbors(X, 9, queries=Q, block_rows=block_rows, threads=threads)
            try:
                assert_same_result(res, base)
            except AssertionError as exc:
                raise AssertionError(f"block_rows={block_rows}, threads={threads}: {exc}") from None


def _query_engine_self_join(X: np.ndarray, k: int, *, block_rows: int, threads: int = 2):
    """The self-join computed by the query engine with ``Q`` a copy of ``X``."""
    corpus = normalize_rows(X, name="X", block_rows=block_rows, invalid="raise")
    queries = normalize_rows(X.copy(), name="queries", block_rows=block_rows, invalid="raise")
    plan = QueryJoinPlan(queries.rows, corpus.rows, queries.norms, corpus.norms, block_rows=block_rows,
                         skip_self=True)
    keys, thresholds = new_state(X.shape[0], k)
    plan.run(keys, thresholds, threads=threads)
    indices, similarities = sorted_neighbours(keys)
    return allknn.TopK(indices=indices, similarities=similarities, n_corpus=X.shape[0])


@pytest.mark.parametrize("block_rows", [7, 64, 1024])
def test_query_engine_on_copy_equals_self_join(clustered_dups, block_rows):
    """Q = copy of X with the diagonal excluded gives exactly the symmetric self-join."""
    X = clustered_dups
    assert_same_result(
        _query_engine_self_join(X, 7, block_rows=block_rows),
        allknn.neighbors(X, 7, block_rows=block_rows, threads=2),
    )


def test_queries_same_object_is_self_join(clustered_dups):
    """``queries=X`` (the same object) excludes self like the self-join."""
    X = clustered_dups
    res = allknn.neighbors(X, 6, queries=X, block_rows=64)
    assert_same_result(res, allknn.neighbors(X, 6, block_rows=64))
    assert not (res.indices == np.arange(X.shape[0])[:, None]).any()


@pytest.mark.parametrize("block_rows", [7, 64, 1024])
def test_queries_copy_equals_self_join_with_self(clustered_dups, block_rows):
    """``queries=X.copy()`` lists self, exactly as ``exclude_self=False``."""
    X = clustered_dups
    a = allknn.neighbors(X, 6, queries=X.copy(), block_rows=block_rows, threads=2)
    b = allknn.neighbors(X, 6, exclude_self=False, block_rows=block_rows, threads=2)
    assert_same_result(a, b)


# --------------------------------------------------------------------------- self, duplicates, ties


@pytest.mark.parametrize("block_rows", [7, 64, 1024])
def test_duplicates_are_neighbours_in_index_order(block_rows):
    """Exact copies (scaled too) score 1.0 and come first, by smaller index."""
    X = make_clustered(300, 19, n_clusters=6, seed=4)
    X[[10, 50, 251]] = X[3]
    X[50] *= 4.0  # a copy scaled by a power of two has exactly the same direction
    res = allknn.neighbors(X, 5, block_rows=block_rows, threads=2)
    for row, want in {3: [10, 50, 251], 10: [3, 50, 251], 50: [3, 10, 251], 251: [3, 10, 50]}.items():
        np.testing.assert_array_equal(res.indices[row, :3], want)
        np.testing.assert_array_equal(res.similarities[row, :3], np.float32(1.0))
        assert res.similarities[row, 3] < 1.0
    assert_topk_equal(res, reference_topk(X, 5))


@pytest.mark.parametrize("block_rows", [7, 13, 64, 1024])
@pytest.mark.parametrize("threads", [1, 2])
def test_many_identical_rows_keep_smallest_indices(block_rows, threads):
    """A group of 25 identical rows, k=6: each member lists the 6 smallest other members."""
    rng = np.random.default_rng(5)
    X = make_clustered(400, 37, n_clusters=8, seed=3)
    group = np.sort(rng.choice(400, 25, replace=False))
    X[group] = X[group[0]] * 3.7
    res = allknn.neighbors(X, 6, block_rows=block_rows, threads=threads)
    wrong = {}
    for m in group:
        want = [x for x in group if x != m][:6]
        want = [int(x) for x in want]
        if res.indices[m].tolist() != want:
            wrong[int(m)] = (res.indices[m].tolist(), want)
        np.testing.assert_array_equal(res.similarities[m], np.float32(1.0))
    assert not wrong, f"row: (got, want) = {wrong}"


def test_all_rows_identical():
    """Every row equal: each lists the k smallest other indices, all at 1.0."""
    X = np.tile(np.array([[0.3, -1.2, 2.0, 0.7]], dtype=np.float32), (90, 1))
    k = 4
    res = allknn.neighbors(X, k, block_rows=16, threads=3)
    want = np.array([[j for j in range(90) if j != i][:k] for i in range(90)])
    np.testing.assert_array_equal(res.indices, want)
    np.testing.assert_array_equal(res.similarities, np.float32(1.0))


def _tie_matrix() -> tuple[np.ndarray, int, list[int]]:
    """A row ``e0`` and four rows ``e0 + e_j`` (equally similar to it, 1/sqrt 2)
    scattered among background rows orthogonal to both."""
    rng = np.random.default_rng(8)
    X = np.zeros((120, 10), dtype=np.float32)
    X[:, 5:] = rng.standard_normal((120, 5))
    query, tied = 60, [40, 13, 77, 5]
    X[[query, *tied]] = 0
    X[query, 0] = 1
    for j, row in enumerate(tied, start=1):
        X[row, 0] = X[row, j] = 1
    return X, query, sorted(tied)


@pytest.mark.parametrize(("block_rows", "threads"), [(7, 2), (13, 3), (64, 1), (1024, 2)])
def test_equal_similarities_break_by_smaller_index(block_rows, threads):
    """Several equally similar candidates: smaller index first, and at the cut."""
    X, query, tied = _tie_matrix()
    res = allknn.neighbors(X, 3, block_rows=block_rows, threads=threads)
    np.testing.assert_array_equal(res.indices[query], tied[:3])
    np.testing.assert_array_equal(res.similarities[query], np.float32(np.sqrt(0.5)))
    # each tied row: the query (1/sqrt 2), then the other tied rows (1/2) by index
    ref = reference_topk(X, 3)
    assert_topk_strict(allknn.TopK(res.indices[tied], res.similarities[tied], 120),
                       ref.similarities[tied], ref.indices[tied])
    for row in tied:
        np.testing.assert_array_equal(res.indices[row], [query, *[t for t in tied if t != row][:2]])
    assert_topk_equal(res, ref)


def test_exclude_self_false_lists_self_first():
    """Without exclusion every row is its own best neighbour, at 1.0."""
    X = make_clustered(200, 12, n_clusters=5, seed=9)
    res = allknn.neighbors(X, 4, exclude_self=False, block_rows=32, threads=2)
    np.testing.assert_array_equal(res.indices[:, 0], np.arange(200))
    np.testing.assert_array_equal(res.similarities[:, 0], np.float32(1.0))
    assert res.params["exclude_self"] is False
    assert_topk_equal(res, reference_topk(X, 4, exclude_self=False))


def test_exclude_self_false_places_self_among_duplicates_by_index():
    """With duplicates, self sits among the 1.0 entries in index order."""
    X = make_clustered(200, 12, n_clusters=5, seed=9)
    X[[3, 150]] = X[77]
    res = allknn.neighbors(X, 5, exclude_self=False, block_rows=32, threads=2)
    for row in (3, 77, 150):
        np.testing.assert_array_equal(res.indices[row, :3], [3, 77, 150])
        np.testing.assert_array_equal(res.similarities[row, :3], np.float32(1.0))


def test_exclude_self_false_allows_k_equal_n():
    """k = n is the limit once self is a candidate."""
    X = np.random.default_rng(3).standard_normal((40, 6)).astype(np.float32)
    res = allknn.neighbors(X, 40, exclude_self=False, block_rows=16)
    assert_well_formed(res, n_queries=40, k=40)
    assert_topk_equal(res, reference_topk(X, 40, exclude_self=False))
    assert (np.sort(res.indices, axis=1) == np.arange(40)).all()


# --------------------------------------------------------------------------- sizes and k


@pytest.mark.parametrize("k", [1, 2, 49])
def test_k_extremes_self_join(k, rng):
    """k = 1 and k = n - 1: every other row exactly once."""
    X = rng.standard_normal((50, 7)).astype(np.float32)
    res = allknn.neighbors(X, k, block_rows=16, threads=2)
    assert_well_formed(res, n_queries=50, k=k, self_join=True)
    assert_topk_equal(res, reference_topk(X, k))
    if k == 49:
        for i in range(50):
            assert sorted(res.indices[i]) == [j for j in range(50) if j != i]


def test_k_equal_n_query_form(rng):
    """k = n in the query form: every corpus row, sorted."""
    X = rng.standard_normal((33, 5)).astype(np.float32)
    Q = rng.standard_normal((20, 5)).astype(np.float32)
    res = allknn.neighbors(X, 33, queries=Q, block_rows=8, threads=2)
    assert_topk_equal(res, reference_topk(X, 33, queries=Q))
    assert (np.sort(res.indices, axis=1) == np.arange(33)).all()


def test_two_rows():
    """n = 2: each row is the other's only neighbour."""
    X = np.array([[1.0, 2.0], [-3.0, 0.5]])
    res = allknn.neighbors(X, 1)
    np.testing.assert_array_equal(res.indices, [[1], [0]])
    want = np.float32((1 * -3 + 2 * 0.5) / (np.sqrt(5) * np.sqrt(9.25)))
    np.testing.assert_allclose(res.similarities, [[want], [want]], rtol=0, atol=1e-7)


def test_single_corpus_row_query_form():
    """A corpus of one row and k = 1."""
    res = allknn.neighbors(np.array([[0.0, 2.0]]), 1, queries=np.array([[1.0, 1.0], [0.0, -1.0]]))
    np.testing.assert_array_equal(res.indices, [[0], [0]])
    np.testing.assert_allclose(res.similarities, [[np.sqrt(0.5)], [-1.0]], rtol=0, atol=1e-7)


def test_smaller_than_one_tile(rng):
    """n below one default tile, with the default block size."""
    X = rng.standard_normal((45, 30)).astype(np.float32)
    res = allknn.neighbors(X, 6)
    assert_topk_equal(res, reference_topk(X, 6))


@pytest.mark.parametrize("block_rows", [100_000, 10**7])
def test_block_rows_much_larger_than_n(rng, block_rows):
    """A block larger than the data is one tile of the data's size, not block_rows squared."""
    X = rng.standard_normal((50, 8)).astype(np.float32)
    res = allknn.neighbors(X, 3, block_rows=block_rows)
    assert_topk_equal(res, reference_topk(X, 3))


def test_block_rows_one(rng):
    """One-row blocks: every tile is a single similarity."""
    X = rng.standard_normal((30, 4)).astype(np.float32)
    X[20] = X[2]
    res = allknn.neighbors(X, 5, block_rows=1, threads=2)
    assert_topk_equal(res, reference_topk(X, 5))
    assert res.indices[2, 0] == 20 and res.indices[20, 0] == 2


# --------------------------------------------------------------------------- dtypes and layouts


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8])
def test_dtypes_match_float64_reference(dtype, rng):
    """Every real dtype gives the reference answer for the same values."""
    if np.dtype(dtype).kind in "iu":
        X = rng.integers(1 if dtype == np.uint8 else -20, 30, size=(200, 9)).astype(dtype)
    else:
        X = rng.standard_normal((200, 9)).astype(dtype)
    res = allknn.neighbors(X, 7, block_rows=64, threads=2)
    assert_well_formed(res, n_queries=200, k=7, self_join=True)
    assert_topk_equal(res, reference_topk(X.astype(np.float64), 7))
    same_values = allknn.neighbors(X.astype(np.float64), 7, block_rows=64, threads=2)
    assert_same_result(res, same_values)


def test_python_lists_and_bool_input():
    """Nested lists and boolean matrices are read as numbers."""
    X = [[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]]
    res = allknn.neighbors(X, 2)
    assert_topk_strict(res, reference_topk(np.array(X, dtype=float), 2))
    assert_same_result(allknn.neighbors(np.array(X, dtype=bool), 2), res)


@pytest.mark.parametrize(
    "view",
    [
        pytest.param(lambda A: np.asfortranarray(A), id="fortran"),
        pytest.param(lambda A: A[:, ::2], id="every-other-column"),
        pytest.param(lambda A: A[::2], id="every-other-row"),
        pytest.param(lambda A: A[::-1, 1:], id="reversed-rows"),
        pytest.param(lambda A: A.astype(np.float64)[::3, ::-1], id="float64-strided"),
    ],
)
def test_layouts_give_the_same_result(view, clustered):
    """Non-contiguous and Fortran views equal their contiguous copies exactly."""
    V = view(clustered)
    assert_same_result(
        allknn.neighbors(V, 5, block_rows=64, threads=2),
        allknn.neighbors(np.ascontiguousarray(V), 5, block_rows=64, threads=2),
    )
    assert_topk_equal(allknn.neighbors(V, 5, block_rows=64), reference_topk(np.asarray(V, np.float64), 5))


def test_layouts_in_query_form(clustered):
    """Strided queries and a Fortran corpus."""
    X, Q = np.asfortranarray(clustered[:400]), clustered[400:, ::-1][:, ::-1]
    res = allknn.neighbors(X, 5, queries=Q[::2], block_rows=50, threads=2)
    assert_topk_equal(res, reference_topk(np.asarray(X, float), 5, queries=np.asarray(Q[::2], float)))


def test_input_is_not_modified(clustered_dups):
    """The caller's matrix comes back unchanged (also through the reordered path)."""
    X = clustered_dups
    before = X.copy()
    allknn.neighbors(X, 5, block_rows=64, threads=2)
    allknn.neighbors(X, 5, queries=X[:50], block_rows=64, threads=2)
    np.testing.assert_array_equal(X, before)


# --------------------------------------------------------------------------- output contract


def test_similarity_range_order_and_dtypes(rng):
    """Opposite rows score -1; sims in [-1, 1], best first; float32 / int64."""
    X = rng.standard_normal((120, 3)).astype(np.float32)
    X[60:] = -X[:60]
    res = allknn.neighbors(X, 119, block_rows=32, threads=2)
    assert_well_formed(res, n_queries=120, k=119, self_join=True)
    assert res.similarities.min() >= -1.0 and res.similarities.max() <= 1.0
    np.testing.assert_array_equal(res.indices[:60, -1], np.arange(60, 120))
    np.testing.assert_array_equal(res.similarities[:, -1], np.float32(-1.0))
    assert res.indices.flags.c_contiguous and res.similarities.flags.c_contiguous


def test_min_similarity_masks_weak_neighbours(clustered):
    """Entries below the floor become -1 / NaN; the rest are unchanged."""
    full = allknn.neighbors(clustered, 8, block_rows=64)
    floor = float(np.median(full.similarities))
    res = allknn.neighbors(clustered, 8, block_rows=64, min_similarity=floor)
    keep = full.similarities >= floor
    np.testing.assert_array_equal(res.indices, np.where(keep, full.indices, -1))
    np.testing.assert_array_equal(res.similarities, np.where(keep, full.similarities, np.nan))
    assert_well_formed(res, n_queries=clustered.shape[0], k=8, self_join=True)


def test_on_tile_counts_every_pair_once(clustered):
    """Progress callbacks cover n (n - 1) / 2 + n pairs in the self-join."""
    seen = []
    allknn.neighbors(clustered, 5, block_rows=64, threads=2, on_tile=lambda t, p: seen.append((t, p)))
    n = clustered.shape[0]
    assert sum(p for _, p in seen) == n * (n + 1) // 2
    assert len({t for t, _ in seen}) == len(seen)


# --------------------------------------------------------------------------- kernels


def _key(value: np.float32, j: int) -> int:
    """The packed key of candidate (value, j), computed in plain Python."""
    bits = int(np.array([value], dtype=np.float32).view(np.int32)[0])
    if bits == -(2**31):  # -0.0 ranks as +0.0
        bits = 0
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return (bits << 32) | (0xFFFFFFFF - j)


def _key_similarity(key: int) -> np.float32:
    bits = key >> 32
    if bits < 0:
        bits ^= 0x7FFFFFFF
    return np.array([bits], dtype=np.int32).view(np.float32)[0]


def _scalar_merge(keys, offers):
    """Top-k by key of each row's current keys plus its offered keys."""
    want = keys.copy()
    k = keys.shape[1]
    for r, extra in offers.items():
        want[r] = sorted({*keys[r].tolist(), *extra})[-k:]
    thresholds = np.array([_key_similarity(int(row.min())) for row in want], dtype=np.float32)
    return np.sort(want, axis=1), thresholds


def _assert_state(keys, thresholds, want_keys, want_thresholds):
    np.testing.assert_array_equal(np.sort(keys, axis=1), want_keys)
    np.testing.assert_array_equal(thresholds.view(np.int32), want_thresholds.view(np.int32))
    k = keys.shape[1]
    for child in range(1, k):  # min-heap: root is the worst kept key
        assert (keys[:, (child - 1) // 2] <= keys[:, child]).all()


class _Rows:
    """Rows with many exact ties (small integers, duplicates), their reference
    similarities, and tiles of them perturbed within the product bound."""

    def __init__(self, rng, n, d=6):
        X = rng.integers(-2, 3, size=(n, d)).astype(np.float32)
        X[:, 0] = np.where(X[:, 0] == 0, 1, X[:, 0])
        X[rng.choice(n, n // 5, replace=False)] = X[0]  # a large duplicate group
        normed = normalize_rows(X, name="X", block_rows=64, invalid="raise")
        self.rows, self.norms = normed.rows, normed.norms
        self.similarity = reference_similarities(X, X)
        self.error = np.float32(0.99 * product_error(d))
        self.scoring = scoring_rows(self.rows, self.norms)
        self.margin = nomination_margin(d)

    def tile(self, rng, rows, cols):
        """Reference similarities of positions ``rows x cols``, each moved within the bound."""
        exact = self.similarity[np.ix_(rows, cols)]
        noise = rng.uniform(-1, 1, size=exact.shape).astype(np.float32) * self.error
        return np.ascontiguousarray(exact + noise)


def _prefilled_state(rng, data, n, k, cols):
    keys, thresholds = new_state(n, k)
    ids = np.arange(n, dtype=np.int64)
    warm = data.tile(rng, ids, cols)
    merge_rows(warm, 0, 0, ids, cols, keys, thresholds, True, False, data.scoring,
               scoring_rows(data.rows[cols], data.norms), data.margin)
    return keys, thresholds


@pytest.mark.parametrize("bj", [1, 5, 63, 64, 65, 127, 130])
@pytest.mark.parametrize("k", [1, 4, 11])
def test_merge_rows_kernel_matches_scalar_reference(bj, k):
    """Any tile width (not only whole 64-wide chunks), onto a non-empty state,
    skipping self: the state is the top-k of the exact keys offered, whatever
    the perturbation of the tile values within the product bound."""
    rng = np.random.default_rng(bj * 100 + k)
    n, bi, row0, col0 = 200, 17, 3, 2
    data = _Rows(rng, n)
    keys, thresholds = _prefilled_state(rng, data, n, k, np.arange(180, 200, dtype=np.int64))
    row_ids = rng.permutation(n).astype(np.int64)  # position -> id; rows by position below
    col_ids = rng.permutation(180)[: col0 + bj].astype(np.int64)
    offers = {}
    for i in range(bi):
        r = int(row_ids[row0 + i])
        offers[r] = [_key(data.similarity[r, j], int(j)) for j in col_ids[col0:] if j != r]
    want = _scalar_merge(keys, offers)
    tile = data.tile(rng, row_ids[row0 : row0 + bi], col_ids[col0:])
    queries = scoring_rows(data.rows[row_ids], data.norms)
    corpus = scoring_rows(data.rows[col_ids], data.norms)
    merge_rows(tile, row0, col0, row_ids, col_ids, keys, thresholds, True, False, queries, corpus,
               data.margin)
    _assert_state(keys, thresholds, *want)


@pytest.mark.parametrize(("bi", "bj"), [(1, 1), (7, 63), (20, 64), (9, 65), (33, 130), (64, 100)])
@pytest.mark.parametrize("k", [1, 5])
def test_merge_rows_and_columns_kernel_matches_scalar_reference(bi, bj, k):
    """Both sides of an off-diagonal symmetric tile, any widths."""
    rng = np.random.default_rng(bi * 1000 + bj + k)
    n = bi + bj + 40
    data = _Rows(rng, n)
    keys, thresholds = _prefilled_state(rng, data, n, k, np.arange(n - 10, n, dtype=np.int64))
    ids = np.r_[rng.permutation(n - 10), np.arange(n - 10, n)].astype(np.int64)  # tile ids never warm ones
    row0, col0 = 4, 4 + bi + 3  # disjoint position ranges
    offers: dict[int, list[int]] = {}
    for i in range(bi):
        for c in range(bj):
            r, j = int(ids[row0 + i]), int(ids[col0 + c])
            offers.setdefault(r, []).append(_key(data.similarity[r, j], j))
            offers.setdefault(j, []).append(_key(data.similarity[j, r], r))
    want = _scalar_merge(keys, offers)
    tile = data.tile(rng, ids[row0 : row0 + bi], ids[col0 : col0 + bj])
    merge_rows_and_columns(tile, row0, col0, ids, keys, thresholds, scoring_rows(data.rows[ids], data.norms),
                           data.margin)
    _assert_state(keys, thresholds, *want)


def test_merge_order_and_rounding_do_not_matter():
    """Merging tiles in any order, each perturbed differently within the
    bound, gives the same state (ties included)."""
    rng = np.random.default_rng(2)
    n, k = 280, 6
    data = _Rows(rng, n)
    rows = np.arange(30, dtype=np.int64)
    cols = np.arange(n, dtype=np.int64)
    corpus = scoring_rows(data.rows, data.norms)
    states = []
    for order in ([0, 1, 2, 3], [3, 1, 0, 2], [2, 3, 1, 0]):
        keys, thresholds = new_state(30, k)
        for t in order:
            tile = data.tile(rng, rows, cols[70 * t : 70 * t + 70])
            merge_rows(tile, 0, 70 * t, rows, cols, keys, thresholds, False, False, corpus, corpus,
                       data.margin)
        states.append((np.sort(keys, axis=1), thresholds.copy()))
    for keys, thresholds in states[1:]:
        np.testing.assert_array_equal(keys, states[0][0])
        np.testing.assert_array_equal(thresholds, states[0][1])


@pytest.mark.parametrize("bj", [3, 4, 5, 64, 100, 130])
@pytest.mark.parametrize("k", [1, 4, 11])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_rows_into_an_empty_state_with_adversarial_rounding(bj, k, seed):
    """An empty row's first tile, its values moved by (nearly) the whole
    product bound against the result: the true top-k lowered, every other
    candidate raised (ties by id included, the row itself among the
    columns, the tile at an offset in both position ranges). The kernel
    floors such a row at its tile's k-th value less two margins; a floor of
    one margin, or one that counted the row itself, loses a true neighbour
    here."""
    rng = np.random.default_rng(seed * 1000 + bj * 10 + k)
    n, row0, col0 = 160, 2, 3
    data = _Rows(rng, n)
    rows = np.arange(20, dtype=np.int64)
    cols = np.r_[rows, rng.choice(np.arange(20, n - 5), bj, replace=False)][:bj].astype(np.int64)
    row_ids, col_ids = np.r_[n - 2, n - 1, rows], np.r_[n - 5, n - 4, n - 3, cols]  # positions -> ids
    keys, thresholds = new_state(n, k)
    want_keys = keys.copy()
    members = np.zeros((rows.size, cols.size), dtype=bool)
    for i, r in enumerate(rows):
        best = sorted(_key(data.similarity[r, j], int(j)) for j in cols if j != r)[-k:]
        want_keys[r, k - len(best) :] = best  # fewer candidates than k: empty slots stay first
        members[i] = [_key(data.similarity[r, j], int(j)) in best and j != r for j in cols]
    want = want_keys, np.array([_key_similarity(int(row[0])) for row in want_keys], dtype=np.float32)
    exact = data.similarity[np.ix_(rows, cols)]
    tile = np.ascontiguousarray(np.where(members, exact - data.error, exact + data.error), dtype=np.float32)
    queries = scoring_rows(data.rows[row_ids], data.norms)
    corpus = scoring_rows(data.rows[col_ids], data.norms)
    merge_rows(tile, row0, col0, row_ids, col_ids, keys, thresholds, True, False, queries, corpus,
               data.margin)
    _assert_state(keys, thresholds, *want)
