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


def cuda(devices: int = 1):
    """Mark a test ``cuda`` (``pytest -m cuda`` on a GPU machine), skipped without ``devices`` devices."""
    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    skip = pytest.mark.skipif(found < devices, reason=f"needs {devices} CUDA device(s), this machine has "
                              f"{found}")
    return lambda test: pytest.mark.cuda(skip(test))


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
    with pytest.raises(ValueError, match=r"device must be 'cpu', 'cuda' or 'cuda:N' \(several: "
                                         r"'cuda:0,cuda:1'\), got 'tpu'"):
        allknn.neighbors(real, 3, device="tpu")
    with pytest.raises(ValueError, match=r"device must be .* got 'cuda:x'"):
        allknn.neighbors(real, 3, device="cuda:x")
    with pytest.raises(ValueError, match="device= mixes the CPU and CUDA devices"):
        allknn.neighbors(real, 3, device=["cpu", "cuda:0"])
    for twice in ("cuda:0,cuda:0", "cuda,cuda:1", "cuda:1, cuda:01"):  # one GPU, two copies and shares
        with pytest.raises(ValueError, match=r"device= names a device twice \('cuda.*'\): .* name each once, "
                                             r"by its index \('cuda:0,cuda:1'\)"):
            allknn.neighbors(real, 3, device=twice)
    with pytest.raises(ValueError, match="backend='torch' runs the exact engine; method='approx'"):
        allknn.neighbors(real, 3, backend="torch", method="approx")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"found no CUDA device \(torch\.cuda\.is_available\(\) is"):
            allknn.neighbors(real, 3, device="cuda")


def test_devices_are_named_as_torch_names_them():
    from allknn.engines.torch.devices import parse_devices

    assert parse_devices(" cuda:01,cuda:2 ") == ("cuda:1", "cuda:2")
    assert parse_devices(["cuda:0"]) == ("cuda:0",) and parse_devices("cpu") == ("cpu",)
    for bad in ("cuda:\u0663", "cuda:-1", "cuda:", "CUDA", 0):  # an Arabic-Indic digit, a sign, no index
        with pytest.raises(ValueError, match="device must be 'cpu', 'cuda' or 'cuda:N'"):
            parse_devices(bad)


def test_auto_never_picks_the_torch_engine(real):
    from allknn.engines import Job, check_options
    from allknn.rows import normalize_rows

    rows = normalize_rows(real, name="X", block_rows=64, invalid="raise")
    job = Job(queries=rows, corpus=rows, k=5, self_join=True, exclude_self=True, threads=1, budget=2**28,
              block_rows=64, options=check_options({}))
    assert not ENGINES["torch"].auto
    assert choose("auto", job).name != "torch"


@cuda()
@pytest.mark.parametrize("precision", PRECISIONS)
def test_cuda_is_the_exact_result(real, precision):
    res = allknn.neighbors(real, 10, device="cuda", precision=precision)
    assert_same_result(res, allknn.neighbors(real, 10))
    assert res.params["device"] == "cuda" and res.params["precision"] == precision


@cuda()
def test_cuda_streams_queries_and_sizes_its_tiles(real):
    Q = real[::3] + np.float32(0.01)
    expected = allknn.neighbors(real, 6, queries=Q)
    assert_same_result(allknn.neighbors(real, 6, queries=Q, device="cuda", precision="bf16"), expected)
    streamed = allknn.neighbors(real, 6, queries=Q, device="cuda", resident=False, block_rows=256)
    assert_same_result(streamed, expected)
    assert_same_result(allknn.neighbors(real, 8, device="cuda:0", resident=False, precision="fp16",
                                        max_memory="64MB"), allknn.neighbors(real, 8))


@cuda()
def test_cuda_estimate_times_tiles_on_the_device(real):
    found = allknn.inspect(real, 10, device="cuda", precision="bf16")
    assert found.engines["torch"].refusal is None and found.engines["torch"].seconds > 0


@cuda(devices=2)
def test_several_cuda_devices_are_the_exact_result(real):
    devices = ",".join(f"cuda:{i}" for i in range(torch.cuda.device_count()))
    assert_same_result(allknn.neighbors(real, 10, device=devices, block_rows=256), allknn.neighbors(real, 10))



