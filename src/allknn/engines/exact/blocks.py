"""Dense rows cut into blocks, and the tile products that nominate candidates."""

from __future__ import annotations

import numpy as np

from allknn._memory import round_block_rows
from allknn.engines.schedule import block_bounds


class Blocks:
    """A matrix cut into row blocks of ``block_rows`` rows (the last may be short).

    Parameters
    ----------
    matrix : ndarray of shape (n, d), float32, C-contiguous
    block_rows : int
        Rows per block, rounded up to a multiple of ``BLOCK_MULTIPLE``.
    """

    def __init__(self, matrix: np.ndarray, block_rows: int):
        self.matrix = matrix
        self.block_rows = block_rows = round_block_rows(block_rows)
        self.bounds = block_bounds(matrix.shape[0], block_rows)

    def __len__(self) -> int:
        return len(self.bounds)

    def block(self, i: int) -> np.ndarray:
        """Rows of block ``i``, shape (rows, d)."""
        start, stop = self.bounds[i]
        return self.matrix[start:stop]

    def rows(self, i: int) -> int:
        """Number of rows in block ``i``."""
        start, stop = self.bounds[i]
        return stop - start


def dense_product(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """``out = a @ b.T`` in float32 (BLAS): the products that nominate
    candidates, within :func:`allknn.topk.bounds.product_error` of the
    reference."""
    np.matmul(a, b.T, out=out)


def dense_tile(a: Blocks, i: int, b: Blocks, j: int, buffer: np.ndarray) -> np.ndarray:
    """Block ``i`` of ``a`` times block ``j`` of ``b`` transposed, at the
    front of ``buffer``, shape (rows of i, rows of j)."""
    out = buffer[: a.rows(i) * b.rows(j)].reshape(a.rows(i), b.rows(j))
    dense_product(a.block(i), b.block(j), out)
    return out
