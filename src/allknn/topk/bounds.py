"""Error bounds of the products that nominate candidates.

A tile value (BLAS float32, a sparse tile, the refinement's float32 dot, a
GPU's bf16 or tf32 product) only nominates a candidate; the reference
(:mod:`allknn.kernels.reference`) decides. A candidate must be nominated
whenever its reference similarity can enter a row's top-k, so a tile value
is kept when it reaches the row's threshold less :func:`nomination_margin`:
a rigorous bound on how far the product can lie from the reference.
"""

from __future__ import annotations

import numpy as np

UNIT_ROUNDOFF = {"fp32": 2.0**-24, "tf32": 2.0**-11, "bf16": 2.0**-8, "fp16": 2.0**-11}
"""Unit roundoff of each product precision's inputs (``fp32``: exact float32
inputs, float32 sums; ``tf32``/``bf16``/``fp16``: inputs rounded to that
format, float32 sums)."""

_FP32 = 2.0**-24


def product_error(terms: int, precision: str = "fp32", *, truncated_sums: bool = False) -> float:
    """Largest distance between a product and the reference similarity.

    For unit-normalised float32 rows ``a`` and ``b`` (``|a|, |b| <= 1 + u``
    with ``u = 2**-24``), a float32 sum of ``terms`` non-zero products in any
    order, with or without fused multiply-adds, is within ``gamma(terms)
    |a| |b|`` of the exact dot product, ``gamma(m) = m u / (1 - m u)``
    (Higham, *Accuracy and Stability of Numerical Algorithms*, 3.1). Inputs
    rounded to a coarser format with unit roundoff ``v`` add ``(2v + v**2)
    |a| |b|``. The reference divides the exact dot product (to float64
    rounding) by ``|a| |b|``, which lies within ``(1 +- u)**2``: another
    ``3u`` at most. Subnormal products add at most ``terms 2**-149``.
    fp16 inputs below its normal range (``2**-14``) are rounded to an
    absolute ``2**-25``, which adds ``2 sqrt(terms) 2**-25 (1 + u) + terms
    2**-50`` (Cauchy-Schwarz over the rounding errors).

    Parameters
    ----------
    terms : int
        Most non-zero products in one similarity (the dimension; for sparse
        rows, the most stored values a row has).
    precision : {"fp32", "tf32", "bf16", "fp16"}
    truncated_sums : bool
        The float32 sums may truncate rather than round (tensor cores
        accumulating TF32/bf16/fp16 products): ``gamma`` with ``2u``.

    Returns
    -------
    float
    """
    m = max(int(terms), 1) + 1
    unit = 2 * _FP32 if truncated_sums else _FP32
    if m * unit >= 0.5:
        raise ValueError(f"{terms} terms are too many for a float32 product bound")
    gamma = m * unit / (1 - m * unit)
    v = UNIT_ROUNDOFF[precision] if precision != "fp32" else 0.0
    scale = (1 + _FP32) ** 2
    underflow = 2 * np.sqrt(m) * 2.0**-25 * (1 + _FP32) + m * 2.0**-50 if precision == "fp16" else 0.0
    return (gamma + 2 * v + v * v) * scale * (1 + gamma) + (underflow * (1 + gamma)) + 4 * _FP32 \
        + m * 2.0**-149


def nomination_margin(terms: int, precision: str = "fp32", *, truncated_sums: bool = False) -> np.float32:
    """How far below a row's threshold a product may lie and still be kept.

    :func:`product_error`, plus ``2**-23`` for the float32 rounding of the
    reference and of ``threshold - margin`` itself, rounded up to float32.
    """
    margin = product_error(terms, precision, truncated_sums=truncated_sums) + 2.0**-23
    rounded = np.float32(margin)
    return rounded if rounded >= margin else np.nextafter(rounded, np.float32(np.inf))
