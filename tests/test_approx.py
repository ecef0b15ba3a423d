"""Approximate engine: recall floors, honest recall intervals, determinism."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import allknn
from allknn.cli import main
from allknn.datasets import make_clustered
from conftest import assert_same_result

REAL = Path(__file__).parent / "data" / "debian_minilm384_first4000_f16.npy"


@pytest.fixture(scope="module")
def real() -> np.ndarray:
    return np.load(REAL).astype(np.float32)


@pytest.fixture(scope="module")
def real_exact(real):
    return allknn.neighbors(real, 10)


def _true_recall(approx, exact) -> float:
    kth = exact.similarities[:, -1]
    return float((np.nan_to_num(approx.similarities, nan=-np.inf) >= kth[:, None] - 1e-5).mean())


def test_default_recall_floor_and_interval_on_real_embeddings(real, real_exact):
    approx = allknn.neighbors(real, 10, method="approx", seed=3)
    truth = _true_recall(approx, real_exact)
    assert truth >= 0.9
    low, high = approx.recall.interval
    assert low <= truth <= high, (approx.recall, truth)
    assert approx.recall.sample_size == 1000
    assert approx.params["method"] == "approx" and approx.params["recall"] == approx.recall.estimate
    assert not (approx.indices == np.arange(len(real))[:, None]).any()  # self excluded


@pytest.mark.parametrize("probes", [1, 3])
def test_interval_contains_true_recall_at_low_recall(real, real_exact, probes):
    approx = allknn.neighbors(real, 10, method="approx", probes=probes, seed=1)
    truth = _true_recall(approx, real_exact)
    assert truth < 0.97  # a setting where recall is really measured, not 1.0
    low, high = approx.recall.interval
    assert low <= truth <= high, (approx.recall, truth)


def test_more_probes_never_lower_recall(real, real_exact):
    recalls = [_true_recall(allknn.neighbors(real, 10, method="approx", probes=p, seed=2), real_exact)
               for p in (1, 2, 4, 8)]
    assert recalls == sorted(recalls) and recalls[-1] > recalls[0]


def test_deterministic_for_a_seed_and_independent_of_threads(real):
    a = allknn.neighbors(real, 8, method="approx", seed=5, threads=1)
    b = allknn.neighbors(real, 8, method="approx", seed=5, threads=2)
    assert_same_result(a, b)
    assert a.recall == b.recall


def test_all_cells_probed_is_exact(real, real_exact):
    approx = allknn.neighbors(real, 10, method="approx", cells=16, probes=16)
    assert_same_result(approx, real_exact)
    assert approx.recall.estimate == 1.0


def test_query_form(real):
    X, Q = real[:3000], real[3000:3400]
    exact = allknn.neighbors(X, 5, queries=Q)
    approx = allknn.neighbors(X, 5, queries=Q, method="approx", recall_target=0.9)
    truth = _true_recall(approx, exact)
    assert truth >= 0.85
    assert approx.recall.interval[0] <= truth <= approx.recall.interval[1]


def test_auto_picks_exact_for_small_inputs():
    X = make_clustered(2000, 16, seed=1)
    auto = allknn.neighbors(X, 5, method="auto")
    assert auto.params["method"] == "exact" and auto.recall is None
    assert_same_result(auto, allknn.neighbors(X, 5))


def test_auto_picks_approx_when_exact_would_be_slow(monkeypatch):
    import allknn.api

    monkeypatch.setattr(allknn.api, "AUTO_EXACT_SECONDS", 0.0)
    result = allknn.neighbors(make_clustered(2000, 16, seed=1), 5, method="auto")
    assert result.params["method"] == "approx" and result.recall is not None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "fast"}, "method must be 'exact', 'approx' or 'auto', got 'fast'"),
        ({"method": "approx", "recall_target": 1.5}, r"recall_target must be a number in \(0, 1\], got 1.5"),
        ({"method": "approx", "probes": 0}, "probes must be a positive integer or None, got 0"),
        ({"method": "approx", "cells": -2}, "cells must be a positive integer or None, got -2"),
        ({"method": "approx", "checkpoint": "x.ckpt"}, r"checkpoint= works with method='exact'"),
    ],
)
def test_bad_options(options, message):
    with pytest.raises(ValueError, match=message):
        allknn.neighbors(make_clustered(500, 8, seed=1), 5, **options)


def test_sparse_input_is_refused_with_the_fix():
    X = sp.random(300, 50, density=0.2, format="csr", random_state=0)
    X = X[np.diff(X.indptr) > 0]
    with pytest.raises(ValueError, match="method='approx' supports dense rows only; use method='exact'"):
        allknn.neighbors(X, 3, method="approx")


def test_cli_prints_measured_recall(real, tmp_path, capsys):
    source = tmp_path / "real.npy"
    np.save(source, real)
    out = tmp_path / "o.parquet"
    assert main(["run", str(source), "-k", "10", "-o", str(out), "--method", "approx"]) == 0
    shown = capsys.readouterr().out
    assert "measured recall@k 0." in shown and "95% interval" in shown
    import json

    import pyarrow.parquet as pq

    stored = json.loads(pq.read_schema(out).metadata[b"allknn"])
    assert stored["params"]["method"] == "approx" and 0.8 < stored["params"]["recall"] <= 1.0


def test_options_are_checked_before_any_work():
    """A bad option fails at once even on input that would take long to normalise."""
    X = np.ones((5, 3), dtype=np.float32)
    X[0] = np.nan  # would raise a different error if normalisation ran first
    with pytest.raises(ValueError, match="method must be"):
        allknn.neighbors(X, 2, method="quick")
    with pytest.raises(ValueError, match=r"min_similarity must be a finite number or None, got 'high'"):
        allknn.neighbors(X, 2, min_similarity="high")
