"""Row labels (ids): read them from a sequence, a Series or a text file, and check them."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

_SHOWN = 5


def read_ids(source: Sequence[Any] | np.ndarray | str | os.PathLike[str], n_rows: int, *,
             name: str = "ids") -> np.ndarray:
    """Return one unique label per matrix row.

    Parameters
    ----------
    source : sequence, ndarray, pandas Series/Index, or path-like
        The labels, or the path of a UTF-8 text file with one label per line
        (kept as strings; a final newline is optional, ``\\r\\n`` endings
        are accepted). A ``str`` is always taken as a path.
    n_rows : int
        Number of rows of the matrix the labels belong to.
    name : str
        What the labels are called in error messages.

    Returns
    -------
    ndarray of shape (n_rows,)
        int64 for integer labels, else an object array of ``str``.

    Raises
    ------
    FileNotFoundError
        If ``source`` is a path that does not exist.
    TypeError
        If the labels are neither all integers nor all strings.
    ValueError
        If the count differs from ``n_rows``, a label is missing (None or
        NaN), a label occurs more than once, or the file has empty lines.
    """
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        labels = _read_text(path)
        name = f"{name} file {path}"
    else:
        labels = _as_labels(source, name)
    if labels.shape[0] != n_rows:
        raise ValueError(
            f"{name} has {labels.shape[0]} entries but the matrix has {n_rows} rows; give one id per row"
        )
    _check_unique(labels, name)
    return labels


def _read_text(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"ids file {path} does not exist; check the path")
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines[-1] == "":
        lines.pop()
    lines = [line.removesuffix("\r") for line in lines]
    empty = [number for number, line in enumerate(lines, start=1) if not line]
    if empty:
        shown = ", ".join(map(str, empty[:_SHOWN])) + (", ..." if len(empty) > _SHOWN else "")
        raise ValueError(
            f"ids file {path} has {len(empty)} empty line(s) (line {shown}); "
            f"write one non-empty id per line"
        )
    return np.array(lines, dtype=object)


def _as_labels(source: Any, name: str) -> np.ndarray:
    if hasattr(source, "to_numpy"):
        values = source.to_numpy()
    elif isinstance(source, np.ndarray):
        values = source
    else:  # a plain sequence: keep each value's own type (np.asarray would turn [1, "a"] into strings)
        values = np.array(list(source), dtype=object)
    if values.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {values.shape}")
    kind = values.dtype.kind
    if kind in "iu":
        return values.astype(np.int64, copy=False)
    if kind == "U":
        return values.astype(object)
    if kind == "O":
        types = {type(value) for value in values}
        if types == {str}:
            return values
        integer = (int, np.integer)
        if types and all(issubclass(t, integer) and not issubclass(t, bool | np.bool_) for t in types):
            return values.astype(np.int64)
    missing = np.flatnonzero(np.array([value is None or value != value for value in values], dtype=bool))
    if missing.size:
        raise ValueError(
            f"{name} has {missing.size} missing value(s) (None or NaN) at position(s) "
            f"{_positions(missing)}; every row needs an id"
        )
    shown = f"dtype {values.dtype}" if kind != "O" else "values of type " + ", ".join(
        sorted(t.__name__ for t in types))
    raise TypeError(
        f"{name} must be all integers or all strings, got {shown}; convert them, e.g. with .astype(str)"
    )


def _positions(positions: np.ndarray) -> str:
    return ", ".join(map(str, positions[:_SHOWN].tolist())) + (", ..." if positions.size > _SHOWN else "")


def _check_unique(labels: np.ndarray, name: str) -> None:
    distinct = len(set(labels)) if labels.dtype == object else np.unique(labels).size
    if distinct == labels.size:
        return
    unique, counts = np.unique(labels, return_counts=True)
    repeated = np.flatnonzero(counts > 1)
    first = repeated[:_SHOWN]
    pairs = zip(unique[first].tolist(), counts[first].tolist(), strict=True)
    shown = ", ".join(f"{label!r} ({count} times)" for label, count in pairs)
    raise ValueError(
        f"{name} has {repeated.size} duplicated id(s): {shown}" + (", ..." if repeated.size > _SHOWN else "")
        + "; ids must be unique"
    )
