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

Every Dask result is checked bit for bit against the local one.

Usage (the command behind BENCHMARKS.md)::

    python benchmarks/bench_dask.py --n 100000 --d 100 --k 10 --repeats 3
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
    warm_path = work / "warm.npy"
    np.save(warm_path, X[:9000])
    for repeat in range(args.repeats):
        # One cluster at a time, started outside the timing and closed before
        # the next run: on 2 cores an idle cluster's processes take CPU too.
        seconds, local = _timed(lambda: allknn.neighbors(X, args.k, threads=args.threads))
        times["local"].append(seconds)
        runs = [(w, "", quiet_cluster) for w in sorted({1, args.workers})]
        runs.insert(len(runs) - 1, (args.workers, ", Dask's default settings", default_cluster))
        for w, label, start in runs:
            with start(w) as cluster, distributed.Client(cluster) as client:
                dask_neighbors(warm_path, args.k, client=client)  # load the kernels outside the timing
                seconds, remote = _timed(lambda c=client: dask_neighbors(path, args.k, client=c,
                                                                         task_rows=args.task_rows))
                times.setdefault(f"dask {w} worker(s){label}", []).append(seconds)
                assert np.array_equal(remote.indices, local.indices), "dask differs from local"
                assert np.array_equal(remote.similarities.view(np.int32), local.similarities.view(np.int32))
                if w != args.workers or label:
                    continue
                out = work / f"out{repeat}"
                seconds, _ = _timed(lambda c=client, o=out: dask_neighbors(path, args.k, client=c, output=o,
                                                                           task_rows=args.task_rows))
                times.setdefault(f"dask {w} worker(s), parts folder", []).append(seconds)
        assert np.array_equal(allknn.load_result(out).indices, local.indices)
        written = _folder_bytes(out)
        shown = ", ".join(f"{name} {values[-1]:.2f} s" for name, values in times.items())
        print(f"run {repeat + 1}: {shown}; parts {written / 1e6:.1f} MB")
    base = statistics.median(times["local"])
    print("\n| run | median s | runs s | time / local |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {median:.2f} | {[round(v, 2) for v in values]} | {median / base:.2f}x |")
    parts = statistics.median(times[f"dask {args.workers} worker(s), parts folder"])
    print(f"\nparts folder: {args.n / parts:,.0f} rows/s, {written / 1e6 / parts:.1f} MB/s of the whole run")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"dask_n{args.n}_d{args.d}_k{args.k}.json").write_text(json.dumps(
        {"args": vars(args), "blas": blas, "times": times, "parts_bytes": written}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
