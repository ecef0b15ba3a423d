"""A result as a folder of parquet parts, one per row block, and a manifest.

Layout
------
``part-000000.parquet``, ... : neighbour tables (see
:mod:`allknn.writers.neighbor_table`) of consecutive row blocks, each with
the ``id`` values of the whole result (row numbers, or labels); each
appears only when complete (atomic rename).

``_ids.arrow``, ``_query_ids.arrow`` : the labels of the corpus rows and
of the query rows, when the parts hold labels instead of row numbers: an
uncompressed Arrow IPC file each, written once before any part, so that
the task writing a part memory-maps it and reads only the labels it
needs.

``_manifest.json`` : the format, the run's fingerprint (input digests and
parameters), ``k``, ``n_rows``, ``n_corpus``, the run's ``params``, which labels
each id column holds (``labels``) and the finished parts (file, first
row, rows). It is rewritten atomically as parts finish, at most once per
``Manifest.save_interval`` seconds (a rewrite per part would cost the
client O(parts²) at thousands of parts) and when the run stops, by an
error or an interrupt, so a killed run leaves a manifest naming only
complete parts, and a resumed run skips exactly those (a client killed
outright also loses the record of the parts of its last second, which the
resumed run writes again, the same bytes). Its name starts with ``_`` so that
parquet readers (``pandas.read_parquet(folder)``) skip it and read the
parts as one table.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from allknn._optional import open_parquet
from allknn.readers.ids import read_ids
from allknn.topk.result import RecallEstimate, TopK
from allknn.writers.atomic import atomic_path
from allknn.writers.json_text import dumps
from allknn.writers.neighbor_table import ParquetNeighborWriter, arrow_labels, labels_digest

if TYPE_CHECKING:
    import pyarrow as pa

MANIFEST = "_manifest.json"
FORMAT = "allknn.parts/1"
SAVE_INTERVAL = 1.0
"""Seconds between rewrites of the manifest while parts finish."""
LABEL_FILES = {"ids": "_ids.arrow", "query_ids": "_query_ids.arrow"}


def part_name(block: int) -> str:
    """File name of row block ``block``'s part."""
    return f"part-{block:06d}.parquet"


@dataclass(frozen=True)
class PartLabels:
    """The labels a parts folder's id columns hold, checked once on the client.

    Attributes
    ----------
    arrays : dict
        ``"ids"`` (corpus labels) and/or ``"query_ids"``, as Arrow arrays.
    columns : dict
        Which of them the ``id`` and ``neighbor_id`` columns hold (None:
        row numbers), as :func:`write_part` takes it.
    """

    arrays: dict[str, pa.Array]
    columns: dict[str, str | None]

    @classmethod
    def check(cls, ids: Any, query_ids: Any, *, n_corpus: int, n_rows: int, self_join: bool) -> PartLabels:
        """Check the labels (one unique label per row) and say which column holds which.

        Raises
        ------
        ValueError, TypeError
            As :func:`allknn.readers.read_ids`; ``query_ids`` in a self-join.
        """
        if self_join and query_ids is not None:
            raise ValueError("query_ids label the rows of queries=; a self-join takes ids= only")
        arrays = {}
        if ids is not None:
            arrays["ids"] = arrow_labels(read_ids(ids, n_corpus, name="ids"))
        if query_ids is not None:
            arrays["query_ids"] = arrow_labels(read_ids(query_ids, n_rows, name="query_ids"))
        query_column = "query_ids" if query_ids is not None else ("ids" if self_join and ids is not None
                                                                  else None)
        return cls(arrays, {"id": query_column, "neighbor_id": "ids" if ids is not None else None})

    @property
    def digests(self) -> dict[str, str]:
        """A digest of each label set (values and order), for the run's fingerprint."""
        return {name: labels_digest(labels) for name, labels in self.arrays.items()}

    def write(self, folder: str | os.PathLike[str]) -> None:
        """Keep each label set in the folder (uncompressed Arrow IPC), atomically."""
        import pyarrow as pa

        for name, labels in self.arrays.items():
            with atomic_path(Path(folder) / LABEL_FILES[name]) as tmp, pa.OSFile(str(tmp), "wb") as sink:
                table = pa.table({"label": labels})
                with pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)


def read_labels(folder: str | os.PathLike[str], name: str) -> pa.Array:
    """The labels ``name`` (``"ids"``, ``"query_ids"``) of a parts folder,
    memory-mapped (reading touches only the labels used).

    Raises
    ------
    ValueError
        If the file is missing or unreadable.
    """
    import pyarrow as pa

    path = Path(folder) / LABEL_FILES[name]
    try:
        column = pa.ipc.open_file(pa.memory_map(str(path))).read_all().column(0)
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()  # one chunk: no copy
    except (OSError, pa.ArrowException) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); the folder is incomplete: run again with "
                         f"--resume") from None


