"""The Dask engine on a real cluster (2 worker processes, 1 thread each, on
loopback): bit-for-bit equality with the local engine, lost workers, a
killed client resumed, repeated tasks, bad input."""

from __future__ import annotations

import importlib.util
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import allknn
import allknn.cli
from conftest import (
    REAL,
    Interrupt,
    assert_same_result,
    clustered_with_duplicates,
    exact_reference_topk,
    reference_unit_rows,
)

distributed = pytest.importorskip("distributed")
pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

from allknn.engines.dask.tasks import Block, JoinSpec, merge_task, pair_task, scan_block  # noqa: E402
from allknn.engines.dask.waves import last_jobs_for  # noqa: E402
from allknn.readers.sources import NpySource, open_source  # noqa: E402

pytestmark = pytest.mark.cluster

README = Path(__file__).parents[2] / "README.md"


@pytest.fixture(scope="module")
def cluster():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  host="127.0.0.1") as cluster:
        yield cluster


@pytest.fixture(scope="module")
def client(cluster):
    with distributed.Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def data():
    X = clustered_with_duplicates(1500, 20, seed=31)
    X[7] = 0.0
    X[900, 3] = np.nan
    return X


@pytest.fixture
def npy(tmp_path, data):
    path = tmp_path / "x.npy"
    np.save(path, data)
    return path


def _parquet_folder(folder, matrix, parts):
    folder.mkdir()
    for i, rows in enumerate(np.array_split(np.arange(matrix.shape[0]), parts)):
        values = pa.FixedSizeListArray.from_arrays(pa.array(matrix[rows].ravel()), matrix.shape[1])
        pq.write_table(pa.table({"emb": values, "n": rows}), folder / f"p{i}.parquet", row_group_size=200)
    return folder


def _dies_after_parts(count: int):
    """An ``on_task`` callback raising :class:`Interrupt` (a killed client) once ``count`` parts are done."""
    finished = []

    def on_task(kind, rows):
        if kind == "part":
            finished.append(rows)
            if len(finished) == count:
                raise Interrupt

    return on_task


def test_self_join_equals_the_local_engine(client, npy, data):
    for options in ({"invalid": "drop"}, {"invalid": "drop", "exclude_self": False, "min_similarity": 0.5}):
        local = allknn.neighbors(data, 6, **options)
        remote = allknn.neighbors(npy, 6, client=client, task_rows=256, **options)
        assert_same_result(remote, local)
        assert remote.params["engine"] == "dask" and remote.params["task_rows"] == 256


def test_query_join_equals_the_local_engine(client, tmp_path, npy, data):
    Q = data[::4] * np.float32(2.0) + np.float32(0.01)
    np.save(tmp_path / "q.npy", Q)
    local = allknn.neighbors(data, 5, queries=Q, invalid="drop")
    remote = allknn.neighbors(npy, 5, queries=tmp_path / "q.npy", client=client, task_rows=128,
                              invalid="drop")
    assert_same_result(remote, local)


def test_parquet_folder_and_dask_array_sources(client, tmp_path, data):
    import dask.array as da

    clean = np.nan_to_num(data, nan=1.0)
    clean[7] = 1.0
    local = allknn.neighbors(clean, 4)
    folder = _parquet_folder(tmp_path / "emb", clean, parts=3)
    assert_same_result(allknn.neighbors(folder, 4, client=client, task_rows=320), local)
    assert_same_result(allknn.dask_neighbors(str(folder / "p*.parquet"), 4, client=client,
                                                          task_rows=320, column="emb"), local)
    assert_same_result(allknn.neighbors(da.from_array(clean, chunks=(100, 20)), 4, client=client,
                                        task_rows=192), local)


def test_zarr_arrays_and_groups(client, tmp_path, data):
    zarr = pytest.importorskip("zarr")
    local = allknn.neighbors(data, 5, invalid="drop")
    array = zarr.create_array(str(tmp_path / "x.zarr"), shape=data.shape, chunks=(300, 20), dtype="f4")
    array[:] = data
    assert_same_result(allknn.neighbors(tmp_path / "x.zarr", 5, client=client, task_rows=256, invalid="drop"),
                       local)
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w")
    group.create_array("emb", shape=data.shape, chunks=(500, 20), dtype="f8")[:] = data.astype(np.float64)
    group.create_array("other", shape=(3, 2), dtype="i4")
    with pytest.raises(ValueError, match=r"holds the arrays \['emb', 'other'\]; name one with column="):
        allknn.neighbors(tmp_path / "g.zarr", 5, client=client)
    remote = allknn.dask_neighbors(tmp_path / "g.zarr", 5, client=client, task_rows=320, invalid="drop",
                                   column="emb")
    assert_same_result(remote, allknn.neighbors(data.astype(np.float64), 5, invalid="drop"))
    with pytest.raises(ValueError, match="holds int32 values; store the embeddings as float16"):
        allknn.dask_neighbors(tmp_path / "g.zarr", 5, client=client, column="other")


def test_bad_input_gets_the_local_messages(client, npy, data, tmp_path, capsys):
    with pytest.raises(ValueError) as local:
        allknn.neighbors(data, 3)
    with pytest.raises(ValueError) as remote:
        allknn.neighbors(npy, 3, client=client, task_rows=256)
    assert str(remote.value) == str(local.value)
    with pytest.raises(ValueError, match=r"k=1500 .*"):
        allknn.neighbors(npy, 1500, client=client, invalid="drop")
    with pytest.raises(FileNotFoundError, match="every worker must read X at this path"):
        allknn.neighbors(tmp_path / "missing.npy", 3, client=client)
    with pytest.raises(TypeError, match="must be a path every worker can read"):
        allknn.neighbors(data, 3, client=client)
    with pytest.raises(ValueError, match="method must be 'exact', 'approx' or 'auto', got 'torch'"):
        allknn.neighbors(npy, 3, client=client, method="torch")
    with pytest.raises(ValueError, match="the approximate engine on a cluster runs the self-join"):
        allknn.neighbors(npy, 3, client=client, method="approx", queries=npy)
    with pytest.raises(ValueError, match=r"threads=, resident= apply to local runs only, not with client=: "
                                         r"on a cluster every task runs on one worker thread"):
        allknn.neighbors(npy, 3, client=client, threads=4, resident=True)
    assert allknn.cli.main(["run", str(npy), "-o", str(tmp_path / "o"), "--scheduler", "tcp://127.0.0.1:9",
                            "--threads", "2", "-q"]) == 1
    assert "--threads does not apply with --scheduler" in capsys.readouterr().err


