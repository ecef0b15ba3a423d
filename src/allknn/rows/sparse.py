"""Sparse (CSR) rows: normalisation and row norms without densifying.

A sparse input stays sparse all the way: its rows are scaled to unit norm
in CSR form, tiles are sparse products densified one tile at a time, and
nominees are scored by the reference over their stored columns.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse

from allknn._validate import rows_to_keep
from allknn.kernels.reference import sparse_row_norms as input_norms
from allknn.kernels.reference import sparse_unit_row_norms
from allknn.rows.normalized import NormalizedRows


def _row_of_entries(matrix: scipy.sparse.csr_matrix) -> np.ndarray:
    return np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))


def sparse_row_norms(matrix: scipy.sparse.csr_matrix) -> np.ndarray:
    """Input norms of the rows of a CSR matrix with sorted indices (those of
    its dense copy; NaN/Inf for bad rows).

    Returns
    -------
    ndarray of shape (n,), float64
    """
    norms = np.empty(matrix.shape[0], dtype=np.float64)
    input_norms(matrix.indptr, matrix.indices, matrix.data.astype(np.float64, copy=False), norms)
    return norms


def normalize_sparse_rows(matrix: scipy.sparse.csr_matrix, *, name: str, invalid: str):
    """Scale each row of a CSR matrix to unit norm, as float32 CSR.

    Empty rows (common: users with no interactions) and rows holding NaN
    or Inf are reported like dense ones, or dropped with
    ``invalid="drop"``.

    Returns
    -------
    NormalizedRows
        With ``rows`` a float32 ``csr_matrix`` of the kept rows.
    """
    n_original = matrix.shape[0]
    norms = sparse_row_norms(matrix)
    kept = rows_to_keep(norms, name=name, invalid=invalid)
    if kept is not None:
        matrix, norms = matrix[kept], norms[kept]
    scaled = matrix.data.astype(np.float64) / norms[_row_of_entries(matrix)]
    rows = scipy.sparse.csr_matrix(
        (scaled.astype(np.float32), matrix.indices.copy(), matrix.indptr.copy()), shape=matrix.shape
    )
    own_norms = np.empty(rows.shape[0], dtype=np.float64)
    sparse_unit_row_norms(rows.indptr, rows.indices, rows.data, own_norms)
    return NormalizedRows(rows=rows, norms=own_norms, kept=kept, n_original=n_original)
