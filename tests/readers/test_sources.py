"""Row sources a cluster's workers read block by block."""

from __future__ import annotations

import numpy as np
import pytest

from allknn.engines.dask import TASK_ROWS, task_rows_for
from allknn.readers.sources import NpySource, ParquetSource, open_source

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _write(path, matrix, row_group_size):
    values = pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel()), matrix.shape[1])
    pq.write_table(pa.table({"emb": values}), path, row_group_size=row_group_size)


def test_npy_source_reads_any_range(tmp_path, rng):
    X = rng.standard_normal((300, 7))
    np.save(tmp_path / "x.npy", X)
    source = open_source(tmp_path / "x.npy")
    assert isinstance(source, NpySource) and source.shape == (300, 7) and source.dtype == "<f8"
    np.testing.assert_array_equal(source.read(17, 211), X[17:211])


def test_parquet_folder_and_glob_are_one_source_in_name_order(tmp_path, rng):
    X = rng.standard_normal((500, 6)).astype(np.float32)
    folder = tmp_path / "emb"
    folder.mkdir()
    for name, (a, b) in zip(("b", "a", "c"), ((180, 400), (0, 180), (400, 500)), strict=True):
        _write(folder / f"{name}.parquet", X[a:b], row_group_size=37)
    for spec in (folder, str(folder / "*.parquet")):
        source = open_source(spec)
        assert isinstance(source, ParquetSource) and source.shape == (500, 6)
        for start, stop in ((0, 500), (150, 420), (179, 181), (401, 402)):
            np.testing.assert_array_equal(source.read(start, stop), X[start:stop])


def test_sources_name_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="every worker must read X at this path"):
        open_source(tmp_path / "nothing.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"holds no \.parquet file"):
        open_source(tmp_path / "empty")
    (tmp_path / "x.csv").write_text("1,2\n")
    with pytest.raises(ValueError, match=r"convert it to \.npy"):
        open_source(tmp_path / "x.csv")
    np.save(tmp_path / "v.npy", np.ones(5))
    with pytest.raises(ValueError, match=r"has shape \(5,\); it needs rows x dimensions"):
        open_source(tmp_path / "v.npy")


def test_task_rows_fit_the_budget():
    rows = task_rows_for(2**26, 100, 10, 1024, 10**6)
    assert rows % 64 == 0 and 1024 <= rows <= TASK_ROWS
    assert 2 * rows * (100 * 12 + 3 * 8 * 10) <= 2**26
    assert task_rows_for(2**34, 100, 10, 1024, 10**6) == TASK_ROWS
    assert task_rows_for(2**34, 100, 10, 1024, 3000) == 3008
    with pytest.raises(ValueError, match=r"max_memory=1000000 bytes is too small for one task"):
        task_rows_for(10**6, 100, 10, 1024, 10**6)


def test_zarr_arrays_of_groups_and_subgroups(tmp_path, rng):
    zarr = pytest.importorskip("zarr")
    X = rng.standard_normal((120, 5)).astype(np.float32)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_group("sub").create_array("emb", shape=X.shape, chunks=(50, 5), dtype="f4")[:] = X
    group.create_array("labels", shape=(120,), dtype="i4")
    source = open_source(tmp_path / "g.zarr", column="sub/emb")
    assert source.shape == (120, 5) and source.describe().endswith("(array sub/emb)")
    np.testing.assert_array_equal(source.read(30, 101), X[30:101])
    for missing in ("sub/other", "nothing", "sub"):  # "sub" is a group, not an array
        with pytest.raises(ValueError, match=rf"has no array '{missing}'; it holds \['labels'\] \(name an "
                                             r"array of a subgroup by its path"):
            open_source(tmp_path / "g.zarr", column=missing)