def test_tasks_on_a_torch_device_are_the_local_result(client, npy, data, tmp_path):
    """device= runs every task's tiles with the torch engine on the
    worker's device (CPU torch here, as a GPU worker would with "cuda"),
    bit for bit the local result, in every precision."""
    pytest.importorskip("torch")
    local = allknn.neighbors(data, 6, invalid="drop")
    for precision in ("fp32", "bf16", "fp16"):
        remote = allknn.neighbors(npy, 6, client=client, backend="torch", device="cpu", precision=precision,
                                  task_rows=256, invalid="drop")
        assert_same_result(remote, local)
        assert remote.params["device"] == "cpu" and remote.params["precision"] == precision
        assert "device_tasks" not in remote.params  # how tiles are sized is not a result's parameter
    Q = data[::5] + np.float32(0.25)
    np.save(tmp_path / "q.npy", Q)
    assert_same_result(allknn.neighbors(npy, 4, queries=tmp_path / "q.npy", client=client, backend="torch",
                                        task_rows=192, invalid="drop"),
                       allknn.neighbors(data, 4, queries=Q, invalid="drop"))
    with pytest.raises(ValueError, match="on a cluster each worker uses one device"):
        allknn.neighbors(npy, 4, client=client, device="cuda:0,cuda:1", backend="torch")
    numba = allknn.neighbors(npy, 4, client=client, device="cpu", invalid="drop")  # the default engine
    assert "device" not in numba.params
    with pytest.raises(ValueError, match="probes= is an option of method='approx'"):
        allknn.neighbors(npy, 4, client=client, probes=8)
    with pytest.raises(ValueError, match="in_flight must be"):
        allknn.dask_neighbors(npy, 4, client=client, invalid="drop", in_flight=0)
    if not __import__("torch").cuda.is_available():
        with pytest.raises(ValueError, match=r"worker tcp://127\.0\.0\.1:\d+ has no CUDA device"):
            allknn.neighbors(npy, 4, client=client, device="cuda", invalid="drop")