def write_part(folder: str | os.PathLike[str], block: int, first_row: int, indices: np.ndarray,
               similarities: np.ndarray, *, n_corpus: int, params: dict[str, Any], n_rows: int,
               labels: dict[str, str | None] | None = None) -> dict[str, int | str]:
    """Write one row block's neighbours as its part, atomically.

    Parameters
    ----------
    folder : path-like
        The result folder (it must exist).
    block : int
    first_row : int
        Result row of the block's first row.
    indices : ndarray of shape (m, k), int64
        Corpus row numbers, -1 where missing (left out of the file).
    similarities : ndarray of shape (m, k), float32
    n_corpus : int
    params : dict
        The run's parameters.
    n_rows : int
        Rows of the whole result.
    labels : dict, optional
        Which labels of the folder (:attr:`PartLabels.columns`) the ``id``
        and ``neighbor_id`` columns hold (default: row numbers).

    Returns
    -------
    dict
        The manifest entry: ``file``, ``first_row``, ``rows``.
    """
    labels = labels or {}
    query_labels, corpus_labels = labels.get("id"), labels.get("neighbor_id")
    ids = None if corpus_labels is None else read_labels(folder, corpus_labels)
    query_ids = read_labels(folder, query_labels) if query_labels not in (None, "ids") else None
    name = part_name(block)
    with ParquetNeighborWriter(Path(folder) / name, k=indices.shape[1], n_rows=indices.shape[0],
                               n_corpus=n_corpus, ids=ids, query_ids=query_ids, params=params,
                               first_row=first_row, part_of=n_rows) as writer:
        writer.write_block(0, indices, similarities)
    return {"file": name, "first_row": int(first_row), "rows": int(indices.shape[0])}


class Manifest:
    """The manifest of a parts folder (see the module docstring).

    Parameters
    ----------
    folder : path-like
    fingerprint : dict
        What must match for a resume (JSON values).
    header : dict
        ``k``, ``n_rows``, ``n_corpus`` and ``params``.
    """

    def __init__(self, folder: str | os.PathLike[str], fingerprint: dict[str, Any], header: dict[str, Any]):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.header = header
        self.parts: dict[int, dict[str, Any]] = {}
        self.save_interval = SAVE_INTERVAL
        self._saved_at = -float("inf")
        self._unsaved = False

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    def resume(self) -> dict[str, Any] | None:
        """Take over the finished parts of the manifest on disk (none if
        there is none), after checking it belongs to this run.

        Returns
        -------
        dict or None
            The manifest on disk (None if there is none).

        Raises
        ------
        ValueError
            An unreadable manifest, or one made by a different run (naming
            each difference).
        """
        if not self.path.exists():
            return None
        saved = _read(self.path)
        keys = list(self.fingerprint) + [key for key in saved["fingerprint"] if key not in self.fingerprint]
        differences = [f"{key}: the folder has {saved['fingerprint'].get(key)!r}, this run has "
                       f"{self.fingerprint.get(key)!r}" for key in keys
                       if saved["fingerprint"].get(key) != self.fingerprint.get(key)]
        if differences:
            raise ValueError(f"cannot resume into {self.folder}: it holds the output of a different run ("
                             + "; ".join(differences) + "); use the original input and parameters, or "
                             "another output folder")
        self.parts = {int(block): entry for block, entry in saved["parts"].items()
                      if (self.folder / entry["file"]).is_file()}
        return saved

    def add(self, block: int, entry: dict[str, Any]) -> None:
        """Record a finished part; rewrite the manifest if the last rewrite
        is ``save_interval`` seconds old (else at :meth:`flush`)."""
        self.parts[block] = entry
        self._unsaved = True
        if time.monotonic() - self._saved_at >= self.save_interval:
            self.save()

    def flush(self) -> None:
        """Rewrite the manifest if parts were added since the last rewrite
        (call it when a run stops early)."""
        if self._unsaved:
            self.save()

    def save(self, *, complete: bool = False) -> None:
        """Write the manifest atomically."""
        text = dumps({"format": FORMAT, "fingerprint": self.fingerprint, **self.header, "complete": complete,
                      "parts": {str(block): self.parts[block] for block in sorted(self.parts)}})
        with atomic_path(self.path) as tmp:
            tmp.write_text(text)
        self._saved_at, self._unsaved = time.monotonic(), False


