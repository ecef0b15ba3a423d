"""TopK converters: the long pandas table and the CSR kNN graph."""

from __future__ import annotations

import numpy as np
import pytest

import allknn
from allknn import TopK

pd = pytest.importorskip("pandas")


@pytest.fixture
def hand() -> TopK:
    """A small hand-written result with missing entries and a zero similarity."""
    return TopK(
        indices=np.array([[2, 1, -1], [0, 3, 2], [-1, -1, -1], [1, 0, 2]], dtype=np.int64),
        similarities=np.array(
            [[0.9, 0.5, np.nan], [0.8, 0.0, -0.25], [np.nan] * 3, [0.7, 0.6, 0.1]], dtype=np.float32
        ),
        n_corpus=4,
    )


@pytest.fixture
def dropped(rng) -> TopK:
    """A real self-join with dropped rows and a similarity floor."""
    X = rng.standard_normal((60, 5)).astype(np.float32)
    X[[4, 31]] = 0
    return allknn.neighbors(X, 6, invalid="drop", min_similarity=0.3, block_rows=16)


def _expected_long(res: TopK) -> list[tuple[int, int, int, float]]:
    out = []
    for i in range(len(res)):
        for rank in range(res.k):
            if res.indices[i, rank] >= 0:
                out.append((i, int(res.indices[i, rank]), rank + 1, float(res.similarities[i, rank])))
    return out


def test_basics(hand):
    """k, len and repr."""
    assert hand.k == 3 and len(hand) == 4
    assert repr(hand) == "TopK(n=4, k=3, n_corpus=4)"


def test_to_pandas_hand(hand):
    """One row per present neighbour, in rank order, with dtypes."""
    df = hand.to_pandas()
    assert list(df.columns) == ["id", "neighbor_id", "rank", "similarity"]
    assert df["rank"].dtype == np.int32 and df["similarity"].dtype == np.float32
    got = list(zip(df["id"], df["neighbor_id"], df["rank"], df["similarity"], strict=True))
    assert got == [
        (0, 2, 1, np.float32(0.9)), (0, 1, 2, np.float32(0.5)),
        (1, 0, 1, np.float32(0.8)), (1, 3, 2, np.float32(0.0)), (1, 2, 3, np.float32(-0.25)),
        (3, 1, 1, np.float32(0.7)), (3, 0, 2, np.float32(0.6)), (3, 2, 3, np.float32(0.1)),
    ]


def test_to_pandas_matches_arrays(dropped):
    """Every present entry, nothing for -1 entries."""
    df = dropped.to_pandas()
    want = _expected_long(dropped)
    assert len(df) == len(want) == int((dropped.indices >= 0).sum())
    assert (df["neighbor_id"] >= 0).all() and not df["similarity"].isna().any()
    got = list(zip(df["id"].tolist(), df["neighbor_id"].tolist(), df["rank"].tolist(),
                   df["similarity"].tolist(), strict=True))
    assert got == want
    assert not df["id"].isin([4, 31]).any() and not df["neighbor_id"].isin([4, 31]).any()


def test_to_pandas_ids_map_both_columns(dropped):
    """In a self-join, ids label both the item and its neighbours."""
    labels = np.array([f"item-{i}" for i in range(60)])
    df = dropped.to_pandas(ids=labels)
    plain = dropped.to_pandas()
    np.testing.assert_array_equal(df["id"].to_numpy(), labels[plain["id"].to_numpy()])
    np.testing.assert_array_equal(df["neighbor_id"].to_numpy(), labels[plain["neighbor_id"].to_numpy()])
    np.testing.assert_array_equal(df["similarity"].to_numpy(), plain["similarity"].to_numpy())


def test_to_pandas_query_form_labels(rng):
    """ids label corpus rows; query_ids label query rows."""
    X = rng.standard_normal((30, 4)).astype(np.float32)
    Q = rng.standard_normal((7, 4)).astype(np.float32)
    res = allknn.neighbors(X, 3, queries=Q)
    corpus = [f"c{i}" for i in range(30)]
    df = res.to_pandas(ids=corpus)
    assert df["id"].tolist() == np.repeat(np.arange(7), 3).tolist()
    assert df["neighbor_id"].tolist() == [corpus[j] for j in res.indices.ravel()]
    df = res.to_pandas(ids=corpus, query_ids=[f"q{i}" for i in range(7)])
    assert df["id"].tolist() == [f"q{i}" for i in np.repeat(np.arange(7), 3)]


def test_to_pandas_query_form_same_size_keeps_query_numbers(rng):
    """Query form with as many queries as corpus rows: corpus ids must not label the queries."""
    X = rng.standard_normal((12, 4)).astype(np.float32)
    Q = rng.standard_normal((12, 4)).astype(np.float32)
    res = allknn.neighbors(X, 2, queries=Q)
    df = res.to_pandas(ids=[f"c{i}" for i in range(12)])
    assert df["id"].tolist() == np.repeat(np.arange(12), 2).tolist()


def test_to_pandas_wrong_label_count(hand):
    """Labels of the wrong length are a clear error."""
    with pytest.raises(ValueError, match="ids has 3 entries but the result has 4 rows"):
        hand.to_pandas(ids=["a", "b", "c"])
    with pytest.raises(ValueError, match="query_ids has 5 entries but the result has 4 rows"):
        hand.to_pandas(query_ids=list("abcde"))


def test_to_csr_hand(hand):
    """Shape, data and columns in rank order; an exact zero is stored."""
    g = hand.to_csr()
    assert g.shape == (4, 4) and g.dtype == np.float32
    np.testing.assert_array_equal(g.indptr, [0, 2, 5, 5, 8])
    np.testing.assert_array_equal(g.indices, [2, 1, 0, 3, 2, 1, 0, 2])
    np.testing.assert_array_equal(g.data, np.float32([0.9, 0.5, 0.8, 0.0, -0.25, 0.7, 0.6, 0.1]))
    assert g.nnz == 8  # the exact zero at (1, 3) is stored, not dropped
    assert g[1, 3] == 0 and g[0, 2] == np.float32(0.9) and g[2].nnz == 0


def test_to_csr_matches_arrays(dropped):
    """Row by row, columns are the indices and data the similarities."""
    g = dropped.to_csr()
    assert g.shape == (60, 60)
    present = dropped.indices >= 0
    assert g.nnz == int(present.sum())
    for i in range(60):
        span = slice(g.indptr[i], g.indptr[i + 1])
        np.testing.assert_array_equal(g.indices[span], dropped.indices[i][present[i]])
        np.testing.assert_array_equal(g.data[span], dropped.similarities[i][present[i]])
    dense = g.toarray()
    rows, ranks = np.nonzero(present)
    cols = dropped.indices[rows, ranks]
    np.testing.assert_array_equal(dense[rows, cols], dropped.similarities[rows, ranks])


def test_to_csr_query_form_shape(rng):
    """(n queries, n corpus) in the query form."""
    X = rng.standard_normal((30, 4)).astype(np.float32)
    res = allknn.neighbors(X, 4, queries=X[:9] + 0.1)
    g = res.to_csr()
    assert g.shape == (9, 30) and g.nnz == 36
    np.testing.assert_array_equal(g.indices.reshape(9, 4), res.indices)
    np.testing.assert_array_equal(g.data.reshape(9, 4), res.similarities)
