"""Result files: atomic writes, exact npz/parquet round trips, the streaming parquet writer."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from allknn import TopK
from allknn.writers import ParquetNeighborWriter, load_result, neighbor_table, save_result

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pd = pytest.importorskip("pandas")


def _topk(rng: np.random.Generator, n: int, n_corpus: int, k: int) -> TopK:
    """A well-formed TopK with -1/NaN padding at the end of some rows."""
    indices = np.stack([rng.choice(n_corpus, size=k, replace=False) for _ in range(n)]).astype(np.int64)
    similarities = -np.sort(-rng.uniform(-1, 1, size=(n, k)), axis=1).astype(np.float32)
    kept = rng.integers(0, k + 1, size=n)
    kept[:3] = (k, 0, 1)
    padding = np.arange(k) >= kept[:, None]
    indices[padding] = -1
    similarities[padding] = np.nan
    self_join = n == n_corpus
    params = {"k": k, "method": "exact", "self_join": self_join, "exclude_self": self_join,
              "min_similarity": None}
    return TopK(indices=indices, similarities=similarities, n_corpus=n_corpus, params=params)


@pytest.fixture
def self_join(rng) -> TopK:
    return _topk(rng, 50, 50, 5)


@pytest.fixture
def query_join(rng) -> TopK:
    return _topk(rng, 12, 30, 4)


def _assert_equal(got: TopK, want: TopK) -> None:
    assert got.indices.dtype == np.int64 and got.similarities.dtype == np.float32
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.similarities, want.similarities)  # NaN padding compares equal
    assert got.n_corpus == want.n_corpus
    assert got.params == want.params


def _masked(topk: TopK, floor: float) -> TopK:
    below = ~(topk.similarities >= floor)
    return TopK(indices=np.where(below, -1, topk.indices),
                similarities=np.where(below, np.float32(np.nan), topk.similarities),
                n_corpus=topk.n_corpus, params=topk.params)


def _leftovers(folder) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
@pytest.mark.parametrize("labels", [None, "strings", "integers"])
def test_self_join_round_trip(tmp_path, self_join, suffix, labels):
    ids = {None: None, "strings": [f"item {i}" for i in range(50)], "integers": np.arange(1000, 1050)}[labels]
    path = tmp_path / f"out{suffix}"
    save_result(self_join, path, ids=ids, metadata={"input": "x.npy"})
    _assert_equal(load_result(path), self_join)
    assert _leftovers(tmp_path) == [path.name]


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_query_join_round_trip_with_query_ids(tmp_path, query_join, suffix):
    path = tmp_path / f"out{suffix}"
    save_result(query_join, path, ids=[f"c{i}" for i in range(30)], query_ids=[f"q{i}" for i in range(12)])
    _assert_equal(load_result(path), query_join)


def test_npz_layout(tmp_path, self_join):
    path = tmp_path / "out.npz"
    save_result(self_join, path, ids=[f"i{i}" for i in range(50)], metadata={"input": "x.npy"})
    with np.load(path, allow_pickle=False) as saved:
        assert json.loads(str(saved["params"])) == self_join.params
        assert json.loads(str(saved["metadata"])) == {"input": "x.npy"}
        assert int(saved["n_corpus"]) == 50 and np.isnan(saved["min_similarity"])
        assert saved["ids"][3] == "i3" and "query_ids" not in saved.files


@pytest.mark.parametrize("labels", [None, "strings"])
def test_parquet_table_is_the_long_table(tmp_path, self_join, labels):
    ids = None if labels is None else [f"item {i}" for i in range(50)]
    path = tmp_path / "out.parquet"
    save_result(self_join, path, ids=ids, metadata={"input": "x.npy"})
    table = pq.read_table(path)
    assert table.schema.field("rank").type == pa.int32()
    assert table.schema.field("similarity").type == pa.float32()
    got = table.to_pandas()
    want = self_join.to_pandas(ids=ids)
    assert list(got.columns) == ["id", "neighbor_id", "rank", "similarity"]
    for column in want.columns:
        np.testing.assert_array_equal(got[column].to_numpy(), want[column].to_numpy())
    header = json.loads(table.schema.metadata[b"allknn"])
    assert header["params"] == self_join.params and header["metadata"] == {"input": "x.npy"}
    assert (header["k"], header["n_rows"], header["n_corpus"]) == (5, 50, 50)
    assert (b"allknn.ids" in table.schema.metadata) == (ids is not None)


def test_parquet_output_is_deterministic(tmp_path, self_join):
    """Equal results give byte-identical files (a resumed run is compared this way)."""
    first, second = tmp_path / "a.parquet", tmp_path / "b.parquet"
    for path in (first, second):
        save_result(self_join, path, ids=[f"i{i}" for i in range(50)], metadata={"input": "x.npy"})
    assert first.read_bytes() == second.read_bytes()


def test_query_join_ids_without_query_ids_use_row_numbers(tmp_path, query_join):
    ids = [f"c{i}" for i in range(30)]
    path = tmp_path / "out.parquet"
    save_result(query_join, path, ids=ids)
    got = pq.read_table(path).to_pandas()
    want = query_join.to_pandas(ids=ids)
    np.testing.assert_array_equal(got["id"].to_numpy(), want["id"].to_numpy())
    _assert_equal(load_result(path), query_join)


@pytest.mark.parametrize("suffix", [".npz", ".parquet"])
def test_min_similarity_leaves_out_weak_neighbours(tmp_path, self_join, suffix):
    path = tmp_path / f"out{suffix}"
    save_result(self_join, path, min_similarity=0.2)
    _assert_equal(load_result(path), _masked(self_join, 0.2))
    if suffix == ".parquet":
        table = pq.read_table(path).to_pandas()
        assert (table["similarity"] >= 0.2).all()
        assert len(table) == int((self_join.similarities >= 0.2).sum())


def test_ids_too_many_to_keep_are_passed_at_load(tmp_path, self_join, monkeypatch):
    monkeypatch.setattr(neighbor_table, "INLINE_LABELS_LIMIT", 0)
    ids = [f"item {i}" for i in range(50)]
    path = tmp_path / "out.parquet"
    save_result(self_join, path, ids=ids)
    assert b"allknn.ids" not in pq.read_schema(path).metadata
    with pytest.raises(ValueError, match=r"out\.parquet lists neighbours by id.*pass ids= "):
        load_result(path)
    _assert_equal(load_result(path, ids=ids), self_join)
    with pytest.raises(ValueError, match=r"the ids do not match those .*out\.parquet was written with"):
        load_result(path, ids=ids[::-1])


def test_save_overwrites_an_existing_file(tmp_path, self_join, query_join):
    path = tmp_path / "out.npz"
    save_result(query_join, path)
    save_result(self_join, path)
    _assert_equal(load_result(path), self_join)


# --- atomic writes ------------------------------------------------------------------------------


def test_failed_npz_write_leaves_nothing(tmp_path, self_join, monkeypatch):
    def broken_savez(handle, **arrays):
        handle.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", broken_savez)
    with pytest.raises(OSError, match="disk full"):
        save_result(self_join, tmp_path / "out.npz")
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_the_previous_file(tmp_path, self_join, query_join, monkeypatch):
    path = tmp_path / "out.parquet"
    save_result(query_join, path)
    before = path.read_bytes()
    calls = []

    def failing_write_table(self, table, *args, **kwargs):
        calls.append(table.num_rows)
        raise OSError("disk full")

    monkeypatch.setattr(pq.ParquetWriter, "write_table", failing_write_table)
    with pytest.raises(OSError, match="disk full"):
        save_result(self_join, path)
    assert calls and path.read_bytes() == before
    assert _leftovers(tmp_path) == ["out.parquet"]


def test_writer_aborts_when_a_block_fails_midway(tmp_path, self_join):
    path = tmp_path / "out.parquet"
    with pytest.raises(RuntimeError, match="engine crashed"), \
            ParquetNeighborWriter(path, k=5, n_corpus=50) as writer:
        writer.write_block(0, self_join.indices[:20], self_join.similarities[:20])
        assert _leftovers(tmp_path) == [f".out.parquet.tmp-{os.getpid()}"]
        raise RuntimeError("engine crashed")
    assert _leftovers(tmp_path) == []


def test_missing_folder(tmp_path, self_join):
    with pytest.raises(FileNotFoundError, match=r"the folder .*nowhere does not exist; create it first"):
        save_result(self_join, tmp_path / "nowhere" / "out.parquet")


# --- the streaming writer -----------------------------------------------------------------------


def test_blocks_in_any_order_equal_save_result(tmp_path, self_join):
    ids = np.arange(500, 550)
    path = tmp_path / "streamed.parquet"
    with ParquetNeighborWriter(path, k=5, ids=ids, params=self_join.params) as writer:
        for start in (40, 0, 20):
            stop = start + 20
            writer.write_block(start, self_join.indices[start:stop], self_join.similarities[start:stop])
    _assert_equal(load_result(path), self_join)


def test_writer_refuses_bad_blocks(tmp_path, self_join):
    writer = ParquetNeighborWriter(tmp_path / "out.parquet", k=5, n_corpus=50)
    writer.write_block(0, self_join.indices[:10], self_join.similarities[:10])
    with pytest.raises(ValueError, match=r"row 5 was already written .*write each row block once"):
        writer.write_block(5, self_join.indices[5:15], self_join.similarities[5:15])
    with pytest.raises(ValueError, match=r"block rows 45\.\.54 are outside the result's rows 0\.\.49"):
        writer.write_block(45, self_join.indices[:10], self_join.similarities[:10])
    with pytest.raises(ValueError, match=r"equal shape \(rows, k=5\); got \(10, 4\)"):
        writer.write_block(10, self_join.indices[10:20, :4], self_join.similarities[10:20, :4])
    with pytest.raises(ValueError, match=r"indices must lie in -1\.\.49"):
        writer.write_block(10, self_join.indices[10:20] + 50, self_join.similarities[10:20])
    with pytest.raises(ValueError, match=r"40 of 50 rows were never written \(first: row 10\)"):
        writer.close()
    assert _leftovers(tmp_path) == []
    with pytest.raises(ValueError, match="is closed"):
        writer.write_block(10, self_join.indices[10:20], self_join.similarities[10:20])


def test_writer_needs_the_corpus_size(tmp_path):
    with pytest.raises(ValueError, match=r"pass n_corpus= .* or ids="):
        ParquetNeighborWriter(tmp_path / "out.parquet", k=5)
    with pytest.raises(ValueError, match=r"a self-join has as many rows as the corpus, got 10 and 50"):
        ParquetNeighborWriter(tmp_path / "out.parquet", k=5, n_rows=10, ids=np.arange(50),
                              params={"self_join": True})
    assert _leftovers(tmp_path) == []


# --- bad inputs ---------------------------------------------------------------------------------


def test_unknown_extensions_and_foreign_files(tmp_path, self_join):
    with pytest.raises(ValueError, match=r"cannot write .*out\.xlsx: the extension must be one of \.npz"):
        save_result(self_join, tmp_path / "out.xlsx")
    with pytest.raises(FileNotFoundError, match=r"no such file: .*gone\.npz"):
        load_result(tmp_path / "gone.npz")
    foreign = tmp_path / "foreign.parquet"
    pq.write_table(pa.table({"a": [1, 2]}), foreign)
    with pytest.raises(ValueError, match=r"foreign\.parquet was not written by allknn"):
        load_result(foreign)
    other = tmp_path / "other.npz"
    np.savez(other, emb=np.zeros((3, 2)))
    with pytest.raises(ValueError, match=r"other\.npz is not an allknn result \(no indices, similarities"):
        load_result(other)


def test_bad_ids_and_metadata(tmp_path, self_join):
    with pytest.raises(ValueError, match=r"^ids has 49 entries but the matrix has 50 rows"):
        save_result(self_join, tmp_path / "out.parquet", ids=np.arange(49))
    with pytest.raises(ValueError, match=r"duplicated id"):
        save_result(self_join, tmp_path / "out.npz", ids=["a"] * 50)
    with pytest.raises(TypeError, match=r"cannot store a set .*use numbers, strings, lists and dicts"):
        save_result(self_join, tmp_path / "out.npz", metadata={"tags": {"a"}})
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("suffix, sep", [(".csv", ","), (".tsv", "\t")])
def test_text_tables_for_spreadsheets(tmp_path, self_join, suffix, sep):
    import pandas as pd

    path = tmp_path / f"out{suffix}"
    ids = [f"item-{i}" for i in range(self_join.n_corpus)]
    save_result(self_join, path, ids=ids, min_similarity=0.5)
    table = pd.read_csv(path, sep=sep)
    want = self_join.to_pandas(ids)
    want = want[want["similarity"] >= 0.5].reset_index(drop=True)
    assert list(table.columns) == ["id", "neighbor_id", "rank", "similarity"]
    pd.testing.assert_frame_equal(table[["id", "neighbor_id", "rank"]], want[["id", "neighbor_id", "rank"]],
                                  check_dtype=False)
    np.testing.assert_array_equal(table["similarity"].to_numpy(np.float32), want["similarity"].to_numpy())


def test_text_tables_are_refused_beyond_a_spreadsheet(tmp_path, monkeypatch, self_join):
    import allknn.writers.results as results

    monkeypatch.setattr(results, "TEXT_MAX_ENTRIES", 10)
    with pytest.raises(ValueError, match=r"too many for a text table \(at most 10, .*\.parquet instead"):
        save_result(self_join, tmp_path / "out.csv")
    assert not list(tmp_path.iterdir())
