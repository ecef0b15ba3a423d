"""Save a :class:`TopK` to ``.npz`` or ``.parquet`` (atomically) and load it back.

``.npz`` layout
---------------
``indices`` (n, k) int64 and ``similarities`` (n, k) float32 (-1 / NaN
where a neighbour is missing or below ``min_similarity``), ``n_corpus``
(int64), ``params`` (JSON text of ``TopK.params``), ``metadata`` (JSON
text of the caller's metadata, ``null`` if none), ``min_similarity``
(float64, NaN if none), and ``ids`` / ``query_ids`` when given (int64 or
unicode strings). No pickles: ``np.load(path)`` reads it as it is.

``.parquet`` layout
-------------------
The long neighbour table of :mod:`allknn.writers.neighbor_table`.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from allknn.readers.ids import read_ids
from allknn.topk.result import TopK
from allknn.writers.atomic import atomic_path
from allknn.writers.json_text import dumps
from allknn.writers.neighbor_table import Labels, ParquetNeighborWriter, read_neighbor_table
from allknn.writers.parts import read_parts

SUFFIXES = (".npz", ".parquet")
TEXT_SUFFIXES = {".csv": ",", ".tsv": "\t"}
"""Write-only text tables, for spreadsheets."""
TEXT_MAX_ENTRIES = 2_000_000
"""Most neighbour entries written as text: a spreadsheet opens about a
million rows, and text files beyond that are slow and large for no reader."""
_ENTRIES_PER_BLOCK = 2**20
_NPZ_KEYS = ("indices", "similarities", "n_corpus", "params")


def save_result(
    topk: TopK,
    path: str | os.PathLike[str],
    *,
    ids: Labels | None = None,
    query_ids: Labels | None = None,
    min_similarity: float | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Write ``topk`` to ``path`` (``.npz`` or ``.parquet``), atomically.

    The file appears under its name only once complete; on any error
    nothing is left at ``path`` or beside it.

    Parameters
    ----------
    topk : TopK
        The result, ``indices`` (n, k) and ``similarities`` (n, k).
    path : path-like
        Output file; the extension picks the format (see the module
        docstring; ``.csv``/``.tsv`` write the long table of
        :meth:`TopK.to_pandas` for spreadsheets, up to
        ``TEXT_MAX_ENTRIES`` neighbours, and cannot be read back). Its
        folder must exist.
    ids : sequence of length n_corpus, optional
        Unique corpus labels (integers or strings). In parquet they replace
        row numbers in ``neighbor_id``, and in ``id`` too in a self-join
        (``topk.params["self_join"]``), as :meth:`TopK.to_pandas` does.
    query_ids : sequence of length n, optional
        Unique labels of the query rows of a query join.
    min_similarity : float, optional
        Leave out neighbours less similar than this (parquet: no row;
        npz: index -1, similarity NaN).
    metadata : dict, optional
        JSON-serialisable facts about the run (input path, ...), stored
        beside ``topk.params``.

    Raises
    ------
    ValueError
        Unknown extension, ids of the wrong length or not unique, a
        missing folder.
    TypeError
        ``params`` or ``metadata`` that cannot be stored as JSON.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        _save_parquet(topk, path, ids, query_ids, min_similarity, metadata)
    elif suffix == ".npz":
        _save_npz(topk, path, ids, query_ids, min_similarity, metadata)
    elif suffix in TEXT_SUFFIXES:
        _save_text(topk, path, ids, query_ids, min_similarity)
    else:
        raise ValueError(f"cannot write {path}: the extension must be one of "
                         f"{', '.join((*SUFFIXES, *TEXT_SUFFIXES))}")


def load_result(
    path: str | os.PathLike[str], *, ids: Labels | None = None, query_ids: Labels | None = None
) -> TopK:
    """Read back a result written by :func:`save_result`.

    Parameters
    ----------
    path : path-like
        A ``.npz`` or ``.parquet`` file from :func:`save_result` (or
        :class:`ParquetNeighborWriter`), or a folder of parquet parts
        written on a cluster (:mod:`allknn.writers.parts`).
    ids, query_ids : sequence, optional
        Only for a parquet file whose ids were too many to keep in it
        (see :mod:`allknn.writers.neighbor_table`): the ids it was written with.

    Returns
    -------
    TopK
        ``indices`` (n, k) int64, ``similarities`` (n, k) float32 with -1 /
        NaN for missing neighbours, ``n_corpus`` and ``params`` as saved.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        Unknown extension, or a file that is not an allknn result.
    """
    path = Path(path)
    if path.is_dir():
        return read_parts(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"cannot read {path}: the extension must be one of {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}; check the path")
    if suffix == ".parquet":
        return read_neighbor_table(path, ids=ids, query_ids=query_ids)
    if ids is not None or query_ids is not None:
        raise ValueError(f"{path} keeps its own ids; pass ids= and query_ids= only for .parquet files")
    return _load_npz(path)


def text_too_large(path: Path, entries: int) -> str:
    """The message for a text table of ``entries`` neighbours over the limit."""
    return (f"cannot write {path}: {entries:,} neighbours are too many for a text table (at most "
            f"{TEXT_MAX_ENTRIES:,}, which a spreadsheet can still open); write .parquet instead")


def _save_text(topk: TopK, path: Path, ids: Labels | None, query_ids: Labels | None,
               min_similarity: float | None) -> None:
    entries = int((topk.indices >= 0).sum())
    if entries > TEXT_MAX_ENTRIES:
        raise ValueError(text_too_large(path, entries))
    table = topk.to_pandas(ids, query_ids=query_ids)
    if min_similarity is not None:
        table = table[table["similarity"] >= min_similarity]
    with atomic_path(path) as tmp:
        table.to_csv(tmp, sep=TEXT_SUFFIXES[path.suffix.lower()], index=False)


def _save_parquet(
    topk: TopK, path: Path, ids: Labels | None, query_ids: Labels | None, min_similarity: float | None,
    metadata: dict[str, Any] | None,
) -> None:
    rows = max(1, _ENTRIES_PER_BLOCK // max(topk.k, 1))
    with ParquetNeighborWriter(
        path, k=topk.k, n_rows=len(topk), n_corpus=topk.n_corpus, ids=ids, query_ids=query_ids,
        min_similarity=min_similarity, params=topk.params, metadata=metadata,
    ) as writer:
        for start in range(0, len(topk), rows):
            stop = start + rows
            writer.write_block(start, topk.indices[start:stop], topk.similarities[start:stop])


def _save_npz(
    topk: TopK, path: Path, ids: Labels | None, query_ids: Labels | None, min_similarity: float | None,
    metadata: dict[str, Any] | None,
) -> None:
    indices = np.asarray(topk.indices, dtype=np.int64)
    similarities = np.asarray(topk.similarities, dtype=np.float32)
    if min_similarity is not None:
        below = ~(similarities >= min_similarity)
        indices = np.where(below, -1, indices)
        similarities = np.where(below, np.float32(np.nan), similarities)
    arrays = {
        "indices": indices,
        "similarities": similarities,
        "n_corpus": np.int64(topk.n_corpus),
        "params": np.array(dumps(topk.params)),
        "metadata": np.array(dumps(metadata)),
        "min_similarity": np.float64(np.nan if min_similarity is None else min_similarity),
    }
    for name, labels, count in (("ids", ids, topk.n_corpus), ("query_ids", query_ids, len(topk))):
        if labels is not None:
            values = read_ids(labels, count, name=name)
            arrays[name] = values if values.dtype.kind == "i" else values.astype(str)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **arrays)


def _load_npz(path: Path) -> TopK:
    try:
        saved = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(
            f"{path} is not a readable .npz file ({exc}); it may be truncated or corrupt: write it again"
        ) from None
    if not hasattr(saved, "files"):
        raise ValueError(f"{path} is a .npy file, not an allknn result")
    with saved:
        missing = [key for key in _NPZ_KEYS if key not in saved.files]
        if missing:
            raise ValueError(
                f"{path} is not an allknn result (no {', '.join(missing)}); load_result reads files "
                f"written by save_result"
            )
        return TopK(
            indices=saved["indices"].astype(np.int64, copy=False),
            similarities=saved["similarities"].astype(np.float32, copy=False),
            n_corpus=int(saved["n_corpus"]),
            params=json.loads(str(saved["params"])),
        )


def save_edges(path: str | os.PathLike[str], sources: np.ndarray, targets: np.ndarray, weights: np.ndarray, *,
               weight: str) -> None:
    """Write an edge list atomically as parquet: columns ``source``,
    ``target`` (int64 row numbers, or the result's ids) and the weight's
    name (float32)."""
    from allknn._optional import optional

    pa = optional("pyarrow", "writing .parquet files")
    pq = optional("pyarrow.parquet", "writing .parquet files")
    table = pa.table({"source": np.asarray(sources), "target": np.asarray(targets),
                      weight: np.asarray(weights, np.float32)})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