def test_the_estimate_times_the_engine_s_own_tiles_on_the_first_blocks(real, monkeypatch):
    """The torch engine's estimate runs its own plan's tiles on the device
    and in the precision asked (not the CPU engine's BLAS tiles, which are
    off by the device's speed-up): a share of the tiles of the first
    ``ESTIMATE_BLOCKS`` row blocks, so that its time and memory stay
    bounded whatever the input."""
    import allknn.engines.torch.plans as plans
    from allknn.engines.torch import ESTIMATE_BLOCKS

    ran = []
    work = plans.DeviceSelfJoinPlan._work_on

    def spy(self, lane, tile, *rest):
        ran.append((lane.device, self.precision, self.normed.shape[0]))
        return work(self, lane, tile, *rest)

    monkeypatch.setattr(plans.DeviceSelfJoinPlan, "_work_on", spy)
    found = allknn.inspect(real, 10, device="cpu", precision="bf16", threads=1, max_memory="1MB")
    assert found.engines["torch"].seconds > 0 and found.engines["exact"].seconds > 0
    assert {(device, precision) for device, precision, _ in ran} == {("cpu", "bf16")}
    assert ESTIMATE_BLOCKS * found.block_rows < real.shape[0]
    assert {rows for *_, rows in ran} == {ESTIMATE_BLOCKS * found.block_rows}
    assert 0 < len(ran) < ESTIMATE_BLOCKS * (ESTIMATE_BLOCKS + 1) // 2  # a share of their tiles
    with pytest.raises(ValueError, match="precision must be 'auto' or one of"):
        allknn.inspect(real, 10, precision="fp8")


def test_cli_info_estimates_the_torch_engine_on_the_device_asked(tmp_path, real, capsys):
    import allknn.cli

    np.save(tmp_path / "x.npy", real[:1200])
    assert allknn.cli.main(["info", str(tmp_path / "x.npy"), "--device", "cpu", "--precision", "fp16"]) == 0
    shown = capsys.readouterr().out
    assert ("s for --backend torch on cpu (precision fp16) with k=10 on" in shown
            and "(timed here on a sample of its tiles; usually high, by up to 2x)" in shown)
    assert allknn.cli.main(["info", str(tmp_path / "x.npy"), "--device", "cpu"]) == 0
    assert "s for --backend torch on cpu (precision fp32) with k=10" in capsys.readouterr().out  # auto on CPU
    if not torch.cuda.is_available():
        assert allknn.cli.main(["info", str(tmp_path / "x.npy"), "--device", "cuda"]) == 0
        assert "torch:       cannot run: found no CUDA device" in capsys.readouterr().out


def test_auto_precision_is_fp32_on_cpu_and_bf16_on_cuda():
    from allknn.engines.torch import resolved_precision

    assert resolved_precision("cpu", None) == resolved_precision("cpu", "auto") == "fp32"
    assert resolved_precision("cuda:1", "auto") == resolved_precision("cuda:0,cuda:1", None) == "bf16"
    assert resolved_precision("cuda", "tf32") == "tf32" and resolved_precision("cpu", "fp16") == "fp16"


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


def test_several_devices_share_the_tiles(real, monkeypatch):
    """Each device's lanes take tiles as they free up; the result is the
    one-device result (two CPU devices stand in for two GPUs here)."""
    import allknn.engines.torch.plans as plans

    used = []
    work = plans.DeviceSelfJoinPlan._work_on
    monkeypatch.setattr(plans.DeviceSelfJoinPlan, "_work_on",
                        lambda self, lane, *rest: (used.append(id(lane)), work(self, lane, *rest)))
    exact = allknn.neighbors(real, 7)
    for device in ("cpu,cpu", ["cpu", "cpu"]):
        used.clear()  # a lane's id may be reused by the next run's lanes
        res = allknn.neighbors(real, 7, device=device, backend="torch", block_rows=128, threads=1)
        assert_same_result(res, exact)
        assert res.params["device"] == "cpu,cpu"
        assert len(set(used)) == 2  # two lanes, both at work
    Q = real[::4] + np.float32(0.02)
    assert_same_result(allknn.neighbors(real, 5, queries=Q, device="cpu, cpu", backend="torch",
                                        resident=False, block_rows=192), allknn.neighbors(real, 5, queries=Q))
    with pytest.raises(ValueError, match="device='cpu,cpu' runs on the torch engine; pass backend='torch'"):
        allknn.neighbors(real, 5, device="cpu,cpu")


