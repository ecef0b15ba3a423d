"""Row ordering that puts similar rows in the same blocks.

The exact self-join's result does not depend on the order of the rows, but
its speed does: a row's top-k threshold rises fastest when its best
candidates come early. Grouping rows by a coarse spherical k-means cluster
makes the diagonal and near-diagonal tiles hold most rows' best neighbours,
so later tiles are rejected by the vectorised threshold compare and almost
never touch a heap. The clustering costs a few percent of the join.
"""

from __future__ import annotations

import numpy as np

from allknn.engines.exact.plans import exact_top_keys
from allknn.kernels.kmeans import sum_by_label
from allknn.kernels.reference import dense_row_norms
from allknn.kernels.topk import key_ids

MIN_ROWS = 8192
"""Below this the join is too short for ordering to pay."""

SAMPLE_ROWS = 16384
"""Rows k-means is fitted on at most."""
_ITERATIONS = 3
NEAREST_ROWS = 16384
"""Rows per batch when listing the nearest centroids."""
_TILE_ROWS = 1024


def n_clusters_for(n: int) -> int:
    """Number of clusters for ``n`` rows: about ``sqrt(n) / 2``, 16 to 512."""
    return int(np.clip(np.sqrt(n) / 2, 16, 512))


def _scratch_bytes(sample_rows: int, n_clusters: int, dim: int) -> int:
    """Peak scratch of :func:`cluster_order`: the sample with its labels,
    float64 and float32 centroids, and a batch of nearest-centroid search
    (its tile and state)."""
    tile = min(_TILE_ROWS, -(-max(sample_rows, n_clusters) // 64) * 64)
    per_sample_row = 4 * dim + 8
    assign = 4 * tile * tile + min(sample_rows, NEAREST_ROWS) * (8 + 4 + 4)
    return sample_rows * per_sample_row + assign + 4 * 8 * n_clusters * dim


def fit_centroids(rows: np.ndarray, n_clusters: int, *, budget: int, seed: int = 0) -> np.ndarray | None:
    """Spherical k-means centroids fitted on a seeded sample of the rows.

    A few Lloyd iterations on at most ``SAMPLE_ROWS`` rows; the sample
    shrinks to keep the scratch memory within ``budget``.

    Parameters
    ----------
    rows : ndarray of shape (n, d), float32
        Unit-normalised rows.
    n_clusters : int
        Number of centroids (at most n).
    budget : int
        Bytes of scratch memory allowed.
    seed : int
        Seed of the sample and of the initial centroids.

    Returns
    -------
    ndarray of shape (n_clusters, d), float32, or None
        Unit-norm centroids; ``None`` when the budget is too small for a
        sample of four rows per cluster.
    """
    n, dim = rows.shape
    sample_rows = min(n, SAMPLE_ROWS)
    while sample_rows >= 4 * n_clusters and _scratch_bytes(sample_rows, n_clusters, dim) > budget:
        sample_rows //= 2
    if sample_rows < min(n, 4 * n_clusters):
        return None
    rng = np.random.default_rng(seed)
    sample = np.asarray(rows[np.sort(rng.choice(n, size=sample_rows, replace=False))], dtype=np.float32)
    centroids = sample[rng.choice(sample.shape[0], size=n_clusters, replace=False)].copy()
    for _ in range(_ITERATIONS):
        labels = nearest_centroids(sample, centroids)[:, 0]
        sums = np.zeros(centroids.shape, dtype=np.float64)
        sum_by_label(sample, labels, sums)
        norms = np.empty(n_clusters, dtype=np.float64)
        dense_row_norms(sums, norms)
        empty = norms == 0
        centroids = np.where(empty[:, None], centroids,
                             sums / np.where(empty, 1, norms)[:, None]).astype(np.float32)
    return centroids


def nearest_centroids(
    rows: np.ndarray, centroids: np.ndarray, count: int = 1, *, threads: int = 1
) -> np.ndarray:
    """The ``count`` most similar centroids of each row, best first.

    By the reference similarity, ties to the smaller centroid number, so
    the cells are the same on every machine: the exact engine's query join
    against the centroids, ``NEAREST_ROWS`` rows at a time (its int64
    state is four times the int32 answer).

    Returns
    -------
    ndarray of shape (n, count), int32
    """
    out = np.empty((rows.shape[0], count), dtype=np.int32)
    for start in range(0, rows.shape[0], NEAREST_ROWS):
        keys = exact_top_keys(rows[start : start + NEAREST_ROWS], centroids, count,
                              block_rows=_TILE_ROWS, threads=threads)
        out[start : start + keys.shape[0]] = key_ids(keys)
    return out


def cluster_order(rows: np.ndarray, *, budget: int, seed: int = 0) -> np.ndarray | None:
    """A permutation that groups rows by spherical k-means cluster.

    Rows keep their relative order within a cluster.

    Parameters
    ----------
    rows : ndarray of shape (n, d), float32
        Unit-normalised rows.
    budget : int
        Bytes of scratch memory allowed (besides the two length-n vectors of
        labels and the returned order).
    seed : int
        Seed of the sample and of the initial centroids.

    Returns
    -------
    ndarray of shape (n,), int64, or None
        ``order[r]`` is the row placed at position ``r``; ``None`` when the
        budget is too small for a useful clustering.
    """
    centroids = fit_centroids(rows, n_clusters_for(rows.shape[0]), budget=budget, seed=seed)
    if centroids is None:
        return None
    labels = nearest_centroids(rows, centroids)[:, 0]
    return np.argsort(labels, kind="stable").astype(np.int64)
