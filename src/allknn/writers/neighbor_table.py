"""The parquet neighbour table: one row per (item, neighbour) pair, written as blocks finish.

Layout
------
Columns ``id``, ``neighbor_id``, ``rank`` (int32, 1 = most similar) and
``similarity`` (float32), ordered by query row then rank within each
written block; missing neighbours (index -1) and neighbours below
``min_similarity`` are left out. ``id``/``neighbor_id`` are row numbers
(int64) or labels (int64 or strings), exactly as :meth:`TopK.to_pandas`
makes them.

The schema metadata key ``allknn`` holds a JSON header: ``k``,
``n_rows``, ``n_corpus``, ``min_similarity``, the run's ``params``, the
caller's ``metadata``, and for each labelled column which labels it uses
(``ids`` or ``query_ids``) with a digest of them. So that
:func:`read_neighbor_table` can turn labels back into row numbers, the
labels themselves are kept in the metadata keys ``allknn.ids`` /
``allknn.query_ids`` (zstd-compressed Arrow IPC, base64) when they take at
most :data:`INLINE_LABELS_LIMIT` bytes there. Larger label sets are left
out, since every parquet reader parses the whole footer (and pyarrow
refuses footers beyond 100 MB by default); such a file is read back by
passing the same ids to :func:`read_neighbor_table`, checked against the
digest.

The file appears under its name only when complete (see
:mod:`allknn.writers.atomic`).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

from allknn._optional import open_parquet, optional
from allknn.readers.ids import read_ids
from allknn.topk.result import TopK
from allknn.writers.atomic import AtomicFile
from allknn.writers.json_text import dumps

if TYPE_CHECKING:
    import pyarrow as pa

HEADER_KEY = b"allknn"
FORMAT = "allknn.neighbors/1"
INLINE_LABELS_LIMIT = 32 * 2**20
"""Most bytes of encoded labels kept in the file's metadata."""

Labels = Sequence[Any] | np.ndarray


