"""How long the exact self-join would take on a cluster: a few tasks timed there."""

from __future__ import annotations

from typing import Any

import numpy as np

from allknn._memory import parse_memory
from allknn.engines.dask.run import Input, device_choice, task_sizes
from allknn.engines.dask.tasks import Block, JoinSpec, timed_floors_task, timed_pair_task, warm_up
from allknn.engines.schedule import block_bounds


def estimate_dask_seconds(X: Any, k: int, *, client, max_memory: str | int = "1GB",
                          task_rows: int | None = None, column: str | None = None,
                          device: str | None = None, precision: str | None = None,
                          samples: int = 3) -> tuple[float, int]:
    """Seconds the exact self-join of ``X`` would take on the cluster, from a few timed tasks.

    The own joins of ``samples`` blocks spread over the input, then the
    block pairs among them (floored, as in a run), each timed where it ran,
    all at once on the cluster's threads; the mean task times are scaled to
    all tasks over the worker threads. With ``device`` (and
    ``precision``), the tasks' tiles run there, as in
    :func:`~allknn.engines.dask.run.dask_neighbors`.

    Returns
    -------
    seconds : float
    timed : int
        Tasks timed.
    """
    corpus = Input(X, name="X", column=column)
    if corpus.source is None:
        raise TypeError("the estimate reads a source on shared storage; pass a path")
    budget = parse_memory(max_memory)
    dim, n = corpus.shape[1], corpus.shape[0]
    block_rows, rows = task_sizes(budget, dim, k, n, task_rows=task_rows)
    spec = JoinSpec(k=k, skip_self=True, block_rows=block_rows, threads=1,
                    **device_choice(client, device, precision))
    bounds = block_bounds(n, rows)
    picks = sorted({int(p) for p in np.linspace(0, len(bounds) - 1, min(samples, len(bounds)))})
    client.run(warm_up, spec)
    blocks = {i: Block(corpus.source, *bounds[i]) for i in picks}
    own = {i: client.submit(timed_pair_task, spec, blocks[i], None, pure=False) for i in picks}
    floors = {i: client.submit(timed_floors_task, own[i], pure=False) for i in picks}
    pairs = [client.submit(timed_pair_task, spec, blocks[i], blocks[j], (floors[i], floors[j]), pure=False)
             for a, i in enumerate(picks) for j in picks[a + 1 :]]
    own_seconds = [seconds for _, seconds in client.gather(list(own.values()))]
    pair_seconds = [seconds for _, seconds in client.gather(pairs)]
    threads = sum(client.nthreads().values())
    n_blocks = len(bounds)
    total = n_blocks * float(np.mean(own_seconds))
    if pair_seconds:
        total += n_blocks * (n_blocks - 1) / 2 * float(np.mean(pair_seconds))
    return total / max(threads, 1), len(own_seconds) + len(pair_seconds)