@pytest.mark.cuda
def test_cuda_workers_are_the_local_result(client, npy, data):
    """On a GPU machine: the tasks' tiles on the workers' GPU are the local
    result, bit for bit; the two worker processes find the one GPU by its
    UUID, so their tasks share its memory."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device, this machine has 0")
    from allknn.engines.dask.run import device_choice

    local = allknn.neighbors(data, 6, invalid="drop")
    for precision in ("bf16", "tf32"):
        remote = allknn.neighbors(npy, 6, client=client, device="cuda", precision=precision, task_rows=256,
                                  invalid="drop")
        assert_same_result(remote, local)
        assert remote.params["device"] == "cuda" and remote.params["precision"] == precision
    assert device_choice(client, "cuda", None)["device_tasks"] == 2  # both workers' "cuda" is device 0


def test_workers_sharing_a_gpu_size_their_tiles_from_one_share_of_it(client):
    """Tasks may run at once on one GPU from every worker process that
    found it (by host and UUID): each task's tiles take that share of its
    free memory (``test_tasks_sharing_a_device_stay_within_its_free_memory``)."""
    from allknn.engines.dask.run import _device_check, device_choice, device_tasks

    threads = {"a": 2, "b": 1, "c": 1, "d": 4}
    assert device_tasks({"a": "h/GPU-1", "b": "h/GPU-1", "c": "h/GPU-2", "d": None}, threads) == 4
    assert device_tasks({"a": "h/GPU-1", "b": "h/GPU-1", "c": "h/GPU-2"}, threads) == 3
    assert device_tasks({"a": "h/GPU-1", "c": "g/GPU-1"}, threads) == 2  # two machines: their own GPUs
    assert device_tasks({}, {}) == 1
    pytest.importorskip("torch")
    assert _device_check("cpu") == (None, None)  # CPU torch: every worker its own
    assert device_choice(client, "cpu", None) == {"device": "cpu", "precision": "fp32", "device_tasks": 1}


def test_the_last_window_of_jobs_runs_largest_first():
    """Jobs keep their order up to the last window, which runs its first
    jobs first, then the others by falling size, ties in their order."""
    from allknn.engines.dask.waves import PairJob, largest_first_at_the_end

    sizes = [5, 9, 9, 3, 7, 1, 8, 2, 8]
    jobs = [PairJob(None, ((at, 0),), size, first=at in (0, 6)) for at, size in enumerate(sizes)]
    for window, expected in ((4, [0, 1, 2, 3, 4, 6, 8, 7, 5]), (0, list(range(9))),
                             (20, [0, 6, 1, 2, 8, 4, 3, 7, 5])):
        ordered = list(largest_first_at_the_end(iter(jobs), window))
        assert [job.targets[0][0] for job in ordered] == expected, window


def test_the_waves_queue_a_quarter_second_behind_each_thread():
    """Each thread gets its running task and at least ``QUEUED_SECONDS``
    of work behind it, one task fewer would not do, at most
    ``MAX_IN_FLIGHT_PER_THREAD`` a thread and ``MIN_IN_FLIGHT`` in all."""
    from allknn.engines.dask.waves import (
        MAX_IN_FLIGHT_PER_THREAD,
        MIN_IN_FLIGHT,
        QUEUED_SECONDS,
        in_flight_for,
    )

    for threads in (2, 3, 64):
        for seconds in (3.0, 0.5, 0.25, 0.1, 0.03, 1e-4):
            per_thread, left = divmod(in_flight_for(threads, seconds), threads)
            assert left == 0 and 2 <= per_thread <= MAX_IN_FLIGHT_PER_THREAD
            if per_thread < MAX_IN_FLIGHT_PER_THREAD:
                assert (per_thread - 1) * seconds >= QUEUED_SECONDS > (per_thread - 2) * seconds
    assert in_flight_for(2, 0.5) == 4 and in_flight_for(1, 3.0) == MIN_IN_FLIGHT


def test_waves_bound_the_unfinished_pair_tasks(client, npy, data):
    """The client keeps at most ``in_flight`` pair tasks unfinished and
    finishes row blocks while later pairs are still to come."""

    def unfinished_pairs(dask_scheduler):
        return sum(1 for task in dask_scheduler.tasks.values()
                   if str(task.key).startswith("allknn-pair") and task.state in ("waiting", "queued",
                                                                                  "no-worker", "processing"))

    seen, events = [], []

    def watch(kind, count):
        events.append(kind)
        seen.append(client.run_on_scheduler(unfinished_pairs))

    local = allknn.neighbors(data, 5, invalid="drop")
    for options in ({}, {"queries": npy}):
        events.clear()
        remote = allknn.dask_neighbors(npy, 5, client=client, task_rows=192, invalid="drop", in_flight=3,
                                       on_task=watch, **options)
        assert_same_result(remote, local if not options else allknn.neighbors(data, 5, queries=data.copy(),
                                                                              invalid="drop"))
        assert events.index("part") < 0.75 * events.count("pair")  # the first part long before the last pair
    assert 0 < max(seen) <= 3


def test_a_thread_runs_the_pair_tasks_in_the_order_of_the_schedule(npy, data):
    """Own joins first, then the pairs row by row, as submitted; the last
    jobs largest first, so that the pairs among them with the short last
    block (156 rows) come last. Dask queues tasks of a large
    group without dependencies (the own joins) on the scheduler and sends
    the pairs, which wait for floors, straight to the workers; without the
    own joins' restriction and the jobs' priorities, the last own joins ran
    after most pairs, and so did the pairs waiting for their floors. A pair
    whose floors reach the scheduler late may be overtaken by a few later
    ones (these tasks take milliseconds)."""
    with (distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                   dashboard_address=None) as cluster,
          distributed.Client(cluster) as client,
          distributed.get_task_stream(client) as stream):
        remote = allknn.dask_neighbors(npy, 5, client=client, task_rows=192, invalid="drop")
    assert_same_result(remote, allknn.neighbors(data, 5, invalid="drop"))
    started = sorted((span["start"], str(task["key"])) for task in stream.data for span in task["startstops"]
                     if span["action"] == "compute" and str(task["key"]).startswith("allknn-pair-"))
    blocks = -(-data.shape[0] // 192)
    ran = [tuple(int(b) for b in key.split("-")[2:4]) for _, key in started]
    assert ran[:blocks] == [(i, i) for i in range(blocks)]
    pairs = list(itertools.combinations(range(blocks), 2))
    assert sorted(ran[blocks:]) == pairs
    last = blocks - 1
    sequence = [(i, i) for i in range(blocks)] + pairs
    cut = len(sequence) - last_jobs_for(1)
    assert cut > blocks  # the last jobs are pairs, the short ones (with block `last`) to run last
    planned = sequence[blocks:cut] + sorted(sequence[cut:], key=lambda pair: last in pair)
    position = {pair: at for at, pair in enumerate(planned)}
    overtaken = sum(1 for a, b in itertools.combinations(ran[blocks:], 2) if position[a] > position[b])
    assert overtaken <= blocks, ran  # row by row: 20 times; a shuffled order: about 190 times


class _Dependencies:
    """The dependencies of each pair task as the scheduler starts it (a scheduler plugin)."""

    def __init__(self, scheduler):
        self.scheduler, self.of = scheduler, {}

    def transition(self, key, start, finish, *args, **kwargs):
        if finish == "processing" and str(key).startswith("allknn-pair-"):
            self.of[str(key)] = {str(dep.key) for dep in self.scheduler.tasks[key].dependencies}


@pytest.mark.parametrize("task_rows", [128, 256])
@pytest.mark.parametrize("form", ["self", "query"])
def test_later_pairs_start_from_the_floors_of_merged_states(npy, data, tmp_path, form, task_rows):
    """12 row blocks, or 6 (fewer partial states per block than a merge
    takes, as in a 100k-row run): a block's first two partial states are
    merged before its later pairs are submitted, and those pairs start from
    the merged state's floors once they have finished. Every pair (every
    query task but a block's first) starts from floors of each of its
    blocks, and the result is the local one, bit for bit (the queries have
    other bad rows than the corpus, so misaligned floors would show)."""
    from distributed.diagnostics.plugin import SchedulerPlugin

    queries = data[::-1].copy()
    queries[[3, 400]] = 0.0
    np.save(tmp_path / "q.npy", queries)
    options = {} if form == "self" else {"queries": tmp_path / "q.npy"}
    with (distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                   dashboard_address=None) as cluster,
          distributed.Client(cluster) as client):
        recorded = type("Recorded", (_Dependencies, SchedulerPlugin), {})(cluster.scheduler)
        cluster.scheduler.add_plugin(recorded)
        remote = allknn.dask_neighbors(npy, 5, client=client, task_rows=task_rows, in_flight=2,
                                       invalid="drop", **options)
    local = allknn.neighbors(data, 5, invalid="drop", **({} if form == "self" else {"queries": queries}))
    assert_same_result(remote, local)
    blocks = -(-data.shape[0] // task_rows)
    assert len(recorded.of) == (blocks * (blocks + 1) // 2 if form == "self" else blocks * blocks)
    refreshed = 0
    for key, dependencies in recorded.of.items():
        i, j = (int(b) for b in re.match(r"allknn-pair-(\d+)-(\d+)-", key).groups())
        floors = [re.match(r"allknn-floors-(\d+)-(?:(\d+)-)?[0-9a-f]+$", dep) for dep in dependencies]
        floored = {int(found.group(1)) for found in floors if found}
        refreshed += any(found and found.group(2) for found in floors)
        if form == "self":
            assert floored == (set() if i == j else {i, j}), key
        else:
            assert floored == (set() if j == 0 else {i}), key
    assert refreshed > 0, recorded.of
    if form == "query":  # first tasks a window ahead (here one block), not all at the start
        started = [tuple(int(b) for b in key.split("-")[2:4]) for key in recorded.of]
        last_of_block_0 = max(at for at, (i, _) in enumerate(started) if i == 0)
        assert sum(1 for i, j in started[:last_of_block_0] if j == 0) <= 3, started


def test_workers_reuse_a_run_s_blocks_only_within_the_run(client, tmp_path, data):
    """Each worker keeps the blocks it read last for the run's next tasks;
    a later run at the same path reads the file again (it may have been
    rewritten), and a block past the budget is not kept."""
    from allknn.engines.dask.tasks import RecentBlocks

    path = tmp_path / "x.npy"
    first = np.nan_to_num(data, nan=1.0)
    first[7] = 1.0
    np.save(path, first)
    assert_same_result(allknn.neighbors(path, 5, client=client, task_rows=256), allknn.neighbors(first, 5))
    second = first[::-1].copy()
    np.save(path, second)  # same shape, same path, other rows
    assert_same_result(allknn.neighbors(path, 5, client=client, task_rows=256), allknn.neighbors(second, 5))

    source = open_source(path)
    cache, block = RecentBlocks(), Block(source, 0, 256)
    spec = JoinSpec(k=5, skip_self=True, block_rows=64, threads=1, cache_bytes=2**20, run="a")
    rows = cache.get(block, None, spec)
    assert cache.get(block, None, spec) is rows and not rows[0].flags.writeable
    assert cache.get(block, None, JoinSpec(**{**spec.__dict__, "run": "b"})) is not rows
    small = JoinSpec(**{**spec.__dict__, "cache_bytes": 1000, "run": "c"})
    assert cache.get(block, None, small) is not cache.get(block, None, small)  # too large to keep


def test_a_worker_that_cannot_read_names_the_path_and_itself(client, tmp_path, data):
    path = tmp_path / "gone.npy"
    np.save(path, data)
    source = open_source(path)
    path.unlink()
    with pytest.raises(OSError, match=r"worker .* \(pid \d+\) cannot read rows 0\.\.99 of .*gone\.npy"):
        client.submit(scan_block, Block(source, 0, 100), pure=False).result()


def test_repeated_tasks_change_nothing(client, npy, data):
    source = NpySource(str(npy), data.shape, data.dtype.str)
    spec = JoinSpec(k=5, skip_self=True, block_rows=64, threads=1)
    first, second = Block(source, 0, 300), Block(source, 300, 700)
    runs = [client.submit(pair_task, spec, first, second, pure=False) for _ in range(2)]
    once = client.submit(merge_task, (runs[0], 0)).result()
    twice = client.submit(merge_task, (runs[0], 0), (runs[1], 0), (runs[0], 0)).result()
    np.testing.assert_array_equal(np.sort(once, axis=1), np.sort(twice, axis=1))


def _two_workers_again(cluster, client) -> None:
    """Wait for the nanny of a SIGKILLed worker to start a new one. In a
    known race of distributed (dask/distributed#7312) the nanny closes
    instead; a new worker then takes its place, so that the module's later
    tests still have two."""
    from distributed.core import Status

    deadline = time.monotonic() + 60
    while len(client.nthreads()) < 2 and time.monotonic() < deadline:
        closed = [name for name, nanny in cluster.workers.items() if nanny.status in (Status.closed,
                                                                                     Status.failed)]
        for name in closed:
            del cluster.worker_spec[name], cluster.workers[name]
        if closed:
            cluster.scale(2)
        time.sleep(0.1)
    client.wait_for_workers(2, timeout=60)


def test_a_killed_worker_costs_only_its_tasks(cluster, client, npy, data):
    local = allknn.neighbors(data, 6, invalid="drop")
    pids = client.run(os.getpid)
    killed = []

    def kill_one(kind, count):
        if kind == "pair" and not killed:
            victim = next(iter(pids.values()))
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)

    remote = allknn.dask_neighbors(npy, 6, client=client, task_rows=128, invalid="drop",
                                                on_task=kill_one)
    assert killed
    assert_same_result(remote, local)
    _two_workers_again(cluster, client)


def test_a_killed_worker_costs_the_approximate_engine_only_its_tasks(cluster, client, tmp_path):
    """A worker killed while it runs one of the stages that meet through
    files: the stage's tasks are run again, and the result is unchanged."""
    import threading

    from allknn.engines.dask.approx import dask_approx_neighbors

    X = clustered_with_duplicates(6000, 24, seed=9)
    np.save(tmp_path / "x.npy", X)
    options = {"client": client, "task_rows": 256, "seed": 4, "probes": 6}
    want = dask_approx_neighbors(tmp_path / "x.npy", 5, **options)
    stages = ("assign_task", "regroup_task", "probe_task", "finish_block_task")
    killed = []

    def kill_a_busy_worker():
        deadline = time.monotonic() + 120
        while not killed and time.monotonic() < deadline:
            busy = [worker for worker, keys in client.processing().items()
                    if any(str(key).startswith(stages) for key in keys)]
            if busy:
                pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.005)

    killer = threading.Thread(target=kill_a_busy_worker)
    killer.start()
    got = dask_approx_neighbors(tmp_path / "x.npy", 5, **options)
    killer.join()
    assert killed, "no stage task ran while the killer looked"
    assert_same_result(got, want)
    _two_workers_again(cluster, client)


