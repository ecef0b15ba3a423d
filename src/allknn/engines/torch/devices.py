"""The torch engine's devices: which ones, their tile workers (lanes) and their tile size.

One process drives every device it is given: each device gets its tile
workers (:class:`Lane`), and the plan hands tiles to the lanes as they
free up, so each device takes a share of the tasks in proportion to its
speed. A CUDA lane has its own stream and its own pinned staging buffers,
so that while one lane of a device computes, the other copies its next
blocks (double buffering) or offers its nominees on the host.

Tiles on a CUDA device are much larger than on a CPU (a tile of 2,048 rows
is a few microseconds of tensor-core work, all launch overhead): their
size comes from the devices' free memory and, when rows are streamed, from
``max_memory`` for the pinned host buffers (:func:`device_block_rows`).
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import numpy as np

from allknn._memory import BLOCK_MULTIPLE, round_block_rows

CUDA_LANES = 2
"""Tile workers per CUDA device: one computes while the other copies or
offers its nominees on the host."""

TILE_SHARE = 0.5
"""Share of a device's free memory (after its resident rows) its lanes' tiles may take."""

TILE_BYTES_PER_ENTRY = 10
"""Device bytes per tile entry at once: the float32 products, the boolean
nomination mask and the comparison it is made of, and torch's scratch."""

MAX_DEVICE_BLOCK_ROWS = 32768
"""Largest tile side on a device: a 4 GB float32 tile, past which larger
tiles gain nothing."""


def parse_devices(value: object) -> tuple[str, ...]:
    """The devices a ``device=`` value names: ``"cpu"``, ``"cuda"``,
    ``"cuda:N"``, several of them comma-separated, or a list of them.

    Raises
    ------
    ValueError
        For anything else, or CPU and CUDA devices mixed.
    """
    names = value.split(",") if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not names:
        names = [value]
    devices = tuple(_device_name(name, value) for name in names)
    gpus = [device for device in devices if device != "cpu"]  # "cpu,cpu" stands in for two devices in tests
    if len(set(gpus)) < len(gpus) or ("cuda" in gpus and len(gpus) > 1):
        raise ValueError(f"device= names a device twice ({value!r}): each device takes one share of the "
                         f"tiles; name each once, by its index ('cuda:0,cuda:1')")
    if len({device == "cpu" for device in devices}) > 1:
        raise ValueError(f"device= mixes the CPU and CUDA devices ({value!r}); give CUDA devices only, "
                         f"or 'cpu'")
    return devices


def _device_name(name: object, value: object) -> str:
    """One device of ``value``, as torch names it (``"cuda:01"`` is ``"cuda:1"``)."""
    device = name.strip() if isinstance(name, str) else name
    if device in ("cpu", "cuda"):
        return device
    index = device[5:] if isinstance(device, str) and device.startswith("cuda:") else ""
    if not (index.isascii() and index.isdigit()):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N' (several: 'cuda:0,cuda:1'), "
                         f"got {value!r}")
    return f"cuda:{int(index)}"


