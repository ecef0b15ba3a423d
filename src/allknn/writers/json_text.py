"""JSON text of run parameters and user metadata stored in result files."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np


def dumps(value: Any) -> str:
    """Deterministic JSON (sorted keys); numpy scalars/arrays and paths are converted.

    Raises
    ------
    TypeError
        If a value has no JSON form, naming its type.
    """
    return json.dumps(value, sort_keys=True, default=_plain, allow_nan=True)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(
        f"cannot store a {type(value).__name__} ({value!r}) in a result file's parameters or metadata; "
        f"use numbers, strings, lists and dicts"
    )
