"""What the Dask workers run for the approximate engine: sample rows,
assign rows to cells, regroup them by range of cells, probe, finish a row
block.

Every stage reads the files of the one before on shared storage (the
scratch folder) and writes its own, so that no stage's task depends on
another's future: the task graph has no edge per (row block, cell) and a
lost worker loses no result. Each name below is a set of ``.npy`` files
``NAME.ARRAY.npy`` (memory-mapped when read, so a task reads only the
slices it needs):

``assigned-B``
    Row block ``B``'s kept rows sorted by their own cell (then by row),
    with ``rows``, ``norms``, ``ids``, ``probes`` (each row's nearest cells,
    its own first) and ``offsets`` (where each cell's rows start).
``range-R``
    The rows of the consecutive cells of range ``R`` (about one task's
    rows), gathered from every ``assigned-B``, in the same arrays.
``states-T``
    The top-k states found by probing task ``T`` for its query rows, sorted
    by row block, with ``ids``, ``keys`` and ``offsets`` (where each row
    block's rows start).

``spread-KIND-I-J``
    The first step of a two-step shuffle (:func:`spread_task`): the rows of
    the J-th run of keys (cells, or row blocks) of the I-th group of files.

Files filed by key (``assigned-B``, ``states-T``, ``spread-…``) keep
``offsets`` over the whole key space, so any of them is sliced by key the
same way (:func:`_slices`); a ``range-R``'s offsets cover its own cells.

A probing task takes a slice of one range's rows as its queries and joins,
cell by cell, the queries probing the cell with the cell's rows (read from
the cell's range), by the exact engine's tiles: every query row's whole
search happens in one task, so no partial states travel between tasks.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import numpy as np

from allknn._blas import single_threaded_blas
from allknn.engines.dask.tasks import (
    Block,
    JoinSpec,
    device_settings,
    finish_task,
    normalised_block,
    query_plan,
)
from allknn.engines.kmeans import nearest_centroids
from allknn.kernels.topk import (
    EMPTY_KEY,
    floored_state,
    key_ids,
    key_similarities,
    merge_found,
    new_state,
)

ROW_ARRAYS = ("rows", "norms", "ids", "probes")


SHARED_MARKER = "_shared"
"""The file the client leaves in the scratch folder, holding a token each
worker must read back (:func:`scratch_refusal`)."""


def scratch_refusal(folder: str, token: str) -> str | None:
    """Why this worker cannot use the client's scratch ``folder`` (None if it can)."""
    marker = Path(folder) / SHARED_MARKER
    try:
        seen = marker.read_text()
    except OSError as exc:
        return f"cannot read {marker} ({exc.strerror or exc})"
    if seen != token:
        return f"sees another folder at {folder} (not the client's)"
    probe = Path(folder) / f"_written-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        return f"cannot write in {folder} ({exc.strerror or exc})"
    return None


