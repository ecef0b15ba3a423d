"""Built-in synthetic embeddings for the demo, tests and benchmarks."""

from __future__ import annotations

import numpy as np


def make_clustered(
    n: int = 50_000,
    d: int = 100,
    *,
    n_clusters: int = 200,
    spread: float = 0.35,
    seed: int = 0,
) -> np.ndarray:
    """Clustered embeddings that look like real ones more than blobs do.

    Cluster sizes follow a power law (a few large clusters, a long tail),
    centres are random directions, and each row is its centre plus isotropic
    noise whose scale varies by cluster.

    Parameters
    ----------
    n, d : int
        Number of rows and dimensions.
    n_clusters : int
        Number of clusters.
    spread : float
        Typical noise norm relative to the centre norm.
    seed : int
        Seed of the generator; equal seeds give equal matrices.

    Returns
    -------
    ndarray of shape (n, d), float32
    """
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, n_clusters + 1) ** 1.1
    labels = rng.choice(n_clusters, size=n, p=weights / weights.sum())
    centres = rng.standard_normal((n_clusters, d)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    scale = (spread * rng.lognormal(0.0, 0.4, size=n_clusters) / np.sqrt(d)).astype(np.float32)
    out = rng.standard_normal((n, d), dtype=np.float32)
    out *= scale[labels, None]
    out += centres[labels]
    return out