class ParquetNeighborWriter:
    """Stream row blocks of a top-k result into a parquet neighbour table.

    Blocks may come in any order, each row exactly once. The file appears
    at ``path`` only on :meth:`close`, once every row was written; until
    then it is a temporary file beside it. As a context manager the
    writer closes on success and aborts (removes the temporary file) on
    an exception.

    Parameters
    ----------
    path : path-like
        The ``.parquet`` file to write; its folder must exist.
    k : int
        Neighbours per row (columns of each block).
    n_rows : int, optional
        Query rows in all; default ``len(query_ids)``, else ``n_corpus``
        (a self-join).
    n_corpus : int, optional
        Corpus rows; default ``len(ids)``. Required without ``ids``.
    ids : sequence of length n_corpus, optional
        Corpus labels for ``neighbor_id``, and for ``id`` in a self-join
        (``params["self_join"]``, as in :meth:`TopK.to_pandas`). Default:
        row numbers. A ``pyarrow.Array`` is taken as already checked (the
        parts writer passes the labels it checked once for all parts).
    query_ids : sequence of length n_rows (``part_of``), optional
        Query labels for ``id`` (default: row numbers, or ``ids`` in a
        self-join).
    min_similarity : float, optional
        Leave out neighbours less similar than this.
    params : dict, optional
        The run's parameters (``TopK.params``, including ``self_join``),
        restored by :func:`read_neighbor_table`.
    metadata : dict, optional
        Anything else to record (JSON-serialisable), e.g. the input path.
    first_row : int
        Query row number of this file's row 0, when it holds one part of a
        larger result (row-number ``id`` values are offset by it; see
        :mod:`allknn.writers.parts`).
    part_of : int, optional
        The larger result's rows, when this file is one of its parts: the
        query labels are those of all its rows, and no labels are kept in
        the file (the parts folder keeps them once).

    Raises
    ------
    ValueError
        Bad counts, duplicate ids, a missing ``n_corpus``.
    FileNotFoundError
        If the folder of ``path`` does not exist.
    ImportError
        Without pyarrow.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        k: int,
        n_rows: int | None = None,
        n_corpus: int | None = None,
        ids: Labels | None = None,
        query_ids: Labels | None = None,
        min_similarity: float | None = None,
        params: dict[str, Any] | None = None,
        metadata: dict[str, Any] | None = None,
        first_row: int = 0,
        part_of: int | None = None,
    ):
        pa = optional("pyarrow", "writing .parquet files")
        pq = optional("pyarrow.parquet", "writing .parquet files")
        if n_corpus is None:
            if ids is None:
                raise ValueError("pass n_corpus= (the number of corpus rows) or ids= to the parquet writer")
            n_corpus = len(ids)
        corpus = _checked_labels(ids, n_corpus, "ids")
        if n_rows is None:
            n_rows = n_corpus if query_ids is None else len(query_ids)
        all_rows = n_rows if part_of is None else int(part_of)
        if part_of is not None and first_row + n_rows > all_rows:
            raise ValueError(f"rows {first_row}..{first_row + n_rows - 1} are not part of a result of "
                             f"{all_rows} rows")
        params = params or {}
        if query_ids is not None:
            queries, query_source = _checked_labels(query_ids, all_rows, "query_ids"), "query_ids"
        elif corpus is not None and params.get("self_join", False):
            if all_rows != n_corpus:
                raise ValueError(f"a self-join has as many rows as the corpus, got {all_rows} and {n_corpus}")
            queries, query_source = corpus, "ids"
        else:
            queries, query_source = None, None
        file_metadata: dict[bytes, bytes] = {}
        keep = part_of is None  # a part's labels are kept once by its folder
        self.path = Path(path)
        self.k, self.n_rows, self.n_corpus = int(k), int(n_rows), int(n_corpus)
        self._min_similarity = min_similarity
        self._corpus, self._queries = corpus, queries
        self._first_row = int(first_row)

        header = {
            "format": FORMAT, "k": self.k, "n_rows": self.n_rows, "n_corpus": self.n_corpus,
            "min_similarity": min_similarity, "params": params, "metadata": metadata,
            **({"first_row": int(first_row)} if first_row else {}),
            "labels": {
                "id": _label_spec(queries, query_source, file_metadata, keep=keep),
                "neighbor_id": _label_spec(corpus, "ids", file_metadata, keep=keep),
            },
        }
        file_metadata[HEADER_KEY] = dumps(header).encode()
        self._schema = pa.schema(
            [
                ("id", pa.int64() if queries is None else queries.type),
                ("neighbor_id", pa.int64() if corpus is None else corpus.type),
                ("rank", pa.int32()),
                ("similarity", pa.float32()),
            ],
            metadata=file_metadata,
        )
        self._file = AtomicFile(self.path)
        try:
            self._writer = pq.ParquetWriter(str(self._file.tmp), self._schema)
        except BaseException:
            self._file.discard()
            raise
        self._written = np.zeros(self.n_rows, dtype=bool)
        self._closed = False

    def write_block(self, row_start: int, indices: np.ndarray, similarities: np.ndarray) -> None:
        """Write the neighbours of rows ``row_start .. row_start + len(indices) - 1``.

        Parameters
        ----------
        row_start : int
            Query row of the block's first row.
        indices : ndarray of shape (m, k), integer
            Corpus row numbers, best first; -1 for missing neighbours.
        similarities : ndarray of shape (m, k), float
            Their similarities (NaN where missing).

        Raises
        ------
        ValueError
            Wrong shapes, rows outside ``0 .. n_rows - 1`` or already
            written, indices outside ``-1 .. n_corpus - 1``, or a closed
            writer.
        TypeError
            Indices that are not integers.
        """
        import pyarrow as pa

        if self._closed:
            raise ValueError(f"the writer of {self.path} is closed; no more blocks can be written")
        indices = np.asarray(indices)
        similarities = np.asarray(similarities)
        if indices.ndim != 2 or indices.shape[1] != self.k or similarities.shape != indices.shape:
            raise ValueError(
                f"a block must be indices and similarities of equal shape (rows, k={self.k}); got "
                f"{indices.shape} and {similarities.shape}"
            )
        if indices.dtype.kind not in "iu":
            raise TypeError(f"indices must be integers, got dtype {indices.dtype}")
        row_start = int(row_start)
        stop = row_start + indices.shape[0]
        if row_start < 0 or stop > self.n_rows:
            raise ValueError(
                f"block rows {row_start}..{stop - 1} are outside the result's rows 0..{self.n_rows - 1}"
            )
        again = np.flatnonzero(self._written[row_start:stop])
        if again.size:
            raise ValueError(
                f"row {row_start + again[0]} was already written to {self.path}; write each row block once"
            )
        if indices.size and (indices.min() < -1 or indices.max() >= self.n_corpus):
            raise ValueError(f"indices must lie in -1..{self.n_corpus - 1} (-1 marks a missing neighbour)")
        present = indices >= 0
        if self._min_similarity is not None:
            present &= similarities >= self._min_similarity
        rows, ranks = np.nonzero(present)
        table = pa.Table.from_arrays(
            [
                _take(self._queries, rows + row_start + self._first_row),
                _take(self._corpus, indices[rows, ranks]),
                pa.array((ranks + 1).astype(np.int32)),
                pa.array(similarities[rows, ranks].astype(np.float32)),
            ],
            schema=self._schema,
        )
        if table.num_rows:
            self._writer.write_table(table)
        self._written[row_start:stop] = True

    def close(self) -> None:
        """Finish the file and publish it at ``path`` (atomically).

        Raises
        ------
        ValueError
            If some rows were never written; nothing is published then.
        """
        if self._closed:
            return
        missing = np.flatnonzero(~self._written)
        if missing.size:
            self.abort()
            raise ValueError(
                f"{missing.size} of {self.n_rows} rows were never written (first: row {missing[0]}); "
                f"{self.path} was not written"
            )
        self._closed = True
        try:
            self._writer.close()
        except BaseException:
            self._file.discard()
            raise
        self._file.publish()

    def abort(self) -> None:
        """Drop the unfinished file; nothing appears at ``path``."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):  # the file is discarded either way
            self._writer.close()
        self._file.discard()

    def __enter__(self) -> ParquetNeighborWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def read_neighbor_table(
    path: str | os.PathLike[str], *, ids: Labels | None = None, query_ids: Labels | None = None
) -> TopK:
    """Rebuild the :class:`TopK` a :class:`ParquetNeighborWriter` wrote.

    Parameters
    ----------
    path : path-like
        A neighbour table written by allknn.
    ids, query_ids : sequence, optional
        The labels the file was written with; needed only when they were
        too many to keep in the file (checked against its digest).

    Returns
    -------
    TopK
        ``indices`` (n_rows, k) int64 and ``similarities`` float32 with -1 /
        NaN where a neighbour was left out, ``n_corpus`` and ``params`` as
        written.

    Raises
    ------
    ValueError
        A file not written by allknn, missing or mismatching ids, or
        inconsistent contents.
    """

    path = Path(path)
    parquet = open_parquet(path)
    metadata = parquet.schema_arrow.metadata or {}
    if HEADER_KEY not in metadata:
        raise ValueError(
            f"{path} was not written by allknn (no {HEADER_KEY.decode()!r} entry in its metadata); "
            f"load_result reads files written by save_result"
        )
    header = json.loads(metadata[HEADER_KEY])
    n_rows, k, n_corpus = header["n_rows"], header["k"], header["n_corpus"]
    table = parquet.read(columns=["id", "neighbor_id", "rank", "similarity"])
    given = {"ids": (ids, n_corpus), "query_ids": (query_ids, n_rows)}
    labels = header["labels"]
    rows = _positions(table.column("id"), labels["id"], metadata, given, path)
    neighbors = _positions(table.column("neighbor_id"), labels["neighbor_id"], metadata, given, path)
    ranks = table.column("rank").to_numpy().astype(np.int64) - 1
    for values, bound in ((rows, n_rows), (ranks, k), (neighbors, n_corpus)):
        if values.size and (values.min() < 0 or values.max() >= bound):
            raise ValueError(f"{path} has entries outside its header's shape ({n_rows} x {k}); it is corrupt")
    indices = np.full((n_rows, k), -1, dtype=np.int64)
    similarities = np.full((n_rows, k), np.nan, dtype=np.float32)
    indices[rows, ranks] = neighbors
    similarities[rows, ranks] = table.column("similarity").to_numpy()
    return TopK(indices=indices, similarities=similarities, n_corpus=n_corpus, params=header["params"])


