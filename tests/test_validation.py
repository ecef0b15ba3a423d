"""User-facing errors and the invalid-row option of ``neighbors``."""

from __future__ import annotations

import re

import numpy as np
import pytest
import scipy.sparse

import allknn
from conftest import assert_topk_equal, assert_well_formed, reference_topk


@pytest.fixture
def X(rng) -> np.ndarray:
    """40 x 6 float32 rows."""
    return rng.standard_normal((40, 6)).astype(np.float32)


# --------------------------------------------------------------------------- bad rows


def test_nan_row(X):
    """One NaN row: named, counted, and the drop option mentioned."""
    X[7, 2] = np.nan
    with pytest.raises(ValueError, match=r"X has 1 row\(s\) containing NaN or Inf \(rows 7\)") as info:
        allknn.neighbors(X, 3)
    assert "invalid='drop'" in str(info.value)


def test_inf_row(X):
    """Inf is reported like NaN."""
    X[12, 0] = -np.inf
    with pytest.raises(ValueError, match=r"1 row\(s\) containing NaN or Inf \(rows 12\).*invalid='drop'"):
        allknn.neighbors(X, 3)


def test_zero_row(X):
    """An all-zero row has no cosine similarity."""
    X[0] = 0
    with pytest.raises(ValueError, match=r"1 all-zero row\(s\).*\(rows 0\).*invalid='drop'"):
        allknn.neighbors(X, 3)


def test_zero_and_nan_rows_both_reported(X):
    """Both kinds of bad row appear in one message."""
    X[[3, 30]] = 0
    X[9, 1] = np.nan
    with pytest.raises(ValueError) as info:
        allknn.neighbors(X, 3)
    message = str(info.value)
    assert "1 row(s) containing NaN or Inf (rows 9)" in message
    assert "2 all-zero row(s)" in message and "(rows 3, 30)" in message


def test_many_bad_rows_show_first_five(X):
    """Seven NaN rows: the count, the first five, then an ellipsis."""
    bad = [2, 5, 6, 11, 19, 25, 33]
    X[bad, 4] = np.nan
    message = "7 row(s) containing NaN or Inf (rows 2, 5, 6, 11, 19, ...)"
    with pytest.raises(ValueError, match=re.escape(message)):
        allknn.neighbors(X, 3)


def test_bad_query_rows_are_named_queries(X):
    """Bad rows of the queries say 'queries'."""
    Q = X[:10].copy()
    Q[4] = 0
    with pytest.raises(ValueError, match=r"^queries has 1 all-zero row\(s\).*\(rows 4\)"):
        allknn.neighbors(X, 3, queries=Q)


def test_nan_in_float16_and_int_zero_rows():
    """Other dtypes are checked too."""
    X16 = np.ones((10, 3), dtype=np.float16)
    X16[8, 1] = np.inf
    with pytest.raises(ValueError, match=r"\(rows 8\)"):
        allknn.neighbors(X16, 2)
    Xi = np.ones((10, 3), dtype=np.int32)
    Xi[1] = 0
    with pytest.raises(ValueError, match=r"all-zero row\(s\).*\(rows 1\)"):
        allknn.neighbors(Xi, 2)


def test_float16_overflowing_norm_is_not_a_bad_row():
    """A large but finite float16 row is valid (its norm overflows float16 only)."""
    X = np.full((6, 4), 60000, dtype=np.float16)
    X[:, 0] = np.arange(6)
    res = allknn.neighbors(X, 2)
    assert_topk_equal(res, reference_topk(X.astype(np.float64), 2))


# --------------------------------------------------------------------------- shapes and types


@pytest.mark.parametrize(
    ("data", "error", "pattern"),
    [
        (np.ones(5), ValueError, r"X must be 2-D .* has shape \(5,\)"),
        (np.ones((2, 3, 4)), ValueError, r"X must be 2-D .* has shape \(2, 3, 4\)"),
        (np.ones((0, 4)), ValueError, r"X has shape \(0, 4\); it needs at least one row"),
        (np.ones((3, 0)), ValueError, r"X has shape \(3, 0\); it needs at least one row and one column"),
        (np.array([["a", "b"], ["c", "d"]]), TypeError, r"X has dtype <U1, which is not a real number type"),
        (np.array([[1, "x"], [2, 3]], dtype=object), TypeError, r"X has dtype object, which is not a real"),
        (np.ones((3, 2), dtype=np.complex64), TypeError, r"X has dtype complex64, which is not a real"),
        ([[1.0, 2.0], [3.0]], TypeError, r"X could not be read as a numeric matrix.*rows of equal length"),
        (scipy.sparse.random(5, 5, density=0.5, format="csr").astype(complex), TypeError,
         r"X has dtype complex128, which is not a real number type"),
    ],
)
def test_bad_corpus(data, error, pattern):
    """Wrong shapes and types raise with the shape or dtype named."""
    with pytest.raises(error, match=pattern):
        allknn.neighbors(data, 1)


