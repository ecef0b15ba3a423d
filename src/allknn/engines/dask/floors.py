"""The floors of a run's row blocks: lower bounds of their rows' final
``k``-th similarities, raised as the run goes.

A pair task starts its rows' states at floors
(:func:`allknn.kernels.topk.floored_state`), so that only the candidates
that can still make a row's top-k are scored. The ``k``-th similarity of
any partial state of a row block, merged or not, is such a bound, and a
higher one the more candidates the state has seen:

- a row block is first floored by its first task, its own join or its
  query block against the first corpus block (the block's later tasks
  wait for it: :meth:`FloorsBook.first`);
- then by the merged partial states of the block each time they have been
  merged 1, 2, 4, 8... times (:meth:`FloorsBook.merged`), once these floors
  have finished. A block's first merge takes its first two states
  (:data:`~allknn.engines.dask.waves.FIRST_MERGE_FAN_IN`), the later ones
  eight.

A pair takes the newest floors that have finished when it is submitted
and never waits for newer ones: with any lower bounds the result is the
same, only the work differs. At the default task size a run of 100k rows
has 7 row blocks: the pairs of all but the first start from the floors
of two blocks of candidates (the own join and the first pair), a pair
task there 3% faster than from the own join's alone (in-process, 16,384
rows); at scale, a pair of a row block's partial states merged ``m``
times starts from the ``k``-th best of about ``7 m`` blocks of candidates
instead of one.
"""

from __future__ import annotations

from typing import Any

from allknn.engines.dask.tasks import floors_task
from allknn.engines.dask.waves import BOOKKEEPING


class FloorsBook:
    """The floors futures of a run's row blocks, newest last.

    Parameters
    ----------
    client : distributed.Client
    retries : int
    key : str
        Suffix of the floors tasks' keys (the run's token).
    """

    def __init__(self, client, *, retries: int, key: str):
        self.client, self.retries, self.key = client, retries, key
        self._first: dict[int, Any] = {}
        self._later: dict[int, list[Any]] = {}

    def first(self, block: int, task: Any, **restrictions: Any) -> None:
        """Floor ``block`` by its first task (a pair task's future whose
        first state is the block's: its own join, or its query block
        against the first corpus block); the pairs submitted until newer
        floors finish wait for these."""
        self._first[block] = self.client.submit(floors_task, task, key=f"allknn-floors-{block}-{self.key}",
                                                retries=self.retries, priority=BOOKKEEPING, **restrictions)

    def merged(self, block: int, state: Any, merges: int) -> None:
        """Floor ``block`` by its partial states merged ``merges`` times
        (``state``: the merge task's future), when ``merges`` is a power of 2."""
        if merges & (merges - 1) == 0:
            self._later.setdefault(block, []).append(self.client.submit(
                floors_task, state, key=f"allknn-floors-{block}-{merges}-{self.key}", retries=self.retries,
                priority=BOOKKEEPING))

    def best(self, block: int) -> Any:
        """The newest floors of ``block`` that have finished, else its first
        task's (which may still run)."""
        later = self._later.get(block, [])
        for at in range(len(later) - 1, -1, -1):
            if later[at].status == "finished":
                del later[:at]  # older floors are lower; pairs holding them keep them alive
                return later[0]
        return self._first.get(block)

    def forget(self, block: int) -> None:
        """Drop ``block``'s floors (all its pairs are submitted)."""
        self._first.pop(block, None)
        self._later.pop(block, None)
