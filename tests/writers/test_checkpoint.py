"""Checkpointed runs: an interrupted run resumes to exactly the same result."""

from __future__ import annotations

import numpy as np
import pytest

import allknn
import allknn.engines.exact
from conftest import Interrupt, assert_same_result, clustered_with_duplicates, interrupt_after


@pytest.mark.parametrize("ordered", [False, True])
@pytest.mark.parametrize(("stop_after", "threads"), [(1, 1), (7, 2), (40, 2)])
def test_interrupted_self_join_resumes_identically(tmp_path, monkeypatch, ordered, stop_after, threads):
    monkeypatch.setattr(allknn.engines.exact, "MIN_ROWS", 1 if ordered else 10**12)
    X = clustered_with_duplicates(1500, 16, seed=8)
    path = tmp_path / "run.ckpt"
    options = {"block_rows": 128, "checkpoint": path, "checkpoint_every": 0.0}
    with pytest.raises(Interrupt):
        allknn.neighbors(X, 8, threads=threads, on_tile=interrupt_after(stop_after), **options)
    assert path.exists() == (stop_after > 8)  # saved after each finished batch of 4 x threads tiles
    restored = []
    resumed = allknn.neighbors(X, 8, threads=2, on_tile=lambda t, p: restored.append(t), **options)
    assert_same_result(resumed, allknn.neighbors(X, 8, block_rows=128))
    assert len(restored) == 12 * 13 // 2  # every tile reported once: restored ones first


def test_interrupted_query_join_resumes_identically(tmp_path):
    X = clustered_with_duplicates(900, 10, seed=1)
    Q = clustered_with_duplicates(400, 10, seed=2)
    options = {"queries": Q, "block_rows": 100, "checkpoint": tmp_path / "q.ckpt", "checkpoint_every": 0.0}
    with pytest.raises(Interrupt):
        allknn.neighbors(X, 6, on_tile=interrupt_after(9), **options)
    assert_same_result(allknn.neighbors(X, 6, **options), allknn.neighbors(X, 6, queries=Q))


def test_resume_with_other_input_or_parameters_is_refused(tmp_path):
    X = clustered_with_duplicates(600, 8, seed=3)
    path = tmp_path / "run.ckpt"
    allknn.neighbors(X, 5, block_rows=100, checkpoint=path)
    Y = X.copy()
    Y[0, 0] += 1.0
    with pytest.raises(ValueError, match=r"different run \(X: checkpoint has '[0-9a-f]+', this run has"):
        allknn.neighbors(Y, 5, block_rows=100, checkpoint=path)
    with pytest.raises(ValueError, match="k: checkpoint has 5, this run has 6"):
        allknn.neighbors(X, 6, block_rows=100, checkpoint=path)
    with pytest.raises(ValueError, match="block_rows: checkpoint has 128, this run has 256"):
        allknn.neighbors(X, 5, block_rows=200, checkpoint=path)


def test_unreadable_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"broken.ckpt cannot be read .*delete it to start over"):
        allknn.neighbors(np.eye(4, dtype=np.float32) + 0.1, 2, checkpoint=path)


def test_finished_checkpoint_returns_the_result_without_work(tmp_path):
    X = clustered_with_duplicates(500, 8, seed=5)
    path = tmp_path / "done.ckpt"
    first = allknn.neighbors(X, 4, block_rows=100, checkpoint=path)
    work = []
    again = allknn.neighbors(X, 4, block_rows=100, checkpoint=path,
                             on_tile=lambda t, p: work.append(t))
    assert_same_result(first, again)
    assert len(work) == 10  # 4 blocks of 128 rows: all 10 tiles restored, none recomputed