def sample_task(block: Block, wanted: np.ndarray, block_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """The normalised kept rows of ``block`` among global rows ``wanted``, and their ids."""
    rows, _, ids = normalised_block(block, None, block_rows)
    keep = np.isin(ids, wanted)
    return rows[keep], ids[keep]


def _save(folder: str, name: str, **arrays: np.ndarray) -> None:
    """Write ``name``'s arrays, each published by a rename, in order (scratch
    needs no fsync). A task run again finds its last array published and
    writes nothing: the files a later stage may be reading are never
    replaced (they would hold the same bytes, but a reader on a network
    filesystem may lose a file replaced under it)."""
    if (Path(folder) / f"{name}.{list(arrays)[-1]}.npy").exists():
        return
    for array_name, array in arrays.items():
        path = Path(folder) / f"{name}.{array_name}.npy"
        tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        with open(tmp, "wb") as handle:  # a handle: np.save would add ".npy" to the name
            np.save(handle, np.ascontiguousarray(array))
        os.replace(tmp, path)


def _open(folder: str, name: str, *array_names: str) -> dict[str, np.ndarray]:
    try:
        return {array_name: np.load(Path(folder) / f"{name}.{array_name}.npy", mmap_mode="r")
                for array_name in array_names}
    except FileNotFoundError as exc:  # e.g. a worker that joined after the scratch check
        where = f"worker {socket.gethostname()} (pid {os.getpid()})"
        raise FileNotFoundError(f"{where} cannot read {exc.filename}: the scratch folder must be on storage "
                                f"every worker shares at the same path (scratch=, --scratch)") from exc


def _filed(arrays: dict[str, np.ndarray], keys: np.ndarray, n_keys: int) -> dict[str, np.ndarray]:
    """The rows sorted by ``keys`` in ``0..n_keys - 1`` (stable: in their
    order within a key), with ``offsets`` (where each key's rows start)."""
    order = np.argsort(keys, kind="stable")
    offsets = np.zeros(n_keys + 1, dtype=np.int64)
    np.cumsum(np.bincount(keys, minlength=n_keys), out=offsets[1:])
    return {**{name: array[order] for name, array in arrays.items()}, "offsets": offsets}


def _key(arrays: dict[str, np.ndarray], kind: str, task_rows: int) -> np.ndarray:
    """The key a row is filed under: its own cell, or its row block."""
    return arrays["probes"][:, 0].astype(np.int64) if kind == "cell" else arrays["ids"] // task_rows


def _slices(folder: str, inputs: list[str], first_key: int, stop_key: int,
            names: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The rows of keys ``first_key:stop_key`` of the filed ``inputs``, in input order."""
    parts = []
    for name in inputs:
        filed = _open(folder, name, *names, "offsets")
        start, stop = filed["offsets"][first_key], filed["offsets"][stop_key]
        parts.append({array: np.asarray(filed[array][start:stop]) for array in names})
    return {array: np.concatenate([part[array] for part in parts]) for array in names}


def assign_task(block: Block, index: int, centroids: np.ndarray, probes: int, folder: str,
                block_rows: int) -> np.ndarray:
    """Write ``assigned-index`` (see the module docstring).

    Returns
    -------
    ndarray of shape (cells,), int64
        The block's kept rows in each cell.
    """
    with single_threaded_blas():
        rows, norms, ids = normalised_block(block, None, block_rows)
        order = (nearest_centroids(rows, centroids, probes) if rows.shape[0]
                 else np.zeros((0, probes), np.int32))
    assigned = _filed({"rows": rows, "norms": norms, "ids": ids, "probes": order},
                      order[:, 0].astype(np.int64), centroids.shape[0])
    _save(folder, f"assigned-{index}", **assigned)
    return np.diff(assigned["offsets"])


def add_counts(*counts: np.ndarray) -> np.ndarray:
    """The sum of cell counts."""
    return np.sum(counts, axis=0)


def cell_ranges(counts: np.ndarray, limit: int) -> np.ndarray:
    """Cut the cells into ranges of consecutive cells holding at most
    ``limit`` rows together (a cell holding more is a range alone).

    Returns
    -------
    ndarray of shape (ranges + 1,), int64
        The first cell of each range, then the number of cells.
    """
    starts = [0]
    held = 0
    for cell, count in enumerate(counts.tolist()):
        if held + count > limit and held:
            starts.append(cell)
            held = 0
        held += count
    return np.array([*starts, counts.size], dtype=np.int64)


def spread_task(folder: str, inputs: list[str], output: str, first_key: int, stop_key: int, n_keys: int,
                names: tuple[str, ...], kind: str, task_rows: int) -> int:
    """Write ``output``: the rows of keys ``first_key:stop_key`` of the
    filed ``inputs``, filed again (the first half of a two-step shuffle,
    see :func:`allknn.engines.dask.approx.spread`); returns its rows."""
    found = _slices(folder, inputs, first_key, stop_key, names)
    _save(folder, output, **_filed(found, _key(found, kind, task_rows), n_keys))
    return int(found["ids"].size)


def regroup_task(index: int, first_cell: int, stop_cell: int, inputs: list[str], folder: str) -> int:
    """Write ``range-index``, the rows of cells ``first_cell:stop_cell``
    from the filed ``inputs`` (every ``assigned-B``, or their spread);
    returns its rows."""
    found = _slices(folder, inputs, first_cell, stop_cell, ROW_ARRAYS)
    cells = _key(found, "cell", 0) - first_cell
    _save(folder, f"range-{index}", **_filed(found, cells, stop_cell - first_cell))
    return int(found["ids"].size)


def save_plan(folder: str, range_starts: np.ndarray, done_blocks: np.ndarray) -> None:
    """Keep what every probing task reads in ``plan`` (rather than in each
    task's spec): the first cell of each range (:func:`cell_ranges`), and
    the row blocks whose rows are not queries (finished by an earlier run)."""
    _save(folder, "plan", range_starts=range_starts, done_blocks=done_blocks)


def probe_task(index: int, range_index: int, start: int, stop: int, folder: str, spec: JoinSpec,
               task_rows: int, n_blocks: int) -> int:
    """Write ``states-index``: the top-k of rows ``start:stop`` of range
    ``range_index`` (those of row blocks the ``plan`` does not list as
    done) among the rows of the cells each probes, the row itself left out;
    a cell of more than ``task_rows`` rows is joined in pieces of
    ``task_rows``. ``spec`` gives the tiles (``spec.k`` is k + 1, room for
    the row itself), on the CPU or on a device of the worker.

    Returns
    -------
    int
        The query rows searched.
    """
    plan = {name: np.asarray(array) for name, array in _open(folder, "plan", "range_starts",
                                                              "done_blocks").items()}
    range_starts, done_blocks = plan["range_starts"], plan["done_blocks"]
    queries = {name: np.asarray(array[start:stop])
               for name, array in _open(folder, f"range-{range_index}", *ROW_ARRAYS).items()}
    wanted = ~np.isin(queries["ids"] // task_rows, done_blocks)
    queries = {name: array[wanted] for name, array in queries.items()}
    n, probes = queries["probes"].shape
    keys = new_state(n, spec.k)[0]
    asked = queries["probes"].ravel()
    order = np.argsort(asked, kind="stable")  # (row, cell) pairs by cell, rows ascending within a cell
    cells, firsts = np.unique(asked[order], return_index=True)
    lasts = np.append(firsts[1:], order.size)
    asking_rows = np.repeat(np.arange(n), probes)[order]
    # the range's own cells first: each query's nearest cell is among them, so
    # its floor rises early and the other cells offer few candidates
    own = (cells >= range_starts[range_index]) & (cells < range_starts[range_index + 1])
    visits = np.concatenate([np.flatnonzero(own), np.flatnonzero(~own)])
    ranges: dict[int, dict[str, np.ndarray]] = {}
    with single_threaded_blas(), device_settings(spec):
        for cell, first, last in zip(cells[visits].tolist(), firsts[visits].tolist(), lasts[visits].tolist(),
                                     strict=True):
            asking = asking_rows[first:last]
            r = int(np.searchsorted(range_starts, cell, side="right")) - 1
            if r not in ranges:
                ranges[r] = _open(folder, f"range-{r}", "rows", "norms", "ids", "offsets")
            members = ranges[r]
            low, high = members["offsets"][cell - range_starts[r] : cell - range_starts[r] + 2]
            query_rows = np.ascontiguousarray(queries["rows"][asking])
            for piece in range(low, high, task_rows):
                end = min(piece + task_rows, high)
                # floored at each query's k + 1-th best so far: only candidates that can still enter
                state, thresholds = floored_state(key_similarities(keys[asking, 0]), spec.k)
                query_plan(spec, query_rows, np.ascontiguousarray(members["rows"][piece:end]),
                           queries["norms"][asking], np.asarray(members["norms"][piece:end])
                           ).run(state, thresholds, threads=1)
                merge_found(keys, asking, state, np.asarray(members["ids"][piece:end], dtype=np.int64))
    keys[key_ids(keys) == queries["ids"][:, None]] = EMPTY_KEY
    keys = np.sort(keys, axis=1)[:, 1:]  # the row itself, or the worst of k + 1
    states = {"ids": queries["ids"], "keys": keys}
    _save(folder, f"states-{index}", **_filed(states, _key(states, "block", task_rows), n_blocks))
    return n


def finish_block_task(block: Block, index: int, bad_rows: np.ndarray, audit_rows: np.ndarray, scratch: str,
                      inputs: list[str], k: int, **finish: object) -> tuple[object, list[list[int]]]:
    """Row block ``index``'s states from the filed ``inputs`` in ``scratch``
    (every ``states-T``, or their spread), finished by
    :func:`~allknn.engines.dask.tasks.finish_task` (its options ``finish``), and the keys found for
    its audit rows ``audit_rows`` (before ``min_similarity``), as lists of
    int for the manifest.

    Raises
    ------
    RuntimeError
        If a kept row has no state (the scratch folder lost files).
    """
    kept = np.setdiff1d(np.arange(block.start, block.stop), bad_rows)
    keys = new_state(kept.size, k)[0]
    found = np.zeros(kept.size, dtype=bool)
    states = _slices(scratch, inputs, index, index + 1, ("ids", "keys"))
    positions = np.searchsorted(kept, states["ids"])
    keys[positions] = states["keys"]
    found[positions] = True
    if not found.all():
        raise RuntimeError(f"rows {kept[~found][:5].tolist()}... of block {index} have no search state in "
                           f"{scratch}: the scratch folder lost files; run again")
    audit_keys = keys[np.searchsorted(kept, audit_rows)].tolist()
    return finish_task(keys, block, bad_rows, **finish), audit_keys
