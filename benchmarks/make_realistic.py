"""A seeded generator of embeddings with the structure of a real set, at any size.

Blobs are too easy for approximate methods; this generator is fitted to a
real embedding matrix (by default the Debian package descriptions in
``../shared/data``) so that a 1M-row benchmark set looks like that set:

1. The real rows are unit-normalised and projected on their top ``d``
   principal components (100 by default), as the classic 100-d case.
2. Spherical k-means splits them into ``clusters`` groups. Each group keeps
   its centre, its share of the rows (heavy-tailed, as measured) and the
   top principal directions and spreads of its members around the centre.
3. A generated row belongs to a group (drawn by the real shares) and to a
   *family* inside it: family centres are drawn from the group's fitted
   distribution and family sizes from a power law (most families small, a
   few large, like the near-duplicate families of real data). The row is
   its family centre plus isotropic noise, and a share of the rows
   duplicates another row of its family exactly, as many real rows do.
4. The noise scale is calibrated so that, at the real set's size, the
   median similarity to the 10th nearest neighbour matches the real set's.
   Larger sets are then denser, as a larger real collection would be.

Usage::

    python benchmarks/make_realistic.py --n 1000000 -o /tmp/realistic-1m.npy

Everything is seeded: the same arguments write the same file.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "debian_packages_minilm384_f16.npy"
DIRECTIONS = 16
"""Principal directions kept per group."""
FAMILY_TAIL = 1.5
"""Family sizes follow P(size >= s) = s ** -FAMILY_TAIL (mean 3) ..."""
MAX_FAMILY = 1000
"""... up to this size."""


@dataclass
class Fit:
    """What the generator keeps of the real set."""

    centres: np.ndarray  # (groups, d) float64, unit norm
    shares: np.ndarray  # (groups,) float64, sums to 1
    directions: np.ndarray  # (groups, DIRECTIONS, d) float64
    spreads: np.ndarray  # (groups, DIRECTIONS) float64: std along each direction
    residual: np.ndarray  # (groups,) float64: std per dimension left over
    duplicate_share: float  # share of rows equal to an earlier row
    median_kth: float  # median similarity to the 10th neighbour
    n: int


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def fit(real: np.ndarray, d: int, groups: int, seed: int) -> Fit:
    """Fit the group model to the real rows ``real`` (n, D)."""
    rng = np.random.default_rng(seed)
    X = _unit(real.astype(np.float64))
    duplicate_share = 1.0 - np.unique(X, axis=0).shape[0] / X.shape[0]
    X -= X.mean(axis=0)
    _, _, vt = np.linalg.svd(X[rng.choice(X.shape[0], min(20000, X.shape[0]), replace=False)],
                             full_matrices=False)
    Y = _unit(X @ vt[:d].T)
    centres = Y[rng.choice(Y.shape[0], groups, replace=False)]
    for _ in range(20):
        labels = np.argmax(Y @ centres.T, axis=1)
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, Y)
        empty = np.linalg.norm(sums, axis=1) == 0
        sums[empty] = Y[rng.choice(Y.shape[0], int(empty.sum()), replace=False)]
        centres = _unit(sums)
    labels = np.argmax(Y @ centres.T, axis=1)
    shares = np.bincount(labels, minlength=groups) / Y.shape[0]
    directions = np.zeros((groups, DIRECTIONS, d))
    spreads = np.zeros((groups, DIRECTIONS))
    residual = np.zeros(groups)
    for g in range(groups):
        E = Y[labels == g] - centres[g]
        if E.shape[0] < 2:
            continue
        _, s, vt_g = np.linalg.svd(E, full_matrices=False)
        r = min(DIRECTIONS, vt_g.shape[0])
        directions[g, :r] = vt_g[:r]
        spreads[g, :r] = s[:r] / np.sqrt(E.shape[0])
        rest = (s[r:] ** 2).sum() / E.shape[0]
        residual[g] = np.sqrt(rest / max(1, d - r))
    from allknn import neighbors

    kth = neighbors(Y.astype(np.float32), 10).similarities[:, -1]
    return Fit(centres, shares, directions, spreads, residual, float(duplicate_share),
               float(np.median(kth)), Y.shape[0])


def generate(model: Fit, n: int, noise: float, seed: int) -> np.ndarray:
    """``n`` rows (float32, not normalised) from the fitted model.

    ``noise`` scales the within-family noise (see :func:`calibrate`).
    """
    rng = np.random.default_rng(seed)
    d = model.centres.shape[1]
    sizes = np.minimum(np.floor(rng.pareto(FAMILY_TAIL, size=n) + 1), MAX_FAMILY).astype(np.int64)
    sizes = sizes[: int(np.searchsorted(np.cumsum(sizes), n)) + 1]
    sizes[-1] -= sizes.sum() - n
    family_group = rng.choice(model.shares.size, size=sizes.size, p=model.shares)
    coefficients = rng.standard_normal((sizes.size, DIRECTIONS)) * model.spreads[family_group]
    family_centres = model.centres[family_group] + np.einsum(
        "fr,frd->fd", coefficients, model.directions[family_group])
    family_centres += rng.standard_normal((sizes.size, d)) * model.residual[family_group, None]
    family_of_row = np.repeat(np.arange(sizes.size), sizes)
    rows = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 65536):
        f = family_of_row[start : start + 65536]
        block = family_centres[f] + noise * rng.standard_normal((f.size, d)) / np.sqrt(d)
        rows[start : start + f.size] = block
    first_of_family = np.cumsum(sizes) - sizes
    duplicates = np.flatnonzero((rng.random(n) < model.duplicate_share)
                                & (np.arange(n) != first_of_family[family_of_row]))
    rows[duplicates] = rows[first_of_family[family_of_row[duplicates]]]
    return rows[rng.permutation(n)]


def calibrate(model: Fit, seed: int) -> float:
    """Noise scale whose set of the real size matches the real median 10th-NN
    similarity (bisection on the log scale)."""
    from allknn import neighbors

    low, high = 1e-2, 10.0
    for _ in range(12):
        mid = np.sqrt(low * high)
        kth = neighbors(generate(model, model.n, mid, seed), 10).similarities[:, -1]
        if np.median(kth) > model.median_kth:
            low = mid
        else:
            high = mid
    return float(np.sqrt(low * high))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=100)
    parser.add_argument("--groups", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", default=str(REAL), help="the real .npy set to fit")
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    model = fit(np.load(args.real), args.d, args.groups, args.seed)
    noise = calibrate(model, args.seed)
    print(f"fitted {args.groups} groups on {model.n} rows; duplicate share "
          f"{model.duplicate_share:.4f}; median 10th-NN similarity {model.median_kth:.4f}; "
          f"noise {noise:.4f}")
    np.save(args.output, generate(model, args.n, noise, args.seed))


if __name__ == "__main__":
    main()
