"""Normalised rows: the input's rows as float32 unit rows, dense or CSR.

The only full-size copy of the input, made once; engines read it (and may
reorder its rows while they run, putting them back before they return).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from allknn.rows.dense import normalize_dense_rows
from allknn.rows.normalized import NormalizedRows, is_sparse
from allknn.rows.sparse import normalize_sparse_rows

__all__ = ["NormalizedRows", "is_sparse", "normalize_rows"]


def normalize_rows(data: np.ndarray | scipy.sparse.csr_matrix, *, name: str, block_rows: int, invalid: str,
                   on_disk: bool = False) -> NormalizedRows:
    """Unit-normalise dense rows (:func:`allknn.rows.dense.normalize_dense_rows`)
    or CSR rows (:func:`allknn.rows.sparse.normalize_sparse_rows`, which stay
    sparse); see those for the parameters and errors."""
    if is_sparse(data):
        return normalize_sparse_rows(data, name=name, invalid=invalid)
    return normalize_dense_rows(data, name=name, block_rows=block_rows, invalid=invalid, on_disk=on_disk)
