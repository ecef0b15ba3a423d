"""Durable progress of a long run: the top-k state and the finished tasks.

A checkpoint is one ``.npz`` file written atomically (temp file, fsync,
rename), holding the running top-k state, the list of finished tasks, what
the plan needs to rebuild the same tasks, and a fingerprint of the input
and parameters. Because the top-k order is total, resuming from it and
running the remaining tasks gives exactly the result of an uninterrupted
run (see :mod:`allknn.engines.tasks`).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse

from allknn.kernels.topk import thresholds_of

_HASH_ROWS = 65536

_OWN_ENTRIES = ("keys", "done", "fingerprint")
"""Entries of the file that are not the plan's state."""


def fingerprint_matrix(data: np.ndarray | scipy.sparse.csr_matrix) -> str:
    """Hash of a matrix's shape, dtype and values, read block by block."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{data.shape}|{data.dtype.str}".encode())
    if scipy.sparse.issparse(data):
        for part in (data.indptr, data.indices, data.data):
            digest.update(np.ascontiguousarray(part).tobytes())
        return digest.hexdigest()
    for start in range(0, data.shape[0], _HASH_ROWS):
        digest.update(np.ascontiguousarray(data[start : start + _HASH_ROWS]).tobytes())
    return digest.hexdigest()


@dataclass
class Progress:
    """What a checkpoint restores.

    Attributes
    ----------
    keys, thresholds : ndarray
        Top-k state (see :mod:`allknn.kernels.topk`); only ``keys`` is
        stored, ``thresholds`` is rebuilt from it.
    done : set of tuple of int
        Finished tasks.
    plan : dict of str to ndarray
        The plan's :meth:`~allknn.engines.tasks.TaskPlan.resume_state`
        (for the exact engine: the row order the tiles refer to, and the
        sparse column layout).
    """

    keys: np.ndarray
    thresholds: np.ndarray
    done: set[tuple[int, ...]]
    plan: dict[str, np.ndarray]


class Checkpoint:
    """Save and restore the progress of one run.

    Parameters
    ----------
    path : path-like
        The checkpoint file.
    fingerprint : dict
        Input hashes and parameters that must match for a resume; values
        must be JSON-serialisable.
    interval : float
        Minimum seconds between two saves (:meth:`due`).
    """

    def __init__(self, path: str | os.PathLike[str], fingerprint: dict[str, Any], *, interval: float = 5.0):
        self.path = Path(path)
        self.fingerprint = fingerprint
        self.interval = interval
        self._last_save = time.monotonic()

    def exists(self) -> bool:
        """Whether a checkpoint file is present."""
        return self.path.exists()

    def restore(self) -> Progress:
        """Load the saved progress after checking it belongs to this run.

        Raises
        ------
        ValueError
            If the file is unreadable, or was made with another input or
            other parameters (naming each difference).
        """
        try:
            with np.load(self.path, allow_pickle=False) as saved:
                stored = json.loads(str(saved["fingerprint"]))
                keys, tasks = saved["keys"], saved["done"]
                plan = {name: saved[name] for name in saved.files if name not in _OWN_ENTRIES}
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(
                f"checkpoint {self.path} cannot be read ({exc}); delete it to start over"
            ) from None
        differences = [
            f"{key}: checkpoint has {stored.get(key)!r}, this run has {value!r}"
            for key, value in self.fingerprint.items()
            if stored.get(key) != value
        ]
        if differences:
            raise ValueError(
                f"cannot resume from {self.path}: it was made by a different run ("
                + "; ".join(differences)
                + "); run with the original input and parameters, or delete the checkpoint"
            )
        return Progress(
            keys=keys,
            thresholds=thresholds_of(keys),
            done={tuple(int(part) for part in task) for task in tasks},
            plan=plan,
        )

    def due(self) -> bool:
        """Whether ``interval`` seconds have passed since the last save."""
        return time.monotonic() - self._last_save >= self.interval

    def save(self, progress: Progress) -> None:
        """Write the progress atomically."""
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        width = len(next(iter(progress.done))) if progress.done else 0
        done = np.array(sorted(progress.done), dtype=np.int64).reshape(len(progress.done), width)
        try:
            with open(tmp, "wb") as handle:
                np.savez(
                    handle,
                    **progress.plan,
                    keys=progress.keys,
                    done=done,
                    fingerprint=np.array(json.dumps(self.fingerprint, sort_keys=True)),
                )
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        self._last_save = time.monotonic()