def device_block_rows(free_bytes: int, dim: int, lanes_per_device: int, n_rows: int, *,
                      streamed_budget: int | None) -> int:
    """Tile side on a CUDA device: the largest multiple of 64 whose lanes'
    tiles take at most ``TILE_SHARE`` of ``free_bytes``, and, when rows are
    streamed, whose pinned staging blocks (two per lane) fit
    ``streamed_budget`` (``max_memory``); at most ``MAX_DEVICE_BLOCK_ROWS``
    and the rows there are.

    Parameters
    ----------
    free_bytes : int
        Free memory of the device with the least, less its resident rows.
    dim : int
    lanes_per_device : int
    n_rows : int
    streamed_budget : int, optional
        Host bytes for the staging blocks of all lanes (None: the rows are
        resident, nothing is staged).

    Raises
    ------
    ValueError
        If not even one tile of 64 rows fits.
    """
    per_lane = TILE_SHARE * max(free_bytes, 0) / lanes_per_device
    quadratic, linear = TILE_BYTES_PER_ENTRY, 2 * 4 * dim  # the tile, and its two blocks of rows
    rows = int((-linear + math.sqrt(linear * linear + 4 * quadratic * per_lane)) / (2 * quadratic))
    if streamed_budget is not None:
        rows = min(rows, streamed_budget // (lanes_per_device * 2 * 4 * dim))
    rows = min(rows, MAX_DEVICE_BLOCK_ROWS, round_block_rows(max(n_rows, 1)))
    rows -= rows % BLOCK_MULTIPLE
    if rows < BLOCK_MULTIPLE:
        raise ValueError(f"the device has too little free memory ({free_bytes} bytes after its rows) or "
                         f"max_memory is too small for one tile of {BLOCK_MULTIPLE} rows at {dim} "
                         f"dimensions; free device memory, raise max_memory, or use resident=True")
    return rows


def free_device_bytes(device: str) -> int:
    """Free memory of a CUDA device, counting what torch's caching allocator
    holds but does not use (earlier tiles' memory, free for the next)."""
    import torch

    where = torch.device(device)
    return int(torch.cuda.mem_get_info(where)[0] + torch.cuda.memory_reserved(where)
               - torch.cuda.memory_allocated(where))


class Lane:
    """One tile worker on one device: its stream, staging buffers and the
    block it copied last (reused while the schedule stays on that block)."""

    def __init__(self, device: str, precision: str):
        import torch

        self.device, self.precision = device, precision
        cuda = device.startswith("cuda")
        self.stream = torch.cuda.Stream(device=torch.device(device)) if cuda else None
        self._pinned = cuda
        self._staging: dict[str, Any] = {}
        self._copied: dict[str, tuple[int, int, int, Any]] = {}

    def active(self) -> AbstractContextManager:
        """Run the lane's device work on its own stream (CUDA)."""
        import torch

        return torch.cuda.stream(self.stream) if self.stream is not None else nullcontext()

    def to_device(self, rows: np.ndarray, slot: str, key: tuple[int, int, int]) -> Any:
        """``rows`` (float32) on the device, rounded to the precision.

        ``key`` says which rows of which matrix they are: a copy of the
        same rows into the same ``slot`` as last time is reused. On CUDA the
        rows go through the slot's pinned staging buffer and are copied
        asynchronously on the lane's stream; the lane's next use of the
        slot comes after the tile that used it has synchronised (its
        nominees came back to the host), so the buffer is free again.
        """
        import torch

        from allknn.engines.torch.product import rounded

        if slot in self._copied and self._copied[slot][:3] == key:
            return self._copied[slot][3]
        host = torch.from_numpy(np.array(rows))  # a writable copy (cached blocks are read-only)
        if self._pinned:
            staging = self._staging.get(slot)
            if staging is None or staging.numel() < host.numel():
                staging = torch.empty(host.numel(), dtype=torch.float32, pin_memory=True)
                self._staging[slot] = staging
            staged = staging[: host.numel()].view(host.shape)
            staged.copy_(host)
            host = staged
        on_device = rounded(host.to(self.device, non_blocking=self._pinned), self.precision)
        self._copied[slot] = (*key, on_device)
        return on_device


def lanes_for(devices: tuple[str, ...], precision: str, threads: int) -> list[Lane]:
    """The tile workers: ``threads`` on the CPU, ``CUDA_LANES`` per CUDA device
    (interleaved, so that a few tiles already reach every device)."""
    if devices == ("cpu",) * len(devices):
        per_device = max(1, threads // len(devices))
    else:
        per_device = CUDA_LANES
    return [Lane(device, precision) for _ in range(per_device) for device in devices]


def task_plan_options(device: str, precision: str, k: int, threads: int, block_rows: int,
                      rows: tuple[np.ndarray, ...], *, tasks_at_once: int = 1) -> dict[str, Any]:
    """The device plans' options for one Dask task on this worker: its rows
    resident on ``device``, tiles from its share of the free memory on CUDA
    (:func:`task_block_rows`; a task's tiles do not outlive it, so any size
    gives the same result).

    Parameters
    ----------
    device, precision : str
    k, threads, block_rows : int
        Neighbours, tile workers on the CPU, and the CPU tile side.
    rows : tuple of ndarray of shape (n_i, d), float32
        The row blocks the task puts on the device.
    tasks_at_once : int
        Tasks that may run at once on the device: the threads of every
        worker process sharing it.
    """
    if device.startswith("cuda"):
        block_rows = task_block_rows(free_device_bytes(device), rows, tasks_at_once)
    return {"lanes": lanes_for((device,), precision, threads), "precision": precision, "k": k,
            "resident": True, "block_rows": block_rows}


def task_block_rows(free_bytes: int, rows: tuple[np.ndarray, ...], tasks_at_once: int) -> int:
    """Tile side of one of ``tasks_at_once`` tasks sharing a device's
    ``free_bytes``: each task's resident rows and tiles take at most its
    equal share (:func:`device_block_rows` of it), so that tasks starting
    together do not take the same memory twice.

    Raises
    ------
    ValueError
        If not even one tile fits a task's share (naming the fix).
    """
    share = free_bytes // max(tasks_at_once, 1) - sum(block.nbytes for block in rows)
    try:
        return device_block_rows(share, rows[0].shape[1], CUDA_LANES, sum(len(block) for block in rows),
                                 streamed_budget=None)
    except ValueError:
        if tasks_at_once == 1:
            raise
        raise ValueError(f"{tasks_at_once} tasks at once (the threads of the workers sharing the device) "
                         f"leave each {share} bytes of the device's {free_bytes} free bytes after its rows, "
                         f"too few for one tile; start one worker per GPU with --nthreads 1 (one task per "
                         f"GPU at a time is enough to keep it busy), or give smaller task_rows") from None
