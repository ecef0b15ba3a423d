"""The rows the reference scores candidates with, as one tuple for the kernels."""

from __future__ import annotations

import numpy as np
import scipy.sparse

_NO_ENTRIES = np.zeros(0, dtype=np.int32)
_NO_VALUES = np.zeros(0, dtype=np.float32)
_NO_ROWS = np.zeros((0, 0), dtype=np.float32)


def scoring_rows(rows: np.ndarray | scipy.sparse.csr_matrix, norms: np.ndarray) -> tuple:
    """Pack unit-normalised rows and their norms for :func:`allknn.kernels.reference.similarity`.

    Parameters
    ----------
    rows : ndarray of shape (m, d), float32, or csr_matrix with sorted indices
        Rows by position (dense rows may be reordered).
    norms : ndarray of shape (n,), float64
        Reference norms of the rows, by id.

    Returns
    -------
    tuple
        ``(dense, indptr, indices, data, norms)``: dense rows with empty CSR
        arrays, or an empty dense array with the CSR arrays.
    """
    if scipy.sparse.issparse(rows):
        return (_NO_ROWS, rows.indptr, rows.indices, rows.data, norms)
    return (rows, _NO_ENTRIES, _NO_ENTRIES, _NO_VALUES, norms)
