"""``neighbors_frame``: the kNN graph of a DataFrame's embedding column, as a long table."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from allknn.api import neighbors
from allknn.readers.ids import read_ids

if TYPE_CHECKING:
    import pandas as pd

_SHOWN = 5


def neighbors_frame(
    df: pd.DataFrame, *, embedding: str, id: str | None = None, k: int = 10, **kwargs: Any
) -> pd.DataFrame:
    """Every row's ``k`` most cosine-similar rows of ``df``, as a long table.

    Parameters
    ----------
    df : pandas.DataFrame, polars.DataFrame or pyarrow.Table
        One row per item. A polars DataFrame or a pyarrow Table (which
        have no index: give ``id``, or rows are numbered) gets its result
        in its own kind.
    embedding : str
        Column holding one vector per row (a list or 1-D array of numbers,
        all of the same length); stacked into an (n, d) float32 matrix.
    id : str, optional
        Column of unique item ids; default ``df.index``.
    k : int
        Neighbours per row.
    **kwargs
        Passed to :func:`allknn.neighbors` (``max_memory``, ``threads``,
        ``invalid``, ``min_similarity``, ...); not ``queries``.

    Returns
    -------
    pandas.DataFrame (or the kind of ``df``)
        Columns ``<id>`` (``id`` when ``id`` is None), ``neighbor_id``,
        ``rank`` (int32, 1 = most similar) and ``similarity`` (float32);
        one row per (item, neighbour), missing neighbours left out.

    Raises
    ------
    KeyError
        If ``embedding`` or ``id`` is not a column of ``df``.
    ValueError
        Ragged vectors, NaN/Inf or all-zero vectors (with the default
        ``invalid="raise"``), duplicate or missing ids; naming the row
        labels.
    TypeError
        Entries that are not vectors of numbers, or ``queries=``.
    """
    if "queries" in kwargs:
        raise TypeError("neighbors_frame joins df with itself; for queries use allknn.neighbors")
    kind = type(df).__module__.split(".")[0]
    if kind in ("polars", "pyarrow"):
        table = neighbors_frame(df.to_pandas(), embedding=embedding, id=id, k=k, **kwargs)
        if kind == "polars":
            import polars

            return polars.from_pandas(table)
        import pyarrow

        return pyarrow.Table.from_pandas(table, preserve_index=False)
    for name in (embedding, id):
        if name is not None and name not in df.columns:
            raise KeyError(f"df has no column {name!r}; its columns are: {', '.join(map(str, df.columns))}")
    if id in ("neighbor_id", "rank", "similarity"):
        raise ValueError(f"id column {id!r} would clash with a column of the result; rename it")
    if id is None:
        labels = read_ids(df.index, len(df), name="df.index")
    else:
        labels = read_ids(df[id], len(df), name=f"column {id!r}")
    matrix = stack_vectors(df[embedding], embedding)
    if kwargs.get("invalid", "raise") == "raise":
        _check_rows(matrix, df.index, embedding)
    result = neighbors(matrix, k, **kwargs)
    table = result.to_pandas(ids=labels)
    return table.rename(columns={"id": id}) if id is not None else table


def stack_vectors(column: pd.Series, name: str) -> np.ndarray:
    """Stack a column of equal-length vectors into a float32 matrix.

    Parameters
    ----------
    column : pandas.Series
        Lists or 1-D arrays of numbers.
    name : str
        The column's name, for messages.

    Returns
    -------
    ndarray of shape (len(column), d), float32

    Raises
    ------
    ValueError
        No rows, or rows of different lengths (naming the first such row).
    TypeError
        An entry that is not a vector of numbers (naming its row).
    """
    if len(column) == 0:
        raise ValueError(f"column {name!r} has no rows; df needs at least two items")
    values = column.to_numpy()
    try:
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
    except TypeError:
        row = next(i for i, value in enumerate(values) if not hasattr(value, "__len__"))
        raise TypeError(
            f"column {name!r} at row {_label(column.index, row)!r} holds {values[row]!r}, not a vector; "
            f"every row needs a list or array of numbers"
        ) from None
    bad = np.flatnonzero(lengths != lengths[0])
    if bad.size:
        raise ValueError(
            f"column {name!r} at row {_label(column.index, bad[0])!r} has {lengths[bad[0]]} values but row "
            f"{_label(column.index, 0)!r} has {lengths[0]}; every vector needs the same length "
            f"({bad.size} rows differ)"
        )
    try:
        matrix = np.array(values.tolist(), dtype=np.float32)
    except (TypeError, ValueError):
        matrix = None
    if matrix is None or matrix.ndim != 2:
        row, why = _first_bad_row(values)
        raise TypeError(
            f"column {name!r} at row {_label(column.index, row)!r} holds {why}; every row needs a 1-D "
            f"list or array of numbers"
        )
    return matrix


def _label(index: pd.Index, row: int) -> Any:
    """The label of a row, as a plain Python value (for messages)."""
    return index[row : row + 1].tolist()[0]


def _first_bad_row(values: np.ndarray) -> tuple[int, str]:
    """The first entry that is not a 1-D vector of numbers, and what it is instead.

    Only called after stacking failed, so such an entry exists: entries of
    equal length that are each 1-D vectors of numbers always stack.
    """
    for row, value in enumerate(values):
        try:
            vector = np.asarray(value, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            return row, f"values that are not numbers ({exc})"
        if vector.ndim != 1:
            return row, f"a {vector.ndim}-D value, not a vector"
    raise AssertionError("stacking failed although every entry is a vector of numbers")


def _check_rows(matrix: np.ndarray, index: pd.Index, name: str) -> None:
    """Raise naming the labels of NaN/Inf and all-zero rows."""
    problems = []
    for what, rows in (
        ("NaN or Inf", np.flatnonzero(~np.isfinite(matrix).all(axis=1))),
        ("only zeros (no cosine similarity)", np.flatnonzero(~matrix.any(axis=1))),
    ):
        if rows.size:
            shown = ", ".join(repr(label) for label in index[rows[:_SHOWN]].tolist())
            more = ", ..." if rows.size > _SHOWN else ""
            problems.append(f"{rows.size} row(s) with {what} (rows {shown}{more})")
    if problems:
        raise ValueError(
            f"column {name!r} has " + " and ".join(problems)
            + "; fix or drop them, or pass invalid='drop' to leave them out"
        )
