"""The normalised rows every engine searches."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import scipy.sparse

from allknn.kernels.topk import permute_rows


def is_sparse(data: object) -> bool:
    """Whether ``data`` is a scipy sparse matrix or array."""
    return scipy.sparse.issparse(data)


@dataclass(frozen=True)
class NormalizedRows:
    """The rows an engine searches, unit-normalised.

    The rows are in input order, except inside :meth:`reordered`, the one
    way an engine may regroup them.

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

    @contextmanager
    def reordered(self, order: np.ndarray | None) -> Iterator[np.ndarray]:
        """Hold ``rows`` in ``order`` (new row ``r`` is row ``order[r]``) for
        the ``with`` block, and put them back on exit, also on error.

        The rows are permuted in place, so regrouping needs no second copy
        of them; ``norms`` and ``kept`` stay in input order. ``None`` keeps
        the order.

        Yields
        ------
        ndarray of shape (m, d)
            ``rows``, reordered.
        """
        if order is None:
            yield self.rows
            return
        permute_rows(self.rows, order)
        try:
            yield self.rows
        finally:
            permute_rows(self.rows, np.argsort(order))
