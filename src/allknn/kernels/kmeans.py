"""Spherical k-means update step (numba, ``nogil``)."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(nogil=True, cache=True)
def sum_by_label(rows, labels, sums):
    """``sums[c] = sum of rows[i] with labels[i] == c``, added in row order.

    Parameters
    ----------
    rows : ndarray of shape (m, d), float32
    labels : ndarray of shape (m,), int
    sums : ndarray of shape (c, d), float64
        Zeroed on entry; the sums on return (the same on every machine).
    """
    for i in range(rows.shape[0]):
        target = sums[labels[i]]
        row = rows[i]
        for t in range(row.shape[0]):
            target[t] += np.float64(row[t])
