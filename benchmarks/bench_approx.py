"""Approximate kNN graph: recall@k against time, allknn next to its peers.

Every setting runs in its own fresh process on the same ``.npy`` file. True
recall is measured against the exact graph (computed once with allknn's
exact engine, and not timed) and counts a returned neighbour as a hit when
it is at least as similar as the row's exact k-th neighbour (ties count).

Usage (the commands behind BENCHMARKS.md)::

    python benchmarks/bench_approx.py --data ../shared/data/debian_packages_minilm384_f16.npy
    python benchmarks/bench_approx.py --n 200000 --d 100

Peers: hnswlib and usearch (HNSW: build on all rows, then query all rows,
``ef`` varied), faiss ``IndexIVFFlat`` on normalised rows (inner product,
``nprobe`` varied) and pynndescent (its default settings). ``--settings``
replaces the settings of some methods, e.g. fewer for the 1M-row set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SETTINGS = {
    "allknn": [{"recall_target": t} for t in (0.8, 0.9, 0.95, 0.99)],
    "hnswlib": [{"M": 16, "ef": ef} for ef in (16, 32, 64, 128)],
    "faiss-ivf": [{"nprobe": p} for p in (4, 8, 16, 32)],
    "pynndescent": [{}],
    "usearch": [{"connectivity": 16, "ef": ef} for ef in (32, 128)],
}


def _normalised(X: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(X / np.linalg.norm(X, axis=1, keepdims=True), dtype=np.float32)


def _drop_self(found: np.ndarray, k: int) -> np.ndarray:
    rows = np.arange(found.shape[0])[:, None]
    keep = found != rows
    keep[keep.sum(axis=1) > k, -1] = False
    return found[keep].reshape(found.shape[0], k)


def run(method: str, X: np.ndarray, k: int, threads: int, setting: dict) -> tuple[np.ndarray, dict]:
    """One approximate kNN graph (self excluded) and what the method says of it."""
    if method == "allknn":
        import allknn

        result = allknn.neighbors(X, k, method="approx", threads=threads, **setting)
        return result.indices, {"estimate": result.recall.estimate, "interval": result.recall.interval}
    return _peer(method, X, k, threads, setting), {}


def _peer(method: str, X: np.ndarray, k: int, threads: int, setting: dict) -> np.ndarray:
    A = _normalised(X)
    if method == "hnswlib":
        import hnswlib

        index = hnswlib.Index(space="ip", dim=A.shape[1])
        index.init_index(max_elements=A.shape[0], M=setting["M"], ef_construction=200)
        index.set_num_threads(threads)
        index.add_items(A)
        index.set_ef(max(setting["ef"], k + 1))
        found, _ = index.knn_query(A, k=k + 1)
        return _drop_self(found.astype(np.int64), k)
    if method == "faiss-ivf":
        import faiss

        faiss.omp_set_num_threads(threads)
        n_lists = int(4 * np.sqrt(A.shape[0]))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(A.shape[1]), A.shape[1], n_lists,
                                   faiss.METRIC_INNER_PRODUCT)
        index.train(A)
        index.add(A)
        index.nprobe = setting["nprobe"]
        _, found = index.search(A, k + 1)
        return _drop_self(found, k)
    if method == "usearch":
        from usearch.index import Index

        index = Index(ndim=A.shape[1], metric="ip", dtype="f32", connectivity=setting["connectivity"],
                      expansion_add=128, expansion_search=max(setting["ef"], k + 1))
        index.add(np.arange(A.shape[0]), A, threads=threads)
        found = index.search(A, k + 1, threads=threads).keys
        return _drop_self(found.astype(np.int64), k)
    if method == "pynndescent":
        from pynndescent import NNDescent

        wider = setting.get("n_neighbors", k + 1)  # a wider graph, cut to k, for more recall
        index = NNDescent(A, metric="dot", n_neighbors=wider, n_jobs=threads, random_state=0)
        graph, _ = index.neighbor_graph
        return _drop_self(graph[:, : k + 1].astype(np.int64), k)
    raise ValueError(method)


def worker(method: str, data: str, k: int, threads: int, setting: str, out: str) -> None:
    """One timed run in this fresh process."""
    X = np.load(data)
    if method in ("allknn", "pynndescent"):  # compile numba kernels outside the timing
        run(method, X[:9000], 5, threads, json.loads(setting))
    started = time.perf_counter()
    found, said = run(method, X, k, threads, json.loads(setting))
    seconds = time.perf_counter() - started
    np.save(out + ".npy", found)
    Path(out).write_text(json.dumps({"seconds": seconds, **said}))


def true_recall(found: np.ndarray, A: np.ndarray, kth: np.ndarray, measured: np.ndarray) -> float:
    """Share of returned neighbours at least as similar as the exact k-th.

    ``found`` (m, k) and ``kth`` (m,) belong to rows ``measured`` of ``A``
    (all normalised rows)."""
    rows = np.repeat(measured, found.shape[1])
    valid = found.ravel() >= 0
    sims = np.full(found.size, -np.inf, dtype=np.float32)
    sims[valid] = np.einsum("ij,ij->i", A[rows[valid]], A[found.ravel()[valid]])
    return float((sims.reshape(found.shape) >= kth[:, None] - 1e-5).mean())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="a .npy file (default: clustered synthetic rows)")
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=100)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--true-sample", type=int,
                        help="measure true recall on this many seeded random rows (exact for those "
                             "rows only) instead of all rows: for sets too large for the exact join")
    parser.add_argument("--settings", type=json.loads, default={},
                        help='JSON: {"method": [setting, ...]} replacing the defaults')
    parser.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, data, k, threads, setting, out = args.worker
        worker(method, data, int(k), int(threads), setting, out)
        return

    import allknn

    if args.data:
        X = np.load(args.data).astype(np.float32)
        label = f"{Path(args.data).name} {X.shape[0]} x {X.shape[1]}"
    else:
        from allknn.datasets import make_clustered

        X = make_clustered(args.n, args.d, n_clusters=max(200, args.n // 500), seed=0)
        label = f"clustered {args.n} x {args.d}"
    rows = np.arange(X.shape[0])
    started = time.perf_counter()
    if args.true_sample:
        rows = np.sort(np.random.default_rng(0).choice(X.shape[0], args.true_sample, replace=False))
        exact = allknn.neighbors(X, args.k + 1, queries=X[rows], threads=args.threads)
        ranked = np.where(exact.indices == rows[:, None], -np.inf, exact.similarities)
        kth = -np.sort(-ranked, axis=1)[:, args.k - 1]
        exact_note = f"true recall on {rows.size} sampled rows"
    else:
        kth = allknn.neighbors(X, args.k, threads=args.threads).similarities[:, -1]
        exact_note = f"exact allknn {time.perf_counter() - started:.1f} s"
    A = _normalised(X)
    print(f"\n{label}, k={args.k}, {args.threads} threads; {exact_note}")
    print("| method | setting | seconds | true recall@k | allknn's own estimate (95% interval) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "X.npy")
        np.save(data, X)
        for method in args.methods:
            for number, setting in enumerate(args.settings.get(method, SETTINGS[method])):
                out = str(Path(tmp) / f"{method}-{number}.json")
                subprocess.run([sys.executable, __file__, "--worker", method, data, str(args.k),
                                str(args.threads), json.dumps(setting), out], check=True)
                report = json.loads(Path(out).read_text())
                seconds = report["seconds"]
                found = np.load(out + ".npy")
                estimate = "-"
                if "estimate" in report:
                    low, high = report["interval"]
                    estimate = f"{report['estimate']:.4f} ({low:.4f}-{high:.4f})"
                print(f"| {method} | {setting or 'default'} | {seconds:.1f} | "
                      f"{true_recall(found[rows], A, kth, rows):.4f} | {estimate} |", flush=True)


if __name__ == "__main__":
    main()