def arrow_labels(labels: np.ndarray) -> pa.Array:
    """Checked labels (:func:`allknn.readers.read_ids`) as an Arrow array: int64 or large strings."""
    import pyarrow as pa

    return pa.array(labels, type=pa.int64() if labels.dtype.kind == "i" else pa.large_string())


def _take(labels: pa.Array | None, positions: np.ndarray) -> pa.Array:
    import pyarrow as pa

    positions = pa.array(positions.astype(np.int64, copy=False))
    return positions if labels is None else labels.take(positions)


def labels_digest(labels: pa.Array) -> str:
    """Hash of the labels' values and order (independent of the pyarrow version)."""
    import pyarrow as pa

    digest = hashlib.blake2b(str(labels.type).encode(), digest_size=16)
    if pa.types.is_integer(labels.type):
        digest.update(labels.to_numpy().astype("<i8").tobytes())
    else:
        start = labels.offset
        offsets = np.frombuffer(labels.buffers()[1], dtype="<i8")[start : start + len(labels) + 1]
        digest.update((offsets - offsets[0]).tobytes())
        digest.update(memoryview(labels.buffers()[2])[offsets[0] : offsets[-1]])
    return digest.hexdigest()


def _checked_labels(labels: Labels | pa.Array | None, n_rows: int, name: str) -> pa.Array | None:
    """Labels as an Arrow array, checked (one unique label per row) unless they already are one."""
    import pyarrow as pa

    if labels is None:
        return None
    if isinstance(labels, pa.Array):
        if len(labels) != n_rows:
            raise ValueError(f"{name} has {len(labels)} entries but the result has {n_rows} rows")
        return labels
    return arrow_labels(read_ids(labels, n_rows, name=name))


