"""The finish of every engine: the top-k state decoded into the result."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from allknn.kernels.topk import decode_rows

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
