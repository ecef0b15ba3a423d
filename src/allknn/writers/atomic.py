"""Atomic file output: write a temporary file beside the target, then rename.

A reader never sees a half-written file under the final name: the data goes
to ``.{name}.tmp-{pid}`` in the same directory, is flushed to disk
(``fsync``) and is then renamed over the target (``os.replace``, atomic on
POSIX and Windows). A failure removes the temporary file and leaves the
target as it was.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class AtomicFile:
    """A temporary path that becomes ``path`` only on :meth:`publish`.

    Parameters
    ----------
    path : path-like
        The final file name. Its folder must exist.

    Raises
    ------
    FileNotFoundError
        If the folder of ``path`` does not exist.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise FileNotFoundError(
                f"cannot write {self.path}: the folder {self.path.parent} does not exist; create it first"
            )
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")

    def publish(self) -> None:
        """Flush the temporary file to disk and rename it to the final name."""
        try:
            _fsync(self.tmp, os.O_RDONLY)
            os.replace(self.tmp, self.path)
        finally:
            self.discard()
        if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
            _fsync(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)

    def discard(self) -> None:
        """Remove the temporary file, if it is there."""
        self.tmp.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; publish it as ``path`` if the block succeeds.

    Examples
    --------
    >>> with atomic_path("out.npz") as tmp, open(tmp, "wb") as handle:  # doctest: +SKIP
    ...     np.savez(handle, a=a)
    """
    target = AtomicFile(path)
    try:
        yield target.tmp
        target.publish()
    finally:
        target.discard()


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