def test_device_tiles_fill_the_free_memory_share():
    from allknn.engines.torch.devices import (
        MAX_DEVICE_BLOCK_ROWS,
        TILE_BYTES_PER_ENTRY,
        TILE_SHARE,
        device_block_rows,
    )

    def lanes_bytes(rows, dim, lanes):
        return lanes * (TILE_BYTES_PER_ENTRY * rows * rows + 8 * dim * rows)

    for free, dim, lanes in ((8 * 2**30, 768, 2), (40 * 2**30, 100, 2), (3 * 2**30, 1024, 4)):
        rows = device_block_rows(free, dim, lanes, 10**7, streamed_budget=None)
        assert rows % 64 == 0 and lanes_bytes(rows, dim, lanes) <= TILE_SHARE * free
        assert rows == MAX_DEVICE_BLOCK_ROWS or lanes_bytes(rows + 64, dim, lanes) > TILE_SHARE * free
    assert device_block_rows(140 * 2**30, 768, 2, 10**7, streamed_budget=None) == MAX_DEVICE_BLOCK_ROWS
    assert device_block_rows(140 * 2**30, 768, 2, 5000, streamed_budget=None) == 5056  # the rows there are
    streamed = device_block_rows(140 * 2**30, 768, 2, 10**7, streamed_budget=2**28)
    assert streamed % 64 == 0 and 2 * 2 * 4 * 768 * streamed <= 2**28 < 2 * 2 * 4 * 768 * (streamed + 64)
    with pytest.raises(ValueError, match=r"too little free memory .* or max_memory is too small for one"):
        device_block_rows(10**5, 768, 2, 10**6, streamed_budget=None)


def test_tasks_sharing_a_device_stay_within_its_free_memory():
    """A Dask worker with several threads runs as many tasks on its GPU at
    once: together, their rows and tiles stay within the free memory."""
    from allknn.engines.torch.devices import CUDA_LANES, TILE_BYTES_PER_ENTRY, task_block_rows

    free = 6 * 2**30
    for dim, n, tasks in ((768, 16384, 1), (768, 16384, 2), (100, 16384, 4), (1024, 8192, 3)):
        rows = (np.zeros((n, dim), np.float32), np.zeros((n, dim), np.float32))
        side = task_block_rows(free, rows, tasks)
        used = sum(block.nbytes for block in rows) + CUDA_LANES * (TILE_BYTES_PER_ENTRY * side * side
                                                                   + 8 * dim * side)
        assert side % 64 == 0 and tasks * used <= free
        assert tasks == 1 or side < task_block_rows(free, rows, 1)
    rows = (np.zeros((16384, 4096), np.float32),) * 2  # 512 MB of rows per task
    with pytest.raises(ValueError, match=r"8 tasks at once \(the threads of the workers sharing the device\) "
                                         r"leave each .* too few for one tile; start one worker per GPU with "
                                         r"--nthreads 1"):
        task_block_rows(4 * 2**30, rows, 8)


def test_a_resumed_run_keeps_the_tile_size_it_started_with(tmp_path, real, monkeypatch):
    """Device tiles are sized from free memory, which a resumed run may not
    find the same: the checkpoint keeps the tile size (else its finished
    tiles would name other rows). The CPU stands in for a device whose free
    memory changed between the runs."""
    from allknn.engines.torch import TorchEngine
    from conftest import Interrupt, interrupt_after

    def recording(into, then=None):
        return lambda tile, pairs: (into.append(pairs), then and then(tile, pairs))

    first, fresh, resumed = [], [], []
    options = {"backend": "torch", "threads": 1, "checkpoint": tmp_path / "t.ckpt", "checkpoint_every": 0.0}
    monkeypatch.setattr(TorchEngine, "_free_bytes", lambda self, job: 2 * 2**20)
    with pytest.raises(Interrupt):
        allknn.neighbors(real, 6, on_tile=recording(first, interrupt_after(40)), **options)
    monkeypatch.setattr(TorchEngine, "_free_bytes", lambda self, job: 6 * 2**20)  # larger tiles now
    allknn.neighbors(real, 6, backend="torch", threads=1, on_tile=recording(fresh))
    side = round((np.sqrt(1 + 8 * max(first)) - 1) / 2)  # the first tiles were diagonal: side (side + 1) / 2
    assert max(fresh) > side * side
    res = allknn.neighbors(real, 6, on_tile=recording(resumed), **options)
    assert_same_result(res, allknn.neighbors(real, 6))
    assert max(resumed) == side * side  # the resumed run's tiles are the first run's


def test_runs_of_another_precision_wait_for_the_torch_settings():
    """The settings are global to the process: an fp32 run never multiplies
    while a lower precision's TF32 setting is on (another thread's run)."""
    import threading

    from allknn.engines.torch.product import torch_settings

    entered, release, seen = threading.Event(), threading.Event(), []

    def lower():
        with torch_settings("bf16"):
            entered.set()
            release.wait(10)

    other = threading.Thread(target=lower)
    other.start()
    entered.wait(10)

    def exact():
        with torch_settings("fp32"):
            seen.append(torch.backends.cuda.matmul.allow_tf32)

    waiting = threading.Thread(target=exact)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive() and not seen  # it waits while bf16 holds the settings
    with torch_settings("bf16"):  # the same precision shares them
        assert torch.backends.cuda.matmul.allow_tf32
    release.set()
    other.join(10)
    waiting.join(10)
    assert seen == [False]
