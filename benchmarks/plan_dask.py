"""Plan a large run on a Dask cluster: a simulation driven by measured task speed.

Given the measured speed of one worker thread on pair tasks (pairs x
dimensions per second, from ``bench_dask.py`` on 1 worker), the scheduler's
cost per task and the storage bandwidth per machine, it simulates the exact
self-join of ``--n`` rows on ``--machines`` machines of ``--cores`` cores:
list scheduling of the block-pair tasks on the cores, each task reading its
two blocks and then computing, the scheduler dispatching one task at a time.
It also models the approximate engine at recall 0.95 from the local
engine's measured shape of work (``ROWS_SCANNED_PER_SQRT_N`` corpus rows per
row, two passes over the data for the assignment to cells).

Usage (the command behind BENCHMARKS.md)::

    python benchmarks/plan_dask.py --n 100000000 --d 100 --pair-dims-per-second 4.0e10
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
    args = parser.parse_args()

    rate = args.pair_dims_per_second
    print(f"# n={args.n:,} d={args.d}, one thread: {rate:.2e} pair-dims/s, dispatch {args.dispatch_ms} "
          f"ms/task, {args.read_mb_per_s:.0f} MB/s per machine")
    print("\n| engine | task rows | tasks | MB read / task | machines | scheduler busy | expected time |")
    print("|---|---|---|---|---|---|---|")
    for rows in args.task_rows:
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
    scanned = 8 * math.sqrt(args.n)  # ROWS_SCANNED_PER_SQRT_N of the local engine, at recall 0.95
    data_mb = args.n * args.d * 4 / 1e6
    for machines in args.machines:
        compute = args.n * scanned * args.d / (rate * machines * args.cores)
        io = 3 * data_mb / (args.read_mb_per_s * machines)  # read, write sorted by cell, read to probe
        print(f"| approx, recall 0.95 | cells of ~{math.sqrt(args.n) / 2:,.0f} rows | - | - | {machines} "
              f"| - | {(compute + io) / 60:.0f} min |")


if __name__ == "__main__":
    main()
