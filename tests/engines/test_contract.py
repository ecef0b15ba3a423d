"""The engine contract, run over every registered engine.

Each engine runs in a setting where it must return the exact result (the
approximate engine with every cell probed), so each line of the numerical
contract is checked bit for bit against the numpy reference. A new engine
(GPU on CPU torch, Dask) joins by adding its setting to ``SETTINGS``.
"""

from __future__ import annotations

import numpy as np
import pytest

import allknn
from allknn.engines import ENGINES, Job, check_options, choose
from allknn.rows import normalize_rows
from conftest import (
    REAL,
    assert_exact,
    assert_same_result,
    assert_well_formed,
    clustered_with_duplicates,
    exact_reference_topk,
    reference_topk,
)

CELLS = 6
SETTINGS = {
    "exact": {"method": "exact"},
    "approx": {"method": "approx", "cells": CELLS, "probes": CELLS},  # every cell probed: exact
    "torch": {"method": "torch", "precision": "bf16"},  # CPU torch, bf16 products: exact by the certificate
}


def test_every_registered_engine_has_a_setting():
    assert set(SETTINGS) == set(ENGINES)


@pytest.fixture(params=sorted(SETTINGS))
def setting(request):
    return SETTINGS[request.param]


@pytest.fixture
def data():
    return clustered_with_duplicates(400, 16, seed=21)


def test_self_join_is_the_reference(setting, data):
    for block_rows, threads in ((64, 1), (256, 2)):
        res = allknn.neighbors(data, 7, block_rows=block_rows, threads=threads, **setting)
        assert_well_formed(res, n_queries=data.shape[0], k=7, self_join=True)
        assert_exact(res, exact_reference_topk(data, 7))
        assert res.params["method"] == setting["method"]


def test_query_join_is_the_reference(setting, data):
    Q = data[::5] * np.float32(1.5)
    res = allknn.neighbors(data, 5, queries=Q, threads=2, **setting)
    assert_exact(res, exact_reference_topk(data, 5, queries=Q))


def test_self_is_kept_when_asked(setting, data):
    res = allknn.neighbors(data, 4, exclude_self=False, **setting)
    assert_exact(res, exact_reference_topk(data, 4, exclude_self=False))


def test_ties_duplicates_and_identical_rows(setting):
    X = np.tile(np.float32([[1, 2, 3, 4]]), (40, 1))
    X[::3] *= np.float32(2)  # scaled copies are the same unit rows
    few_cells = {"cells": 2, "probes": 2} if setting["method"] == "approx" else {}
    res = allknn.neighbors(X, 6, **setting | few_cells)
    assert (res.similarities == 1.0).all()
    for row in range(40):
        np.testing.assert_array_equal(res.indices[row], [j for j in range(40) if j != row][:6])


def test_invalid_rows_dropped_and_min_similarity(setting, data):
    X = data.copy()
    X[[3, 50]] = 0
    X[77, 2] = np.nan
    res = allknn.neighbors(X, 5, invalid="drop", min_similarity=0.5, **setting)
    ref = reference_topk(X, 5, drop_invalid=True)
    weak = ~(ref.similarities >= 0.5)
    assert (res.indices[[3, 50, 77]] == -1).all()
    assert not np.isin(res.indices, [3, 50, 77]).any()
    np.testing.assert_array_equal(res.indices == -1, weak | (ref.indices == -1))
    with pytest.raises(ValueError, match="2 all-zero row"):
        allknn.neighbors(X, 5, **setting)


def test_k_too_large_is_refused(setting, data):
    n = data.shape[0]
    with pytest.raises(ValueError, match=rf"k={n} is too large: each row has only {n - 1}"):
        allknn.neighbors(data, n, **setting)


def _job(X, k=5, **options):
    rows = normalize_rows(X, name="X", block_rows=64, invalid="raise")
    return Job(queries=rows, corpus=rows, k=k, self_join=True, exclude_self=True, threads=1,
               budget=2**28, block_rows=64, options=check_options(options))


def test_engines_describe_their_work(data):
    job = _job(data)
    for engine in ENGINES.values():
        assert engine.refusal(job) is None
        assert 0 < engine.working_bytes(job) < job.budget
        assert engine.estimate_seconds(job) > 0
        found = engine.search(job)
        assert found.keys.shape == (data.shape[0], 5)


def test_refusals_come_from_the_engine_and_name_the_fix(data):
    import scipy.sparse as sp

    sparse = _job(sp.csr_matrix(data))
    assert ENGINES["exact"].refusal(sparse) is None
    assert "dense rows only; use method='exact'" in ENGINES["approx"].refusal(sparse)
    assert choose("auto", sparse).name == "exact"
    with pytest.raises(ValueError, match="method='approx' supports dense rows only"):
        choose("approx", sparse)


def test_unknown_engine_option_is_refused():
    taken = "cells, device, precision, probes, recall_target, refine, resident"
    with pytest.raises(ValueError, match=f"unknown option 'beam'; engines take: {taken}$"):
        check_options({"beam": 3})


def test_a_named_engine_refuses_options_that_would_do_nothing():
    X = np.random.default_rng(2).standard_normal((300, 8)).astype(np.float32)
    with pytest.raises(ValueError, match=r"^precision= is an option of method='torch', and does nothing with "
                                         r"method='exact'; leave it out$"):
        allknn.neighbors(X, 3, precision="bf16")
    with pytest.raises(ValueError, match=r"^probes= is an option of method='approx'; resident= is an option "
                                         r"of method='torch', and does nothing with method='exact'"):
        allknn.neighbors(X, 3, probes=4, resident=False)
    with pytest.raises(ValueError, match="recall_target= is an option of method='approx'"):
        allknn.neighbors(X, 3, backend="torch", recall_target=0.9)
    allknn.neighbors(X, 3, method="auto", probes=4)  # accepted: they apply if approx is chosen


def test_engines_agree_with_each_other_on_real_rows():
    X = np.load(REAL)[:1500]
    exact = allknn.neighbors(X, 10)
    for name, setting in SETTINGS.items():
        if name != "exact":
            fewer = {"cells": 4, "probes": 4} if name == "approx" else {}
            assert_same_result(allknn.neighbors(X, 10, **setting | fewer), exact)


def test_inspect_reports_rows_and_every_engine(data):
    import scipy.sparse as sp

    X = data.copy()
    X[3] = 0
    X[9, 2] = np.inf
    found = allknn.inspect(X, 10, threads=1)
    assert found.shape == X.shape and found.stored_values is None
    np.testing.assert_array_equal(found.zero_rows, [3])
    np.testing.assert_array_equal(found.nonfinite_rows, [9])
    assert set(found.engines) == set(ENGINES)
    for estimate in found.engines.values():
        assert estimate.refusal is None and estimate.seconds > 0 and estimate.memory_bytes > X.nbytes // 2
    sparse = allknn.inspect(sp.csr_matrix(data), 5)
    assert sparse.stored_values == np.count_nonzero(data)
    assert "dense rows only" in sparse.engines["approx"].refusal and sparse.engines["approx"].seconds is None
    assert sparse.engines["exact"].seconds > 0
