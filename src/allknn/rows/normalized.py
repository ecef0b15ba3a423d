"""The normalised rows every engine searches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse


def is_sparse(data: object) -> bool:
    """Whether ``data`` is a scipy sparse matrix or array."""
    return scipy.sparse.issparse(data)


@dataclass(frozen=True)
class NormalizedRows:
    """The rows an engine searches, unit-normalised.

    Attributes
    ----------
    rows : ndarray of shape (m, d), float32, C-contiguous, or csr_matrix
        Kept rows divided by their norm (sparse input stays sparse).
    norms : ndarray of shape (m,), float64
        Reference norms of ``rows`` themselves (1 up to float32 rounding),
        the denominators of the reference similarity.
    kept : ndarray of shape (m,), int64, or None
        Original row number of each kept row; ``None`` when all rows were
        kept (then row ``i`` is original row ``i``).
    n_original : int
        Number of rows of the input.
    """

    rows: np.ndarray
    norms: np.ndarray
    kept: np.ndarray | None
    n_original: int