def read_parts(folder: str | os.PathLike[str]) -> TopK:
    """Read a complete parts folder back as one :class:`TopK`.

    Raises
    ------
    ValueError
        No manifest, an unfinished run (naming the missing rows and how to
        finish it), or parts that do not match the manifest.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ValueError(f"{folder} is a folder without {MANIFEST}; load_result reads folders written by "
                         f"allknn run with a cluster")
    manifest = _read(path)
    n_rows, k, n_corpus = manifest["n_rows"], manifest["k"], manifest["n_corpus"]
    labels = {column: None if name is None else read_labels(folder, name)
              for column, name in manifest.get("labels", {}).items()}
    indices = np.full((n_rows, k), -1, dtype=np.int64)
    similarities = np.full((n_rows, k), np.nan, dtype=np.float32)
    covered = np.zeros(n_rows, dtype=bool)
    entries = list(manifest["parts"].values())
    tables = [open_parquet(folder / entry["file"]).read(columns=["id", "neighbor_id", "rank", "similarity"])
              for entry in entries]
    for entry, table in zip(entries[1:], tables[1:], strict=True):
        if table.schema != tables[0].schema:
            raise ValueError(f"{folder / entry['file']} has the columns {_columns(table)} where "
                             f"{entries[0]['file']} has {_columns(tables[0])}; it is corrupt")
    if tables:  # labels to row numbers once for all parts (a lookup table per call)
        import pyarrow as pa

        table = pa.concat_tables(tables)
        all_ids = _row_numbers(table.column("id"), labels.get("id"), folder)
        all_neighbours = _row_numbers(table.column("neighbor_id"), labels.get("neighbor_id"), folder)
    ends = np.cumsum([t.num_rows for t in tables], dtype=np.int64)
    for entry, part, end in zip(entries, tables, ends, strict=True):
        first, rows = entry["first_row"], entry["rows"]
        ids = all_ids[end - part.num_rows : end]
        ranks = part.column("rank").to_numpy().astype(np.int64) - 1
        outside = ids.size and (ids.min() < first or ids.max() >= first + rows or ranks.min() < 0
                                or ranks.max() >= k)
        if outside:
            raise ValueError(f"{folder / entry['file']} holds rows outside its manifest entry; it is corrupt")
        indices[ids, ranks] = all_neighbours[end - part.num_rows : end]
        similarities[ids, ranks] = part.column("similarity").to_numpy()
        covered[first : first + rows] = True
    if not covered.all():
        missing = np.flatnonzero(~covered)
        raise ValueError(f"{folder} is unfinished: rows {missing[0]}..{missing[-1]} have no part yet; run "
                         f"the same command again with --resume to finish it")
    if not manifest.get("complete"):
        raise ValueError(f"{folder} is unfinished: it has every part, but the run stopped before its last "
                         f"step (an approximate run's recall audit); run the same command again with "
                         f"--resume to finish it")
    return TopK(indices=indices, similarities=similarities, n_corpus=n_corpus, params=manifest["params"],
                recall=_recall(manifest["params"]))


def _columns(table: pa.Table) -> str:
    return ", ".join(f"{field.name}: {field.type}" for field in table.schema)


def folder_recall(folder: str | os.PathLike[str]) -> RecallEstimate | None:
    """The measured recall of the approximate run that wrote a parts folder (None: an exact run)."""
    return _recall(_read(Path(folder) / MANIFEST)["params"])


def _recall(params: dict[str, Any]) -> RecallEstimate | None:
    if "recall_rows" not in params:
        return None
    return RecallEstimate(params["recall"], tuple(params["recall_interval"]), params["recall_rows"])


def folder_labels(folder: str | os.PathLike[str]) -> dict[str, np.ndarray | None]:
    """The labels of a parts folder's ``id`` and ``neighbor_id`` columns (None: row numbers)."""
    manifest = _read(Path(folder) / MANIFEST)
    return {column: None if name is None else read_labels(folder, name).to_numpy(zero_copy_only=False)
            for column, name in manifest.get("labels", {"id": None, "neighbor_id": None}).items()}


def _row_numbers(column: pa.ChunkedArray, labels: pa.Array | None, folder: Path) -> np.ndarray:
    """Row numbers of an id column: the column itself, or each label's place among ``labels``."""
    import pyarrow.compute as pc

    if labels is None:
        return column.to_numpy()
    positions = pc.index_in(column, value_set=labels)
    if positions.null_count:
        raise ValueError(f"{folder} has parts with ids that are not among its labels; it is corrupt")
    return positions.to_numpy().astype(np.int64)


def _read(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        return manifest
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); delete the folder to start over") from None