def test_parts_folder_reads_as_one_table_and_resumes(client, npy, data, tmp_path):
    local = allknn.neighbors(data, 6, invalid="drop")
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        allknn.dask_neighbors(npy, 6, client=client, task_rows=128, invalid="drop", output=out,
                                           on_task=_dies_after_parts(2))
    manifest = json.loads((out / "_manifest.json").read_text())
    assert len(manifest["parts"]) == 2 and not manifest["complete"]
    with pytest.raises(ValueError, match=r"unfinished: .* --resume"):
        allknn.load_result(out)
    with pytest.raises(ValueError, match="holds the output of an earlier run; pass resume=True"):
        allknn.dask_neighbors(npy, 6, client=client, task_rows=128, invalid="drop", output=out)
    with pytest.raises(ValueError, match=r"different run \(k: the folder has 6, this run has 5"):
        allknn.dask_neighbors(npy, 5, client=client, task_rows=128, invalid="drop", output=out,
                                           resume=True)
    recorded = {entry["file"]: os.stat(out / entry["file"]).st_mtime_ns
                for entry in manifest["parts"].values()}
    allknn.dask_neighbors(npy, 6, client=client, task_rows=128, invalid="drop", output=out,
                                       resume=True)
    assert all(os.stat(out / name).st_mtime_ns == mtime for name, mtime in recorded.items())  # kept
    assert_same_result(allknn.load_result(out), local)
    table = pq.read_table(out).to_pandas()  # the parts as one table
    present = local.indices >= 0
    assert len(table) == present.sum()
    assert sorted(table["id"].unique()) == sorted(np.flatnonzero(present.any(axis=1)))


