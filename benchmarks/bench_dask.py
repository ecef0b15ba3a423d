"""The exact self-join on a local Dask cluster against the local engine, same run.

Measures (medians of ``--repeats`` runs, alternating):

- the local engine on ``--threads`` threads (an in-memory array);
- the Dask engine on a ``LocalCluster`` of 1 and of ``--workers`` worker
  processes with one thread each, reading the ``.npy`` file, the result
  gathered to the client (overhead over the local engine, and scaling);
- the same run writing a parts folder (``output=``), for the throughput of
  the parquet output (rows and MB per second of the run).

Each cluster is started before its runs and closed after them, outside the
timing, so that no idle cluster shares the machine's cores with a timed run.
The clusters have the settings ``allknn run --workers N`` starts its own
with (:mod:`allknn.engines.dask.cluster`); the 2-worker run is also timed
on a cluster of Dask's default settings.

Every Dask result is checked bit for bit against the local one. Each Dask
run's task stream gives its idle worker-seconds (each worker's wall time
less its tasks' time, summed) and its task seconds, far less noisy than
the wall times on a shared machine.

With ``--approx FILE`` (for example the Debian rows of ``shared/data``),
the approximate engine also runs on the 2-worker cluster, on that file.
With ``--query-form``, the query form (every row of the file against the
file, itself included) runs locally and on the 2-worker cluster too, its
ratio taken to the local query form.

Usage (the commands behind BENCHMARKS.md)::

    python benchmarks/bench_dask.py --n 100000 --d 100 --k 10 --repeats 3 \
        --approx shared/data/debian_packages_minilm384_f16.npy
    python benchmarks/bench_dask.py --n 100000 --d 100 --k 10 --repeats 3 --query-form \
        --task-rows 4096
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def _timed(run) -> tuple[float, object]:
    started = time.perf_counter()
    value = run()
    return time.perf_counter() - started, value


def _streamed(client, run) -> tuple[float, object, float, float]:
    """:func:`_timed` on a cluster, with the run's idle worker-seconds and task seconds."""
    import distributed

    with distributed.get_task_stream(client) as stream:
        seconds, value = _timed(run)
    busy: dict[str, float] = {}
    for task in stream.data:
        for span in task["startstops"]:
            if span["action"] == "compute":
                busy[task["worker"]] = busy.get(task["worker"], 0.0) + span["stop"] - span["start"]
    workers = len(client.nthreads())
    return seconds, value, workers * seconds - sum(busy.values()), sum(busy.values())


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.parquet"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2, help="threads of the local engine")
    parser.add_argument("--workers", type=int, default=2, help="most worker processes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--task-rows", type=int, default=None)
    parser.add_argument("--query-form", action="store_true",
                        help="also time the query form (X against itself), locally and on the cluster")
    parser.add_argument("--approx", default=None, metavar="FILE",
                        help="also run the approximate engine on this .npy on the 2-worker cluster")
    args = parser.parse_args()

    import distributed
    from threadpoolctl import threadpool_info

    import allknn
    from allknn.datasets import make_clustered
    from allknn.engines.dask import dask_neighbors
    from allknn.engines.dask.cluster import local_cluster

    def quiet_cluster(workers: int):  # as allknn run --workers starts it
        return local_cluster(workers, 1, dashboard_address=None, host="127.0.0.1", silence_logs=logging.ERROR)

    def default_cluster(workers: int):
        return distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=None, host="127.0.0.1", silence_logs=logging.ERROR)

    work = Path(tempfile.mkdtemp(prefix="allknn-bench-dask-"))
    X = make_clustered(args.n, args.d, seed=0)
    path = work / "x.npy"
    np.save(path, X)
    allknn.neighbors(X[:9000], args.k, threads=args.threads)  # compile outside the timing
    blas = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}" for i in threadpool_info()
            if i.get("user_api") == "blas"]
    print(f"# {platform.processor() or platform.machine()}, BLAS {blas}, n={args.n} d={args.d} k={args.k}")

    times: dict[str, list[float]] = {"local": []}
    idle: dict[str, list[float]] = {}
    tasks: dict[str, list[float]] = {}
    approx_results = []

    def record(name: str, measured: tuple[float, object, float, float]) -> object:
        seconds, value, idle_seconds, task_seconds = measured
        times.setdefault(name, []).append(seconds)
        idle.setdefault(name, []).append(idle_seconds)
        tasks.setdefault(name, []).append(task_seconds)
        return value

    warm_path = work / "warm.npy"
    np.save(warm_path, X[:9000])
    for repeat in range(args.repeats):
        # One cluster at a time, started outside the timing and closed before
        # the next run: on 2 cores an idle cluster's processes take CPU too.
        seconds, local = _timed(lambda: allknn.neighbors(X, args.k, threads=args.threads))
        times["local"].append(seconds)
        if args.query_form:
            seconds, local_query = _timed(lambda: allknn.neighbors(X, args.k, queries=X.copy(),
                                                                   threads=args.threads))
            times.setdefault("local, query form", []).append(seconds)
        runs = [(w, "", quiet_cluster) for w in sorted({1, args.workers})]
        runs.insert(len(runs) - 1, (args.workers, ", Dask's default settings", default_cluster))
        for w, label, start in runs:
            with start(w) as cluster, distributed.Client(cluster) as client:
                # load the kernels outside the timing: 3 blocks, so pairs, floors and merges run too
                dask_neighbors(warm_path, args.k, client=client, task_rows=3000)

                def exact(c=client, **options):
                    return dask_neighbors(path, args.k, client=c, task_rows=args.task_rows, **options)

                remote = record(f"dask {w} worker(s){label}", _streamed(client, exact))
                assert np.array_equal(remote.indices, local.indices), "dask differs from local"
                assert np.array_equal(remote.similarities.view(np.int32), local.similarities.view(np.int32))
                if w != args.workers or label:
                    continue
                out = work / f"out{repeat}"
                record(f"dask {w} worker(s), parts folder", _streamed(client, lambda o=out: exact(output=o)))
                if args.query_form:
                    queried = record(f"dask {w} worker(s), query form",
                                     _streamed(client, lambda: exact(queries=path)))
                    assert np.array_equal(queried.indices, local_query.indices), "dask differs from local"
                    assert np.array_equal(queried.similarities.view(np.int32),
                                          local_query.similarities.view(np.int32))
                if args.approx:
                    found = _streamed(client, lambda c=client: allknn.neighbors(args.approx, args.k, client=c,
                                                                                method="approx"))
                    approx_results.append(record(f"dask {w} worker(s), approximate, {Path(args.approx).name}",
                                                 found))
        assert np.array_equal(allknn.load_result(out).indices, local.indices)
        written = _folder_bytes(out)
        shown = ", ".join(f"{name} {values[-1]:.2f} s" for name, values in times.items())
        print(f"run {repeat + 1}: {shown}; parts {written / 1e6:.1f} MB")
    base = statistics.median(times["local"])
    print("\n| run | median s | runs s | time / local | idle worker-s, median | task s, median |")
    print("|---|---|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        reference = statistics.median(times["local, query form"]) if "query form" in name else base
        ratio = f"{median / reference:.2f}x" if "approximate" not in name else "(another input)"
        stream = "- | -"
        if name in idle:
            stream = f"{statistics.median(idle[name]):.2f} | {statistics.median(tasks[name]):.2f}"
        print(f"| {name} | {median:.2f} | {[round(v, 2) for v in values]} | {ratio} | {stream} |")
    for found in approx_results[1:]:
        assert np.array_equal(found.indices, approx_results[0].indices), "approximate runs differ"
    if approx_results:
        print(f"\napproximate: {approx_results[0].recall}, {approx_results[0].params['probes']} probes of "
              f"{approx_results[0].params['cells']} cells")
    parts = statistics.median(times[f"dask {args.workers} worker(s), parts folder"])
    print(f"\nparts folder: {args.n / parts:,.0f} rows/s, {written / 1e6 / parts:.1f} MB/s of the whole run")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"dask_n{args.n}_d{args.d}_k{args.k}.json").write_text(json.dumps(
        {"args": vars(args), "blas": blas, "times": times, "idle": idle, "tasks": tasks,
         "parts_bytes": written}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
