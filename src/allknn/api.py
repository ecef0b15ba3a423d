"""``neighbors()``: validate, normalise, run the engine, return a TopK."""

from __future__ import annotations

import logging
import os
import time

import numpy as np
import scipy.sparse
from numpy.typing import ArrayLike

from allknn import _validate
from allknn._approx_search import approx_search
from allknn._checkpoint import Checkpoint, fingerprint_matrix
from allknn._memory import cap_block_rows, check_block_rows, choose_block_rows, parse_memory
from allknn._normalize import NormalizedRows, normalize_rows
from allknn._search import exact_search
from allknn._sparse import is_sparse
from allknn.engines.exact import ProgressCallback
from allknn.kernels.topk import MAX_ROWS
from allknn.result import TopK

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
    recall_target: float = 0.95,
    probes: int | None = None,
    refine: int | None = None,
    cells: int | None = None,
    seed: int = 0,
    block_rows: int | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_every: float = 5.0,
    on_tile: ProgressCallback | None = None,
) -> TopK:
    """Find the ``k`` most cosine-similar rows of ``X`` for every row.

    Exact: every pair is scored. The self-join computes only half of the
    symmetric similarity matrix; selection is fused into the product tiles.

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
    recall_target : float
        Approximate runs widen the search until a pilot sample of rows
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

    Returns
    -------
    TopK
        ``indices`` (nq, k) int64 and ``similarities`` (nq, k) float32, best
        first. Ties are broken by the smaller index, so the result does not
        depend on ``block_rows``, ``threads`` or the query form. Final
        similarities are re-scored in float64 (exact duplicates score 1.0).

    Raises
    ------
    TypeError
        Non-numeric input, or ``k`` not an integer.
    ValueError
        Input not 2-D or empty, mismatched dimensions, zero or NaN/Inf rows
        (with ``invalid="raise"``), ``k`` out of range, a budget too small.
    """
    corpus = _validate.as_matrix(X, "X")
    self_join = queries is None or queries is X
    query_matrix = corpus if self_join else _validate.as_matrix(queries, "queries")
    _validate.check_same_width(corpus, query_matrix)
    _validate.check_row_limit(corpus.shape[0], MAX_ROWS, "X")
    _validate.check_row_limit(query_matrix.shape[0], MAX_ROWS, "queries")
    sparse = is_sparse(corpus) or is_sparse(query_matrix)
    if sparse and not self_join:  # one representation for both sides
        corpus, query_matrix = scipy.sparse.csr_matrix(corpus), scipy.sparse.csr_matrix(query_matrix)
    n_threads = _validate.check_threads(threads)
    invalid = _validate.check_invalid_choice(invalid)
    budget = parse_memory(max_memory)
    _validate.check_method(method)
    if method == "approx" and checkpoint is not None:
        raise ValueError("checkpoint= works with method='exact' (or 'auto') only")
    recall_target = _validate.check_fraction(recall_target, "recall_target")
    probes = _validate.check_optional_count(probes, "probes")
    refine = _validate.check_refine(refine, probes)
    cells = _validate.check_optional_count(cells, "cells")
    min_similarity = _validate.check_min_similarity(min_similarity)
    n_rows = max(corpus.shape[0], query_matrix.shape[0])
    if block_rows is None:
        block_rows = cap_block_rows(
            choose_block_rows(budget, corpus.shape[1], n_threads, sparse=sparse), n_rows
        )
    else:
        block_rows = check_block_rows(block_rows, n_rows, budget, corpus.shape[1], n_threads,
                                      sparse=sparse)

    started = time.perf_counter()
    normed = normalize_rows(corpus, name="X", block_rows=block_rows, invalid=invalid,
                            on_disk=_spill(corpus, budget))
    n_candidates = normed.rows.shape[0] - (1 if self_join and exclude_self else 0)
    k = _validate.check_k(k, n_candidates, self_join=self_join and exclude_self)
    if self_join:
        query_normed = normed
    else:
        query_normed = normalize_rows(query_matrix, name="queries", block_rows=block_rows,
                                      invalid=invalid, on_disk=_spill(query_matrix, budget))

    chosen = _choose_method(method, n_pairs=_pair_count(self_join, query_normed, normed),
                            dim=corpus.shape[1], threads=n_threads, sparse=sparse)
    logger.debug(
        "%s %s: %d x %d against %d rows, k=%d, block_rows=%d, threads=%d", chosen,
        "self-join" if self_join else "query join", query_normed.rows.shape[0],
        corpus.shape[1], normed.rows.shape[0], k, block_rows, n_threads,
    )
    params = {"k": k, "method": chosen, "self_join": self_join,
              "exclude_self": bool(exclude_self and self_join),
              "invalid": invalid, "min_similarity": min_similarity}
    recall = None
    if chosen == "approx":
        heap_idx, heap_sim, recall, plan = approx_search(
            query_normed, normed, k, self_join=self_join, exclude_self=exclude_self,
            block_rows=block_rows, threads=n_threads, budget=budget, recall_target=recall_target,
            probes=probes, refine_passes=refine, cells=cells, seed=seed,
            sample_size=RECALL_SAMPLE_ROWS,
        )
        params.update(recall=recall.estimate, recall_interval=list(recall.interval),
                      cells=plan.cells, probes=plan.probes, refine_passes=plan.passes, seed=seed)
    else:
        saver = None
        if checkpoint is not None:
            fingerprint = {
                **params, "block_rows": block_rows, "X": fingerprint_matrix(corpus),
                "queries": None if self_join else fingerprint_matrix(query_matrix),
            }
            saver = Checkpoint(checkpoint, fingerprint, interval=checkpoint_every)
        heap_idx, heap_sim = exact_search(
            query_normed, normed, k, self_join=self_join, exclude_self=exclude_self,
            block_rows=block_rows, threads=n_threads, budget=budget, checkpoint=saver,
            on_tile=on_tile,
        )
    indices, similarities = _to_original_rows(heap_idx, heap_sim, query_normed, normed)
    if min_similarity is not None:
        below = ~(similarities >= min_similarity)  # NaN padding stays masked
        indices[below] = -1
        similarities[below] = np.nan
    elapsed = time.perf_counter() - started
    logger.info("%s search of %d rows done in %.2f s", chosen, indices.shape[0], elapsed)
    return TopK(
        indices=indices,
        similarities=similarities,
        n_corpus=corpus.shape[0],
        params=params,
        recall=recall,
    )


