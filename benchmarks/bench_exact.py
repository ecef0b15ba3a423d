"""Exact all-kNN self-join: allknn against its peers and the matrix-product floor.

Every method runs in its own fresh subprocess on the same data file, so the
peak RSS of each is its own (``ru_maxrss`` of the child, which includes the
interpreter and its libraries). Results go to ``benchmarks/results/`` as
JSON and are printed as a markdown table with medians and ratios.

Usage (the command behind BENCHMARKS.md)::

    python benchmarks/bench_exact.py --n 100000 --d 100 --k 10 --repeats 5 \
        --methods allknn floor faiss numpy sklearn

Peers: faiss ``IndexFlatIP`` on normalised rows, scikit-learn
``NearestNeighbors(metric="cosine", algorithm="brute", n_jobs=-1)``, numpy
row blocks times the whole matrix with ``argpartition``, and the *floor*:
the products of the same upper-triangle tiles allknn computes (blocks of
``PREFERRED_BLOCK_ROWS`` rows, single-threaded BLAS per tile, one tile per
core at a time) with no selection at all.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from allknn._memory import PREFERRED_BLOCK_ROWS as BLOCK

RESULTS = Path(__file__).parent / "results"


def _normalised(X: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(X / np.linalg.norm(X, axis=1, keepdims=True), dtype=np.float32)


def run_allknn(X: np.ndarray, k: int, threads: int) -> np.ndarray:
    import allknn

    return allknn.neighbors(X, k, threads=threads).indices


def run_floor(X: np.ndarray, k: int, threads: int) -> None:
    from threadpoolctl import threadpool_limits

    A = _normalised(X)
    starts = range(0, A.shape[0], BLOCK)
    tiles = [(i, j) for i in starts for j in starts if i <= j]
    buffers = [np.empty(BLOCK * BLOCK, np.float32) for _ in range(threads)]

    def work(worker: int) -> None:
        for i, j in tiles[worker::threads]:
            a, b = A[i : i + BLOCK], A[j : j + BLOCK]
            np.matmul(a, b.T, out=buffers[worker][: a.shape[0] * b.shape[0]].reshape(a.shape[0], -1))

    with threadpool_limits(1, "blas"), ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(threads)))


def run_faiss(X: np.ndarray, k: int, threads: int) -> np.ndarray:
    import faiss

    faiss.omp_set_num_threads(threads)
    A = _normalised(X)
    index = faiss.IndexFlatIP(A.shape[1])
    index.add(A)
    _, found = index.search(A, k + 1)
    return _drop_self(found, k)


def run_sklearn(X: np.ndarray, k: int, threads: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    model = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute", n_jobs=-1).fit(X)
    return model.kneighbors(return_distance=False)  # X=None: self excluded


def run_numpy(X: np.ndarray, k: int, threads: int) -> np.ndarray:
    A = _normalised(X)
    out = np.empty((A.shape[0], k), dtype=np.int64)
    rows = np.arange(A.shape[0])
    for start in range(0, A.shape[0], BLOCK):
        S = A[start : start + BLOCK] @ A.T
        S[np.arange(S.shape[0]), rows[start : start + BLOCK]] = -np.inf
        part = np.argpartition(-S, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(S, part, 1), axis=1, kind="stable")
        out[start : start + BLOCK] = np.take_along_axis(part, order, 1)
    return out


def _drop_self(found: np.ndarray, k: int) -> np.ndarray:
    """faiss returns the row itself among its k + 1 hits: remove it."""
    rows = np.arange(found.shape[0])[:, None]
    keep = found != rows
    keep[keep.sum(axis=1) > k, -1] = False  # self not found: drop the last
    return found[keep].reshape(found.shape[0], k)


METHODS = {"allknn": run_allknn, "floor": run_floor, "faiss": run_faiss,
           "sklearn": run_sklearn, "numpy": run_numpy}


def worker(method: str, data: str, k: int, threads: int, out: str) -> None:
    """Run one method once in this (fresh) process and write a JSON line."""
    X = np.load(data)
    if method == "allknn":  # compile (or load cached) kernels outside the timing
        run_allknn(X[:2048], 5, threads)
    started = time.perf_counter()
    found = METHODS[method](X, k, threads)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if found is not None:
        np.save(out + ".npy", found)
    Path(out).write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


def _machine() -> dict:
    from threadpoolctl import threadpool_info

    import allknn

    blas = [
        {key: info.get(key) for key in ("internal_api", "version", "architecture", "num_threads")}
        for info in threadpool_info() if info["user_api"] == "blas"
    ]
    return {"python": platform.python_version(), "machine": platform.machine(),
            "processor": _cpu_name(), "cpus": os.cpu_count(), "numpy": np.__version__,
            "allknn": allknn.__version__, "blas": blas,
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE")}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    hits = sum(np.intersect1d(a, b).size for a, b in zip(found, truth, strict=True))
    return hits / truth.size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--d", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--data", help="a .npy file to use instead of clustered synthetic data")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=3, help="runs of allknn and floor")
    parser.add_argument("--peer-repeats", type=int, default=1, help="runs of each peer")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--worker", nargs=5, metavar=("METHOD", "DATA", "K", "THREADS", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, data, k, threads, out = args.worker
        worker(method, data, int(k), int(threads), out)
        return

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "X.npy"
        if args.data:
            X = np.load(args.data).astype(np.float32)
            label = f"{Path(args.data).name} {X.shape[0]} x {X.shape[1]}"
        else:
            from allknn.datasets import make_clustered

            X = make_clustered(args.n, args.d, seed=0)
            label = f"clustered {args.n} x {args.d}"
        np.save(data, X)
        runs: dict[str, list[dict]] = {}
        answers: dict[str, np.ndarray] = {}
        for method in args.methods:
            repeats = args.repeats if method in ("allknn", "floor") else args.peer_repeats
            for rep in range(repeats):
                out = str(Path(tmp) / f"{method}-{rep}.json")
                subprocess.run([sys.executable, __file__, "--worker", method, str(data), str(args.k),
                                str(args.threads), out], check=True)
                runs.setdefault(method, []).append(json.loads(Path(out).read_text()))
                if Path(out + ".npy").exists():
                    answers[method] = np.load(out + ".npy")
                print(f"{method} run {rep + 1}/{repeats}: {runs[method][-1]}", file=sys.stderr, flush=True)

    summary = {
        method: {"median_s": statistics.median(r["seconds"] for r in rs),
                 "runs_s": [round(r["seconds"], 3) for r in rs],
                 "peak_rss_mb": max(r["peak_rss_mb"] for r in rs)}
        for method, rs in runs.items()
    }
    if "allknn" in answers:
        for method, found in answers.items():
            summary[method]["agreement_with_allknn"] = round(_recall(found, answers["allknn"]), 5)
    report = {"data": label, "k": args.k, "threads": args.threads, "machine": _machine(),
              "command": " ".join(sys.argv), "results": summary}
    RESULTS.mkdir(exist_ok=True)
    methods = "-".join(args.methods)
    name = f"exact-{label.split()[0]}-{X.shape[0]}x{X.shape[1]}-k{args.k}-{methods}.json"
    (RESULTS / name).write_text(json.dumps(report, indent=2))
    print(f"\n{label}, k={args.k}, {args.threads} threads")
    print("| method | median s | runs s | peak RSS MB | time / allknn | agreement with allknn |")
    print("|---|---|---|---|---|---|")
    base = summary.get("allknn", {}).get("median_s")
    for method, row in summary.items():
        ratio = f"{row['median_s'] / base:.2f}x" if base else "-"
        print(f"| {method} | {row['median_s']:.2f} | {row['runs_s']} | {row['peak_rss_mb']:.0f} | {ratio} | "
              f"{row.get('agreement_with_allknn', '-')} |")


if __name__ == "__main__":
    main()
