"""The engine contract: what every engine (exact, approximate, GPU, Dask) implements.

An engine is given a :class:`Job` (normalised rows, k, the self-join flag,
threads, budget, seed and its own options). It says whether it can run it
(:meth:`Engine.refusal`), how much working memory it needs and how long it
would take, and it searches into the one top-k state (:mod:`allknn.kernels.topk`),
returned as a :class:`Found`. Everything after that, the finish that
decodes the state, maps rows back and masks weak neighbours, is shared
(:func:`allknn.topk.finish.finish`): nothing downstream knows which engine
ran. Adding an engine is adding a folder with a subclass of :class:`Engine`
and registering it in :mod:`allknn.engines`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from allknn.rows import NormalizedRows, is_sparse
from allknn.topk.result import RecallEstimate

ProgressCallback = Callable[[tuple[int, ...], int], None]
"""Called after each finished task (a tile: ``(query block, corpus block)``)
with the task and the pairs it scored."""


@dataclass(frozen=True)
class Job:
    """One search: every row of ``queries`` against ``corpus``.

    Attributes
    ----------
    queries, corpus : NormalizedRows
        The same object in a self-join.
    k : int
        Neighbours per row (checked against the candidates).
    self_join : bool
        Whether the queries are the corpus (decided at the boundary, never
        by object identity inside an engine).
    exclude_self : bool
        In a self-join, never list a row as its own neighbour.
    threads : int
    budget : int
        Bytes of working memory allowed (``max_memory``).
    block_rows : int
        Rows per tile side (a multiple of 64).
    block_rows_given : bool
        Whether the caller chose ``block_rows`` (else an engine whose tiles
        live elsewhere, a GPU's, may size its own).
    seed : int
    options : mapping
        The engine's own options, checked by :meth:`Engine.check_options`.
    """

    queries: NormalizedRows
    corpus: NormalizedRows
    k: int
    self_join: bool
    exclude_self: bool
    threads: int
    budget: int
    block_rows: int
    block_rows_given: bool = False
    seed: int = 0
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def skip_self(self) -> bool:
        """Whether query ``i`` must never be paired with corpus row ``i``."""
        return self.self_join and self.exclude_self

    @property
    def sparse(self) -> bool:
        return is_sparse(self.corpus.rows)

    @property
    def dim(self) -> int:
        return int(self.corpus.rows.shape[1])

    @property
    def pairs(self) -> int:
        """(query, candidate) pairs of the whole join."""
        n = self.corpus.rows.shape[0]
        return n * (n - 1) // 2 if self.self_join else self.queries.rows.shape[0] * n


@dataclass
class Found:
    """What an engine's search returns.

    Attributes
    ----------
    keys : ndarray of shape (n_queries, k), int64
        The top-k state by kept query row, ids are kept corpus rows.
    params : dict
        What the engine did, for ``TopK.params`` (JSON values).
    recall : RecallEstimate or None
        Measured recall of an approximate engine.
    """

    keys: np.ndarray
    params: dict[str, Any] = field(default_factory=dict)
    recall: RecallEstimate | None = None


class Engine(ABC):
    """One way to search a :class:`Job` (see the module docstring)."""

    name: ClassVar[str]
    """The ``method=`` that selects it."""

    exact: ClassVar[bool]
    """Whether it returns the exact result (``method="auto"`` prefers it when fast enough)."""

    auto: ClassVar[bool] = True
    """Whether ``method="auto"`` may choose it (an engine for a device is chosen by name)."""

    options: ClassVar[Mapping[str, Callable[[Any], Any]]] = {}
    """Its own options: name -> checker returning the clean value (None: the default)."""

    checkpoints: ClassVar[bool] = False
    """Whether :meth:`search` can save and resume its progress."""

    def check_combination(self, options: Mapping[str, Any]) -> None:  # noqa: B027 - most engines have none
        """Raise ``ValueError`` for own options that do not fit together."""

    @abstractmethod
    def refusal(self, job: Job) -> str | None:
        """Why this engine cannot run ``job``, or None: a phrase that follows
        ``method='name'`` in the error and names the fix."""

    @abstractmethod
    def working_bytes(self, job: Job) -> int:
        """Peak working memory of :meth:`search` beyond the inputs, their
        normalised copies and the result."""

    @abstractmethod
    def estimate_seconds(self, job: Job) -> float:
        """Expected wall time of :meth:`search` on this machine."""

    @abstractmethod
    def search(self, job: Job, *, checkpoint: Any = None, on_tile: ProgressCallback | None = None) -> Found:
        """Search ``job`` into a top-k state."""
