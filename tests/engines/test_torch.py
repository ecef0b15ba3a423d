"""The torch engine (CPU torch in CI): the exact engine's result, bit for
bit, in every product precision; the certificate's bound is what makes it so."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import allknn
from allknn.engines import ENGINES, choose
from conftest import REAL, assert_same_result, clustered_with_duplicates

torch = pytest.importorskip("torch")

from allknn.engines.torch.product import PRECISIONS, rounded  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(scope="module")
def real():
    return np.load(REAL)[:2500].astype(np.float32)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_is_the_exact_result(real, precision):
    exact = allknn.neighbors(real, 10)
    res = allknn.neighbors(real, 10, backend="torch", precision=precision)
    assert_same_result(res, exact)
    assert res.params["method"] == "torch" and res.params["precision"] == precision
    assert res.params["device"] == "cpu"
    Q = real[::7] * np.float32(3.0)
    res = allknn.neighbors(real, 6, queries=Q, backend="torch", precision=precision, block_rows=128)
    assert_same_result(res, allknn.neighbors(real, 6, queries=Q))


def test_duplicates_ties_and_dropped_rows(rng):
    X = clustered_with_duplicates(900, 12, seed=4)
    X[[5, 6]] = 0
    for precision in ("bf16", "fp16"):
        assert_same_result(allknn.neighbors(X, 7, backend="torch", precision=precision, invalid="drop",
                                            min_similarity=0.2, threads=2, block_rows=64),
                           allknn.neighbors(X, 7, invalid="drop", min_similarity=0.2))


def test_the_margin_of_the_precision_is_needed(real, monkeypatch):
    """bf16 products with the fp32 margin lose neighbours: the bound of the
    precision is what keeps the result exact."""
    import allknn.engines.exact.plans as plans

    exact = allknn.neighbors(real, 10)
    fp32_margin = plans.nomination_margin
    monkeypatch.setattr(plans, "nomination_margin", lambda terms, precision="fp32": fp32_margin(terms))
    wrong = allknn.neighbors(real, 10, backend="torch", precision="bf16")
    assert not np.array_equal(wrong.indices, exact.indices)


def test_rounding_to_each_precision():
    values = torch.from_numpy(np.random.default_rng(0).standard_normal(10_000).astype(np.float32) / 30)
    for precision, mantissa in (("tf32", 10), ("bf16", 7), ("fp16", 10)):
        out = rounded(values.clone(), precision).numpy().astype(np.float64)
        original = values.numpy().astype(np.float64)
        normal = np.abs(original) >= (2.0**-14 if precision == "fp16" else 2.0**-126)
        spacing = 2.0 ** (np.floor(np.log2(np.abs(original[normal]))) - mantissa)
        assert (np.abs(out[normal] - original[normal]) <= spacing / 2).all()  # to nearest
        scaled = out[normal] / spacing
        np.testing.assert_array_equal(scaled, np.round(scaled))  # on the format's grid
    assert rounded(values, "fp32") is values


def test_refusals_and_bad_options(real):
    with pytest.raises(ValueError, match="method='torch' supports dense rows only; use backend='numba'"):
        allknn.neighbors(sp.csr_matrix(real[:100]), 3, backend="torch")
    with pytest.raises(ValueError, match="backend must be one of"):
        allknn.neighbors(real, 3, backend="jax")
    with pytest.raises(ValueError, match="precision must be 'auto' or one of 'fp32', 'tf32', 'bf16', 'fp16'"):
        allknn.neighbors(real, 3, backend="torch", precision="fp8")
    with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N', got 'tpu'"):
        allknn.neighbors(real, 3, device="tpu")
    with pytest.raises(ValueError, match="backend='torch' runs the exact engine; method='approx'"):
        allknn.neighbors(real, 3, backend="torch", method="approx")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"found no CUDA device \(torch\.cuda\.is_available\(\) is"):
            allknn.neighbors(real, 3, device="cuda")


def test_auto_never_picks_the_torch_engine(real):
    from allknn.engines import Job, check_options
    from allknn.rows import normalize_rows

    rows = normalize_rows(real, name="X", block_rows=64, invalid="raise")
    job = Job(queries=rows, corpus=rows, k=5, self_join=True, exclude_self=True, threads=1, budget=2**28,
              block_rows=64, options=check_options({}))
    assert not ENGINES["torch"].auto
    assert choose("auto", job).name != "torch"


@cuda
@pytest.mark.parametrize("precision", PRECISIONS)
def test_cuda_is_the_exact_result(real, precision):
    res = allknn.neighbors(real, 10, device="cuda", precision=precision)
    assert_same_result(res, allknn.neighbors(real, 10))


def test_cli_runs_the_torch_backend(tmp_path, real):
    import allknn.cli

    np.save(tmp_path / "x.npy", real[:800])
    assert allknn.cli.main(["run", str(tmp_path / "x.npy"), "-k", "5", "-o", str(tmp_path / "n.npz"),
                            "--backend", "torch", "--precision", "fp16", "-q"]) == 0
    assert_same_result(allknn.load_result(tmp_path / "n.npz"), allknn.neighbors(real[:800], 5))


def test_checkpoints_resume_on_the_torch_engine(tmp_path, real):
    from conftest import Interrupt, interrupt_after

    options = {"backend": "torch", "precision": "tf32", "block_rows": 128, "threads": 1,
               "checkpoint": tmp_path / "t.ckpt", "checkpoint_every": 0.0}
    with pytest.raises(Interrupt):
        allknn.neighbors(real, 5, on_tile=interrupt_after(60), **options)
    assert_same_result(allknn.neighbors(real, 5, **options), allknn.neighbors(real, 5))


def test_only_nominees_leave_the_device(real, monkeypatch):
    """The host sees the nominated pairs only, a small share of the pairs
    (the tiles stay on the device)."""
    import allknn.engines.torch.plans as plans

    seen = []
    offer = plans.offer_nominees
    monkeypatch.setattr(plans, "offer_nominees",
                        lambda rows, *rest: (seen.append(rows.size), offer(rows, *rest)))
    res = allknn.neighbors(real, 10, backend="torch", precision="bf16", block_rows=256, threads=1)
    assert_same_result(res, allknn.neighbors(real, 10))
    pairs = real.shape[0] * (real.shape[0] - 1) // 2
    assert 0 < sum(seen) < 0.05 * pairs


def test_streamed_rows_are_the_resident_result(real):
    """Rows streamed from host memory block by block (inputs larger than
    the device) give the same result as rows kept on the device."""
    exact = allknn.neighbors(real, 8)
    assert_same_result(allknn.neighbors(real, 8, backend="torch", resident=False, block_rows=512), exact)
    Q = real[::5] + np.float32(0.01)
    assert_same_result(allknn.neighbors(real, 4, queries=Q, backend="torch", resident=False, block_rows=256),
                       allknn.neighbors(real, 4, queries=Q))
    with pytest.raises(ValueError, match="resident must be True or False"):
        allknn.neighbors(real, 3, backend="torch", resident="yes")
