"""Submitting a run's pair tasks in waves, merging and finishing row blocks as they complete.

A graph of every block pair at once is fine up to a few thousand blocks;
past that (100M rows are 18M pair tasks at the default size) it would hold
the scheduler for hours and the client's memory with it. So the client
keeps at most ``in_flight`` pair tasks unfinished, submitting the next as
one finishes, in row-block order so that row blocks complete (and their
parts are written) one after the other. Each pair task's partial states
join their row blocks' merges as soon as it is submitted, ``MERGE_FAN_IN``
at a time (the merges also raise the blocks' floors, :mod:`.floors`), and
a row block's finish task is submitted with its last pair.

Dask gives tasks submitted within its FIFO timeout one priority, and a
worker then starts its ready tasks in no set order. So each job is
submitted with a priority that falls along the sequence
(:func:`job_priority`), and the merge, floors and finish tasks, which are
small and release memory or let pairs start, with ``BOOKKEEPING``, above
every job. The last window of jobs runs largest first
(:func:`largest_first_at_the_end`), so that the run ends on small tasks.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from allknn._optional import optional
from allknn.engines.dask.tasks import merge_task

if TYPE_CHECKING:
    from allknn.engines.dask.floors import FloorsBook

MERGE_FAN_IN = 8
"""Partial states merged per merge task."""

FIRST_MERGE_FAN_IN = 2
"""Partial states of a row block's first merge: its first task's and the
next one's, so that the block's later pairs start from the floors of both
(:meth:`FloorsBook.merged`) rather than waiting for ``MERGE_FAN_IN``."""

QUEUED_SECONDS = 0.25
"""Seconds of work queued behind each worker thread's running pair task,
so that the thread does not wait for the client to submit its next one
(a task's result reaches the client, which submits another, which the
scheduler sends to a worker)."""

MAX_IN_FLIGHT_PER_THREAD = 8
"""Unfinished pair tasks per worker thread at most (:func:`in_flight_for`)."""

MIN_IN_FLIGHT = 4
"""Unfinished pair tasks on a cluster at least."""

LAST_JOBS_PER_THREAD = 8
"""Jobs per worker thread (at least ``MIN_LAST_JOBS``) at the end of a
run that run largest first (:func:`largest_first_at_the_end`): enough to
hold the short pairs of the last rows of a 100k-row run (7 row blocks, 28
jobs), few enough that the row blocks before them complete in order."""

MIN_LAST_JOBS = 16

BOOKKEEPING = 1
"""Dask priority of the merge, floors and finish tasks: above every job's
(:func:`job_priority`), so that a worker runs them as soon as they are ready."""


def near(workers: list[str], position: int) -> dict[str, Any]:
    """``client.submit`` options restricting a task loosely to one of
    ``workers``, taken in turn by ``position`` (any other worker may still
    run or steal it; none if there are no workers).

    Dask places a task on the worker that holds its dependencies, and holds
    back tasks of a large group without dependencies (its root-ish tasks)
    in a queue on the scheduler; a restricted task is neither.
    """
    if not workers:
        return {}
    return {"workers": [workers[position % len(workers)]], "allow_other_workers": True}


def job_priority(position: int) -> int:
    """Dask priority of the job at ``position`` (from 0) of a run's
    sequence: earlier jobs first (Dask runs higher priorities first)."""
    return -position


@dataclass(frozen=True)
class PairJob:
    """One pair task to submit: ``submit(priority)`` returns its future; its state
    ``side`` belongs to row block ``block`` for each ``(block, side)`` of
    ``targets``; it scores ``pairs`` pairs (for progress). A ``first`` job
    (a row block's first task, whose state floors the block's later ones)
    is never submitted after a job of its block that is not."""

    submit: Callable[[int], Any]
    targets: tuple[tuple[int, int], ...]
    pairs: int
    first: bool = False


def largest_first_at_the_end(jobs: Iterable[PairJob], window: int) -> Iterator[PairJob]:
    """``jobs`` in their order, except the last ``window``: first jobs
    first, then the others by falling ``pairs`` (ties in their order).

    A run's last tasks decide how long its workers idle: whichever worker
    finishes first waits for the others' last tasks. A row block pair with
    the last block of a side (the rest of the rows, a fraction of a block)
    costs a fraction of the others, so at the end of the sequence they
    fill the workers' gaps instead of leaving a long pair to run alone
    (the longest-processing-time-first rule). Only the last window is
    reordered, so row blocks still complete one after the other, and the
    client holds at most ``window`` jobs ahead.
    """
    ahead: deque[PairJob] = deque()
    for job in jobs:
        ahead.append(job)
        if len(ahead) > window:
            yield ahead.popleft()
    yield from sorted(ahead, key=lambda job: (not job.first, 0 if job.first else -job.pairs))


def in_flight_for(threads: int, task_seconds: float) -> int:
    """Unfinished pair tasks kept on a cluster of ``threads`` threads whose
    pair tasks take about ``task_seconds`` each.

    Each thread gets its running task and ``QUEUED_SECONDS`` of work
    queued behind it (at most ``MAX_IN_FLIGHT_PER_THREAD`` tasks; at least
    ``MIN_IN_FLIGHT`` in all), and no more: Dask sends every task whose
    dependencies are ready to a worker at once and moves queued tasks to
    an idle worker at most once a second (``work-stealing-interval``), so
    with more queued a run's last tasks waited on one worker while another
    idled (8 per thread, tasks of 0.7 s); with fewer, short tasks (4,096
    rows, about 50 ms) left threads waiting for the client.
    """
    queued = math.ceil(QUEUED_SECONDS / max(task_seconds, 1e-6))
    per_thread = min(MAX_IN_FLIGHT_PER_THREAD, 1 + queued)
    return max(MIN_IN_FLIGHT, per_thread * threads)


def last_jobs_for(threads: int) -> int:
    """Jobs at the end of a run on this many threads that run largest first."""
    return max(MIN_LAST_JOBS, LAST_JOBS_PER_THREAD * threads)


def run_in_waves(client, jobs: Iterable[PairJob], expected: dict[int, int], *, in_flight: int,
                 last_jobs: int, finish: Callable[[int, Any], Any], retries: int, key: str,
                 floors: FloorsBook) -> Iterator[tuple[str, int, Any]]:
    """Submit ``jobs`` keeping at most ``in_flight`` unfinished, the last
    ``last_jobs`` largest first; yield events as tasks finish.

    Parameters
    ----------
    client : distributed.Client
    jobs : iterable of PairJob
        In the order to run them (row blocks complete in this order).
    expected : dict
        For each row block to compute, how many jobs target it.
    in_flight : int
    last_jobs : int
        See :func:`largest_first_at_the_end`.
    finish : callable
        ``finish(block, state_future)`` submits a row block's finish task
        (with priority ``BOOKKEEPING``).
    retries : int
    key : str
        Suffix of the merge tasks' keys (the run's token).
    floors : FloorsBook
        Told of each merge before a row block's last job (its floors are
        raised from them), and of each row block whose jobs are all
        submitted.

    Yields
    ------
    tuple
        ``("pair", pairs, None)`` as a pair task finishes, ``("finish",
        block, value)`` as a row block's finish task does.
    """
    as_completed = optional("distributed", "running on a Dask cluster").as_completed
    remaining = dict(expected)
    partials: dict[int, list[Any]] = {block: [] for block in expected}
    merges = {block: 0 for block in expected}
    running: dict[str, int] = {}
    finishing: dict[str, int] = {}
    queue = as_completed()
    pending = enumerate(largest_first_at_the_end(jobs, last_jobs))

    def merge(block: int, parts: list[Any]) -> Any:
        merges[block] += 1
        return client.submit(merge_task, *parts, key=f"allknn-merge-{block}-{merges[block]}-{key}",
                             retries=retries, priority=BOOKKEEPING)

    def submit_next() -> bool:
        position, job = next(pending, (0, None))
        if job is None:
            return False
        future = job.submit(job_priority(position))
        running[future.key] = job.pairs
        queue.add(future)
        for block, side in job.targets:
            parts = partials[block]
            parts.append((future, side))
            remaining[block] -= 1
            if remaining[block] == 0:
                done = finish(block, merge(block, partials.pop(block)))
                finishing[done.key] = block
                queue.add(done)
                floors.forget(block)
            elif len(parts) == (FIRST_MERGE_FAN_IN if merges[block] == 0 else MERGE_FAN_IN):
                partials[block] = [merge(block, parts)]
                floors.merged(block, partials[block][0], merges[block])
        return True

    while len(running) < in_flight and submit_next():
        pass
    for future in queue:
        if future.key in running:  # its result stays while a merge still needs it
            pairs = running.pop(future.key)
            while len(running) < in_flight and submit_next():
                pass
            yield "pair", pairs, None
        else:
            yield "finish", finishing.pop(future.key), future.result()
