"""The parts folder written on a cluster: read back whole, and refused
with a clear message when a part does not match its manifest."""

from __future__ import annotations

import json

import numpy as np
import pytest

import allknn
from conftest import assert_same_result

pq = pytest.importorskip("pyarrow.parquet")
pa = pytest.importorskip("pyarrow")

from allknn.writers.parts import Manifest, PartLabels, write_part  # noqa: E402


def _folder(path, result, *, rows: int, ids=None):
    """``result`` written as parts of ``rows`` rows, as the cluster engines do."""
    labels = PartLabels.check(ids, None, n_corpus=result.n_corpus, n_rows=len(result), self_join=True)
    path.mkdir()
    manifest = Manifest(path, {"test": 1}, {"k": result.k, "n_rows": len(result), "n_corpus": result.n_corpus,
                                            "params": result.params, "labels": labels.columns})
    labels.write(path)
    for block, start in enumerate(range(0, len(result), rows)):
        stop = min(start + rows, len(result))
        manifest.add(block, write_part(path, block, start, result.indices[start:stop],
                                       result.similarities[start:stop], n_corpus=result.n_corpus,
                                       params=result.params, n_rows=len(result), labels=labels.columns))
    manifest.save(complete=True)
    return path


@pytest.fixture
def result(clustered):
    return allknn.neighbors(clustered, 4, min_similarity=0.9)  # some rows lack neighbours


def test_parts_read_back_as_the_result(tmp_path, result):
    assert_same_result(allknn.load_result(_folder(tmp_path / "plain", result, rows=128)), result)
    labels = np.array([f"n{i}" for i in range(len(result))])
    labelled = _folder(tmp_path / "labelled", result, rows=100, ids=labels)
    assert_same_result(allknn.load_result(labelled), result)


def test_a_part_with_rows_outside_its_entry_is_corrupt(tmp_path, result):
    folder = _folder(tmp_path / "out", result, rows=128)
    manifest = json.loads((folder / "_manifest.json").read_text())
    manifest["parts"]["1"]["first_row"] = 0  # the entry now claims part 0's rows
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"part-000001\.parquet holds rows outside its manifest entry; it is "
                                         r"corrupt"):
        allknn.load_result(folder)


def test_a_part_with_unknown_labels_is_corrupt(tmp_path, result):
    labels = np.array([f"n{i}" for i in range(len(result))])
    folder = _folder(tmp_path / "out", result, rows=128, ids=labels)
    part = folder / "part-000002.parquet"
    table = pq.read_table(part)
    ids = table.column("id").to_pylist()
    ids[0] = "stranger"
    column = table.schema.get_field_index("id")
    pq.write_table(table.set_column(column, "id", pa.array(ids, table.schema.field("id").type)), part)
    with pytest.raises(ValueError, match="has parts with ids that are not among its labels; it is corrupt"):
        allknn.load_result(folder)
    narrow = pa.array(table.column("id").to_pylist(), pa.string())  # another type than the other parts'
    pq.write_table(table.set_column(column, "id", narrow), part)
    with pytest.raises(ValueError, match=r"part-000002\.parquet has the columns .*id: string.* where "
                                         r"part-000000\.parquet has .*id: large_string.*; it is corrupt"):
        allknn.load_result(folder)


def test_a_missing_part_names_the_rows_and_the_fix(tmp_path, result):
    folder = _folder(tmp_path / "out", result, rows=128)
    (folder / "part-000003.parquet").unlink()
    manifest = json.loads((folder / "_manifest.json").read_text())
    del manifest["parts"]["3"]
    (folder / "_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"unfinished: rows 384\.\.511 have no part yet; run the same "
                                         r"command again with --resume"):
        allknn.load_result(folder)


def test_a_folder_whose_run_stopped_before_its_last_step_is_unfinished(tmp_path, result):
    folder = _folder(tmp_path / "out", result, rows=128)
    manifest = json.loads((folder / "_manifest.json").read_text())
    (folder / "_manifest.json").write_text(json.dumps({**manifest, "complete": False}))
    with pytest.raises(ValueError, match=r"unfinished: it has every part, but the run stopped before its "
                                         r"last step .* --resume"):
        allknn.load_result(folder)


def test_the_manifest_is_rewritten_at_most_once_per_interval_and_flushed_when_a_run_stops(tmp_path, result):
    folder = _folder(tmp_path / "whole", result, rows=64)
    entries = json.loads((folder / "_manifest.json").read_text())["parts"]
    manifest = Manifest(tmp_path / "throttled", {"test": 1}, {"k": result.k})
    manifest.folder.mkdir()
    manifest.save()  # as a run does before its first part
    manifest.save_interval = 3600.0
    for block, entry in entries.items():
        manifest.add(int(block), entry)
    on_disk = json.loads(manifest.path.read_text())
    assert on_disk["parts"] == {} and not on_disk["complete"]  # one rewrite per interval: none yet
    manifest.flush()
    assert json.loads(manifest.path.read_text())["parts"] == entries
    inode = manifest.path.stat().st_ino  # a rewrite renames a new file over it
    manifest.flush()  # nothing new: not rewritten
    assert manifest.path.stat().st_ino == inode
    manifest.save_interval = 0.0
    manifest.add(0, entries["0"])
    assert manifest.path.stat().st_ino != inode  # past the interval: rewritten at once
