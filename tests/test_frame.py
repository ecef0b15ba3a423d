"""neighbors_frame: a DataFrame's embedding column in, the long neighbour table out."""

from __future__ import annotations

import numpy as np
import pytest

import allknn
from allknn.frame import neighbors_frame

pd = pytest.importorskip("pandas")


@pytest.fixture
def vectors(rng) -> np.ndarray:
    """60 x 8 float32 rows."""
    return rng.standard_normal((60, 8)).astype(np.float32)


@pytest.fixture
def frame(vectors) -> pd.DataFrame:
    """Embeddings as Python lists, string ids, an unrelated column and a non-default index."""
    return pd.DataFrame(
        {
            "item_id": [f"item-{i}" for i in range(60)],
            "emb": [row.tolist() for row in vectors],
            "price": np.arange(60.0),
        },
        index=np.arange(100, 160),
    )


def _assert_same_table(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    for column in want.columns:
        np.testing.assert_array_equal(got[column].to_numpy(), want[column].to_numpy())
    assert got["rank"].dtype == np.int32 and got["similarity"].dtype == np.float32


def test_equals_the_array_api_with_an_id_column(frame, vectors):
    got = neighbors_frame(frame, embedding="emb", id="item_id", k=4)
    want = allknn.neighbors(vectors, 4).to_pandas(ids=frame["item_id"].to_numpy())
    _assert_same_table(got, want.rename(columns={"id": "item_id"}))
    assert list(got.columns) == ["item_id", "neighbor_id", "rank", "similarity"]
    assert got["item_id"].iloc[0] == "item-0" and got["neighbor_id"].str.startswith("item-").all()


def test_index_is_the_default_id_and_arrays_stack_too(frame, vectors):
    frame["emb"] = list(vectors.astype(np.float64))
    got = neighbors_frame(frame, embedding="emb", k=3, min_similarity=0.1, threads=1)
    want = allknn.neighbors(vectors, 3, min_similarity=0.1).to_pandas(ids=frame.index.to_numpy())
    _assert_same_table(got, want)
    assert got["id"].iloc[0] == 100


def test_ragged_vectors_name_the_row(frame):
    frame.at[107, "emb"] = frame.at[107, "emb"][:5]
    with pytest.raises(ValueError, match=r"column 'emb' at row 107 has 5 values but row 100 has 8"):
        neighbors_frame(frame, embedding="emb")


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (None, r"column 'emb' at row 103 holds None, not a vector"),
        (["a"] * 8, r"column 'emb' at row 103 holds values that are not numbers"),
        ([[1.0] * 4] * 8, r"column 'emb' at row 103 holds a 2-D value, not a vector"),
    ],
)
def test_entries_that_are_not_vectors_name_the_row(frame, entry, message):
    frame["emb"] = frame["emb"].astype(object)
    frame.at[103, "emb"] = entry
    with pytest.raises(TypeError, match=message):
        neighbors_frame(frame, embedding="emb")


def test_nan_and_zero_rows_name_the_labels(frame):
    frame.at[110, "emb"] = [np.nan, *frame.at[110, "emb"][1:]]
    frame.at[120, "emb"] = [0.0] * 8
    with pytest.raises(ValueError, match=r"column 'emb' has 1 row\(s\) with NaN or Inf \(rows 110\) and "
                                         r"1 row\(s\) with only zeros .*\(rows 120\); .*invalid='drop'"):
        neighbors_frame(frame, embedding="emb", id="item_id")
    got = neighbors_frame(frame, embedding="emb", id="item_id", k=3, invalid="drop")
    assert not got["item_id"].isin(["item-10", "item-20"]).any()
    assert not got["neighbor_id"].isin(["item-10", "item-20"]).any()


def test_bad_ids_and_columns(frame):
    frame["dup"] = ["a", "b"] * 30
    with pytest.raises(ValueError, match=r"column 'dup' has 2 duplicated id\(s\): 'a' \(30 times\)"):
        neighbors_frame(frame, embedding="emb", id="dup")
    with pytest.raises(ValueError, match=r"df.index has 30 duplicated id\(s\): 0 \(2 times\), 1 \(2 times\)"):
        neighbors_frame(frame.set_index(np.repeat(np.arange(60), 2)[:60]), embedding="emb")
    with pytest.raises(KeyError, match=r"df has no column 'vector'; its columns are: item_id, emb, price"):
        neighbors_frame(frame, embedding="vector")
    with pytest.raises(TypeError, match=r"for queries use allknn.neighbors"):
        neighbors_frame(frame, embedding="emb", queries=np.zeros((2, 8)))


@pytest.mark.parametrize("library", ["polars", "pyarrow"])
def test_polars_and_arrow_tables_get_their_own_kind_back(frame, library):
    module = pytest.importorskip(library)
    plain = frame.reset_index(drop=True)
    want = neighbors_frame(plain, embedding="emb", id="item_id", k=4)
    table = module.from_pandas(plain) if library == "polars" else module.Table.from_pandas(plain)
    got = neighbors_frame(table, embedding="emb", id="item_id", k=4)
    assert type(got).__module__.split(".")[0] == library
    pd.testing.assert_frame_equal(got.to_pandas(), want, check_dtype=False)
