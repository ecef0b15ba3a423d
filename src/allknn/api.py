"""``neighbors()``: the data path from a matrix to a TopK, through one engine."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import scipy.sparse
from numpy.typing import ArrayLike

from allknn import _validate
from allknn._memory import cap_block_rows, check_block_rows, choose_block_rows, parse_memory
from allknn.engines import Job, check_method, check_options, choose
from allknn.engines.base import ProgressCallback
from allknn.engines.dask import dask_neighbors
from allknn.engines.dask.approx import dask_approx_neighbors
from allknn.kernels.topk import MAX_ROWS
from allknn.rows import is_sparse, normalize_rows
from allknn.topk.finish import finish
from allknn.topk.result import TopK
from allknn.writers.checkpoint import Checkpoint, fingerprint_matrix

logger = logging.getLogger("allknn")


def neighbors(
    X: ArrayLike,
    k: int = 10,
    *,
    queries: ArrayLike | None = None,
    exclude_self: bool = True,
    max_memory: str | int = "1GB",
    threads: int | None = None,
    invalid: str = "raise",
    min_similarity: float | None = None,
    method: str = "exact",
    recall_target: float | None = None,
    probes: int | None = None,
    refine: int | None = None,
    cells: int | None = None,
    seed: int = 0,
    block_rows: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: float = 5.0,
    on_tile: ProgressCallback | None = None,
    client=None,
    task_rows: int | None = None,
    backend: str = "numba",
    device: str | None = None,
    precision: str | None = None,
    resident: bool | None = None,
    scratch: str | os.PathLike[str] | None = None,
) -> TopK:
    """Find the ``k`` most cosine-similar rows of ``X`` for every row.

    The data path: check every option, read and normalise the rows once,
    describe the job, let the chosen engine search it into the top-k state,
    and finish (sort, input row numbers, ``min_similarity``).

    The result is defined by the reference similarity (see
    :mod:`allknn.kernels.reference`): the float32 rounding of a fixed-order
    float64 cosine of the float32 unit rows, the same on every machine.
    Each row's neighbours are its top-k under that value, ties by smaller
    index; products (BLAS, sparse tiles) only nominate candidates within a
    proven error bound, so the result does not depend on the CPU, the BLAS
    kernel, ``block_rows``, ``threads`` or the query form, bit for bit.

    Parameters
    ----------
    X : array-like or scipy sparse matrix of shape (n, d)
        Corpus, any real dtype (float16/32/64 are read without a copy;
        memory maps are read block by block). Sparse input (CSR, CSC, COO,
        sparse arrays) is never densified as a whole: tiles are sparse
        products, densified one at a time.
    k : int
        Neighbours per row, ``1 <= k <= n - 1`` in the self-join (``n``
        with ``exclude_self=False`` or with ``queries``).
    queries : array-like or sparse matrix of shape (nq, d), optional
        Search these rows against ``X`` instead of ``X`` against itself.
        Passing ``X`` itself is the self-join.
    exclude_self : bool
        In the self-join, never list a row as its own neighbour (exact
        duplicates of it are other rows and are listed, with similarity 1).
    max_memory : str or int
        Budget for working memory beyond the inputs, their normalised
        float32 copies and the result, e.g. ``"1GB"`` or bytes. A
        memory-mapped input whose float32 copy exceeds the budget gets its
        normalised copy in a memory-mapped temporary file (out-of-core).
    threads : int, optional
        Worker threads; default the usable CPUs. BLAS runs single-threaded
        inside each worker.
    invalid : {"raise", "drop"}
        All-zero rows and rows holding NaN or Inf raise ``ValueError``
        (default), or are dropped: a dropped query row gets index -1 and
        similarity NaN, and a dropped corpus row is nobody's neighbour.
    min_similarity : float, optional
        Neighbours less similar than this are masked (index -1, similarity
        NaN); rows keep their length ``k``.
    method : {"exact", "approx", "auto"}
        ``"approx"``: partition the corpus into cells (spherical k-means),
        search each row in its nearest cells only and, in the self-join,
        refine the graph with neighbours of neighbours, for inputs too
        large for the exact join; the result's ``recall`` is measured on a
        random sample of rows against exact answers (dense rows only).
        ``"auto"``: exact when its estimated time is under a minute or the
        rows are sparse, else approximate.
    recall_target : float, optional
        Default 0.95. Approximate runs widen the search until a pilot sample of rows
        reaches this recall@k less one standard error, so the whole set
        usually reaches it too (ignored with ``probes``); ``result.recall``
        reports the recall measured afterwards on another sample.
    probes, cells : int, optional
        Experts: cells searched per row, and number of cells (default about
        ``2 sqrt(n)``).
    refine : int, optional
        Experts, with ``probes``: neighbour-of-neighbour passes after the
        probing (self-join only; default none).
    seed : int
        Seed of the approximate engine's sampling (equal seeds, equal
        results).
    block_rows : int, optional
        Rows per tile side, rounded up to a multiple of 64; default from
        ``max_memory`` and the cache. The result does not depend on it.
    checkpoint : path-like, optional
        Save progress to this file every few seconds; if the file exists
        (from a killed run with the same input and parameters) the run
        resumes from it and returns exactly what an uninterrupted run would.
        The file is left in place; delete it once the result is stored.
        Exact runs only (``method="auto"`` ignores it when it picks the
        approximate engine, which is fast).
    checkpoint_every : float
        Seconds between two checkpoint saves.
    on_tile : callable, optional
        ``on_tile(tile, pairs)`` after each finished tile (for progress),
        including, at the start, each tile restored from a checkpoint.
    client : distributed.Client, optional
        Run on this Dask cluster (:mod:`allknn.engines.dask`; with
        ``method="approx"``, :mod:`allknn.engines.dask.approx`, self-join):
        ``X`` and ``queries`` are then paths every worker can read
        (``.npy``, ``.parquet``, a folder or glob of ``.parquet`` files) or
        dask arrays, ``max_memory`` bounds each task, and the result equals
        the local one bit for bit. ``None``: this machine.
    task_rows : int, optional
        With ``client``: rows per task block (default from ``max_memory``).
    backend : {"numba", "torch"}
        ``"torch"``: the exact engine's tiles with products by torch
        (:mod:`allknn.engines.torch`, ``method="torch"``), the same result
        bit for bit; needs ``allknn[gpu]``.
    device : str, optional
        ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` for the torch backend (a CUDA
        device implies ``backend="torch"``); default ``"cpu"``.
    precision : {"auto", "fp32", "tf32", "bf16", "fp16"}, optional
        Precision of the torch backend's products (``"auto"``: fp32 on CPU,
        bf16 on CUDA); the certificate's bound follows it, so the result
        does not depend on it.
    resident : bool, optional
        Torch backend: keep the rows on the device for the whole run
        (default: when they take at most half its free memory), or stream
        them from host memory block by block (``False``).
    scratch : path-like, optional
        With ``client`` and ``method="approx"``: a folder every worker and
        this client read and write at the same path, for the rows regrouped
        by cell (default this machine's temporary folder, enough for a
        cluster on one machine; checked on every worker before the run).

    Returns
    -------
    TopK
        ``indices`` (nq, k) int64 and ``similarities`` (nq, k) float32 (the
        reference similarities; exact duplicates score 1.0), best first,
        ties by smaller index.

    Raises
    ------
    TypeError
        Non-numeric input, or ``k`` not an integer.
    ValueError
        Input not 2-D or empty, mismatched dimensions, zero or NaN/Inf rows
        (with ``invalid="raise"``), ``k`` out of range, a budget too small.
    """
    if scratch is not None and (client is None or method != "approx"):
        raise ValueError("scratch= is the shared folder of the approximate engine on a cluster (client= and "
                         "method='approx'); leave it out")
    if client is not None:
        _check_cluster_options({"threads": threads, "refine": refine, "on_tile": on_tile,
                                "resident": resident})
        # on a cluster the approximate engine's probing tiles run on the torch engine too
        torch = _validate.check_backend(backend, device, "exact" if method in ("auto", "approx") else method
                                        ) == "torch"
        device = (device or "cpu") if torch else None
        if method != "approx":
            check_options({"recall_target": recall_target, "probes": probes, "cells": cells}, "exact")
        return _on_cluster(X, k, client=client, queries=queries, exclude_self=exclude_self,
                           max_memory=max_memory, invalid=invalid, min_similarity=min_similarity,
                           method=method, block_rows=block_rows, task_rows=task_rows, checkpoint=checkpoint,
                           device=device, precision=precision,
                           approx={"probes": probes, "cells": cells, "seed": seed,
                                   "recall_target": recall_target, "scratch": scratch})
    self_join = queries is None or queries is X
    corpus = _validate.as_matrix(X, "X")
    query_matrix = corpus if self_join else _validate.as_matrix(queries, "queries")
    _validate.check_same_width(corpus, query_matrix)
    _validate.check_row_limit(corpus.shape[0], MAX_ROWS, "X")
    _validate.check_row_limit(query_matrix.shape[0], MAX_ROWS, "queries")
    if (is_sparse(corpus) or is_sparse(query_matrix)) and not self_join:  # one representation for both
        corpus, query_matrix = scipy.sparse.csr_matrix(corpus), scipy.sparse.csr_matrix(query_matrix)
    n_threads = _validate.check_threads(threads)
    invalid = _validate.check_invalid_choice(invalid)
    budget = parse_memory(max_memory)
    method = _validate.check_backend(backend, device, method)
    check_method(method, checkpoint=checkpoint is not None)
    options = check_options({"recall_target": recall_target, "probes": probes, "refine": refine,
                             "cells": cells, "device": device if method == "torch" else None,
                             "precision": precision, "resident": resident}, method)
    min_similarity = _validate.check_min_similarity(min_similarity)
    block_rows_given = block_rows is not None
    block_rows = _block_rows(block_rows, corpus, query_matrix, budget, n_threads)

    started = time.perf_counter()
    corpus_rows = normalize_rows(corpus, name="X", block_rows=block_rows, invalid=invalid,
                                 on_disk=_spill(corpus, budget))
    query_rows = corpus_rows if self_join else normalize_rows(
        query_matrix, name="queries", block_rows=block_rows, invalid=invalid,
        on_disk=_spill(query_matrix, budget))
    n_candidates = corpus_rows.rows.shape[0] - (1 if self_join and exclude_self else 0)
    k = _validate.check_k(k, n_candidates, self_join=self_join and exclude_self)
    job = Job(queries=query_rows, corpus=corpus_rows, k=k, self_join=self_join,
              exclude_self=bool(exclude_self), threads=n_threads, budget=budget, block_rows=block_rows,
              block_rows_given=block_rows_given, seed=seed, options=options)
    engine = choose(method, job)
    logger.debug("%s %s: %d x %d against %d rows, k=%d, block_rows=%d, threads=%d", engine.name,
                 "self-join" if self_join else "query join", query_rows.rows.shape[0], job.dim,
                 corpus_rows.rows.shape[0], k, block_rows, n_threads)
    params = {"k": k, "method": engine.name, "self_join": self_join,
              "exclude_self": job.skip_self, "invalid": invalid, "min_similarity": min_similarity}
    fingerprint = {**params, "block_rows": block_rows}
    params["threads"] = n_threads
    saver = None
    if checkpoint is not None and engine.checkpoints:
        fingerprint.update(X=fingerprint_matrix(corpus),
                           queries=None if self_join else fingerprint_matrix(query_matrix))
        saver = Checkpoint(checkpoint, fingerprint, interval=checkpoint_every)
    found = engine.search(job, checkpoint=saver, on_tile=on_tile)
    indices, similarities = finish(found.keys, query_rows, corpus_rows, min_similarity=min_similarity,
                                   threads=n_threads)
    logger.info("%s search of %d rows done in %.2f s", engine.name, indices.shape[0],
                time.perf_counter() - started)
    return TopK(indices=indices, similarities=similarities, n_corpus=corpus.shape[0],
                params={**params, **found.params}, recall=found.recall)


def _check_cluster_options(options: dict) -> None:
    """Raise for options that only apply to a local run (None: not given)."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        names = ", ".join(f"{name}=" for name in given)
        raise ValueError(f"{names} apply to local runs only, not with client=: on a cluster every task "
                         f"runs on one worker thread (start workers with --nthreads to run more at once); "
                         f"leave {'it' if len(given) == 1 else 'them'} out")


def _on_cluster(X, k, *, client, method: str, checkpoint, approx: dict, **options) -> TopK:
    """``neighbors`` on a Dask cluster (the cluster retries lost work)."""
    if method not in ("exact", "auto", "approx"):
        raise ValueError(f"with client=, method must be 'exact', 'approx' or 'auto', got {method!r}")
    if checkpoint is not None:
        raise ValueError("checkpoint= is for local runs; on a cluster, write a parts folder with "
                         "allknn run -o FOLDER --scheduler ... and --resume it")
    if method == "approx":
        if options.pop("queries") is not None or not options.pop("exclude_self"):
            raise ValueError("the approximate engine on a cluster runs the self-join with self excluded only")
        options.pop("block_rows")
        return dask_approx_neighbors(X, k, client=client, **approx, **options)
    return dask_neighbors(X, k, client=client, **options)


def _block_rows(block_rows: int | None, corpus, queries, budget: int, threads: int) -> int:
    """Rows per block: the given size checked against the budget, or the
    largest the budget allows (up to the cache-friendly preference)."""
    sparse = is_sparse(corpus) or is_sparse(queries)
    n_rows = max(corpus.shape[0], queries.shape[0])
    if block_rows is None:
        return cap_block_rows(choose_block_rows(budget, corpus.shape[1], threads, sparse=sparse), n_rows)
    return check_block_rows(block_rows, n_rows, budget, corpus.shape[1], threads, sparse=sparse)


def _spill(data: np.ndarray, budget: int) -> bool:
    """Whether a memory-mapped input's normalised copy goes to disk too.

    An input the user memory-mapped and whose float32 copy exceeds the
    budget is treated as out-of-core: its copy is a temporary memory-mapped
    file, so resident memory stays with the operating system's page cache.
    """
    return isinstance(data, np.memmap) and data.shape[0] * data.shape[1] * 4 > budget