def test_bad_queries_named_queries(X):
    """The same checks apply to queries, naming them."""
    with pytest.raises(ValueError, match=r"queries must be 2-D .* has shape \(6,\)"):
        allknn.neighbors(X, 1, queries=X[0])
    with pytest.raises(TypeError, match="queries has dtype complex128"):
        allknn.neighbors(X, 1, queries=X.astype(complex))


def test_mismatched_query_dimensions(X):
    """Queries and corpus must have the same width."""
    with pytest.raises(ValueError, match="queries have 5 dimensions but X has 6"):
        allknn.neighbors(X, 3, queries=np.ones((4, 5)))


# --------------------------------------------------------------------------- k


@pytest.mark.parametrize(
    ("k", "error", "pattern"),
    [
        (0, ValueError, "k must be at least 1, got k=0"),
        (-2, ValueError, "k must be at least 1, got k=-2"),
        (2.5, TypeError, r"k must be a positive integer, got 2\.5"),
        (3.0, TypeError, r"k must be a positive integer, got 3\.0"),
        ("3", TypeError, "k must be a positive integer, got '3'"),
        (True, TypeError, "k must be a positive integer, got True"),
        (None, TypeError, "k must be a positive integer, got None"),
    ],
)
def test_bad_k(X, k, error, pattern):
    """k must be a positive integer."""
    with pytest.raises(error, match=pattern):
        allknn.neighbors(X, k)


def test_numpy_integer_k_is_accepted(X):
    """``np.int64(3)`` is an integer k."""
    assert allknn.neighbors(X, np.int64(3)).k == 3


def test_k_too_large_self_join(X):
    """The limit is n - 1 with self excluded."""
    with pytest.raises(ValueError, match=r"k=40 is too large: each row has only 39 candidate other rows "
                                         r"\(self excluded\); pass k <= 39"):
        allknn.neighbors(X, 40)


def test_k_too_large_without_self_exclusion(X):
    """With self allowed the limit is n."""
    assert allknn.neighbors(X, 40, exclude_self=False).k == 40
    with pytest.raises(ValueError, match=r"k=41 is too large.*pass k <= 40"):
        allknn.neighbors(X, 41, exclude_self=False)


def test_k_too_large_query_form(X):
    """In the query form the limit is the corpus size."""
    with pytest.raises(ValueError, match=r"k=41 is too large: each row has only 40 candidate corpus rows; "
                                         r"pass k <= 40"):
        allknn.neighbors(X, 41, queries=X[:3])


def test_k_limit_counts_kept_rows_after_drop(X):
    """Dropped rows are not candidates, so they lower the limit."""
    X[[1, 2]] = 0
    assert allknn.neighbors(X, 37, invalid="drop").k == 37
    with pytest.raises(ValueError, match="pass k <= 37"):
        allknn.neighbors(X, 38, invalid="drop")


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("threads", [0, -1, 1.5, "2", True])
def test_bad_threads(X, threads):
    """threads is a positive integer or None."""
    message = f"threads must be a positive integer or None, got {threads!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        allknn.neighbors(X, 3, threads=threads)


@pytest.mark.parametrize(
    ("budget", "error", "pattern"),
    [
        ("lots", ValueError, r"max_memory='lots' is not a size; write it like '512MB'"),
        ("10XB", ValueError, r"max_memory='10XB' is not a size"),
        ("", ValueError, r"max_memory='' is not a size"),
        ("-5MB", ValueError, r"max_memory='-5MB' is not a size"),
        ("0MB", ValueError, r"max_memory must be positive, got '0MB'"),
        (0, ValueError, r"max_memory must be positive, got 0"),
        (1.5e9, TypeError, r"max_memory must be a size string like '1GB' or bytes as int"),
        (None, TypeError, r"max_memory must be a size string"),
    ],
)
def test_bad_max_memory(X, budget, error, pattern):
    """Unparseable or non-positive budgets."""
    with pytest.raises(error, match=pattern):
        allknn.neighbors(X, 3, max_memory=budget)


@pytest.mark.parametrize("budget", ["1.5GiB", "512MB", " 64 mib ", 10**8, np.int64(10**8)])
def test_good_max_memory_spellings(X, budget):
    """Sizes with units, spaces, any case, or bytes."""
    assert allknn.neighbors(X, 3, max_memory=budget).k == 3


def test_budget_too_small(X):
    """A budget below the smallest tile raises and says what would fit."""
    with pytest.raises(ValueError, match=r"max_memory=1000 bytes is too small for 2 thread\(s\) at 6 "
                                         r"dimensions; give at least \d+ bytes or fewer threads"):
        allknn.neighbors(X, 3, max_memory=1000, threads=2)


@pytest.mark.parametrize("choice", ["bogus", "Drop", None, "ignore"])
def test_bad_invalid_choice(X, choice):
    """invalid is 'raise' or 'drop'."""
    message = f"invalid must be one of ('raise', 'drop'), got {choice!r}"
    with pytest.raises(ValueError, match=re.escape(message)):
        allknn.neighbors(X, 3, invalid=choice)