def _label_spec(
    labels: pa.Array | None, source: str | None, file_metadata: dict[bytes, bytes], *, keep: bool
) -> dict[str, Any] | None:
    """Header entry of one label column; with ``keep``, keeps the labels in
    ``file_metadata`` when small enough."""
    import pyarrow as pa

    if labels is None:
        return None
    key = f"allknn.{source}".encode()
    if keep and key not in file_metadata:
        sink = pa.BufferOutputStream()
        batch = pa.record_batch([labels], names=["label"])
        options = pa.ipc.IpcWriteOptions(compression="zstd")
        with pa.ipc.new_stream(sink, batch.schema, options=options) as stream:
            stream.write_batch(batch)
        encoded = base64.b64encode(sink.getvalue().to_pybytes())
        if len(encoded) <= INLINE_LABELS_LIMIT:
            file_metadata[key] = encoded
    digest = labels_digest(labels) if keep else None
    return {"labels": source, "digest": digest, "stored": key in file_metadata}


def _positions(
    column: pa.ChunkedArray,
    spec: dict[str, Any] | None,
    metadata: dict[bytes, bytes],
    given: dict[str, tuple[Labels | None, int]],
    path: Path,
) -> np.ndarray:
    """Row numbers of a label column: the column itself, or each label's place among the labels."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if spec is None:
        return column.to_numpy()
    name = spec["labels"]
    if spec["digest"] is None:
        raise ValueError(f"{path} is one part of a parts folder, whose labels the folder keeps; read the "
                         f"folder with load_result")
    if spec["stored"]:
        encoded = metadata[f"allknn.{name}".encode()]
        labels = pa.ipc.open_stream(base64.b64decode(encoded)).read_all().column(0).combine_chunks()
    elif given[name][0] is not None:
        labels = arrow_labels(read_ids(*given[name], name=name))
    else:
        raise ValueError(
            f"{path} lists neighbours by id, and its {name} were too many to keep in the file; "
            f"pass {name}= (the ids it was written with) to load_result"
        )
    if labels_digest(labels) != spec["digest"]:
        raise ValueError(
            f"the {name} do not match those {path} was written with (same values in the same order "
            f"are needed to rebuild row numbers)"
        )
    positions = pc.index_in(column, value_set=labels)
    if positions.null_count:
        raise ValueError(f"{path} has ids that are not among its stored {name}; it is corrupt")
    return positions.to_numpy().astype(np.int64)


def stored_ids(path: str | os.PathLike[str]) -> np.ndarray | None:
    """The corpus ids a neighbour table keeps in its metadata (None: row
    numbers, or ids too many to keep), as an array."""
    import pyarrow as pa

    metadata = open_parquet(Path(path)).schema_arrow.metadata or {}
    if HEADER_KEY not in metadata:
        return None
    spec = json.loads(metadata[HEADER_KEY])["labels"]["neighbor_id"]
    if spec is None or not spec["stored"]:
        return None
    encoded = metadata[f"allknn.{spec['labels']}".encode()]
    return pa.ipc.open_stream(base64.b64decode(encoded)).read_all().column(0).to_numpy(zero_copy_only=False)