def test_parts_hold_the_ids_as_the_local_parquet_file_does(client, npy, data, tmp_path):
    import pandas as pd

    labels = np.array([f"item-{i:05d}" for i in np.random.default_rng(5).permutation(data.shape[0])])
    local = allknn.neighbors(data, 6, invalid="drop")
    local.save(tmp_path / "local.parquet", ids=labels)
    allknn.dask_neighbors(npy, 6, client=client, task_rows=256, invalid="drop", output=tmp_path / "out",
                          ids=labels)
    expected = pd.read_parquet(tmp_path / "local.parquet")
    assert expected["id"].iloc[0].startswith("item-") and len(expected) == (local.indices >= 0).sum()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out"), expected)
    assert_same_result(allknn.load_result(tmp_path / "out"), local)
    with pytest.raises(ValueError, match=r"different run \(labels: the folder has"):
        allknn.dask_neighbors(npy, 6, client=client, task_rows=256, invalid="drop", output=tmp_path / "out",
                              ids=labels[::-1], resume=True)

    Q = data[::3] + np.float32(0.5)
    np.save(tmp_path / "q.npy", Q)
    query_labels = 10_000 + np.arange(Q.shape[0]) * 7
    local = allknn.neighbors(data, 4, queries=Q, invalid="drop")
    local.save(tmp_path / "local_q.parquet", ids=labels, query_ids=query_labels)
    allknn.dask_neighbors(npy, 4, queries=tmp_path / "q.npy", client=client, task_rows=192, invalid="drop",
                          output=tmp_path / "out_q", ids=labels, query_ids=query_labels)
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "out_q"),
                                  pd.read_parquet(tmp_path / "local_q.parquet"))
    assert_same_result(allknn.load_result(tmp_path / "out_q"), local)

    with pytest.raises(ValueError, match=r"without output= the result holds row numbers"):
        allknn.dask_neighbors(npy, 4, client=client, ids=labels)
    with pytest.raises(ValueError, match="ids has 10 entries but the matrix has 1500 rows"):
        allknn.dask_neighbors(npy, 4, client=client, output=tmp_path / "o", ids=labels[:10])
    with pytest.raises(ValueError, match="id_column= reads a column of parquet files"):
        allknn.dask_neighbors(npy, 4, client=client, output=tmp_path / "o", id_column="n")


def test_cli_takes_the_id_column_of_a_parquet_folder(cluster, tmp_path, data):
    import pandas as pd

    clean = np.nan_to_num(data, nan=1.0)
    clean[7] = 1.0
    folder = _parquet_folder(tmp_path / "emb", clean, parts=3)
    for path in sorted(folder.glob("*.parquet")):  # the id column "n" holds 0, 1, ... per file
        table = pq.read_table(path)
        pq.write_table(table.set_column(1, "n", pa.array(table["n"].to_numpy() * 3 + 1)), path)
    labels = np.arange(clean.shape[0]) * 3 + 1
    torch_found = importlib.util.find_spec("torch") is not None  # exact tasks then run on CPU torch
    local = allknn.neighbors(clean, 5)
    local.save(tmp_path / "local.parquet", ids=labels)
    for method in ("exact", "approx"):
        out = tmp_path / f"out-{method}"
        tiles = ["--backend", "torch", "--precision", "bf16"] if method == "exact" and torch_found else []
        assert allknn.cli.main(["run", str(folder), "-k", "5", "-o", str(out), "--scheduler",
                                cluster.scheduler_address, "--id-column", "n", "--column", "emb",
                                "--method", method, "--task-rows", "512", "-q", *tiles]) == 0
        table = pd.read_parquet(out)
        result = allknn.load_result(out)  # row numbers again, through the folder's labels
        rows, ranks = np.nonzero(result.indices >= 0)
        np.testing.assert_array_equal(table["id"], labels[rows])
        np.testing.assert_array_equal(table["neighbor_id"], labels[result.indices[rows, ranks]])
        if method == "exact":
            pd.testing.assert_frame_equal(table, pd.read_parquet(tmp_path / "local.parquet"))
            assert_same_result(result, local)


def test_cli_on_a_scheduler_resumes_after_the_client_is_killed(cluster, tmp_path):
    X = clustered_with_duplicates(6000, 24, seed=3)
    np.save(tmp_path / "x.npy", X)
    command = [sys.executable, "-m", "allknn.cli", "run", str(tmp_path / "x.npy"), "-k", "5", "-o",
               str(tmp_path / "out"), "--scheduler", cluster.scheduler_address, "--task-rows", "128", "-q"]
    manifest = tmp_path / "out" / "_manifest.json"
    process = subprocess.Popen(command)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and json.loads(manifest.read_text())["parts"]:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not json.loads(manifest.read_text())["complete"]
    subprocess.run([*command, "--resume"], check=True, timeout=300)
    assert_same_result(allknn.load_result(tmp_path / "out"), allknn.neighbors(X, 5))


