"""``allknn.inspect``: what a run on some rows would meet, before running it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from allknn import _validate
from allknn._memory import cap_block_rows, choose_block_rows, parse_memory
from allknn.engines import ENGINES, Job, check_options
from allknn.rows import is_sparse, normalize_rows
from allknn.rows.dense import row_norms
from allknn.rows.sparse import sparse_row_norms

_WARM_UP_ROWS = 256


@dataclass(frozen=True)
class EngineEstimate:
    """One engine's view of the job.

    Attributes
    ----------
    refusal : str or None
        Why the engine cannot run it (then the rest is None).
    seconds : float or None
        Estimated wall time on this machine.
    memory_bytes : int or None
        Bytes beyond the input: its normalised copy, the result and the
        engine's working memory.
    """

    refusal: str | None
    seconds: float | None = None
    memory_bytes: int | None = None


@dataclass(frozen=True)
class Inspection:
    """What :func:`inspect` found.

    Attributes
    ----------
    shape : tuple of int
    dtype : numpy.dtype
    stored_values : int or None
        Stored entries of a sparse matrix (None when dense).
    ids : bool
        Whether the file has row ids.
    zero_rows, nonfinite_rows : ndarray of int64
        All-zero rows and rows holding NaN or Inf (left out of the estimates).
    k, threads, block_rows : int
        The settings estimated.
    engines : dict of str to EngineEstimate
        Every registered engine, by ``method=`` name.
    """

    shape: tuple[int, int]
    dtype: np.dtype
    stored_values: int | None
    ids: bool
    zero_rows: np.ndarray
    nonfinite_rows: np.ndarray
    k: int
    threads: int
    block_rows: int
    engines: dict[str, EngineEstimate] = field(default_factory=dict)


def inspect(source: str | os.PathLike[str] | ArrayLike, k: int = 10, *, max_memory: str | int = "1GB",
            threads: int | None = None, column: str | None = None, id_column: str | None = None,
            dataset: str | None = None, device: str | None = None,
            precision: str | None = None) -> Inspection:
    """Shape, bad rows and every engine's estimates for the self-join of ``source``.

    The estimates are measured here: the exact engine times a few of its
    tile products on these rows (sparse rows: a sample of the real plan's
    tiles), the approximate engine models its probing from the same speed,
    and the torch engine times a sample of its plan's tiles on ``device``.

    Parameters
    ----------
    source : path-like, array-like or sparse matrix
        A file :func:`allknn.load` reads (``column``, ``id_column`` and
        ``dataset`` as there), or the rows themselves.
    k : int
        Neighbours per row to estimate for (capped at the rows there are).
    max_memory, threads, device, precision
        As in :func:`allknn.neighbors` (``device`` and ``precision``: of
        the torch engine's estimate; default CPU torch).

    Returns
    -------
    Inspection
    """
    ids = False
    if isinstance(source, str | os.PathLike):
        from allknn.readers import load

        embeddings = load(source, column=column, id_column=id_column, dataset=dataset)
        matrix, ids = embeddings.matrix, embeddings.ids is not None
    else:
        matrix = source
    matrix = _validate.as_matrix(matrix, "X")
    n_threads = _validate.check_threads(threads)
    budget = parse_memory(max_memory)
    options = check_options({"device": device, "precision": precision})
    sparse = is_sparse(matrix)
    block_rows = cap_block_rows(choose_block_rows(budget, matrix.shape[1], n_threads, sparse=sparse),
                                matrix.shape[0])
    norms = sparse_row_norms(matrix) if sparse else row_norms(matrix, block_rows)
    report = Inspection(
        shape=tuple(matrix.shape), dtype=matrix.dtype, stored_values=matrix.nnz if sparse else None, ids=ids,
        zero_rows=np.flatnonzero(norms == 0), nonfinite_rows=np.flatnonzero(~np.isfinite(norms)), k=int(k),
        threads=n_threads, block_rows=block_rows)
    rows = normalize_rows(matrix, name="X", block_rows=block_rows, invalid="drop")
    n = rows.rows.shape[0]
    if n < 2:
        return report
    k = min(int(k), n - 1)
    if sparse:  # compile the sparse kernels outside the timing
        sample = normalize_rows(matrix[:_WARM_UP_ROWS], name="X", block_rows=64, invalid="drop")
        if sample.rows.shape[0] >= 2:
            _estimate(_job(sample, min(k, sample.rows.shape[0] - 1), 1, budget, 64, options))
    report.engines.update(_estimate(_job(rows, k, n_threads, budget, block_rows, options)))
    return report


def _job(rows, k: int, threads: int, budget: int, block_rows: int, options: dict) -> Job:
    return Job(queries=rows, corpus=rows, k=k, self_join=True, exclude_self=True, threads=threads,
               budget=budget, block_rows=block_rows, options=options)


def _estimate(job: Job) -> dict[str, EngineEstimate]:
    estimates = {}
    copy = job.corpus.rows.data.nbytes * 2 if job.sparse else job.corpus.rows.nbytes
    state = job.queries.rows.shape[0] * job.k * 12
    for name, engine in ENGINES.items():
        refusal = engine.refusal(job)
        if refusal is not None:
            estimates[name] = EngineEstimate(refusal=refusal)
            continue
        estimates[name] = EngineEstimate(refusal=None, seconds=engine.estimate_seconds(job),
                                         memory_bytes=copy + state + engine.working_bytes(job))
    return estimates
