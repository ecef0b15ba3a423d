"""Measured recall: approximate neighbours of sampled rows against exact ones.

Recall of a row is the share of its k returned neighbours that are at
least as similar as its exact k-th neighbour (within 1e-5), so ties at the
cut count as hits whichever tied row was returned.
"""

from __future__ import annotations

import math

import numpy as np

from allknn.engines.exact.plans import exact_top_keys
from allknn.kernels.topk import key_ids, key_similarities
from allknn.topk.result import RecallEstimate

TOLERANCE = 1e-5
_Z95 = 1.959964


def exact_kth(
    queries: np.ndarray, corpus: np.ndarray, sample: np.ndarray, k: int, *, skip_self: bool,
    block_rows: int, threads: int,
) -> np.ndarray:
    """Exact k-th best similarity of each sampled query row.

    Runs the exact engine for ``k + 1`` neighbours and, in a self-join,
    leaves the row itself out (a row is its own best match).

    Parameters
    ----------
    queries : ndarray of shape (nq, d), float32
        Unit-normalised queries.
    corpus : ndarray of shape (n, d), float32
        Unit-normalised corpus.
    sample : ndarray of int64
        Query rows to measure.
    k : int
    skip_self : bool
        Leave out corpus row ``i`` for query ``i`` (self-join).

    Returns
    -------
    ndarray of shape (len(sample),), float32
    """
    wanted = min(k + 1, corpus.shape[0]) if skip_self else k
    keys = exact_top_keys(queries[sample], corpus, wanted, block_rows=block_rows, threads=threads)
    similarities = key_similarities(keys).copy()
    if skip_self:
        similarities[key_ids(keys) == sample[:, None]] = -np.inf
        similarities = -np.sort(-similarities, axis=1)
    return similarities[:, k - 1]


def row_recall(found_similarities: np.ndarray, kth: np.ndarray) -> np.ndarray:
    """Recall of each row from its returned similarities (NaN = missing).

    Parameters
    ----------
    found_similarities : ndarray of shape (m, k)
    kth : ndarray of shape (m,)

    Returns
    -------
    ndarray of shape (m,), float64
    """
    hits = np.nan_to_num(found_similarities, nan=-np.inf) >= kth[:, None] - TOLERANCE
    return hits.mean(axis=1)


def cautious_recall(recalls: np.ndarray) -> float:
    """Mean recall of sampled rows less one standard error of that mean.

    A search that stops once this reaches its target leaves the recall of
    all rows below the target about one time in six, rather than one in two
    for the plain mean.

    Parameters
    ----------
    recalls : ndarray of shape (m,), float64
        Per-row recalls (:func:`row_recall`).
    """
    m = recalls.size
    spread = float(recalls.std(ddof=1)) / math.sqrt(m) if m > 1 else 0.0
    return float(recalls.mean()) - spread


def _wilson(p: float, n: int) -> tuple[float, float]:
    centre = (p + _Z95**2 / (2 * n)) / (1 + _Z95**2 / n)
    half = _Z95 * math.sqrt(p * (1 - p) / n + _Z95**2 / (4 * n * n)) / (1 + _Z95**2 / n)
    return centre - half, centre + half


def estimate(recalls: np.ndarray) -> RecallEstimate:
    """Mean recall with a 95% interval.

    The interval is the wider of a normal interval on the per-row recalls
    (rows are the independent units) and a Wilson interval treating the
    mean as a proportion of ``m`` rows, which stays honest when every
    sampled row scored the same (e.g. all 1.0).
    """
    m = recalls.size
    mean = float(recalls.mean())
    spread = _Z95 * float(recalls.std(ddof=1)) / math.sqrt(m) if m > 1 else 1.0
    low, high = _wilson(mean, m)
    return RecallEstimate(
        estimate=mean,
        interval=(max(0.0, min(low, mean - spread)), min(1.0, max(high, mean + spread))),
        sample_size=m,
    )
