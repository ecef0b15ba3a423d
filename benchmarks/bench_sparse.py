"""Sparse all-kNN self-join: allknn against sklearn, sparse_dot_topn and chunkdot.

Each method runs in its own fresh process on the same ``.npz`` file (written
with ``scipy.sparse.save_npz``); peak RSS is the child's ``ru_maxrss``.

Usage (the commands behind BENCHMARKS.md)::

    python benchmarks/bench_sparse.py --data user-item --n 100000 --repeats 3
    python benchmarks/bench_sparse.py --data tfidf --repeats 3

Every method runs ``--repeats`` times (medians reported), except peers
whose first run takes over 30 s.

``--data user-item``: a seeded user x item matrix (power-law item
popularity, ``--per-user`` interactions per user, counts 1-4).
``--data tfidf``: scikit-learn's ``TfidfVectorizer`` on the Debian package
descriptions in ``shared/data`` (``tfidf-english``: with English stop words
removed, so no column is dense). chunkdot pins old numpy/numba versions, so
it runs from its own environment (``--chunkdot-python``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy
import scipy.sparse as sp

from bench_exact import _machine

SLOW_PEER_SECONDS = 30.0
"""A peer whose first run takes longer is run once (sklearn, chunkdot)."""

DEBIAN = Path(__file__).resolve().parents[2] / "shared" / "data" / "debian_packages_descriptions.tsv.gz"


def user_item(n_users: int, n_items: int, per_user: int, seed: int = 0) -> sp.csr_matrix:
    """Seeded interactions with power-law item popularity (no empty users)."""
    rng = np.random.default_rng(seed)
    popularity = 1.0 / np.arange(1, n_items + 1) ** 0.9
    rows = np.repeat(np.arange(n_users), per_user)
    cols = rng.choice(n_items, size=rows.size, p=popularity / popularity.sum())
    counts = rng.integers(1, 5, size=rows.size).astype(np.float32)
    matrix = sp.csr_matrix((counts, (rows, cols)), shape=(n_users, n_items))
    matrix.sum_duplicates()
    return matrix


def tfidf(stop_words: str | None = None) -> sp.csr_matrix:
    """TF-IDF rows of the Debian package descriptions (empty ones left out)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    with gzip.open(DEBIAN, "rt", encoding="utf-8") as handle:
        texts = [line.split("\t", 1)[-1] for line in handle]
    matrix = TfidfVectorizer(dtype=np.float32, stop_words=stop_words).fit_transform(texts).tocsr()
    return matrix[np.diff(matrix.indptr) > 0]


def _rows_to_indices(graph: sp.csr_matrix, k: int) -> np.ndarray:
    """Best-first neighbour indices of a top-k graph, self removed."""
    graph = graph.tocsr()
    out = np.full((graph.shape[0], k), -1, dtype=np.int64)
    for row in range(graph.shape[0]):
        start, stop = graph.indptr[row], graph.indptr[row + 1]
        cols, vals = graph.indices[start:stop], graph.data[start:stop]
        keep = cols != row
        cols, vals = cols[keep], vals[keep]
        best = cols[np.lexsort((cols, -vals))][:k]
        out[row, : best.size] = best
    return out


def run_allknn(X: sp.csr_matrix, k: int, threads: int) -> np.ndarray:
    import allknn

    return allknn.neighbors(X, k, threads=threads).indices


def run_sklearn(X: sp.csr_matrix, k: int, threads: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    model = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute", n_jobs=-1).fit(X)
    return model.kneighbors(return_distance=False)


def run_sparse_dot_topn(X: sp.csr_matrix, k: int, threads: int) -> np.ndarray:
    from sklearn.preprocessing import normalize
    from sparse_dot_topn import sp_matmul_topn

    A = normalize(X).astype(np.float32).tocsr()
    return _rows_to_indices(sp_matmul_topn(A, A.T.tocsr(), top_n=k + 1, n_threads=threads), k)


def run_chunkdot(X: sp.csr_matrix, k: int, threads: int) -> np.ndarray:
    from chunkdot import cosine_similarity_top_k

    return _rows_to_indices(cosine_similarity_top_k(X, top_k=k + 1), k)


METHODS = {"allknn": run_allknn, "sklearn": run_sklearn, "sparse_dot_topn": run_sparse_dot_topn,
           "chunkdot": run_chunkdot}


def worker(method: str, data: str, k: int, threads: int, out: str) -> None:
    """One timed run in this fresh process; writes JSON and the indices."""
    X = sp.load_npz(data).tocsr()
    if method == "allknn":
        run_allknn(X[:2000], 5, threads)  # compile kernels outside the timing
    started = time.perf_counter()
    found = METHODS[method](X, k, threads)
    seconds = time.perf_counter() - started
    np.save(out + ".npy", found)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps({"seconds": seconds, "peak_rss_mb": peak_mb}))


def _agreement(found: np.ndarray, truth: np.ndarray) -> float:
    return sum(np.intersect1d(a, b).size for a, b in zip(found, truth, strict=True)) / truth.size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", choices=("user-item", "tfidf", "tfidf-english"), default="user-item",
                        help="tfidf-english: English stop words removed (very sparse tiles)")
    parser.add_argument("--n", type=int, default=100_000, help="users (user-item)")
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--per-user", type=int, default=50)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="runs of allknn")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--chunkdot-python", default=sys.executable,
                        help="interpreter of an environment with chunkdot installed")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, data, k, threads, out = args.worker
        worker(method, data, int(k), int(threads), out)
        return

    if args.data == "user-item":
        X = user_item(args.n, args.items, args.per_user)
    else:
        X = tfidf("english" if args.data == "tfidf-english" else None)
    label = f"{args.data} {X.shape[0]} x {X.shape[1]}, {X.nnz} stored values"
    runs: dict[str, list[dict]] = {}
    answers: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "X.npz")
        sp.save_npz(data, X)
        for method in args.methods:
            python = args.chunkdot_python if method == "chunkdot" else sys.executable
            for rep in range(args.repeats):
                out = str(Path(tmp) / f"{method}-{rep}.json")
                subprocess.run([python, __file__, "--worker", method, data, str(args.k), str(args.threads),
                                out], check=True)
                runs.setdefault(method, []).append(json.loads(Path(out).read_text()))
                answers[method] = np.load(out + ".npy")
                print(f"{method} run {rep + 1}: {runs[method][-1]}", file=sys.stderr, flush=True)
                if method != "allknn" and runs[method][0]["seconds"] > SLOW_PEER_SECONDS:
                    break

    base = statistics.median(r["seconds"] for r in runs["allknn"]) if "allknn" in runs else None
    print(f"\n{label}, k={args.k}, {args.threads} threads")
    print(json.dumps({**_machine(), "scipy": scipy.__version__}))
    print("| method | median s | runs s | peak RSS MB | time / allknn | agreement with allknn |")
    print("|---|---|---|---|---|---|")
    for method, rs in runs.items():
        median = statistics.median(r["seconds"] for r in rs)
        agreement = _agreement(answers[method], answers["allknn"]) if base else float("nan")
        ratio = f"{median / base:.2f}x" if base else "-"
        print(f"| {method} | {median:.2f} | {[round(r['seconds'], 2) for r in rs]} | "
              f"{max(r['peak_rss_mb'] for r in rs):.0f} | {ratio} | {agreement:.4f} |")


if __name__ == "__main__":
    main()