RECALL_SAMPLE_ROWS = 1000
"""Rows whose recall every approximate run measures (and as many again for
the pilot that picks the number of probes)."""

EXACT_PAIR_DIMS_PER_SECOND = 5.5e10
"""Exact engine speed per thread, in (pairs x dimensions) per second, as
measured on the benchmark machine (BENCHMARKS.md); used by ``method="auto"``."""

AUTO_EXACT_SECONDS = 60.0


def _pair_count(self_join: bool, queries: NormalizedRows, corpus: NormalizedRows) -> int:
    n = corpus.rows.shape[0]
    return n * (n - 1) // 2 if self_join else queries.rows.shape[0] * n


def _choose_method(method: str, *, n_pairs: int, dim: int, threads: int, sparse: bool) -> str:
    """``"exact"`` or ``"approx"``; for ``"auto"``, from the estimated exact
    time (always exact for sparse rows, which the approximate engine does
    not take)."""
    if method != "auto":
        return method
    if sparse:
        return "exact"
    seconds = n_pairs * dim / (EXACT_PAIR_DIMS_PER_SECOND * threads)
    logger.info("auto: the exact join would take about %.0f s", seconds)
    return "exact" if seconds < AUTO_EXACT_SECONDS else "approx"


def _spill(data: np.ndarray, budget: int) -> bool:
    """Whether a memory-mapped input's normalised copy goes to disk too.

    An input the user memory-mapped and whose float32 copy exceeds the
    budget is treated as out-of-core: its copy is a temporary memory-mapped
    file, so resident memory stays with the operating system's page cache.
    """
    return isinstance(data, np.memmap) and data.shape[0] * data.shape[1] * 4 > budget


def _to_original_rows(
    indices: np.ndarray, similarities: np.ndarray, queries: NormalizedRows, corpus: NormalizedRows
) -> tuple[np.ndarray, np.ndarray]:
    """Map kept-row numbers back to input row numbers; dropped queries get -1/NaN."""
    if corpus.kept is not None:
        present = indices >= 0
        indices[present] = corpus.kept[indices[present]]
    if queries.kept is None:
        return indices, similarities
    full_indices = np.full((queries.n_original, indices.shape[1]), -1, dtype=np.int64)
    full_similarities = np.full((queries.n_original, indices.shape[1]), np.nan, dtype=np.float32)
    full_indices[queries.kept] = indices
    full_similarities[queries.kept] = similarities
    return full_indices, full_similarities
