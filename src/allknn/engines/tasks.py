"""Tiled engines: a search cut into tasks, any subset of which runs into the top-k state.

A :class:`TaskPlan` lists the tasks of one search (the exact engine's tiles,
later a GPU engine's batches or the Dask engine's block pairs) and runs any
subset of them, in any order, into the one top-k state. Because every task
offers reference keys and the state's merge is associative and idempotent,
the state after all tasks is the same however they were split, ordered,
repeated or resumed. That is what :func:`run_tasks` builds checkpoints and
progress on, for every tiled engine alike.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import ClassVar

import numpy as np

from allknn.engines.base import Engine, Found, Job, ProgressCallback
from allknn.kernels.topk import new_state
from allknn.writers.checkpoint import Checkpoint, Progress

logger = logging.getLogger("allknn")

Task = tuple[int, ...]
"""One unit of a plan's work (for tiles: a ``(query block, corpus block)`` pair)."""

SAVES_PER_RUN = 200
"""A checkpointed run is cut into about this many batches of tasks (each at
least ``4 x threads`` tasks), saved when the checkpoint interval is due."""


class TaskPlan(ABC):
    """The tasks of one search and how to run a subset of them.

    Attributes
    ----------
    tasks : list
        Every task, in the preferred order.
    n_queries : int
        Rows of the top-k state.
    """

    tasks: list[Task]
    n_queries: int

    @abstractmethod
    def pairs(self, task: Task) -> int:
        """Number of (query, candidate) pairs a task scores."""

    @abstractmethod
    def run(self, keys: np.ndarray, thresholds: np.ndarray, *, threads: int,
            tasks: Sequence[Task] | None = None, on_task: ProgressCallback | None = None) -> None:
        """Merge ``tasks`` (default all) into the top-k state, in place.

        Parameters
        ----------
        keys, thresholds : ndarray of shape (n_queries, k) and (n_queries,)
            Top-k state from :func:`allknn.kernels.topk.new_state`.
        threads : int
        tasks : sequence, optional
            A subset of :attr:`tasks`.
        on_task : callable, optional
            Called after each finished task with the task and its pairs.
        """

    def complete(self, keys: np.ndarray, thresholds: np.ndarray, *, threads: int) -> None:  # noqa: B027
        """Work that needs every task merged first (by default none)."""

    def resume_state(self) -> dict[str, np.ndarray]:
        """What a checkpoint keeps so that a resumed run rebuilds the same
        tasks (by default nothing: the tasks follow from the job)."""
        return {}


def run_tasks(plan: TaskPlan, k: int, *, threads: int, checkpoint: Checkpoint | None,
              progress: Progress | None, on_task: ProgressCallback | None) -> np.ndarray:
    """Run a plan's unfinished tasks, then its completion; with a checkpoint,
    in saved batches.

    Between two batches no task is in flight, so each saved state is
    exactly the merge of the saved finished tasks.

    Parameters
    ----------
    plan : TaskPlan
    k : int
    threads : int
    checkpoint : Checkpoint, optional
    progress : Progress, optional
        Restored from ``checkpoint``: its state and finished tasks are
        taken over (and reported to ``on_task`` first).
    on_task : callable, optional

    Returns
    -------
    ndarray of shape (n_queries, k), int64
        The top-k state.
    """
    if progress is None:
        progress = Progress(*new_state(plan.n_queries, k), done=set(), plan=plan.resume_state())
    elif progress.done:
        logger.info("resuming: %d of %d tasks done", len(progress.done), len(plan.tasks))
        if on_task is not None:
            for task in plan.tasks:
                if task in progress.done:
                    on_task(task, plan.pairs(task))
    remaining = [task for task in plan.tasks if task not in progress.done]
    if checkpoint is None:
        plan.run(progress.keys, progress.thresholds, threads=threads, tasks=remaining, on_task=on_task)
    else:
        batch = max(4 * threads, len(plan.tasks) // SAVES_PER_RUN)
        for start in range(0, len(remaining), batch):
            tasks = remaining[start : start + batch]
            plan.run(progress.keys, progress.thresholds, threads=threads, tasks=tasks, on_task=on_task)
            progress.done.update(tasks)
            if checkpoint.due():
                checkpoint.save(progress)
        checkpoint.save(progress)
    plan.complete(progress.keys, progress.thresholds, threads=threads)
    return progress.keys


class TiledEngine(Engine):
    """An engine whose search is a :class:`TaskPlan`: it gets checkpoints
    and per-task progress from :func:`run_tasks`, and its tasks can be
    handed out (GPU batches, Dask tasks) without changing its result."""

    checkpoints: ClassVar[bool] = True

    @abstractmethod
    def plan(self, job: Job, saved: Mapping[str, np.ndarray] | None) -> AbstractContextManager[TaskPlan]:
        """The plan of ``job``, valid inside the ``with`` block (it may
        reorder the job's rows there, and puts them back on exit).

        Parameters
        ----------
        job : Job
        saved : mapping of str to ndarray, or None
            :meth:`TaskPlan.resume_state` of the plan a checkpoint was
            made with; None for a fresh run.
        """

    def search(self, job: Job, *, checkpoint: Checkpoint | None = None,
               on_tile: ProgressCallback | None = None) -> Found:
        progress = checkpoint.restore() if checkpoint is not None and checkpoint.exists() else None
        with self.plan(job, None if progress is None else progress.plan) as plan:
            keys = run_tasks(plan, job.k, threads=job.threads, checkpoint=checkpoint, progress=progress,
                             on_task=on_tile)
        return Found(keys=keys)
