"""Tile plans whose products and nominations happen on torch devices.

The rows are copied to each device once, rounded to the precision, when
they fit (``resident``); otherwise each tile copies the blocks its lane
does not hold yet (:class:`~allknn.engines.torch.devices.Lane`: the corpus
streamed from host memory through pinned buffers, so inputs larger than the
device work). For each tile the device computes the products and the
nominees: the values that reach the row's (and, off the diagonal of a
self-join, the column's) floor, the threshold less the margin, and that lie
within two margins of the tile's own k-th best value of that row or column
(a value further below cannot beat the k better ones of the same tile,
whatever the rounding). Only the nominees' positions travel to the host,
where the reference scores them into the state
(:func:`allknn.kernels.topk.offer_nominees`): never a tile. Tiles go to the
lanes of every device as the lanes free up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from allknn._blas import single_threaded_blas
from allknn.engines.base import ProgressCallback
from allknn.engines.exact.plans import PairPlan, QueryJoinPlan, SelfJoinPlan
from allknn.engines.schedule import Tile, run_tiles
from allknn.engines.torch.devices import Lane
from allknn.kernels.topk import offer_nominees
from allknn.topk.bounds import nomination_margin


class _OnDevice:
    """Rows on the devices, the lanes that run tiles, and the nomination of one tile."""

    def _device_setup(self, lanes: list[Lane], precision: str, k: int, dim: int, resident: bool) -> None:
        self.lanes, self.precision, self.k, self.resident = lanes, precision, k, resident
        self.devices = tuple(dict.fromkeys(lane.device for lane in lanes))
        if self.devices[0].startswith("cuda") and precision != "fp32":  # tensor cores may truncate sums
            self.margin = nomination_margin(dim, precision, truncated_sums=True)

    def _resident(self, rows: np.ndarray) -> dict[str, Any] | None:
        """``rows`` on each device for the whole run, or None when they are
        streamed block by block (copied by the lanes as tiles need them)."""
        if not self.resident:
            return None
        import torch

        from allknn.engines.torch.product import rounded

        on_device = {}
        for device in self.devices:  # a plain copy, on the default stream, complete before any lane starts
            on_device[device] = rounded(torch.from_numpy(np.array(rows)).to(device), self.precision)
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
        return on_device

    def _rows(self, lane: Lane, on_device: dict[str, Any] | None, host: np.ndarray, start: int, stop: int,
              slot: str) -> Any:
        if on_device is not None:
            return on_device[lane.device][start:stop]
        return lane.to_device(host[start:stop], slot, key=(id(host), start, stop))

    def run(self, keys: np.ndarray, thresholds: np.ndarray, *, threads: int,
            tasks: Sequence[Tile] | None = None, on_task: ProgressCallback | None = None) -> None:
        """Merge tiles ``tasks`` (default all) into the state, in place, one
        worker per lane (the lanes were made for ``threads``; no host tile
        buffers: tiles stay on the devices)."""
        todo = self.tasks if tasks is None else tasks

        def work(tile: Tile, worker: int) -> None:
            lane = self.lanes[worker]
            with lane.active():
                self._work_on(lane, tile, keys, thresholds)
            if on_task is not None:
                on_task(tile, self.pairs(tile))

        with single_threaded_blas():
            run_tiles(todo, work, threads=min(len(self.lanes), len(todo)), blocks_of=self._blocks_of)

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

    def resume_state(self) -> dict[str, np.ndarray]:
        """The exact plan's state, and the tile size (chosen from free device
        memory, which a resumed run may not find the same)."""
        return {**super().resume_state(), "block_rows": np.array([self.block_rows], dtype=np.int64)}


class DeviceSelfJoinPlan(_OnDevice, SelfJoinPlan):
    """:class:`SelfJoinPlan` with device products and nominations (dense rows)."""

    def __init__(self, normed: np.ndarray, norms: np.ndarray, *, block_rows: int, skip_self: bool,
                 ids: np.ndarray | None, lanes: list[Lane], precision: str, k: int, resident: bool):
        super().__init__(normed, norms, block_rows=block_rows, skip_self=skip_self, ids=ids,
                         precision=precision)
        self._device_setup(lanes, precision, k, normed.shape[1], resident)
        self.normed = normed
        self.on_device = self._resident(normed)

    def _work_on(self, lane: Lane, tile: Tile, keys: np.ndarray, thresholds: np.ndarray) -> None:
        (i0, i1), (j0, j1) = self.blocks.bounds[tile[0]], self.blocks.bounds[tile[1]]
        diagonal = tile[0] == tile[1]
        row_floor = thresholds[self.row_ids[i0:i1]] - self.margin
        col_floor = None if diagonal else thresholds[self.row_ids[j0:j1]] - self.margin
        a = self._rows(lane, self.on_device, self.normed, i0, i1, "a")
        b = a if diagonal else self._rows(lane, self.on_device, self.normed, j0, j1, "b")
        rows, cols = self._nominees(a, b, row_floor, col_floor, diagonal and self.skip_self)
        offer_nominees(rows, cols, i0, j0, self.row_ids, self.row_ids, keys, thresholds,
                       diagonal and self.skip_self, self.scoring[0], self.scoring[1], not diagonal)


class DeviceQueryJoinPlan(_OnDevice, QueryJoinPlan):
    """:class:`QueryJoinPlan` with device products and nominations (dense rows)."""

    def __init__(self, queries_normed: np.ndarray, normed: np.ndarray, query_norms: np.ndarray,
                 norms: np.ndarray, *, block_rows: int, lanes: list[Lane], precision: str, k: int,
                 resident: bool):
        super().__init__(queries_normed, normed, query_norms, norms, block_rows=block_rows,
                         precision=precision)
        self._device_setup(lanes, precision, k, normed.shape[1], resident)
        self.queries_normed, self.normed = queries_normed, normed
        self.queries_on_device = self._resident(queries_normed)
        self.corpus_on_device = self._resident(normed)

    def _work_on(self, lane: Lane, tile: Tile, keys: np.ndarray, thresholds: np.ndarray) -> None:
        (i0, i1), (j0, j1) = self.query_blocks.bounds[tile[0]], self.corpus_blocks.bounds[tile[1]]
        a = self._rows(lane, self.queries_on_device, self.queries_normed, i0, i1, "a")
        b = self._rows(lane, self.corpus_on_device, self.normed, j0, j1, "b")
        rows, cols = self._nominees(a, b, thresholds[self.query_ids[i0:i1]] - self.margin, None, False)
        offer_nominees(rows, cols, i0, j0, self.query_ids, self.corpus_ids, keys, thresholds, False,
                       self.scoring[0], self.scoring[1], False)


class DevicePairPlan(_OnDevice, PairPlan):
    """:class:`PairPlan` (two blocks of a self-join, both sides offered: a
    Dask task) with device products and nominations."""

    def __init__(self, first: np.ndarray, second: np.ndarray, first_norms: np.ndarray,
                 second_norms: np.ndarray, *, block_rows: int, lanes: list[Lane], precision: str, k: int,
                 resident: bool):
        super().__init__(first, second, first_norms, second_norms, block_rows=block_rows, precision=precision)
        self._device_setup(lanes, precision, k, first.shape[1], resident)
        self.on_device = self._resident(self.both)

    def _work_on(self, lane: Lane, tile: Tile, keys: np.ndarray, thresholds: np.ndarray) -> None:
        (i0, i1) = self.first.bounds[tile[0]]
        (j0, j1) = (self.offset + bound for bound in self.second.bounds[tile[1]])
        a = self._rows(lane, self.on_device, self.both, i0, i1, "a")
        b = self._rows(lane, self.on_device, self.both, j0, j1, "b")
        rows, cols = self._nominees(a, b, thresholds[i0:i1] - self.margin, thresholds[j0:j1] - self.margin,
                                    False)
        offer_nominees(rows, cols, i0, j0, self.row_ids, self.row_ids, keys, thresholds, False, self.scoring,
                       self.scoring, True)
