"""Shared fixtures, the brute-force numpy reference and result comparisons."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from allknn.datasets import make_clustered

DATA = Path(__file__).parent / "data"
"""Committed test data (see data/README.md)."""
REAL = DATA / "debian_minilm384_first4000_f16.npy"
"""4,000 real sentence embeddings (float16) with exact duplicate rows."""


@dataclass(frozen=True)
class Reference:
    """Brute-force answer: sorted top-k plus the full float64 similarity matrix.

    ``full[i, j]`` is the similarity of query ``i`` to corpus row ``j`` in
    original row numbers (``-inf`` where the pair is not a candidate).
    """

    indices: np.ndarray
    similarities: np.ndarray
    full: np.ndarray


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def _valid_rows(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return np.isfinite(rows).all(axis=1) & (np.abs(rows).sum(axis=1) > 0)


def reference_topk(
    X: np.ndarray,
    k: int,
    *,
    queries: np.ndarray | None = None,
    exclude_self: bool = True,
    drop_invalid: bool = False,
    rows: np.ndarray | None = None,
) -> Reference:
    """Plain float64 brute force, ties by smaller index.

    With ``drop_invalid`` zero and NaN/Inf rows are left out of the corpus
    and get ``-1`` / NaN as queries, everything in original row numbers.
    ``rows`` restricts a self-join to those query rows (in that order).
    """
    X = np.asarray(X)
    self_join = queries is None
    Q = X if self_join else np.asarray(queries)
    rows = np.arange(Q.shape[0]) if rows is None else np.asarray(rows)
    Q = Q[rows]
    x_ok = _valid_rows(X) if drop_invalid else np.ones(X.shape[0], dtype=bool)
    q_ok = _valid_rows(Q) if drop_invalid else np.ones(Q.shape[0], dtype=bool)
    full = np.full((Q.shape[0], X.shape[0]), -np.inf)
    full[np.ix_(q_ok, x_ok)] = _unit(Q[q_ok]) @ _unit(X[x_ok]).T
    if self_join and exclude_self:
        full[np.arange(rows.size), rows] = -np.inf
    order = np.argsort(-full, axis=1, kind="stable")[:, :k]
    sims = np.take_along_axis(full, order, axis=1)
    idx = order.astype(np.int64)
    missing = ~np.isfinite(sims)
    idx[missing] = -1
    sims[missing] = np.nan
    return Reference(indices=idx, similarities=sims, full=full)


LANES = 8


def _lane_sums(products: np.ndarray) -> np.ndarray:
    """The input norms' fixed-order sum over the last axis of float64 products:
    column ``t`` in lane ``t % 8``, lanes in column order, then
    ``((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))``."""
    d = products.shape[-1]
    padded = np.zeros((*products.shape[:-1], -(-d // LANES) * LANES), dtype=np.float64)
    padded[..., :d] = products
    lanes = np.zeros((*products.shape[:-1], LANES), dtype=np.float64)
    for t in range(0, padded.shape[-1], LANES):  # one vector add per column group: sequential per lane
        lanes += padded[..., t : t + LANES]
    s = [lanes[..., i] for i in range(LANES)]
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]))


GRID = 2.0**50


def _grid_dots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``2**-50 sum_t round(a_t b_t 2**50)`` for every row pair, the sum exact in int64."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    total = np.zeros((a.shape[0], b.shape[0]), dtype=np.int64)
    for t in range(a.shape[1]):
        total += np.rint(np.multiply.outer(a64[:, t], b64[:, t]) * GRID).astype(np.int64)
    return total / GRID


def reference_unit_rows(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference's float32 unit rows and their norms, in plain numpy."""
    rows = np.asarray(rows, dtype=np.float64)
    unit = (rows / np.sqrt(_lane_sums(rows * rows))[:, None]).astype(np.float32)
    return unit, np.sqrt(np.array([_grid_dots(u[None], u[None])[0, 0] for u in unit]))


def reference_similarities(Q: np.ndarray, X: np.ndarray) -> np.ndarray:
    """The reference similarity of every (query, corpus) pair, float32, in plain numpy.

    ``fl32(clip(dot(q, x) / (|q| |x|)))`` of the float32 unit rows with the
    grid dot product of :mod:`allknn.kernels.reference` (dense rows; no
    zero rows).
    """
    q, q_norms = reference_unit_rows(Q)
    x, x_norms = reference_unit_rows(X)
    cos = _grid_dots(q, x) / (q_norms[:, None] * x_norms[None, :])
    return np.clip(cos, -1.0, 1.0).astype(np.float32)


def exact_reference_topk(X: np.ndarray, k: int, *, queries: np.ndarray | None = None,
                         exclude_self: bool = True) -> Reference:
    """The result the contract defines, bit for bit: top-k by the reference
    similarity, ties by smaller index (dense rows, no zero rows)."""
    self_join = queries is None
    full = reference_similarities(X if self_join else queries, X).astype(np.float64)
    if self_join and exclude_self:
        np.fill_diagonal(full, -np.inf)
    order = np.lexsort((np.broadcast_to(np.arange(full.shape[1]), full.shape), -full), axis=1)[:, :k]
    sims = np.take_along_axis(full, order, axis=1)
    return Reference(indices=order.astype(np.int64), similarities=sims.astype(np.float32), full=full)


def assert_exact(result, ref: Reference) -> None:
    """Bit-identical to the contract's reference (indices and similarity bits)."""
    np.testing.assert_array_equal(result.indices, ref.indices)
    np.testing.assert_array_equal(result.similarities.view(np.int32),
                                  ref.similarities.astype(np.float32).view(np.int32))


