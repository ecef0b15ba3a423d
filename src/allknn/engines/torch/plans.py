"""Tile plans whose products and nominations happen on the torch device.

The rows are copied to the device once, rounded to the precision, when
they fit (``resident``); otherwise each tile copies its two blocks (the
corpus streamed from host memory, so inputs larger than the device work). For each
tile the device computes the products and the nominees: the values that
reach the row's (and, off the diagonal of a self-join, the column's) floor,
the threshold less the margin, and that lie within two margins of the
tile's own k-th best value of that row or column (a value further below
cannot beat the k better ones of the same tile, whatever the rounding).
Only the nominees' positions travel to the host, where the reference scores
them into the state (:func:`allknn.kernels.topk.offer_nominees`): never a
tile.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from allknn.engines.exact.plans import QueryJoinPlan, SelfJoinPlan
from allknn.engines.schedule import Tile
from allknn.engines.torch.product import rounded
from allknn.kernels.topk import offer_nominees
from allknn.topk.bounds import nomination_margin


class _OnDevice:
    """Rows on the device and the nomination of one tile."""

    def _device_setup(self, device: str, precision: str, k: int, dim: int, resident: bool) -> None:
        self.device, self.precision, self.k, self.resident = device, precision, k, resident
        if device.startswith("cuda") and precision != "fp32":  # tensor cores may truncate their sums
            self.margin = nomination_margin(dim, precision, truncated_sums=True)

    def _to_device(self, rows: np.ndarray) -> Any:
        import torch

        return rounded(torch.from_numpy(np.ascontiguousarray(rows)).to(self.device), self.precision)

    def _resident(self, rows: np.ndarray) -> Any:
        """``rows`` on the device for the whole run, or None when they are
        streamed block by block (copied with each tile)."""
        return self._to_device(rows) if self.resident else None

    def _rows(self, on_device: Any, host: np.ndarray, start: int, stop: int) -> Any:
        return on_device[start:stop] if on_device is not None else self._to_device(host[start:stop])

    def _nominees(self, a: Any, b: Any, row_floor: np.ndarray, col_floor: np.ndarray | None,
                  skip_diagonal: bool) -> tuple[np.ndarray, np.ndarray]:
        import torch

        values = a @ b.T  # TF32 tensor cores on CUDA unless fp32 (set once by the engine's plan)
        margin = float(self.margin)
        rows, cols = values.shape
        depth = min(self.k + int(skip_diagonal), cols)  # the row itself may be among the best
        floor = torch.from_numpy(row_floor).to(values.device)
        floor = torch.maximum(floor, torch.topk(values, depth, dim=1).values[:, -1] - 2 * margin)
        mask = values >= floor[:, None]
        if col_floor is not None:
            column = torch.from_numpy(col_floor).to(values.device)
            best = torch.topk(values, min(self.k, rows), dim=0).values[-1]
            column = torch.maximum(column, best - 2 * margin)
            mask |= values >= column[None, :]
        found = torch.nonzero(mask).cpu().numpy()
        return np.ascontiguousarray(found[:, 0]), np.ascontiguousarray(found[:, 1])


class DeviceSelfJoinPlan(_OnDevice, SelfJoinPlan):
    """:class:`SelfJoinPlan` with device products and nominations (dense rows)."""

    def __init__(self, normed: np.ndarray, norms: np.ndarray, *, block_rows: int, skip_self: bool,
                 ids: np.ndarray | None, device: str, precision: str, k: int, resident: bool):
        super().__init__(normed, norms, block_rows=block_rows, skip_self=skip_self, ids=ids,
                         precision=precision)
        self._device_setup(device, precision, k, normed.shape[1], resident)
        self.normed = normed
        self.on_device = self._resident(normed)

    def _work(self, tile: Tile, buffer: np.ndarray, keys: np.ndarray, thresholds: np.ndarray) -> None:
        (i0, i1), (j0, j1) = self.blocks.bounds[tile[0]], self.blocks.bounds[tile[1]]
        diagonal = tile[0] == tile[1]
        row_floor = thresholds[self.row_ids[i0:i1]] - self.margin
        col_floor = None if diagonal else thresholds[self.row_ids[j0:j1]] - self.margin
        a = self._rows(self.on_device, self.normed, i0, i1)
        b = a if diagonal else self._rows(self.on_device, self.normed, j0, j1)
        rows, cols = self._nominees(a, b, row_floor, col_floor, diagonal and self.skip_self)
        offer_nominees(rows, cols, i0, j0, self.row_ids, self.row_ids, keys, thresholds,
                       diagonal and self.skip_self, self.scoring[0], self.scoring[1], not diagonal)


class DeviceQueryJoinPlan(_OnDevice, QueryJoinPlan):
    """:class:`QueryJoinPlan` with device products and nominations (dense rows)."""

    def __init__(self, queries_normed: np.ndarray, normed: np.ndarray, query_norms: np.ndarray,
                 norms: np.ndarray, *, block_rows: int, device: str, precision: str, k: int, resident: bool):
        super().__init__(queries_normed, normed, query_norms, norms, block_rows=block_rows,
                         precision=precision)
        self._device_setup(device, precision, k, normed.shape[1], resident)
        self.queries_normed, self.normed = queries_normed, normed
        self.queries_on_device = self._resident(queries_normed)
        self.corpus_on_device = self._resident(normed)

    def _work(self, tile: Tile, buffer: np.ndarray, keys: np.ndarray, thresholds: np.ndarray) -> None:
        (i0, i1), (j0, j1) = self.query_blocks.bounds[tile[0]], self.corpus_blocks.bounds[tile[1]]
        rows, cols = self._nominees(self._rows(self.queries_on_device, self.queries_normed, i0, i1),
                                    self._rows(self.corpus_on_device, self.normed, j0, j1),
                                    thresholds[self.query_ids[i0:i1]] - self.margin, None, False)
        offer_nominees(rows, cols, i0, j0, self.query_ids, self.corpus_ids, keys, thresholds, False,
                       self.scoring[0], self.scoring[1], False)
