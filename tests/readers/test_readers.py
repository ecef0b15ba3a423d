"""Reading embeddings and ids: every format round trips, every bad input has a clear message."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from allknn.readers import Embeddings, load, read_ids

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


@pytest.fixture
def matrix(rng) -> np.ndarray:
    """40 x 6 float32 rows."""
    return rng.standard_normal((40, 6)).astype(np.float32)


def _write_fvecs(path: Path, rows: np.ndarray) -> None:
    records = np.empty(rows.shape[0], dtype=[("dim", "<i4"), ("vector", "<f4", (rows.shape[1],))])
    records["dim"] = rows.shape[1]
    records["vector"] = rows
    records.tofile(path)


def _list_table(rows: np.ndarray, kind: pa.DataType, **extra: object) -> pa.Table:
    return pa.table({**extra, "emb": pa.array(list(rows), type=kind)})


# --- .npy ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_npy_is_memory_mapped_in_its_stored_dtype(tmp_path, matrix, dtype):
    path = tmp_path / "x.npy"
    np.save(path, matrix.astype(dtype))
    got = load(path)
    assert isinstance(got, Embeddings)
    assert isinstance(got.matrix, np.memmap) and not got.matrix.flags.writeable
    assert got.matrix.dtype == dtype and got.ids is None and got.source == str(path)
    np.testing.assert_array_equal(got.matrix, matrix.astype(dtype))


def test_truncated_npy_names_the_file(tmp_path, matrix):
    path = tmp_path / "cut.npy"
    np.save(path, matrix)
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(ValueError, match=r"cut\.npy is not a readable \.npy file .*truncated or corrupt"):
        load(path)


@pytest.mark.parametrize(
    ("array", "error", "message"),
    [
        (np.zeros(5, np.float32), ValueError, r"shape \(5,\), but embeddings must be 2-D"),
        (np.zeros((0, 3), np.float32), ValueError, r"shape \(0, 3\); it needs at least one row"),
        (np.array([["a", "b"]]), TypeError, r"holds dtype <U1, not numbers"),
    ],
)
def test_npy_that_is_not_a_matrix(tmp_path, array, error, message):
    path = tmp_path / "bad.npy"
    np.save(path, array)
    with pytest.raises(error, match=f"bad.npy.*{message}"):
        load(path)


# --- .npz ---------------------------------------------------------------------------------------


def test_npz_single_array_and_named_array(tmp_path, matrix):
    one = tmp_path / "one.npz"
    np.savez(one, emb=matrix)
    np.testing.assert_array_equal(load(one).matrix, matrix)
    two = tmp_path / "two.npz"
    np.savez_compressed(two, train=matrix, test=matrix[:3])
    got = load(two, dataset="test")
    np.testing.assert_array_equal(got.matrix, matrix[:3])
    assert got.source == f"{two} (array 'test')"


def test_npz_errors_list_the_arrays(tmp_path, matrix):
    path = tmp_path / "two.npz"
    np.savez(path, train=matrix, test=matrix)
    with pytest.raises(ValueError, match=r"two\.npz has 2 arrays \(train, test\); pass dataset="):
        load(path)
    with pytest.raises(ValueError, match=r"two\.npz has no array 'emb'; its arrays are: train, test"):
        load(path, dataset="emb")


def test_sparse_npz_loads_as_csr(tmp_path):
    scipy_sparse = pytest.importorskip("scipy.sparse")
    path = tmp_path / "sparse.npz"
    matrix = scipy_sparse.random(10, 5, density=0.3, format="coo", random_state=0)
    scipy_sparse.save_npz(path, matrix)
    loaded = load(path).matrix
    assert loaded.format == "csr"
    np.testing.assert_array_equal(loaded.toarray(), matrix.toarray())


def test_corrupt_npz(tmp_path):
    path = tmp_path / "junk.npz"
    path.write_bytes(b"PK\x03\x04 this is not a zip archive")
    with pytest.raises(ValueError, match=r"junk\.npz is not a readable \.npz file"):
        load(path)


# --- .parquet -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["list", "large_list", "fixed_size_list"])
def test_parquet_list_column_with_ids_over_row_groups(tmp_path, matrix, kind):
    value_type = {"list": pa.list_(pa.float32()), "large_list": pa.large_list(pa.float32()),
                  "fixed_size_list": pa.list_(pa.float32(), 6)}[kind]
    ids = [f"item-{i}" for i in range(40)]
    path = tmp_path / "x.parquet"
    pq.write_table(_list_table(matrix, value_type, item=ids, score=np.arange(40.0)), path, row_group_size=7)
    got = load(path, id_column="item")
    assert got.matrix.dtype == np.float32 and got.source == f"{path} (column 'emb')"
    np.testing.assert_array_equal(got.matrix, matrix)
    assert got.ids.tolist() == ids


@pytest.mark.parametrize("arrow_type", [pa.float16(), pa.float64()])
def test_parquet_keeps_the_stored_float_type(tmp_path, matrix, arrow_type):
    stored = matrix.astype(arrow_type.to_pandas_dtype())
    path = tmp_path / "x.parquet"
    pq.write_table(_list_table(stored, pa.list_(arrow_type)), path)
    got = load(path)
    assert got.matrix.dtype == stored.dtype
    np.testing.assert_array_equal(got.matrix, stored)


def test_parquet_float_columns_layout(tmp_path, matrix):
    path = tmp_path / "wide.parquet"
    columns = {"key": np.arange(100, 140), "label": [str(i) for i in range(40)]}
    columns |= {f"d{j}": matrix[:, j] for j in range(6)}
    pq.write_table(pa.table(columns), path, row_group_size=9)
    got = load(path, id_column="key")
    np.testing.assert_array_equal(got.matrix, matrix)
    assert got.ids.dtype == np.int64 and got.ids[0] == 100
    assert got.source == f"{path} (6 float columns)"


def test_parquet_explicit_column_among_several_lists(tmp_path, matrix):
    path = tmp_path / "two.parquet"
    pq.write_table(pa.table({"a": pa.array(list(matrix), pa.list_(pa.float32())),
                             "b": pa.array(list(matrix[:, :2]), pa.list_(pa.float32()))}), path)
    with pytest.raises(ValueError, match=r"two\.parquet has several list columns \(a, b\); pass column="):
        load(path)
    np.testing.assert_array_equal(load(path, column="b").matrix, matrix[:, :2])


def test_parquet_missing_columns_list_the_available_ones(tmp_path, matrix):
    path = tmp_path / "x.parquet"
    pq.write_table(_list_table(matrix, pa.list_(pa.float32()), name=[str(i) for i in range(40)]), path)
    with pytest.raises(ValueError, match=r"x\.parquet has no column 'vec'; its columns are: name, emb"):
        load(path, column="vec")
    with pytest.raises(ValueError, match=r"x\.parquet has no column 'id'; its columns are: name, emb"):
        load(path, id_column="id")


def test_parquet_ragged_lists_name_the_first_bad_row(tmp_path):
    rows = [[1.0, 2.0, 3.0]] * 10 + [[1.0, 2.0]] + [[1.0, 2.0, 3.0]] * 5
    path = tmp_path / "ragged.parquet"
    pq.write_table(pa.table({"emb": rows}), path, row_group_size=4)
    with pytest.raises(ValueError, match=r"ragged\.parquet \(column 'emb'\): row 10 has 2 values but row 0"):
        load(path)


def test_parquet_nulls(tmp_path):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"emb": [[1.0, 2.0], None, [3.0, 4.0]]}), path)
    with pytest.raises(ValueError, match=r"nulls\.parquet \(column 'emb'\): row 1 is null"):
        load(path)
    pq.write_table(pa.table({"emb": [[1.0, 2.0], [3.0, 4.0], [5.0, None]]}), path)
    with pytest.raises(ValueError, match=r"row 2 holds a null value \(dimension 1\)"):
        load(path)
    pq.write_table(pa.table({"x": [1.0, 2.0], "y": [0.5, None]}), path)
    with pytest.raises(ValueError, match=r"column 'y' is null at row 1"):
        load(path)


def test_parquet_non_numeric_embeddings(tmp_path):
    path = tmp_path / "text.parquet"
    pq.write_table(pa.table({"emb": [["a", "b"], ["c", "d"]], "name": ["x", "y"]}), path)
    with pytest.raises(TypeError, match=r"text\.parquet \(column 'emb'\) holds lists of string, not numbers"):
        load(path)
    with pytest.raises(TypeError, match=r"column 'name' of .*text\.parquet holds string values, not lists"):
        load(path, column="name")
    only_text = tmp_path / "names.parquet"
    pq.write_table(pa.table({"name": ["x", "y"]}), only_text)
    with pytest.raises(ValueError, match=r"names\.parquet has no list column and no float columns"):
        load(only_text)


def test_parquet_integer_lists_become_float32(tmp_path):
    path = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"emb": pa.array([[1, 2], [3, 4]], pa.list_(pa.int8()))}), path)
    got = load(path)
    assert got.matrix.dtype == np.float32
    np.testing.assert_array_equal(got.matrix, [[1, 2], [3, 4]])


def test_parquet_bad_ids(tmp_path, matrix):
    path = tmp_path / "ids.parquet"
    pq.write_table(_list_table(matrix[:4], pa.list_(pa.float32()), key=["a", "b", "a", "c"]), path)
    with pytest.raises(ValueError, match=r"id column 'key' of .*ids\.parquet has 1 duplicated id\(s\): 'a'"):
        load(path, id_column="key")
    pq.write_table(_list_table(matrix[:3], pa.list_(pa.float32()), key=["a", None, "c"]), path)
    with pytest.raises(ValueError, match=r"id column 'key' of .*ids\.parquet has 1 null\(s\) \(first at"):
        load(path, id_column="key")


def test_corrupt_parquet(tmp_path, matrix):
    path = tmp_path / "cut.parquet"
    pq.write_table(_list_table(matrix, pa.list_(pa.float32())), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut\.parquet is not a readable parquet file"):
        load(path)


# --- .h5 ----------------------------------------------------------------------------------------


def test_hdf5_ann_benchmarks_layout_is_memory_mapped(tmp_path, matrix):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "glove.hdf5"
    with h5py.File(path, "w") as handle:
        handle["train"] = matrix
        handle["test"] = matrix[:5]
        handle["neighbors"] = np.zeros((5, 10), np.int32)
    got = load(path)
    assert isinstance(got.matrix, np.memmap) and got.source == f"{path} (dataset 'train')"
    np.testing.assert_array_equal(np.asarray(got.matrix), matrix)
    np.testing.assert_array_equal(load(path, dataset="test").matrix, matrix[:5])


def test_hdf5_only_2d_dataset_chunked_and_compressed(tmp_path, matrix):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("group/emb", data=matrix.astype(np.float16), compression="gzip", chunks=(8, 6))
        handle["labels"] = np.arange(40)
    got = load(path)
    assert got.matrix.dtype == np.float16 and got.source == f"{path} (dataset 'group/emb')"
    np.testing.assert_array_equal(got.matrix, matrix.astype(np.float16))


def test_hdf5_errors_list_the_datasets(tmp_path, matrix):
    h5py = pytest.importorskip("h5py")
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as handle:
        handle["a"] = matrix
        handle["b"] = matrix
    with pytest.raises(ValueError, match=r"x\.h5 has 2 2-D datasets \(datasets: a \(40, 6\), b \(40, 6\)\)"):
        load(path)
    with pytest.raises(ValueError, match=r"x\.h5 has no dataset 'c'; its datasets are: a, b"):
        load(path, dataset="c")


def test_missing_optional_dependency_names_the_extra(tmp_path, matrix, monkeypatch):
    path = tmp_path / "x.h5"
    path.write_bytes(b"not read")
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match=r"reading \.h5 files needs h5py.*pip install 'allknn\[hdf5\]'"):
        load(path)


# --- .fvecs -------------------------------------------------------------------------------------


def test_fvecs_is_memory_mapped(tmp_path, matrix):
    path = tmp_path / "x.fvecs"
    _write_fvecs(path, matrix)
    got = load(path)
    assert isinstance(got.matrix, np.memmap) and got.matrix.dtype == np.float32
    np.testing.assert_array_equal(got.matrix, matrix)


def test_truncated_fvecs_gives_expected_and_actual_size(tmp_path, matrix):
    path = tmp_path / "cut.fvecs"
    _write_fvecs(path, matrix)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"cut\.fvecs is truncated .*every record has 28 bytes.*"
                                         r"multiple of 28, but it is 1110 bytes"):
        load(path)


def test_fvecs_records_of_other_dimensions(tmp_path, matrix):
    path = tmp_path / "mixed.fvecs"
    _write_fvecs(path, matrix)
    raw = bytearray(path.read_bytes())
    raw[28 * 3 : 28 * 3 + 4] = np.int32(5).tobytes()
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=r"mixed\.fvecs has records of different dimensions: record 3 has 5"):
        load(path)


# --- dispatch -----------------------------------------------------------------------------------


def test_unknown_extension_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match=r"x\.csv: unknown extension '\.csv'; supported: \.npy, \.npz"):
        load(tmp_path / "x.csv")
    with pytest.raises(FileNotFoundError, match=r"no such file: .*missing\.npy"):
        load(tmp_path / "missing.npy")


def test_options_that_do_not_apply(tmp_path, matrix):
    path = tmp_path / "x.npz"
    np.savez(path, emb=matrix)
    with pytest.raises(ValueError, match=r"column= does not apply to .*x\.npz .*use dataset= instead"):
        load(path, column="emb")
    with pytest.raises(ValueError, match=r"dataset= does not apply to .*x\.npy .*leave it out"):
        load(tmp_path / "x.npy", dataset="emb")


# --- ids ----------------------------------------------------------------------------------------


def test_ids_from_sequences_series_and_files(tmp_path):
    pd = pytest.importorskip("pandas")
    assert read_ids(["b", "a"], 2).tolist() == ["b", "a"]
    assert read_ids(np.arange(3, dtype=np.int32), 3).dtype == np.int64
    assert read_ids(pd.Series([7, 8]), 2).tolist() == [7, 8]
    path = tmp_path / "ids.txt"
    path.write_bytes(b"first\r\nsecond id\nthird")
    assert read_ids(path, 3).tolist() == ["first", "second id", "third"]
    path.write_text("1\n2\n")
    assert read_ids(str(path), 2).tolist() == ["1", "2"]


def test_ids_count_mismatch():
    with pytest.raises(ValueError, match=r"^ids has 99 entries but the matrix has 100 rows"):
        read_ids(np.arange(99), 100)


def test_duplicate_ids_name_five_and_count():
    labels = [f"x{i}" for i in range(7)] * 2 + ["unique"]
    with pytest.raises(ValueError, match=r"ids has 7 duplicated id\(s\): 'x0' \(2 times\), 'x1' .*'x4' "
                                         r"\(2 times\), \.\.\.; ids must be unique"):
        read_ids(labels, 15)


def test_ids_file_problems(tmp_path):
    path = tmp_path / "ids.txt"
    path.write_text("a\n\nb\n\n")
    with pytest.raises(ValueError, match=r"ids file .*ids\.txt has 2 empty line\(s\) \(line 2, 4\)"):
        read_ids(path, 4)
    with pytest.raises(FileNotFoundError, match=r"ids file .*nope\.txt does not exist"):
        read_ids(tmp_path / "nope.txt", 4)


def test_ids_of_mixed_or_missing_values():
    with pytest.raises(TypeError, match=r"ids must be all integers or all strings, got values of type int"):
        read_ids([1, "a"], 2)
    with pytest.raises(ValueError, match=r"ids has 1 missing value\(s\) \(None or NaN\) at position\(s\) 1"):
        read_ids(["a", None], 2)
