"""Approximate engine: recall floors, honest recall intervals, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import allknn
from allknn.cli import main
from allknn.datasets import make_clustered
from conftest import REAL, assert_same_result


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


def _neighbour_sets_are_clean(result) -> None:
    """No row lists itself, nor the same neighbour twice."""
    ids = result.indices
    assert not (ids == np.arange(ids.shape[0])[:, None]).any()
    ordered = np.sort(ids, axis=1)
    assert not ((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any()


def test_refinement_raises_recall(real, real_exact):
    """Neighbour-of-neighbour passes after a narrow probe find neighbours the
    probe missed, and more passes never lose any."""
    recalls = [
        _true_recall(allknn.neighbors(real, 10, method="approx", probes=2, refine=r, seed=4), real_exact)
        for r in (0, 1, 3)
    ]
    assert recalls[1] >= recalls[0] + 0.03, recalls
    assert recalls[2] >= recalls[1], recalls


def test_refined_graph_lists_no_row_itself_nor_a_neighbour_twice(real):
    """Refinement and later probing both reach some pairs; each is kept once."""
    for result in (allknn.neighbors(real, 10, method="approx", probes=3, refine=2, seed=1),
                   allknn.neighbors(real, 10, method="approx", seed=1),
                   allknn.neighbors(real, 10, method="approx", recall_target=0.99, seed=1)):
        _neighbour_sets_are_clean(result)


def test_refinement_independent_of_threads_and_block_size(real):
    runs = [allknn.neighbors(real, 10, method="approx", probes=2, refine=3, seed=6, threads=t,
                             block_rows=b) for t, b in ((1, 64), (2, 1024), (3, 256))]
    for other in runs[1:]:
        assert_same_result(runs[0], other)
    assert runs[0].params["refine"] == 3 and runs[0].params["probes"] == 2


@pytest.mark.parametrize("cells", [None, 16])
def test_recall_target_reached(real, real_exact, cells):
    """The pilot's target holds for the whole set within sampling error."""
    approx = allknn.neighbors(real, 10, method="approx", recall_target=0.95, cells=cells, seed=8)
    truth = _true_recall(approx, real_exact)
    assert truth >= 0.945  # the pilot stops one standard error above the target
    assert approx.recall.interval[0] <= truth <= approx.recall.interval[1]


class _Simulated:
    """Probing closes ``probe_share`` of the missing recall per round, a
    refinement pass ``refine_share``; costs 1 per round, ``refine_cost`` per pass."""

    def __init__(self, probe_share, refine_share, refine_cost):
        self.probe_share, self.refine_share, self.refine_cost = probe_share, refine_share, refine_cost
        self.recall, self.done, self.actions = 0.0, 0, []

    def probe_to(self, count):
        self.recall = 1 - (1 - self.recall) * (1 - self.probe_share) ** (count - self.done)
        self.done = count
        self.actions.append(f"probe {count}")

    def refine_once(self):
        self.recall = 1 - (1 - self.recall) * (1 - self.refine_share)
        self.actions.append("refine")
        return 1000

    def pilot_recall(self):
        return self.recall

    def probe(self, done, count):
        return float(count - done)

    def refine(self, pairs):
        return self.refine_cost

    first_pass_pairs = 1000


@pytest.mark.parametrize(
    ("refine_share", "refine_cost", "expected"),
    [
        # a pass cheap and effective: refine from the second probe on, never at one probe
        (0.5, 0.5, ["probe 1", "probe 2", "refine", "refine", "refine", "refine"]),
        # a pass dearer than the rounds it would save: probe only
        (0.5, 50.0, ["probe 1", "probe 2", "probe 3", "probe 4", "probe 6", "probe 8", "probe 11"]),
    ],
)
def test_widening_policy_takes_the_cheaper_gain(refine_share, refine_cost, expected):
    from allknn.engines.approx.search import _search_to_target

    run = _Simulated(probe_share=0.25, refine_share=refine_share, refine_cost=refine_cost)
    _search_to_target(run.probe_to, run.refine_once, run.pilot_recall, run, 0.95, 64)
    assert run.actions == expected
    assert run.recall >= 0.95


