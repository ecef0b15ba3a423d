"""The exact kNN graph on a GPU: allknn's torch engine against its GPU peers, in one run.

Prepared for the GPU machine (one H200): one script, bounded in time, that
prints a markdown table and writes ``benchmarks/results/gpu-*.json``.

Usage (the commands behind BENCHMARKS.md)::

    python benchmarks/bench_gpu.py --n 1000000 --d 768 --k 10 --repeats 3
    python benchmarks/bench_gpu.py --n 10000000 --d 100 --k 10 --repeats 1 --methods allknn-bf16 torch-fp32
    python benchmarks/bench_gpu.py --n 20000 --d 64 --device cpu --repeats 1   # a dry run on CPU torch

Methods:

- ``allknn-<precision>``: ``allknn.neighbors(X, k, device=..., precision=...)``,
  exact; reported with the share of pairs nominated to the host (the rest
  were settled on the device by the certificate) and the peak device
  memory.
- ``torch-fp32``: the plain recipe, normalised rows times the corpus in
  row blocks of 8,192 (TF32 off) and ``torch.topk``; not certified.
- ``faiss``: ``faiss.knn_gpu`` on normalised rows, if faiss has GPU support.
- ``cuvs``: ``cuvs.neighbors.brute_force``, if cuVS is installed.

Before timing, allknn's result on the first ``--check-rows`` rows is
checked bit for bit against the CPU engine (the certificate's promise),
and every peer's recall@k on a sample of rows is measured against exact
neighbours. The floor column is the tensor-core time of the symmetric
schedule's products alone (n^2 d flops at the device's peak for that
precision: H200 dense 989 TFLOP/s bf16/fp16, 494 tf32, 67 fp32).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
PEAK_TFLOPS = {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0}
"""Dense tensor throughput of an H200 (NVIDIA's datasheet, without sparsity)."""
RECALL_ROWS = 2000


def _normalised(torch, X: np.ndarray, device: str):
    rows = torch.from_numpy(X).to(device)
    return rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True)


def run_allknn(X, k, device, precision, counts):
    import allknn
    import allknn.engines.torch.plans as plans

    offer = plans.offer_nominees

    def counting(rows, *rest):
        counts.append(rows.size)
        return offer(rows, *rest)

    plans.offer_nominees = counting
    try:
        return allknn.neighbors(X, k, backend="torch", device=device, precision=precision).indices
    finally:
        plans.offer_nominees = offer


def run_torch(X, k, device):
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    rows = _normalised(torch, X, device)
    out = []
    for start in range(0, rows.shape[0], 8192):
        values = rows[start : start + 8192] @ rows.T
        values[torch.arange(values.shape[0]), torch.arange(start, start + values.shape[0])] = -2.0
        out.append(torch.topk(values, k, dim=1).indices.cpu())
    return torch.cat(out).numpy()


def run_faiss(X, k, device):
    import faiss

    A = X / np.linalg.norm(X, axis=1, keepdims=True)
    _, indices = faiss.knn_gpu(faiss.StandardGpuResources(), A, A, k + 1, metric=faiss.METRIC_INNER_PRODUCT)
    return indices[:, 1:]


def run_cuvs(X, k, device):
    import cupy
    from cuvs.neighbors import brute_force

    A = cupy.asarray(X / np.linalg.norm(X, axis=1, keepdims=True))
    index = brute_force.build(A, metric="inner_product")
    _, indices = brute_force.search(index, A, k + 1)
    return cupy.asnumpy(indices)[:, 1:]


def recall(found: np.ndarray, X: np.ndarray, k: int, rows: np.ndarray) -> float:
    """recall@k of ``found`` on ``rows`` against exact float64 neighbours."""
    A = X.astype(np.float64)
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    sims = A[rows] @ A.T
    sims[np.arange(rows.size), rows] = -np.inf
    truth = np.argpartition(-sims, k, axis=1)[:, :k]
    return float(np.mean([len(set(found[r][:k]) & set(t)) / k for r, t in zip(rows, truth, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--check-rows", type=int, default=20_000)
    parser.add_argument("--methods", nargs="+", default=["allknn-bf16", "allknn-tf32", "allknn-fp32",
                                                          "torch-fp32", "faiss", "cuvs"])
    args = parser.parse_args()

    import torch

    import allknn
    from allknn.datasets import make_clustered

    X = make_clustered(args.n, args.d, seed=0)
    sample = X[: args.check_rows]
    for precision in ("bf16", "tf32", "fp16", "fp32"):
        got = allknn.neighbors(sample, args.k, backend="torch", device=args.device, precision=precision)
        expected = allknn.neighbors(sample, args.k)
        same = np.array_equal(got.indices, expected.indices) and np.array_equal(got.similarities,
                                                                                expected.similarities)
        print(f"check {precision}: {'bit-identical' if same else 'DIFFERENT'} to the CPU engine on "
              f"{sample.shape[0]} rows", flush=True)
    rows = np.random.default_rng(1).choice(args.n, min(RECALL_ROWS, args.n), replace=False)
    cuda = args.device.startswith("cuda")
    table = []
    for method in args.methods:
        times, extra = [], {}
        try:
            for _ in range(args.repeats):
                counts = []
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                started = time.perf_counter()
                if method.startswith("allknn-"):
                    found = run_allknn(X, args.k, args.device, method.split("-")[1], counts)
                elif method == "torch-fp32":
                    found = run_torch(X, args.k, args.device)
                elif method == "faiss":
                    found = run_faiss(X, args.k, args.device)
                else:
                    found = run_cuvs(X, args.k, args.device)
                if cuda:
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - started)
                if counts:
                    extra["nominated_share"] = sum(counts) / (args.n * (args.n - 1) / 2)
                if cuda:
                    extra["peak_device_gb"] = torch.cuda.max_memory_allocated() / 2**30
        except ImportError as exc:
            print(f"{method}: not run ({exc})", flush=True)
            continue
        precision = method.split("-")[1] if "-" in method else "fp32"
        floor = args.n * args.n * args.d / (PEAK_TFLOPS[precision] * 1e12)  # n^2/2 pairs, 2 flops each
        row = {"method": method, "median_s": statistics.median(times), "runs_s": times,
               "recall": recall(found, X, args.k, rows), "floor_s": floor, **extra}
        table.append(row)
        print(json.dumps(row), flush=True)
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"gpu-{args.n}x{args.d}-k{args.k}-{int(time.time())}.json"
    out.write_text(json.dumps({"device": device_name, "n": args.n, "d": args.d, "k": args.k, "rows": table},
                              indent=1))
    print(f"\n{device_name}, {args.n} x {args.d}, k = {args.k}, medians of {args.repeats}\n")
    print("| method | median s | recall@k | floor s | pairs to host | peak device GB |")
    print("|---|---|---|---|---|---|")
    for row in table:
        share = f"{row['nominated_share']:.2%}" if "nominated_share" in row else "-"
        peak = f"{row['peak_device_gb']:.1f}" if "peak_device_gb" in row else "-"
        print(f"| {row['method']} | {row['median_s']:.2f} | {row['recall']:.4f} | {row['floor_s']:.2f} | "
              f"{share} | {peak} |")


if __name__ == "__main__":
    main()
