"""Read an embedding matrix from a parquet file, row group by row group.

Two layouts are understood: one list column holding a vector per row
(``list``, ``large_list`` or ``fixed_size_list`` of numbers), or one float
column per dimension. The values go straight from Arrow buffers into one
preallocated matrix; no pandas object columns, no per-row Python.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from allknn._optional import open_parquet
from allknn.readers.ids import read_ids

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq


def read_parquet(
    path: Path, *, column: str | None, id_column: str | None
) -> tuple[np.ndarray, np.ndarray | None, str]:
    """Read the embeddings (and ids) of a parquet file.

    Parameters
    ----------
    path : Path
        The file.
    column : str or None
        The list column holding the vectors; ``None``: the only list
        column, else every float column (one dimension each).
    id_column : str or None
        Column of unique row ids.

    Returns
    -------
    matrix : ndarray of shape (n, d)
        float16/32/64 as stored (float32 for integer values; the common
        float type of several float columns).
    ids : ndarray of shape (n,) or None
        See :func:`allknn.readers.read_ids`.
    source : str
        The path and the column(s), for messages.

    Raises
    ------
    ValueError
        Unreadable file, missing column (listing those there), no rows,
        ragged lists (naming the first bad row), nulls, bad ids.
    TypeError
        An embedding column that does not hold numbers.
    """
    parquet = open_parquet(path)
    schema = parquet.schema_arrow
    for name in (column, id_column):
        if name is not None and name not in schema.names:
            raise ValueError(f"{path} has no column {name!r}; its columns are: {', '.join(schema.names)}")
    columns = _embedding_columns(schema, column, id_column, path)
    n_rows = parquet.metadata.num_rows
    if n_rows == 0:
        raise ValueError(f"{path} has no rows; it needs at least one embedding")
    if len(columns) == 1 and _is_list(schema.field(columns[0]).type):
        source = f"{path} (column {columns[0]!r})"
        matrix = _read_lists(parquet, columns[0], n_rows, source)
    else:
        source = f"{path} ({len(columns)} float columns)"
        matrix = _read_float_columns(parquet, columns, n_rows, source)
    ids = None
    if id_column is not None:
        ids = read_ids(parquet_id_values(path, id_column), n_rows, name=f"id column {id_column!r} of {path}")
    return matrix, ids, source


def parquet_id_values(path: Path, id_column: str) -> np.ndarray:
    """The values of ``id_column`` of one parquet file, unchecked for uniqueness.

    Raises
    ------
    ValueError
        No such column, or a null id (naming its row).
    """
    parquet = open_parquet(path)
    if id_column not in parquet.schema_arrow.names:
        raise ValueError(f"{path} has no column {id_column!r}; its columns are: "
                         f"{', '.join(parquet.schema_arrow.names)}")
    values = parquet.read(columns=[id_column]).column(0)
    if values.null_count:
        first = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(
            f"id column {id_column!r} of {path} has {values.null_count} null(s) (first at row {first}); "
            f"every row needs an id"
        )
    return values.to_numpy(zero_copy_only=False)


def parquet_row_count(path: Path) -> int:
    """Rows of a parquet file, from its footer."""
    return int(open_parquet(path).metadata.num_rows)


def read_parquet_rows(path: Path, *, column: str | None, start: int, stop: int) -> np.ndarray:
    """Rows ``start:stop`` of the embeddings of a parquet file (layouts as in
    :func:`read_parquet`), reading only the row groups that hold them.

    Returns
    -------
    ndarray of shape (stop - start, d)

    Raises
    ------
    ValueError, TypeError
        As :func:`read_parquet`; row numbers in messages count from the
        start of the file.
    """
    parquet = open_parquet(path)
    schema = parquet.schema_arrow
    if column is not None and column not in schema.names:
        raise ValueError(f"{path} has no column {column!r}; its columns are: {', '.join(schema.names)}")
    columns = _embedding_columns(schema, column, None, path)
    sizes = [parquet.metadata.row_group(g).num_rows for g in range(parquet.num_row_groups)]
    ends = np.cumsum(sizes)
    first_group = int(np.searchsorted(ends, start, side="right"))
    last_group = int(np.searchsorted(ends, stop, side="left"))
    groups = range(first_group, min(last_group + 1, len(sizes)))
    first = int(ends[first_group] - sizes[first_group]) if groups else start
    n_rows = int(sum(sizes[g] for g in groups))
    if len(columns) == 1 and _is_list(schema.field(columns[0]).type):
        matrix = _read_lists(parquet, columns[0], n_rows, f"{path} (column {columns[0]!r})", groups, first)
    else:
        matrix = _read_float_columns(parquet, columns, n_rows, f"{path} ({len(columns)} float columns)",
                                     groups, first)
    return matrix[start - first : stop - first]


def _is_list(kind: pa.DataType) -> bool:
    import pyarrow as pa

    return pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)


def _embedding_columns(schema: pa.Schema, column: str | None, id_column: str | None, path: Path) -> list[str]:
    """Names of the embedding column(s) per the layout rules of :func:`read_parquet`."""
    import pyarrow as pa

    if column is not None:
        kind = schema.field(column).type
        if not _is_list(kind):
            raise TypeError(
                f"column {column!r} of {path} holds {kind} values, not lists of numbers; name the column "
                f"holding one vector per row, or leave column= out to use all float columns"
            )
        return [column]
    candidates = [field for field in schema if field.name != id_column]
    lists = [field.name for field in candidates if _is_list(field.type)]
    if len(lists) > 1:
        raise ValueError(
            f"{path} has several list columns ({', '.join(lists)}); pass column= to choose the embedding"
        )
    if lists:
        return lists
    floats = [field.name for field in candidates if pa.types.is_floating(field.type)]
    if not floats:
        raise ValueError(
            f"{path} has no list column and no float columns to read embeddings from; its columns "
            f"are: {', '.join(schema.names)}"
        )
    return floats


def _value_dtype(kind: pa.DataType, source: str) -> np.dtype:
    import pyarrow as pa

    if pa.types.is_floating(kind):
        return np.dtype(kind.to_pandas_dtype())
    if pa.types.is_integer(kind):
        return np.dtype(np.float32)
    raise TypeError(
        f"{source} holds lists of {kind}, not numbers; store the embeddings as lists of float32"
    )


def _read_lists(parquet: pq.ParquetFile, column: str, n_rows: int, source: str, groups: range | None = None,
                first: int = 0) -> np.ndarray:
    """Stack a list column into an (n_rows, d) matrix, d from the first row
    (of row ``groups``, default all, whose first row is row ``first``)."""
    kind = parquet.schema_arrow.field(column).type
    dtype = _value_dtype(kind.value_type, source)
    matrix = None
    start = 0
    for group in range(parquet.num_row_groups) if groups is None else groups:
        for chunk in parquet.read_row_group(group, columns=[column]).column(0).chunks:
            if len(chunk) == 0:
                continue
            block = _list_rows(chunk, first + start, None if matrix is None else matrix.shape[1], source)
            if matrix is None:
                matrix = np.empty((n_rows, block.shape[1]), dtype=dtype)
            matrix[start : start + len(chunk)] = block
            start += len(chunk)
    return matrix


def _list_rows(chunk: pa.Array, first_row: int, width: int | None, source: str) -> np.ndarray:
    """The rows of one list array as a (len(chunk), width) array, after checking them."""
    import pyarrow.compute as pc

    if chunk.null_count:
        row = first_row + int(np.flatnonzero(chunk.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{source}: row {row} is null; every row needs a vector (drop or fill null rows)")
    lengths = pc.list_value_length(chunk).to_numpy()
    width = int(lengths[0]) if width is None else width
    bad = np.flatnonzero(lengths != width)
    if bad.size:
        row = first_row + int(bad[0])
        raise ValueError(
            f"{source}: row {row} has {lengths[bad[0]]} values but row 0 has {width}; every row needs "
            f"the same number of dimensions (ragged lists)"
        )
    if width == 0:
        raise ValueError(f"{source}: rows are empty lists; every row needs a vector")
    values = chunk.flatten()
    if values.null_count:
        position = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(
            f"{source}: row {first_row + position // width} holds a null value (dimension "
            f"{position % width}); fill or drop it"
        )
    return values.to_numpy(zero_copy_only=False).reshape(-1, width)


def _read_float_columns(parquet: pq.ParquetFile, columns: list[str], n_rows: int, source: str,
                        groups: range | None = None, first: int = 0) -> np.ndarray:
    """One float column per dimension, into an (n_rows, len(columns)) matrix
    (of row ``groups``, default all, whose first row is row ``first``)."""
    schema = parquet.schema_arrow
    dtype = np.result_type(*(schema.field(name).type.to_pandas_dtype() for name in columns))
    matrix = np.empty((n_rows, len(columns)), dtype=dtype)
    start = 0
    for group in range(parquet.num_row_groups) if groups is None else groups:
        table = parquet.read_row_group(group, columns=columns)
        for j, name in enumerate(columns):
            values = table.column(j)
            if values.null_count:
                row = first + start + int(np.flatnonzero(values.is_null().to_numpy())[0])
                raise ValueError(f"{source}: column {name!r} is null at row {row}; fill or drop it")
            matrix[start : start + table.num_rows, j] = values.to_numpy()
        start += table.num_rows
    return matrix