def assert_well_formed(result, *, n_queries: int, k: int, self_join: bool = False) -> None:
    """Dtypes, shapes, ranges, order and per-row uniqueness of a TopK."""
    idx, sims = result.indices, result.similarities
    assert idx.dtype == np.int64, idx.dtype
    assert sims.dtype == np.float32, sims.dtype
    assert idx.shape == sims.shape == (n_queries, k)
    present = idx >= 0
    assert np.array_equal(present, ~np.isnan(sims)), "-1 and NaN must mark the same slots"
    assert (idx[~present] == -1).all()
    assert (idx < result.n_corpus).all()
    assert ((sims[present] >= -1.0) & (sims[present] <= 1.0)).all()
    for row in range(n_queries):
        have = sims[row][present[row]]
        assert (np.diff(have) <= 0).all(), f"row {row} not best first: {sims[row]}"
        assert present[row].sum() == 0 or present[row][: present[row].sum()].all(), "gaps before padding"
        got = idx[row][present[row]]
        assert np.unique(got).size == got.size, f"row {row} repeats a neighbour: {idx[row]}"
        if self_join and result.params.get("exclude_self", True):
            assert row not in got, f"row {row} is its own neighbour"


def assert_topk_equal(result, ref_sims, ref_idx=None, atol: float = 1e-6, *, full=None) -> None:
    """Tie-aware equality with the reference.

    Similarities agree within ``atol`` at every rank; every reference index
    clearly better than the k-th similarity is returned; and with ``full``
    (the reference similarity matrix) each returned index's true
    similarity matches the similarity reported for it. Indices may thus
    differ only among near-ties at the cut.
    """
    if hasattr(ref_sims, "full"):  # a Reference passed whole
        ref = ref_sims
        ref_sims, ref_idx, full = ref.similarities, ref.indices, ref.full
    idx, sims = result.indices, result.similarities
    assert idx.shape == np.shape(ref_idx), (idx.shape, np.shape(ref_idx))
    ref_present = np.asarray(ref_idx) >= 0
    np.testing.assert_array_equal(idx >= 0, ref_present, err_msg="missing neighbours differ")
    np.testing.assert_allclose(
        np.where(ref_present, sims, 0.0), np.where(ref_present, ref_sims, 0.0), rtol=0, atol=atol,
        err_msg="similarities differ from the reference",
    )
    for row in range(idx.shape[0]):
        count = int(ref_present[row].sum())
        if count == 0:
            continue
        got = idx[row, :count]
        kth = ref_sims[row, count - 1]
        clear = ref_idx[row, :count][ref_sims[row, :count] > kth + atol]
        lost = np.setdiff1d(clear, got)
        assert lost.size == 0, f"row {row}: lost clear neighbours {lost}; got {idx[row]}, want {ref_idx[row]}"
        if full is not None:
            np.testing.assert_allclose(
                sims[row, :count], full[row, got], rtol=0, atol=atol,
                err_msg=f"row {row}: returned similarities are not those of the returned indices",
            )
        # outside the clear set, returned indices must themselves be near-ties of the cut
        extra = np.setdiff1d(got, ref_idx[row, :count])
        if extra.size and full is not None:
            assert (full[row, extra] >= kth - atol).all(), f"row {row}: {extra} are not near-ties"


def assert_topk_strict(result, ref_sims, ref_idx=None, atol: float = 1e-6) -> None:
    """Exactly the reference's indices, in its order; similarities within ``atol``."""
    if hasattr(ref_sims, "full"):
        ref_sims, ref_idx = ref_sims.similarities, ref_sims.indices
    np.testing.assert_array_equal(result.indices, ref_idx)
    np.testing.assert_allclose(result.similarities, ref_sims, rtol=0, atol=atol, equal_nan=True)


def assert_same_result(a, b) -> None:
    """Bit-identical indices and similarities (NaN padding equal)."""
    np.testing.assert_array_equal(a.indices, b.indices)
    assert a.similarities.dtype == b.similarities.dtype
    np.testing.assert_array_equal(a.similarities.view(np.int32), b.similarities.view(np.int32))


def clustered_with_duplicates(n: int, d: int, *, seed: int, n_copies: int = 30) -> np.ndarray:
    """Clustered rows with exact duplicates: pairs, and a group of 6 copies."""
    X = make_clustered(n, d, n_clusters=max(2, n // 60), seed=seed)
    rng = np.random.default_rng(seed + 1000)
    src = rng.choice(n, size=n_copies, replace=False)
    dst = rng.choice(np.setdiff1d(np.arange(n), src), size=n_copies, replace=False)
    X[dst] = X[src]
    group = rng.choice(np.setdiff1d(np.arange(n), np.concatenate([src, dst])), size=6, replace=False)
    X[group] = X[group[0]]
    return X


@pytest.fixture
def rng() -> np.random.Generator:
    """A seeded generator."""
    return np.random.default_rng(20240601)


@pytest.fixture
def gaussian(rng) -> np.ndarray:
    """300 x 24 float32 Gaussian rows."""
    return rng.standard_normal((300, 24)).astype(np.float32)


@pytest.fixture
def clustered() -> np.ndarray:
    """700 x 32 clustered float32 rows."""
    return make_clustered(700, 32, n_clusters=12, seed=7)


@pytest.fixture
def clustered_dups() -> np.ndarray:
    """Clustered rows with exact duplicate rows inserted."""
    return clustered_with_duplicates(900, 48, seed=11)


class Interrupt(Exception):
    """Stands in for a killed process."""


def interrupt_after(tiles: int):
    """An ``on_tile`` callback raising :class:`Interrupt` after ``tiles`` tiles."""
    seen = []

    def on_tile(tile, pairs):
        seen.append(tile)
        if len(seen) == tiles:
            raise Interrupt

    return on_tile
