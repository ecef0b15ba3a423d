"""The reference similarity that defines every result (numba, ``nogil``).

The similarity of two rows is ``fl32(clip(dot(a, b) / (|a| |b|)))`` for
their float32 unit-normalised copies ``a`` and ``b``, where ``dot`` and the
norms are float64 sums in one fixed order, whatever the machine:

- the products of column ``t`` go to lane ``t % LANES``, and each lane adds
  its products in increasing column order;
- the lanes are then added as ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 +
  l7))``.

A product of two float32 numbers is exact in float64, so fused
multiply-adds change nothing; no reassociation is allowed, so the value is
the same on every CPU, SIMD width and thread count. A sparse row sums only
its stored columns into the same lanes: adding an exact zero changes no
sum, so a sparse matrix and its dense copy score every pair the same, bit
for bit. Products made any other way (BLAS tiles, sparse tiles, the
refinement's float32 dots, a GPU) only nominate candidates within a proven
error bound of this value (see :mod:`allknn.topk.bounds`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

LANES = 8
"""Float64 partial sums of a reference dot product (column ``t`` in lane ``t % LANES``)."""


@njit(nogil=True, cache=True, inline="always")
def _combine(s0, s1, s2, s3, s4, s5, s6, s7):
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(nogil=True, cache=True)
def dense_dot(a, b):
    """Reference float64 dot product of two float32 (or float64) rows.

    Parameters
    ----------
    a, b : ndarray of shape (d,)

    Returns
    -------
    float
        The lane sums of the products, combined in the fixed order.
    """
    d = a.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    full = d - d % LANES
    for t in range(0, full, LANES):
        s0 += np.float64(a[t]) * np.float64(b[t])
        s1 += np.float64(a[t + 1]) * np.float64(b[t + 1])
        s2 += np.float64(a[t + 2]) * np.float64(b[t + 2])
        s3 += np.float64(a[t + 3]) * np.float64(b[t + 3])
        s4 += np.float64(a[t + 4]) * np.float64(b[t + 4])
        s5 += np.float64(a[t + 5]) * np.float64(b[t + 5])
        s6 += np.float64(a[t + 6]) * np.float64(b[t + 6])
        s7 += np.float64(a[t + 7]) * np.float64(b[t + 7])
    rest = d - full
    if rest > 0:
        s0 += np.float64(a[full]) * np.float64(b[full])
    if rest > 1:
        s1 += np.float64(a[full + 1]) * np.float64(b[full + 1])
    if rest > 2:
        s2 += np.float64(a[full + 2]) * np.float64(b[full + 2])
    if rest > 3:
        s3 += np.float64(a[full + 3]) * np.float64(b[full + 3])
    if rest > 4:
        s4 += np.float64(a[full + 4]) * np.float64(b[full + 4])
    if rest > 5:
        s5 += np.float64(a[full + 5]) * np.float64(b[full + 5])
    if rest > 6:
        s6 += np.float64(a[full + 6]) * np.float64(b[full + 6])
    return _combine(s0, s1, s2, s3, s4, s5, s6, s7)


@njit(nogil=True, cache=True)
def sparse_dot(a_indices, a_data, b_indices, b_data):
    """:func:`dense_dot` of two sparse rows (sorted column indices).

    Only shared columns contribute, each to lane ``column % LANES``, in
    increasing column order: the value :func:`dense_dot` gives the dense
    copies of the rows.
    """
    lanes = np.zeros(LANES, dtype=np.float64)
    p = 0
    q = 0
    while p < a_indices.shape[0] and q < b_indices.shape[0]:
        if a_indices[p] == b_indices[q]:
            lanes[a_indices[p] % LANES] += np.float64(a_data[p]) * np.float64(b_data[q])
            p += 1
            q += 1
        elif a_indices[p] < b_indices[q]:
            p += 1
        else:
            q += 1
    return _combine(lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6], lanes[7])


@njit(nogil=True, cache=True)
def dense_row_norms(block, out):
    """``out[i] = sqrt(dense_dot(block[i], block[i]))`` (NaN/Inf rows give NaN/Inf).

    Parameters
    ----------
    block : ndarray of shape (m, d), float32 or float64
    out : ndarray of shape (m,), float64
    """
    for i in range(block.shape[0]):
        out[i] = np.sqrt(dense_dot(block[i], block[i]))


@njit(nogil=True, cache=True)
def sparse_row_norms(indptr, indices, data, out):
    """:func:`dense_row_norms` of CSR rows (the same value as their dense copies)."""
    lanes = np.zeros(LANES, dtype=np.float64)
    for i in range(indptr.shape[0] - 1):
        lanes[:] = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            v = np.float64(data[p])
            lanes[indices[p] % LANES] += v * v
        out[i] = np.sqrt(_combine(lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6],
                                  lanes[7]))


@njit(nogil=True, cache=True, inline="always")
def _rounded(dot, norm_a, norm_b):
    """``fl32(clip(dot / (norm_a norm_b), -1, 1))``."""
    s = dot / (norm_a * norm_b)
    return np.float32(min(1.0, max(-1.0, s)))


@njit(nogil=True, cache=True)
def similarity(a, b, a_row, b_row, a_id, b_id):
    """Reference similarity (float32) of row ``a_row`` of ``a`` and ``b_row`` of ``b``.

    Parameters
    ----------
    a, b : tuple
        Scoring rows (see :func:`allknn.topk.state.scoring_rows`):
        ``(dense, indptr, indices, data, norms)``; dense rows have an
        empty ``indptr``, sparse rows an empty ``dense``.
    a_row, b_row : int
        Positions of the rows (in ``dense``, or CSR row numbers).
    a_id, b_id : int
        Ids of the rows, which index ``norms``.
    """
    if a[0].shape[0] > 0:
        dot = dense_dot(a[0][a_row], b[0][b_row])
    else:
        p0, p1 = a[1][a_row], a[1][a_row + 1]
        q0, q1 = b[1][b_row], b[1][b_row + 1]
        dot = sparse_dot(a[2][p0:p1], a[3][p0:p1], b[2][q0:q1], b[3][q0:q1])
    return _rounded(dot, a[4][a_id], b[4][b_id])
