"""Run the approximate engine: cells, probing, refinement, measured recall.

The breadth of the search is chosen by a pilot sample of rows whose exact
neighbours are known: probing rounds (each row against one more of its
nearest cells) and, in the self-join, neighbour-of-neighbour refinement
passes run until the pilot's recall, less one standard error, reaches the
recall target (so the whole set usually reaches it too). The recall reported
to the user is measured afterwards on a second, independent sample (the
stopping rule would bias the pilot's own estimate).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from allknn.engines.approx.cells import MAX_PROBES, CellIndex, cell_centroids, n_cells_for, probe_rounds
from allknn.engines.approx.recall import RecallEstimate, cautious_recall, estimate, exact_kth, row_recall
from allknn.engines.approx.refine import neighbour_ids, refine_bytes, refinement_pass
from allknn.engines.base import Job
from allknn.engines.kmeans import NEAREST_ROWS, nearest_centroids
from allknn.kernels.topk import key_similarities, new_state

logger = logging.getLogger("allknn")

PROBE_STEPS = (1, 2, 3, 4, 6, 8, 11, 16, 22, 32, 45, 64)
"""Cells per row after which a run checks its pilot recall (growing by about
1.4x, so it overshoots the needed breadth by at most that much)."""

DEFAULT_RECALL_TARGET = 0.95

FIRST_PROBES = 16
"""Nearest cells listed per row up front; more are listed only when the
pilot needs them (the list is ``n x probes`` integers)."""

FIRST_PASS_SHARE = 0.45
"""Expected share of the missing pilot recall that a refinement pass
recovers, until one is measured (0.3 to 0.55 measured on the real and
generated sets)."""

PROBE_NS_PER_PAIR_DIM = 0.02
PROBE_NS_PER_PAIR = 0.5
PROBE_NS_PER_CELL = 60_000.0
REFINE_NS_PER_ROW = 600.0
REFINE_NS_PER_PAIR = 25.0
REFINE_NS_PER_PAIR_DIM = 0.08
"""Cost model of the two ways to widen the search, in nanoseconds on the
benchmark machine: a probing round is a BLAS product per pair and
dimension, a threshold scan per pair and a task per cell; a refinement pass
gathers scattered rows, so it pays per pair as well as per dimension, and
rebuilds every row's candidate lists. Only
their ratio matters, and only for the choice between the two (never for the
result's correctness); the model counts work, not time, so the choice is
deterministic."""


def max_candidates_for(k: int) -> int:
    """Candidates per row and kind in a refinement pass: ``2k``, 20 to 60."""
    return int(np.clip(2 * k, 20, 60))


@dataclass
class ApproxPlan:
    """What an approximate run did (recorded in the result's parameters)."""

    cells: int
    probes: int = 0
    refine: int = 0
    """Refinement passes run."""


def approx_bytes(n_queries: int, n_corpus: int, k: int, *, listed: int, self_join: bool,
                 threads: int, block_rows: int) -> int:
    """Peak working memory of :func:`approx_search` besides the top-k state.

    Tiles, the nearest-cell lists (``listed`` per row, and the batch state
    that lists them), the cell index and, in the self-join, the
    refinement's candidate lists.
    """
    tiles = threads * 4 * block_rows * block_rows
    probe_lists = n_queries * (4 * listed + 3 * 8) + NEAREST_ROWS * 16 * listed
    index = 3 * 8 * n_corpus
    refinement = refine_bytes(n_corpus, k, max_candidates_for(k)) if self_join else 0
    return tiles + probe_lists + index + refinement


RECALL_SAMPLE_ROWS = 1000
"""Rows whose recall every approximate run measures (and as many again for
the pilot that picks the breadth of the search)."""


def listed_probes(n_corpus: int, probes: int | None, cells: int | None) -> tuple[int, int, int]:
    """Cells, most probes and the nearest cells listed up front for a corpus."""
    n_cells = min(cells or n_cells_for(n_corpus), n_corpus)
    most = min(n_cells, probes or MAX_PROBES)
    return n_cells, most, min(most, probes or FIRST_PROBES)


def approx_working_bytes(job: Job) -> int:
    """:func:`approx_bytes` of a job, with the nearest cells it lists up front."""
    n_corpus = job.corpus.rows.shape[0]
    _, _, listed = listed_probes(n_corpus, job.options.get("probes"), job.options.get("cells"))
    return approx_bytes(job.queries.rows.shape[0], n_corpus, job.k, listed=listed, self_join=job.self_join,
                        threads=job.threads, block_rows=job.block_rows)


def approx_search(job: Job) -> tuple[np.ndarray, RecallEstimate, ApproxPlan]:
    """Approximate top-k by cell probing and refinement, with measured recall.

    With the option ``probes``, exactly that many cells per row, then
    ``refine`` refinement passes (self-join only; default none). Without,
    see the module docstring (option ``recall_target``, default 0.95).

    Returns
    -------
    keys : ndarray of shape (nq, k), int64
        The top-k state (see :mod:`allknn.kernels.topk`), by kept row.
    recall : RecallEstimate
    plan : ApproxPlan

    Raises
    ------
    ValueError
        A budget too small for the engine's working memory.
    """
    queries, corpus, k, self_join = job.queries, job.corpus, job.k, job.self_join
    block_rows, threads, budget, seed = job.block_rows, job.threads, job.budget, job.seed
    probes, cells = job.options.get("probes"), job.options.get("cells")
    refine = job.options.get("refine")
    recall_target = job.options.get("recall_target") or DEFAULT_RECALL_TARGET
    n_queries, n_corpus = queries.rows.shape[0], corpus.rows.shape[0]
    n_cells, most, listed = listed_probes(n_corpus, probes, cells)
    need = approx_working_bytes(job)
    if need > budget:
        raise ValueError(
            f"max_memory={budget} bytes is too small for the approximate engine on {n_corpus} rows "
            f"(it needs about {need} bytes); raise max_memory"
        )
    # longer lists (made while the first ones are kept) only as far as the budget allows
    most = max(listed, min(most, (budget - need) // (4 * n_queries + NEAREST_ROWS * 16)))
    centroids = cell_centroids(corpus.rows, n_cells, budget=budget - need, seed=seed)
    plan = ApproxPlan(cells=centroids.shape[0])
    probe_order = nearest_centroids(queries.rows, centroids, listed, threads=threads)
    labels = probe_order[:, 0] if self_join else nearest_centroids(corpus.rows, centroids,
                                                                   threads=threads)[:, 0]
    keys, thresholds = new_state(n_queries, k)
    skip_self = job.skip_self
    picks = np.random.default_rng(seed).permutation(n_queries)
    size = min(RECALL_SAMPLE_ROWS, n_queries)
    audit = np.sort(picks[:size])
    pilot = np.sort(picks[size : 2 * size]) if n_queries >= 2 * size else audit
    pilot_kth = None if probes else exact_kth(queries.rows, corpus.rows, pilot, k, skip_self=skip_self,
                                              block_rows=block_rows, threads=threads)

    index = CellIndex(centroids, labels)
    query_positions = index.positions if self_join else None
    previous: np.ndarray | None = None  # neighbour ids when the last pass began

    def probe_to(count: int) -> None:
        nonlocal probe_order
        if count > probe_order.shape[1]:
            probe_order = nearest_centroids(queries.rows, centroids, most, threads=threads)
            if query_positions is not None:
                probe_order = probe_order[query_positions]
        probe_rounds(queries.rows, query_positions, queries.norms, index, corpus.norms, keys, thresholds,
                     range(plan.probes, count), probe_order, block_rows=block_rows,
                     threads=threads, skip_self=skip_self, unique=plan.refine > 0)
        plan.probes = count

    def refine_once() -> int:
        nonlocal previous
        snapshot = neighbour_ids(keys)
        pairs = refinement_pass(index.rows, index.positions, index.order, keys, thresholds, previous,
                                corpus.norms, max_candidates=max_candidates_for(k),
                                seed=seed + plan.refine, threads=threads)
        previous = snapshot
        plan.refine += 1
        return pairs

    def pilot_recall() -> float:
        reached = cautious_recall(row_recall(key_similarities(keys[pilot]), pilot_kth))
        logger.info("approx: %d probe(s), %d pass(es): pilot recall %.4f (less one standard error)",
                    plan.probes, plan.refine, reached)
        return reached

    with index.grouping(corpus):
        if probes:
            probe_to(most)
            for _ in range(refine or 0):
                refine_once()
        else:
            costs = _Costs(probe_order, np.diff(index.starts), n_corpus, k, corpus.rows.shape[1])
            _search_to_target(probe_to, refine_once if self_join else None, pilot_recall, costs,
                              recall_target, most)
    audit_kth = exact_kth(queries.rows, corpus.rows, audit, k, skip_self=skip_self,
                          block_rows=block_rows, threads=threads)
    return keys, estimate(row_recall(key_similarities(keys[audit]), audit_kth)), plan


class _Costs:
    """The cost model applied to a run (nanoseconds, see the constants)."""

    def __init__(self, probe_order: np.ndarray, cell_sizes: np.ndarray, n: int, k: int, dim: int):
        self.probe_order, self.cell_sizes = probe_order, cell_sizes
        self.dim, self.rows = dim, n
        fresh = min(max_candidates_for(k), int(1.4 * k))  # new candidates per row, measured ~1.4 k
        self.first_pass_pairs = n * fresh * (fresh - 1) // 2

    def probe(self, done: int, count: int) -> float:
        """Cost of probe rounds ``done : count`` (rounds beyond the listed
        probes are priced like the last listed one)."""
        listed = self.probe_order.shape[1]
        ranks = range(min(done, listed - 1), min(count, listed))
        rounds = (count - done) / len(ranks)
        pairs = cells = 0
        for p in ranks:
            visits = np.bincount(self.probe_order[:, p], minlength=self.cell_sizes.size)
            pairs += int(visits @ self.cell_sizes)
            cells += int(np.count_nonzero(visits))
        return rounds * (pairs * (PROBE_NS_PER_PAIR_DIM * self.dim + PROBE_NS_PER_PAIR)
                         + cells * PROBE_NS_PER_CELL)

    def refine(self, pairs: int) -> float:
        """Cost of a refinement pass scoring ``pairs`` pairs."""
        return (REFINE_NS_PER_ROW * self.rows
                + (REFINE_NS_PER_PAIR + REFINE_NS_PER_PAIR_DIM * self.dim) * pairs)


def _search_to_target(probe_to, refine_once, pilot_recall, costs: _Costs, target: float,
                      most: int) -> None:
    """Widen the search until the pilot recall reaches ``target``.

    Each step either probes up to the next count of ``PROBE_STEPS`` or
    (self-join, ``refine_once`` given) runs a refinement pass, whichever
    promises more recall per cost: the share of the missing recall that
    the last step of each kind recovered, per round or per pass, times the
    recall still missing, over the modelled cost.
    """
    steps = [min(step, most) for step in PROBE_STEPS if step <= most] + [most]
    done = steps[0]
    probe_to(done)
    reached = pilot_recall()
    probe_share = reached  # per round, from nothing
    refine_share, refine_pairs = FIRST_PASS_SHARE, costs.first_pass_pairs
    while reached < target:
        following = next((step for step in steps if step > done), None)
        gap = 1.0 - reached
        probe_rate = 0.0
        if following is not None:
            rounds = following - done
            probe_rate = (1 - (1 - probe_share) ** rounds) * gap / costs.probe(done, following)
        refine_rate = 0.0
        if refine_once is not None and done > 1:  # one probe: the cells were joined exactly
            refine_rate = refine_share * gap / costs.refine(refine_pairs)
        if probe_rate <= 0.0 and refine_rate <= 0.0:
            return
        before = reached
        if refine_rate > probe_rate:
            refine_pairs = refine_once()
            reached = pilot_recall()
            refine_share = max(0.0, reached - before) / gap
            refine_pairs //= 2  # the next pass joins only what this one changed
        else:
            probe_to(following)
            reached = pilot_recall()
            left = max(1.0 - reached, 1e-9) / gap
            probe_share = 1.0 - left ** (1.0 / (following - done))
            done = following
            refine_share, refine_pairs = FIRST_PASS_SHARE, costs.first_pass_pairs
