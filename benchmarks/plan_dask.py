"""Plan a large run on a Dask cluster: a simulation driven by measured task speed.

Given the measured speed of one worker thread on pair tasks (pairs x
dimensions per second, from ``bench_dask.py`` on 1 worker), the scheduler's
cost per task and the storage bandwidth per machine, it simulates the exact
self-join of ``--n`` rows on ``--machines`` machines of ``--cores`` cores:
list scheduling of the block-pair tasks on the cores, each task reading its
two blocks and then computing, the scheduler dispatching one task at a time.
It also simulates the approximate engine as built on the cluster
(:mod:`allknn.engines.dask.approx`), stage after stage (each a barrier):
assignment (each row block against the centroids), the two-step shuffle
and the regrouping by range of cells (a task block read and written per
task), the probing (a range's rows against the cells they probe: ``probes``
cells of ``sqrt(n) / 2`` rows per row, reading about ``--union`` times
``probes`` cells per task), and the finish. The breadth a recall needs is
data-dependent: give ``--probes`` (the Debian rows needed 67 of 504 cells
for 0.95 without refinement).

Usage (the commands behind BENCHMARKS.md)::

    python benchmarks/plan_dask.py --n 100000000 --d 100 --pair-dims-per-second 1.8e10
    python benchmarks/plan_dask.py --n 100000000 --d 100 --pair-dims-per-second 1.8e10 \
        --approx-only --probes 64 256 1024
"""

from __future__ import annotations

import argparse
import heapq
import math


def simulate(n_tasks: int, task_seconds: float, read_seconds: float, slots: int,
             dispatch_seconds: float) -> float:
    """Makespan of ``n_tasks`` equal tasks on ``slots`` cores, one dispatch
    at a time (the scheduler), each task reading then computing."""
    free = [0.0] * slots
    heapq.heapify(free)
    clock = 0.0  # the scheduler's time
    end = 0.0
    for _ in range(n_tasks):
        start = max(heapq.heappop(free), clock)
        clock = start + dispatch_seconds
        finish = start + read_seconds + task_seconds
        heapq.heappush(free, finish)
        end = max(end, finish)
    return end


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000_000)
    parser.add_argument("--d", type=int, default=100)
    parser.add_argument("--pair-dims-per-second", type=float, required=True,
                        help="measured speed of one worker thread on pair tasks")
    parser.add_argument("--cores", type=int, default=16)
    parser.add_argument("--machines", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--task-rows", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--dispatch-ms", type=float, default=1.0,
                        help="scheduler time per task (Dask: about 1 ms)")
    parser.add_argument("--read-mb-per-s", type=float, default=500.0, help="storage bandwidth per machine")
    parser.add_argument("--simulate-tasks", type=int, default=2_000_000,
                        help="simulate at most this many tasks, scaling the rest")
    parser.add_argument("--probes", type=int, nargs="+", default=[256],
                        help="cells each row probes in the approximate engine")
    parser.add_argument("--union", type=float, default=2.0,
                        help="cells a probing task reads, as a multiple of probes (its rows' probes overlap)")
    parser.add_argument("--approx-only", action="store_true")
    args = parser.parse_args()

    rate = args.pair_dims_per_second
    print(f"# n={args.n:,} d={args.d}, one thread: {rate:.2e} pair-dims/s, dispatch {args.dispatch_ms} "
          f"ms/task, {args.read_mb_per_s:.0f} MB/s per machine")
    print("\n| engine | task rows | tasks | MB read / task | machines | scheduler busy | expected time |")
    print("|---|---|---|---|---|---|---|")
    for rows in [] if args.approx_only else args.task_rows:
        blocks = math.ceil(args.n / rows)
        tasks = blocks * (blocks + 1) // 2
        read_mb = 2 * rows * args.d * 4 / 1e6
        compute = rows * rows * args.d / rate
        for machines in args.machines:
            slots = machines * args.cores
            read = read_mb / (args.read_mb_per_s / args.cores)  # cores share their machine's bandwidth
            simulated = min(tasks, args.simulate_tasks)
            seconds = simulate(simulated, compute, read, slots, args.dispatch_ms / 1e3) * tasks / simulated
            busy = tasks * args.dispatch_ms / 1e3
            print(f"| exact | {rows:,} | {tasks:,} | {read_mb:.1f} | {machines} | {busy / 3600:.1f} h | "
                  f"{seconds / 3600:.1f} h |")
    for probes in args.probes:
        for machines in args.machines:
            stages = approx_stages(args.n, args.d, probes, args.task_rows[0], rate, args.read_mb_per_s,
                                   args.cores, args.union)
            slots = machines * args.cores
            seconds = sum(simulate(min(tasks, args.simulate_tasks), compute, read, slots,
                                   args.dispatch_ms / 1e3) * tasks / min(tasks, args.simulate_tasks)
                          for tasks, compute, read in stages.values())
            tasks = sum(tasks for tasks, _, _ in stages.values())
            probe_mb = stages["probe"][2] * args.read_mb_per_s / args.cores
            busy = tasks * args.dispatch_ms / 3.6e6
            print(f"| approx, {probes} probes of {2 * math.isqrt(args.n):,} cells | {args.task_rows[0]:,} | "
                  f"{tasks:,} | {probe_mb:.0f} (probing) | {machines} | {busy:.2f} h | "
                  f"{seconds / 60:.0f} min |")


def approx_stages(n: int, d: int, probes: int, rows: int, rate: float, read_mb_per_s: float, cores: int,
                  union: float) -> dict[str, tuple[int, float, float]]:
    """The approximate engine's stages: (tasks, compute s, read+write s) per task."""
    blocks = math.ceil(n / rows)
    cells = 2 * math.isqrt(n)
    cell_rows = n / cells
    block_mb = rows * d * 4 / 1e6
    per_core = read_mb_per_s / cores  # cores share their machine's bandwidth
    spread_tasks = (math.isqrt(blocks - 1) + 1) ** 2
    probe_read_mb = min(union * probes, cells) * cell_rows * d * 4 / 1e6
    return {
        "assign": (blocks, rows * cells * d / rate, 2 * block_mb / per_core),
        "spread": (spread_tasks, 0.0, 2 * block_mb * blocks / spread_tasks / per_core),
        "regroup": (blocks, 0.0, 2 * block_mb / per_core),
        "probe": (blocks, rows * probes * cell_rows * d / rate, (block_mb + probe_read_mb) / per_core),
        "finish": (2 * blocks, 0.0, rows * 10 * 8 * 2 / 1e6 / per_core),
    }

if __name__ == "__main__":
    main()