@pytest.mark.parametrize("block_rows", [0, -4])
def test_bad_block_rows(X, block_rows):
    """block_rows must be positive."""
    with pytest.raises(ValueError, match=f"block_rows must be a positive integer, got {block_rows}"):
        allknn.neighbors(X, 3, block_rows=block_rows)


# --------------------------------------------------------------------------- invalid="drop"


def _spoil(X: np.ndarray, rows: dict[int, float]) -> np.ndarray:
    X = X.copy()
    for row, value in rows.items():
        if value == 0:
            X[row] = 0
        else:
            X[row, row % X.shape[1]] = value
    return X


@pytest.mark.parametrize("block_rows", [4, 16, 1024])
def test_drop_self_join(rng, block_rows):
    """Dropped rows get -1 / NaN and appear in nobody's list; the rest is the kept-rows answer."""
    X = _spoil(rng.standard_normal((90, 8)).astype(np.float32), {0: 0, 17: np.nan, 18: np.inf, 89: 0})
    dropped = [0, 17, 18, 89]
    kept = np.setdiff1d(np.arange(90), dropped)
    k = 6
    res = allknn.neighbors(X, k, invalid="drop", block_rows=block_rows, threads=2)
    assert_well_formed(res, n_queries=90, k=k, self_join=True)
    assert res.n_corpus == 90
    assert (res.indices[dropped] == -1).all() and np.isnan(res.similarities[dropped]).all()
    assert not np.isin(res.indices, dropped).any()
    assert (res.indices[kept] >= 0).all()
    assert_topk_equal(res, reference_topk(X, k, drop_invalid=True))
    on_kept = allknn.neighbors(X[kept], k, block_rows=block_rows)
    np.testing.assert_array_equal(res.indices[kept], kept[on_kept.indices])
    np.testing.assert_array_equal(res.similarities[kept], on_kept.similarities)


def test_drop_query_form(rng):
    """A dropped query row is -1 / NaN; a dropped corpus row is nobody's neighbour."""
    X = _spoil(rng.standard_normal((70, 5)).astype(np.float32), {3: 0, 40: np.nan})
    Q = _spoil(rng.standard_normal((25, 5)).astype(np.float32), {0: np.inf, 24: 0})
    k = 68
    res = allknn.neighbors(X, k, queries=Q, invalid="drop", block_rows=16, threads=3)
    assert_well_formed(res, n_queries=25, k=k)
    assert (res.indices[[0, 24]] == -1).all() and np.isnan(res.similarities[[0, 24]]).all()
    assert not np.isin(res.indices, [3, 40]).any()
    assert_topk_equal(res, reference_topk(X, k, queries=Q, drop_invalid=True))
    with pytest.raises(ValueError, match="pass k <= 68"):
        allknn.neighbors(X, 69, queries=Q, invalid="drop")


def test_drop_everything_raises():
    """Nothing left to search is an error."""
    with pytest.raises(ValueError, match="all 3 rows of X are zero or contain NaN/Inf"):
        allknn.neighbors(np.zeros((3, 4)), 1, invalid="drop")


def test_drop_with_nothing_to_drop_is_plain(rng):
    """With clean input, drop changes nothing."""
    X = rng.standard_normal((50, 4)).astype(np.float32)
    a, b = allknn.neighbors(X, 4, invalid="drop"), allknn.neighbors(X, 4)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.similarities, b.similarities)


def test_more_rows_than_ids_can_hold_is_refused(monkeypatch):
    """Row ids are packed in 32 bits; the limit is enforced, not assumed."""
    import allknn.api

    monkeypatch.setattr(allknn.api, "MAX_ROWS", 100)
    X = np.random.default_rng(0).standard_normal((100, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="X has 100 rows; one search handles fewer than 100: split it"):
        allknn.neighbors(X, 3)
    with pytest.raises(ValueError, match="queries has 100 rows"):
        allknn.neighbors(X[:50], 3, queries=X)
    assert allknn.neighbors(X[:99], 3).indices.shape == (99, 3)


@pytest.mark.parametrize("value", [2, 1.0001, -1.5])
def test_min_similarity_outside_the_cosine_range_is_refused(value):
    X = np.random.default_rng(0).standard_normal((20, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=rf"min_similarity={value!r} is outside \[-1, 1\]"):
        allknn.neighbors(X, 3, min_similarity=value)
    assert allknn.neighbors(X, 3, min_similarity=1.0).indices.shape == (20, 3)


def test_a_one_row_self_join_says_it_needs_two_rows():
    with pytest.raises(ValueError, match="a self-join needs at least two"):
        allknn.neighbors(np.ones((1, 4), np.float32), 1)
    X = np.ones((3, 4), np.float32)
    X[1:] = 0
    with pytest.raises(ValueError, match="a self-join needs at least two"):
        allknn.neighbors(X, 1, invalid="drop")
    assert allknn.neighbors(np.ones((1, 4), np.float32), 1, exclude_self=False).indices.tolist() == [[0]]
