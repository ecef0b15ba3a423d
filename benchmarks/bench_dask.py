"""The exact self-join on a local Dask cluster against the local engine, same run.

Measures (medians of ``--repeats`` runs, alternating):

- the local engine on ``--threads`` threads (an in-memory array);
- the Dask engine on a ``LocalCluster`` of 1 and of ``--workers`` worker
  processes with one thread each, reading the ``.npy`` file, the result
  gathered to the client (overhead over the local engine, and scaling);
- the same run writing a parts folder (``output=``), for the throughput of
  the parquet output (rows and MB per second of the run).

Every Dask result is checked bit for bit against the local one.

Usage (the command behind BENCHMARKS.md)::

    python benchmarks/bench_dask.py --n 100000 --d 100 --k 10 --repeats 3
"""

from __future__ import annotations

import argparse
import json
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

    work = Path(tempfile.mkdtemp(prefix="allknn-bench-dask-"))
    X = make_clustered(args.n, args.d, seed=0)
    path = work / "x.npy"
    np.save(path, X)
    allknn.neighbors(X[:9000], args.k, threads=args.threads)  # compile outside the timing
    blas = [f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')}" for i in threadpool_info()
            if i.get("user_api") == "blas"]
    print(f"# {platform.processor() or platform.machine()}, BLAS {blas}, n={args.n} d={args.d} k={args.k}")

    times: dict[str, list[float]] = {"local": []}
    local = None
    clusters = {w: distributed.LocalCluster(n_workers=w, threads_per_worker=1, processes=True,
                                            dashboard_address=None, host="127.0.0.1")
                for w in sorted({1, args.workers})}
    clients = {w: distributed.Client(cluster) for w, cluster in clusters.items()}
    try:
        for client in clients.values():  # compile on the workers outside the timing
            dask_neighbors(path, args.k, client=client, task_rows=4096)
        for repeat in range(args.repeats):
            seconds, local = _timed(lambda: allknn.neighbors(X, args.k, threads=args.threads))
            times["local"].append(seconds)
            for w, client in clients.items():
                seconds, remote = _timed(lambda c=client: dask_neighbors(path, args.k, client=c,
                                                                         task_rows=args.task_rows))
                times.setdefault(f"dask {w} worker(s)", []).append(seconds)
                assert np.array_equal(remote.indices, local.indices), "dask differs from local"
                assert np.array_equal(remote.similarities.view(np.int32), local.similarities.view(np.int32))
            out = work / f"out{repeat}"
            client = clients[args.workers]
            seconds, _ = _timed(lambda c=client, o=out: dask_neighbors(path, args.k, client=c, output=o,
                                                                       task_rows=args.task_rows))
            times.setdefault(f"dask {args.workers} worker(s), parts folder", []).append(seconds)
            assert np.array_equal(allknn.load_result(out).indices, local.indices)
            written = _folder_bytes(out)
            shown = ", ".join(f"{name} {values[-1]:.2f} s" for name, values in times.items())
            print(f"run {repeat + 1}: {shown}; parts {written / 1e6:.1f} MB")
    finally:
        for client in clients.values():
            client.close()
        for cluster in clusters.values():
            cluster.close()
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
