"""The finish of every engine: the top-k state decoded into the result,
in input row numbers, weak neighbours masked."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from allknn.kernels.topk import decode_rows
from allknn.rows import NormalizedRows

_DECODE_ROWS = 16384


def sorted_neighbours(keys: np.ndarray, *, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Decode a top-k state into the result, best first, ties by smaller index.

    The state holds reference similarities only (see
    :mod:`allknn.kernels.reference`), so this is the whole finish: sort
    each row's keys and unpack them. ``keys`` is reused for the indices.

    Parameters
    ----------
    keys : ndarray of shape (n, k), int64
        The state's keys; overwritten.
    threads : int

    Returns
    -------
    indices : ndarray of shape (n, k), int64
        ``keys`` itself, now neighbour ids, -1 for empty slots (last).
    similarities : ndarray of shape (n, k), float32
        Reference similarities, NaN for empty slots.
    """
    similarities = np.empty(keys.shape, dtype=np.float32)
    starts = range(0, keys.shape[0], _DECODE_ROWS)
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(lambda r0: decode_rows(keys, similarities, r0, min(r0 + _DECODE_ROWS, keys.shape[0])),
                      starts))
    return keys, similarities


def finish(keys: np.ndarray, queries: NormalizedRows, corpus: NormalizedRows, *, min_similarity: float | None,
           threads: int) -> tuple[np.ndarray, np.ndarray]:
    """The result of a search: sorted, in input rows, masked below ``min_similarity``.

    Parameters
    ----------
    keys : ndarray of shape (kept queries, k), int64
        An engine's top-k state (overwritten).
    queries, corpus : NormalizedRows
        What the engine searched (their ``kept`` rows map back to the input).
    min_similarity : float or None
        Neighbours less similar are masked (index -1, similarity NaN).
    threads : int

    Returns
    -------
    indices : ndarray of shape (queries.n_original, k), int64
        Input row numbers; -1 for dropped query rows and masked neighbours.
    similarities : ndarray of shape (queries.n_original, k), float32
    """
    indices, similarities = sorted_neighbours(keys, threads=threads)
    if corpus.kept is not None:
        present = indices >= 0
        indices[present] = corpus.kept[indices[present]]
    indices, similarities = place_rows(indices, similarities, queries.kept, queries.n_original)
    return mask_below(indices, similarities, min_similarity)


def place_rows(indices: np.ndarray, similarities: np.ndarray, kept: np.ndarray | None,
               n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Put the results of kept query rows at their input rows; dropped rows
    get index -1 and similarity NaN.

    Parameters
    ----------
    indices, similarities : ndarray of shape (len(kept), k)
    kept : ndarray of int64 or None
        Input row of each result row; None: all rows were kept.
    n_rows : int
        Input rows.
    """
    if kept is None:
        return indices, similarities
    full_indices = np.full((n_rows, indices.shape[1]), -1, dtype=np.int64)
    full_similarities = np.full((n_rows, indices.shape[1]), np.nan, dtype=np.float32)
    full_indices[kept] = indices
    full_similarities[kept] = similarities
    return full_indices, full_similarities


def mask_below(indices: np.ndarray, similarities: np.ndarray,
               min_similarity: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Mask neighbours less similar than ``min_similarity`` (index -1,
    similarity NaN), in place."""
    if min_similarity is not None:
        below = ~(similarities >= min_similarity)  # NaN padding stays masked
        indices[below] = -1
        similarities[below] = np.nan
    return indices, similarities
