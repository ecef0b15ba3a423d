"""One BLAS thread, for the code that runs its own worker threads."""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager

from threadpoolctl import ThreadpoolController

_found: tuple[int, ThreadpoolController] | None = None


def single_threaded_blas() -> AbstractContextManager:
    """A context in which the BLAS libraries run one thread each.

    threadpoolctl's ``threadpool_limits`` finds the loaded libraries anew on
    every call by reading the process's memory map (about 2 ms), which
    dominated the approximate engine's many small joins; the libraries are
    found again only after new modules were imported (which may have
    loaded another BLAS).
    """
    global _found
    if _found is None or _found[0] != len(sys.modules):
        _found = (len(sys.modules), ThreadpoolController())
    return _found[1].limit(limits=1, user_api="blas")