def test_widening_policy_stops_when_nothing_is_left():
    from allknn.engines.approx.search import _search_to_target

    run = _Simulated(probe_share=0.1, refine_share=0.0, refine_cost=1.0)
    _search_to_target(run.probe_to, None, run.pilot_recall, run, 0.99, 3)
    assert run.actions == ["probe 1", "probe 2", "probe 3"] and run.recall < 0.99


def test_approx_memory_stays_within_budget():
    """Working memory of the approximate engine, besides the normalised copy,
    the result and its state, stays below max_memory."""
    from test_memory import MB, _peak_bytes

    n, d, k = 60_000, 16, 5
    X = make_clustered(n, d, n_clusters=300, seed=9)
    allknn.neighbors(X[:3000], k, method="approx", probes=2, refine=1)  # compile outside the measurement
    budget = 64 * MB
    for options in ({}, {"probes": 3, "refine": 3}):  # the default search, and one that refines
        result, peak = _peak_bytes(lambda options=options: allknn.neighbors(
            X, k, method="approx", max_memory=budget, threads=2, **options))
        assert result.indices.shape == (n, k)
        working = peak - (n * d * 4 + 2 * n * k * 12 + 4 * n * 8)
        assert working < budget, f"{options}: working memory {working / MB:.2f} MB exceeds the budget"


def test_approx_budget_too_small_is_refused_with_the_fix():
    X = make_clustered(60_000, 16, n_clusters=300, seed=9)
    message = (r"max_memory=4000000 bytes is too small for the approximate engine on 60000 rows "
               r"\(it needs about \d+ bytes\); raise max_memory")
    with pytest.raises(ValueError, match=message):
        allknn.neighbors(X, 5, method="approx", max_memory="4MB")


def test_auto_picks_exact_for_small_inputs():
    X = make_clustered(2000, 16, seed=1)
    auto = allknn.neighbors(X, 5, method="auto")
    assert auto.params["method"] == "exact" and auto.recall is None
    assert_same_result(auto, allknn.neighbors(X, 5))


def test_auto_picks_approx_when_exact_would_be_slow(monkeypatch):
    import allknn.engines

    monkeypatch.setattr(allknn.engines, "AUTO_EXACT_SECONDS", 0.0)
    result = allknn.neighbors(make_clustered(2000, 16, seed=1), 5, method="auto")
    assert result.params["method"] == "approx" and result.recall is not None


def test_auto_keeps_sparse_rows_exact(monkeypatch):
    """The approximate engine takes dense rows only: auto never sends it
    sparse ones, however long the exact join would take."""
    import scipy.sparse as sp

    import allknn.engines

    monkeypatch.setattr(allknn.engines, "AUTO_EXACT_SECONDS", 0.0)
    X = sp.random(2000, 5000, density=0.003, format="csr", random_state=4, dtype=np.float32)
    X = X[np.diff(X.indptr) > 0]
    result = allknn.neighbors(X, 5, method="auto")
    assert result.params["method"] == "exact" and result.recall is None
    assert_same_result(result, allknn.neighbors(X, 5))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "fast"}, "method must be 'exact', 'approx', 'torch' or 'auto', got 'fast'"),
        ({"method": "approx", "recall_target": 1.5}, r"recall_target must be a number in \(0, 1\], got 1.5"),
        ({"method": "approx", "probes": 0}, "probes must be a positive integer or None, got 0"),
        ({"method": "approx", "cells": -2}, "cells must be a positive integer or None, got -2"),
        ({"method": "approx", "checkpoint": "x.ckpt"}, r"checkpoint= works with method='exact'"),
        ({"method": "approx", "refine": 2}, "refine= needs probes=; with recall_target the engine "
                                            "chooses its passes itself"),
        ({"method": "approx", "probes": 2, "refine": -1},
         "refine must be a non-negative integer or None, got -1"),
        ({"method": "approx", "probes": 2, "refine": 1, "queries": np.ones((3, 8))},
         r"refine= works in the self-join only"),
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


def test_cautious_recall_is_the_mean_less_one_standard_error():
    from allknn.engines.approx.recall import cautious_recall

    recalls = np.array([1.0] * 90 + [0.5] * 10)
    assert cautious_recall(recalls) == pytest.approx(0.95 - recalls.std(ddof=1) / 10)
    assert cautious_recall(np.ones(50)) == 1.0  # every sampled row perfect: no margin needed
    assert cautious_recall(np.array([0.7])) == 0.7
