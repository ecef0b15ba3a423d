"""The reference similarity that defines every result (numba, ``nogil``).

The similarity of two rows is ``fl32(clip(dot(a, b) / (|a| |b|)))`` for
their float32 unit-normalised copies ``a`` and ``b``, where

- ``dot(a, b) = 2**-50 * sum_t round(a_t b_t 2**50)``: each product (exact
  in float64) is rounded to the nearest multiple of ``2**-50`` (ties to
  even) and the sum of those integers is exact, so it does not depend on
  the order of summation: any SIMD width, thread count or machine gives
  the same value, and so does a sparse row, whose missing columns add
  zeros. The rounding moves a similarity by at most ``d 2**-51``, far
  below float32 resolution.
- ``|a| = sqrt(dot(a, a))``, the same way.

The float32 unit rows themselves are ``fl32(x / ||x||)`` with ``||x||`` a
float64 norm of the input row summed in a fixed lane order (column ``t``
in lane ``t % LANES``, lanes in column order, then ``((l0 + l1) + (l2 +
l3)) + ((l4 + l5) + (l6 + l7))``), so they are the same on every machine
too, for dense and sparse input alike.

Products made any other way (BLAS tiles, sparse tiles, the refinement's
float32 dots, a GPU) only nominate candidates within a proven error bound
of this value (see :mod:`allknn.topk.bounds`).
"""

from __future__ import annotations

import numpy as np
from numba import njit

LANES = 8
"""Float64 partial sums of an input norm (column ``t`` in lane ``t % LANES``)."""


@njit(nogil=True, cache=True, inline="always")
def _combine(s0, s1, s2, s3, s4, s5, s6, s7):
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


GRID = 2.0**50
"""Products are rounded to multiples of ``1 / GRID`` before the exact sum."""

_SHIFT = 6.0
"""``product + 6.0`` (for ``|product| < 2``) lies in [4, 8), where float64
numbers are the multiples of ``2**-50``: the addition rounds the product to
the grid (ties to even), and the low bits hold the multiple."""
_SHIFT_BITS = int(np.float64(_SHIFT).view(np.int64))


@njit(nogil=True, cache=True, inline="always")
def _on_grid(product):
    """``round(product * GRID)`` as int64, for ``|product| <= 1``."""
    return np.float64(product + _SHIFT).view(np.int64) - _SHIFT_BITS


@njit(nogil=True, cache=True, inline="always")
def dense_dot(a, i, b, j):
    """Reference dot product of rows ``a[i]`` and ``b[j]`` of unit-normalised
    float32 matrices (entries of magnitude at most 1):
    ``2**-50 * sum_t round(a_it b_jt 2**50)``, exactly. Rows are indexed,
    not sliced: a row view costs reference counting on every call."""
    total = np.int64(0)
    for t in range(a.shape[1]):
        total += _on_grid(np.float64(a[i, t]) * np.float64(b[j, t]))
    return np.float64(total) / GRID


@njit(nogil=True, cache=True, inline="always")
def sparse_dot(a_indptr, a_indices, a_data, i, b_indptr, b_indices, b_data, j):
    """:func:`dense_dot` of CSR rows ``i`` and ``j`` (sorted column indices):
    the value of their dense copies (missing columns add 0)."""
    total = np.int64(0)
    p, p1 = a_indptr[i], a_indptr[i + 1]
    q, q1 = b_indptr[j], b_indptr[j + 1]
    while p < p1 and q < q1:
        if a_indices[p] == b_indices[q]:
            total += _on_grid(np.float64(a_data[p]) * np.float64(b_data[q]))
            p += 1
            q += 1
        elif a_indices[p] < b_indices[q]:
            p += 1
        else:
            q += 1
    return np.float64(total) / GRID


@njit(nogil=True, cache=True)
def _lane_sum_of_squares(row):
    """Fixed-order float64 sum of the squares of a row of any magnitude."""
    d = row.shape[0]
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    full = d - d % LANES
    for t in range(0, full, LANES):
        s0 += row[t] * row[t]
        s1 += row[t + 1] * row[t + 1]
        s2 += row[t + 2] * row[t + 2]
        s3 += row[t + 3] * row[t + 3]
        s4 += row[t + 4] * row[t + 4]
        s5 += row[t + 5] * row[t + 5]
        s6 += row[t + 6] * row[t + 6]
        s7 += row[t + 7] * row[t + 7]
    rest = d - full
    if rest > 0:
        s0 += row[full] * row[full]
    if rest > 1:
        s1 += row[full + 1] * row[full + 1]
    if rest > 2:
        s2 += row[full + 2] * row[full + 2]
    if rest > 3:
        s3 += row[full + 3] * row[full + 3]
    if rest > 4:
        s4 += row[full + 4] * row[full + 4]
    if rest > 5:
        s5 += row[full + 5] * row[full + 5]
    if rest > 6:
        s6 += row[full + 6] * row[full + 6]
    return _combine(s0, s1, s2, s3, s4, s5, s6, s7)


@njit(nogil=True, cache=True)
def dense_row_norms(block, out):
    """Input norms: ``out[i]`` is the lane-ordered float64 norm of
    ``block[i]`` (NaN/Inf rows give NaN/Inf).

    Parameters
    ----------
    block : ndarray of shape (m, d), float64
    out : ndarray of shape (m,), float64
    """
    for i in range(block.shape[0]):
        out[i] = np.sqrt(_lane_sum_of_squares(block[i]))


@njit(nogil=True, cache=True)
def sparse_row_norms(indptr, indices, data, out):
    """:func:`dense_row_norms` of CSR rows (float64 data): the norms of
    their dense copies."""
    lanes = np.zeros(LANES, dtype=np.float64)
    for i in range(indptr.shape[0] - 1):
        lanes[:] = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            v = data[p]
            lanes[indices[p] % LANES] += v * v
        out[i] = np.sqrt(_combine(lanes[0], lanes[1], lanes[2], lanes[3], lanes[4], lanes[5], lanes[6],
                                  lanes[7]))


@njit(nogil=True, cache=True)
def unit_row_norms(rows, out):
    """Reference norms ``sqrt(dense_dot(r, r))`` of unit-normalised float32 rows."""
    for i in range(rows.shape[0]):
        out[i] = np.sqrt(dense_dot(rows, i, rows, i))


@njit(nogil=True, cache=True)
def sparse_unit_row_norms(indptr, indices, data, out):
    """:func:`unit_row_norms` of CSR rows: those of their dense copies."""
    for i in range(indptr.shape[0] - 1):
        out[i] = np.sqrt(sparse_dot(indptr, indices, data, i, indptr, indices, data, i))


@njit(nogil=True, cache=True, inline="always")
def similarity(a, b, a_row, b_row, a_id, b_id):
    """Reference similarity (float32) of row ``a_row`` of ``a`` and ``b_row`` of ``b``.

    Parameters
    ----------
    a, b : tuple
        Scoring rows (see :func:`allknn.topk.scoring.scoring_rows`):
        ``(dense, indptr, indices, data, norms)``; dense rows have an
        empty ``indptr``, sparse rows an empty ``dense``.
    a_row, b_row : int
        Positions of the rows (in ``dense``, or CSR row numbers).
    a_id, b_id : int
        Ids of the rows, which index ``norms``.
    """
    if a[0].shape[0] > 0:
        dot = dense_dot(a[0], a_row, b[0], b_row)
    else:
        dot = sparse_dot(a[1], a[2], a[3], a_row, b[1], b[2], b[3], b_row)
    s = dot / (a[4][a_id] * b[4][b_id])
    return np.float32(min(1.0, max(-1.0, s)))