def test_cli_names_an_unreachable_scheduler(tmp_path, npy):
    done = subprocess.run([sys.executable, "-m", "allknn.cli", "run", str(npy), "-o", str(tmp_path / "o"),
                           "--scheduler", "tcp://127.0.0.1:9", "-q"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in done.stderr


def test_cli_info_estimates_from_tasks_timed_on_the_cluster(cluster, npy, data, tmp_path, capsys):
    clean = np.nan_to_num(data, nan=1.0)
    clean[7] = 1.0
    np.save(tmp_path / "clean.npy", clean)
    assert allknn.cli.main(["info", str(tmp_path / "clean.npy"), "-k", "5", "--task-rows", "256",
                            "--scheduler", cluster.scheduler_address]) == 0
    shown = capsys.readouterr().out
    assert "on 2 worker thread(s) (from 6 tasks timed on the cluster)" in shown
    seconds = float(shown.split("estimate:")[1].split()[0])
    assert seconds > 0


def test_cli_info_on_the_cluster_times_tasks_on_the_device_asked(cluster, npy, data, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    np.save(tmp_path / "clean.npy", np.nan_to_num(data, nan=1.0) + np.float32(0.5))
    argv = ["info", str(tmp_path / "clean.npy"), "-k", "5", "--task-rows", "256", "--scheduler",
            cluster.scheduler_address]
    assert allknn.cli.main([*argv, "--device", "cpu", "--precision", "bf16"]) == 0  # tiles in CPU torch
    assert "(from 6 tasks timed on the cluster, tiles on cpu)" in capsys.readouterr().out
    if not torch.cuda.is_available():  # nor on the workers, on this machine
        assert allknn.cli.main([*argv, "--device", "cuda"]) == 1
        assert "has no CUDA device (torch.cuda.is_available() is False)" in capsys.readouterr().err


def test_approximate_engine_meets_its_floor_and_its_interval_holds(client, tmp_path):
    """Real rows: cells fitted on a sample, the breadth chosen by a pilot
    for the recall target, shards by group of cells, probing tasks; the
    true recall (against the exact graph) meets the target's floor, the
    audited interval contains it, and no row lists itself."""
    X = np.load(REAL).astype(np.float32)
    X[11] = 0.0
    np.save(tmp_path / "real.npy", X)
    exact = allknn.neighbors(X, 10, invalid="drop")
    res = allknn.neighbors(tmp_path / "real.npy", 10, client=client, method="approx", invalid="drop",
                           task_rows=1024, seed=3)
    kept = np.flatnonzero(exact.indices[:, 0] >= 0)
    hits = np.nan_to_num(res.similarities[kept], nan=-np.inf) >= exact.similarities[kept, -1:] - 1e-6
    true = hits.mean()
    low, high = res.recall.interval
    assert true >= 0.94 and res.recall.estimate >= 0.94
    assert low <= true <= high
    assert res.params["recall_target"] == 0.95 and res.params["pilot_recall"] >= 0.95
    assert (res.indices[11] == -1).all() and not np.isin(res.indices, [11]).any()
    assert not (res.indices == np.arange(X.shape[0])[:, None]).any()
    assert res.params["method"] == "approx" and res.params["engine"] == "dask"
    again = allknn.neighbors(tmp_path / "real.npy", 10, client=client, method="approx", invalid="drop",
                             task_rows=1024, seed=3)
    assert_same_result(again, res)  # equal seeds, equal results
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    from allknn.engines.dask.approx import dask_approx_neighbors

    assert_same_result(dask_approx_neighbors(tmp_path / "real.npy", 10, client=client, invalid="drop",
                                             task_rows=1024, seed=3, scratch=scratch), res)
    assert not list(scratch.iterdir())  # the shards are removed
    lower = dask_approx_neighbors(tmp_path / "real.npy", 10, client=client, invalid="drop", task_rows=1024,
                                  seed=3, recall_target=0.8)
    assert lower.params["probes"] < res.params["probes"]
    hits = np.nan_to_num(lower.similarities[kept], nan=-np.inf) >= exact.similarities[kept, -1:] - 1e-6
    assert 0.78 <= hits.mean() < true
    fixed = dask_approx_neighbors(tmp_path / "real.npy", 10, client=client, invalid="drop", task_rows=1024,
                                  seed=3, probes=4)
    assert fixed.params["probes"] == 4 and "pilot_recall" not in fixed.params
    with_target = dask_approx_neighbors(tmp_path / "real.npy", 10, client=client, invalid="drop",
                                        task_rows=1024, seed=3, probes=4, recall_target=0.99)
    assert_same_result(with_target, fixed)  # ignored with probes, as locally


def test_the_assignment_runs_on_every_worker(client, tmp_path):
    """Every assignment task needs the centroids, which one worker holds.
    Dask places a group of few tasks (here 4, as for the 63,666 Debian
    rows) where their dependencies are: they all ran there, one after the
    other, while the other worker waited (2 s of a 10 s run)."""
    from allknn.engines.dask.approx import dask_approx_neighbors

    X = np.load(REAL).astype(np.float32)
    np.save(tmp_path / "real.npy", X)
    with distributed.get_task_stream(client) as stream:
        dask_approx_neighbors(tmp_path / "real.npy", 10, client=client, task_rows=1024, seed=3, probes=2)
    workers = {task["worker"] for task in stream.data if str(task["key"]).startswith("assign_task")}
    assert len(workers) == len(client.nthreads()) == 2


def test_a_thread_probes_the_largest_tasks_first(tmp_path):
    """The probing tasks run largest first (by query rows), so that the
    short ones fill the workers' last gaps rather than a long one running
    alone at the end."""
    from allknn.engines.dask.approx import dask_approx_neighbors

    X = np.load(REAL)[:4000].astype(np.float32)
    np.save(tmp_path / "real.npy", X)
    searched = []

    def probed(kind: str, rows: int) -> None:
        if kind == "probe":
            searched.append(rows)

    with (distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                   dashboard_address=None) as cluster,
          distributed.Client(cluster) as client):
        res = dask_approx_neighbors(tmp_path / "real.npy", 10, client=client, task_rows=640, seed=3,
                                    on_task=probed)
    assert sum(searched) == X.shape[0] and len(set(searched)) > 3
    assert searched == sorted(searched, reverse=True)
    assert res.recall.estimate >= 0.9


def test_approximate_engine_reads_its_three_samples_in_one_pass(client, tmp_path, monkeypatch):
    """The cells' sample, the pilot and the audit rows are read by one task
    per block; only the pilot's neighbours need a second pass."""
    from allknn.engines.dask import approx

    X = np.load(REAL).astype(np.float32)
    np.save(tmp_path / "real.npy", X)
    monkeypatch.setattr(approx, "SAMPLE_ROWS", 500)  # the samples are then a part of the rows
    with distributed.get_task_stream(client) as stream:
        res = approx.dask_approx_neighbors(tmp_path / "real.npy", 10, client=client, task_rows=1024, seed=3)
    reads = [task for task in stream.data if task["key"].startswith("sample_task-")]
    assert len(reads) == 2 * 4  # two passes over the 4 blocks (there were four)
    assert res.params["cells"] <= 500 and res.recall.estimate >= 0.9


def _probed_reference(X: np.ndarray, k: int, centroids: np.ndarray, probes: int) -> allknn.TopK:
    """The approximate engine's answer by brute force: each row's exact
    top-k (by the contract's reference similarity, ties by smaller index)
    among the rows whose cell is one of its ``probes`` nearest cells."""
    from allknn.engines.kmeans import nearest_centroids

    order = nearest_centroids(reference_unit_rows(X)[0], centroids, probes)
    full = exact_reference_topk(X, 1).full
    full[~(order[:, 0][None, :, None] == order[:, None, :]).any(axis=2)] = -np.inf  # j's cell not probed by i
    best = np.lexsort((np.broadcast_to(np.arange(full.shape[1]), full.shape), -full), axis=1)[:, :k]
    similarities = np.take_along_axis(full, best, axis=1)
    missing = np.isinf(similarities)
    return allknn.TopK(indices=np.where(missing, -1, best).astype(np.int64),
                       similarities=np.where(missing, np.nan, similarities).astype(np.float32),
                       n_corpus=X.shape[0])


def test_approximate_probing_equals_brute_force_over_the_probed_cells_however_large_a_cell(client, tmp_path,
                                                                                          monkeypatch):
    """One giant cluster makes cells of many task blocks: its shards are cut
    into several probing tasks a side, and the result is still each row's
    exact top-k over its probed cells, also through the two-step shuffle of
    many files; the parts written by the workers read
    back as the in-memory result, with its recall."""
    from allknn.engines.dask.approx import dask_approx_neighbors
    from allknn.engines.kmeans import nearest_centroids

    rng = np.random.default_rng(4)
    giant = np.float32(3.0) + rng.standard_normal((700, 12)).astype(np.float32) * np.float32(0.3)
    X = np.concatenate([clustered_with_duplicates(500, 12, seed=5), giant])
    np.save(tmp_path / "x.npy", X)
    options = {"client": client, "cells": 6, "probes": 2, "task_rows": 64, "seed": 2}
    held = dask_approx_neighbors(tmp_path / "x.npy", 5, **options)
    events = []
    dask_approx_neighbors(tmp_path / "x.npy", 5, output=tmp_path / "out", **options,
                          on_task=lambda kind, rows: events.append((kind, rows)))
    for kind in ("probe", "part"):  # progress: every row searched once, every row written once
        assert sum(rows for seen, rows in events if seen == kind) == X.shape[0]
    assert [kind for kind, _ in events].index("part") > [kind for kind, _ in events].index("probe")
    centroids = np.load(tmp_path / "out" / "_cells.npy")
    cells = nearest_centroids(reference_unit_rows(X)[0], centroids, 1)[:, 0]
    assert np.bincount(cells).max() > 4 * 64  # a cell of more than four task blocks
    assert_same_result(held, _probed_reference(X, 5, centroids, 2))
    from allknn.engines.dask import approx

    monkeypatch.setattr(approx, "SPREAD_ABOVE", 2)  # through the two-step shuffle
    assert_same_result(dask_approx_neighbors(tmp_path / "x.npy", 5, **options), held)
    if importlib.util.find_spec("torch") is not None:  # the probing tiles on CPU torch, low precision
        on_torch = dask_approx_neighbors(tmp_path / "x.npy", 5, device="cpu", precision="bf16", **options)
        assert_same_result(on_torch, held)
        assert on_torch.params["device"] == "cpu" and on_torch.params["precision"] == "bf16"
        assert_same_result(allknn.neighbors(tmp_path / "x.npy", 5, method="approx", backend="torch",
                                            precision="fp16", **options), held)
    written = allknn.load_result(tmp_path / "out")
    assert_same_result(written, held)
    assert written.recall == held.recall and held.recall.sample_size == 1000
    assert written.params["probes"] == 2 and written.params["recall_rows"] == 1000
    table = pq.read_table(tmp_path / "out").to_pandas()  # the parts as one table
    assert len(table) == (held.indices >= 0).sum()


def test_approximate_run_resumes_with_the_cells_and_breadth_it_kept(client, npy, data, tmp_path, monkeypatch):
    """A run killed after two parts, resumed: the finished parts are kept,
    the cells and the pilot's breadth are read back rather than chosen
    again, and the folder equals an uninterrupted run's (ids included)."""
    import pandas as pd

    from allknn.engines.dask import approx

    labels = np.array([f"r{i}" for i in range(data.shape[0])])
    options = {"client": client, "task_rows": 256, "invalid": "drop", "seed": 1, "ids": labels}
    approx.dask_approx_neighbors(npy, 6, output=tmp_path / "whole", **options)
    out = tmp_path / "out"
    with pytest.raises(Interrupt):
        approx.dask_approx_neighbors(npy, 6, output=out, on_task=_dies_after_parts(2), **options)
    manifest = json.loads((out / "_manifest.json").read_text())
    assert len(manifest["parts"]) == 2 and not manifest["complete"]
    assert (out / "_cells.npy").is_file() and "pilot_recall" in manifest["params"]
    with pytest.raises(ValueError, match="holds the output of an earlier run; pass resume=True"):
        approx.dask_approx_neighbors(npy, 6, output=out, **options)
    with pytest.raises(ValueError, match=r"different run \(seed: the folder has 1, this run has 2"):
        approx.dask_approx_neighbors(npy, 6, output=out, resume=True, **{**options, "seed": 2})
    with pytest.raises(ValueError, match=r"different run \(labels: the folder has \{'ids': .*\}, this run "
                                         r"has None"):
        approx.dask_approx_neighbors(npy, 6, output=out, resume=True, **{**options, "ids": None})
    cells = (out / "_cells.npy").read_bytes()
    (out / "_cells.npy").unlink()
    with pytest.raises(ValueError, match=r"_cells\.npy cannot be read .* the finished parts were searched "
                                         r"with the cells it held, so the run cannot be resumed"):
        approx.dask_approx_neighbors(npy, 6, output=out, resume=True, **options)
    (out / "_cells.npy").write_bytes(cells)
    recorded = {entry["file"]: os.stat(out / entry["file"]).st_mtime_ns
                for entry in manifest["parts"].values()}

    def chosen_again(*args, **kwargs):
        raise AssertionError("a resumed run chose its cells again")

    monkeypatch.setattr(approx._Search, "breadth", chosen_again)
    approx.dask_approx_neighbors(npy, 6, output=out, resume=True, **options)
    assert all(os.stat(out / name).st_mtime_ns == mtime for name, mtime in recorded.items())  # kept
    whole, resumed = allknn.load_result(tmp_path / "whole"), allknn.load_result(out)
    assert_same_result(resumed, whole)
    assert resumed.recall == whole.recall and resumed.params == whole.params
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(tmp_path / "whole"))
    assert pd.read_parquet(out)["id"].iloc[0].startswith("r")


def test_cell_ranges_hold_at_most_a_task_of_rows_unless_one_cell_does():
    from allknn.engines.dask.approx_tasks import cell_ranges

    rng = np.random.default_rng(0)
    for _ in range(200):
        limit = int(rng.integers(1, 50))
        counts = rng.integers(0, 2 * limit if rng.random() < 0.3 else limit // 2 + 1, rng.integers(1, 40))
        starts = cell_ranges(counts, limit)
        assert starts[0] == 0 and starts[-1] == counts.size and (np.diff(starts) > 0).all()  # every cell once
        sums = [counts[a:b].sum() for a, b in itertools.pairwise(starts)]
        assert all(total <= limit or np.count_nonzero(counts[a:b]) == 1  # else one cell alone
                   for total, (a, b) in zip(sums, itertools.pairwise(starts), strict=True))
        assert all(total > 0 and total + counts[b] > limit  # full: the next cell did not fit
                   for total, b in zip(sums[:-1], starts[1:-1], strict=True))


def test_a_scratch_folder_the_workers_do_not_share_is_named(client, npy, tmp_path):
    from allknn.engines.dask.approx_tasks import SHARED_MARKER, scratch_refusal

    folder = tmp_path / "scratch"
    folder.mkdir()
    missing = f"cannot read {folder / SHARED_MARKER} (No such file or directory)"
    assert scratch_refusal(str(folder), "t0") == missing
    (folder / SHARED_MARKER).write_text("another")  # another machine's folder at the same path
    assert scratch_refusal(str(folder), "t0") == f"sees another folder at {folder} (not the client's)"
    (folder / SHARED_MARKER).write_text("t0")
    assert scratch_refusal(str(folder), "t0") is None
    from allknn.engines.dask.approx_tasks import probe_task

    # a worker that joined after the check
    with pytest.raises(FileNotFoundError, match=r"cannot read .*plan\.range_starts\.npy: the scratch folder "
                                                r"must be on storage every worker shares"):
        probe_task(0, 0, 0, 10, str(folder), JoinSpec(k=3, skip_self=False, block_rows=64, threads=1), 64, 1)
    with pytest.raises(ValueError, match=r"scratch= is the shared folder of the approximate engine on a "
                                         r"cluster \(client= and method='approx'\)"):
        allknn.neighbors(np.ones((10, 3)), 2, scratch=folder)
    with pytest.raises(ValueError, match="scratch= is the shared folder"):
        allknn.neighbors(npy, 2, client=client, scratch=folder)
    assert allknn.cli.main(["run", str(npy), "-o", str(tmp_path / "o"), "--scheduler",
                            client.scheduler.address, "--scratch", str(folder)]) == 1


QUIET_ENVIRONMENT = dict(assignment.split("=") for line in README.read_text().splitlines()
                         if line.startswith("export DASK_") for assignment in line.split()[1:])
"""The README's environment for a cluster of one's own (the settings of
:mod:`allknn.engines.dask.cluster`)."""


def _housekeeping():
    """For ``client.run`` / ``run_on_scheduler``: how often a running worker
    or scheduler checks its event loop, and whether it profiles its tasks
    (nested, so that it travels by value to workers that cannot import the
    tests)."""
    def housekeeping(dask_worker=None, dask_scheduler=None) -> dict:
        server = dask_worker or dask_scheduler
        return {"tick ms": server.periodic_callbacks["tick"].callback_time,
                "profiles": "profile" in server.periodic_callbacks}

    return housekeeping


QUIET = {"tick ms": 1000, "profiles": False}
"""What :data:`QUIET_SETTINGS` make of every process."""


def test_the_cluster_the_cli_starts_has_the_quiet_settings_in_every_process():
    from allknn.engines.dask.cluster import local_cluster

    with local_cluster(1, 1, dashboard_address=None, host="127.0.0.1") as cluster, \
            distributed.Client(cluster) as client:
        assert list(client.run(_housekeeping()).values()) == [QUIET]
        assert client.run_on_scheduler(_housekeeping()) == QUIET
        nanny = next(iter(cluster.workers.values()))  # in this process: it reads the workers' memory
        assert nanny.periodic_callbacks["memory_monitor"].callback_time == 500
        assert client.submit(sum, [1, 2]).result() == 3
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                                  host="127.0.0.1") as cluster, distributed.Client(cluster) as client:
        assert list(client.run(_housekeeping()).values()) != [QUIET]  # Dask's defaults differ


def test_by_hand_scheduler_and_workers_survive_a_killed_worker(tmp_path):
    """The README's way: ``dask scheduler`` and ``dask worker`` started by
    hand, ``allknn run ... --scheduler``; a worker killed mid-run."""
    dask_cli = os.path.join(os.path.dirname(sys.executable), "dask")
    X = clustered_with_duplicates(4000, 16, seed=8)
    np.save(tmp_path / "emb.npy", X)
    file = tmp_path / "scheduler.json"
    env = {**os.environ, **QUIET_ENVIRONMENT}  # the README's settings for a cluster of one's own
    started = [subprocess.Popen([dask_cli, "scheduler", "--host", "127.0.0.1", "--port", "0",
                                 "--dashboard-address", ":0", "--scheduler-file", str(file)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)]
    try:
        deadline = time.monotonic() + 60
        while not file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(file.read_text())["address"]
        started.append(subprocess.Popen([dask_cli, "worker", address, "--nworkers", "2", "--nthreads", "1",
                                         "--no-dashboard"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env=env))
        with distributed.Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
            assert list(client.run(_housekeeping()).values()) == [QUIET, QUIET]
            assert client.run_on_scheduler(_housekeeping()) == QUIET
            run = subprocess.Popen([sys.executable, "-m", "allknn.cli", "run", str(tmp_path / "emb.npy"),
                                    "-k", "6", "-o", str(tmp_path / "out"), "--scheduler", address,
                                    "--task-rows", "128", "-q"])
            busy = []
            while not busy and run.poll() is None and time.monotonic() < deadline + 120:
                busy = [worker for worker, keys in client.processing().items()
                        if any("allknn-pair" in str(key) for key in keys)]
                time.sleep(0.02)
            assert busy, "no pair task ran before the run ended"
            os.kill(client.run(os.getpid, workers=busy[:1])[busy[0]], signal.SIGKILL)  # mid-task
            assert run.wait(timeout=300) == 0
        assert_same_result(allknn.load_result(tmp_path / "out"), allknn.neighbors(X, 6))
    finally:
        for process in reversed(started):
            process.terminate()
            process.wait(timeout=30)


def test_cli_writes_an_approximate_run_as_parts(cluster, client, tmp_path, capsys):
    X = np.load(REAL).astype(np.float32)
    np.save(tmp_path / "real.npy", X)
    want = allknn.neighbors(tmp_path / "real.npy", 10, client=client, method="approx", task_rows=1024)
    out = tmp_path / "out"
    assert allknn.cli.main(["run", str(tmp_path / "real.npy"), "-k", "10", "-o", str(out), "--method",
                            "approx", "--task-rows", "1024", "--scheduler", cluster.scheduler_address]) == 0
    shown = capsys.readouterr().out
    assert f"measured {want.recall}" in shown
    assert_same_result(allknn.load_result(out), want)
    written = {path.name: path.stat().st_mtime_ns for path in out.glob("part-*.parquet")}
    assert allknn.cli.main(["run", str(tmp_path / "real.npy"), "-k", "10", "-o", str(out), "--method",
                            "approx", "--task-rows", "1024", "--scheduler", cluster.scheduler_address,
                            "--resume"]) == 0  # finished: nothing to redo, the same recall
    assert f"measured {want.recall}" in capsys.readouterr().out
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("part-*.parquet")} == written
    assert allknn.cli.main(["run", str(tmp_path / "real.npy"), "-o", str(out), "--method", "approx",
                            "--scheduler", cluster.scheduler_address]) == 1  # an earlier run's folder
