"""A result as a folder of parquet parts, one per row block, and a manifest.

Layout
------
``part-000000.parquet``, ... : neighbour tables (see
:mod:`allknn.writers.neighbor_table`) of consecutive row blocks, each with
row-number ``id`` values of the whole result; each appears only when
complete (atomic rename).

``_manifest.json`` : the format, the run's fingerprint (input digests and
parameters), ``k``, ``n_rows``, ``n_corpus``, the run's ``params`` and the
finished parts (file, first row, rows). It is rewritten atomically after
each part, so a killed run leaves a manifest naming only complete parts,
and a resumed run skips exactly those. Its name starts with ``_`` so that
parquet readers (``pandas.read_parquet(folder)``) skip it and read the
parts as one table.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from allknn._optional import open_parquet
from allknn.topk.result import TopK
from allknn.writers.atomic import atomic_path
from allknn.writers.json_text import dumps
from allknn.writers.neighbor_table import ParquetNeighborWriter

MANIFEST = "_manifest.json"
FORMAT = "allknn.parts/1"


def part_name(block: int) -> str:
    """File name of row block ``block``'s part."""
    return f"part-{block:06d}.parquet"


def write_part(folder: str | os.PathLike[str], block: int, first_row: int, indices: np.ndarray,
               similarities: np.ndarray, *, n_corpus: int, params: dict[str, Any]) -> dict[str, int | str]:
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

    Returns
    -------
    dict
        The manifest entry: ``file``, ``first_row``, ``rows``.
    """
    name = part_name(block)
    with ParquetNeighborWriter(Path(folder) / name, k=indices.shape[1], n_rows=indices.shape[0],
                               n_corpus=n_corpus, params=params, first_row=first_row) as writer:
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

    @property
    def path(self) -> Path:
        return self.folder / MANIFEST

    def resume(self) -> None:
        """Take over the finished parts of the manifest on disk (none if
        there is none), after checking it belongs to this run.

        Raises
        ------
        ValueError
            An unreadable manifest, or one made by a different run (naming
            each difference).
        """
        if not self.path.exists():
            return
        saved = _read(self.path)
        differences = [f"{key}: the folder has {saved['fingerprint'].get(key)!r}, this run has {value!r}"
                       for key, value in self.fingerprint.items() if saved["fingerprint"].get(key) != value]
        if differences:
            raise ValueError(f"cannot resume into {self.folder}: it holds the output of a different run ("
                             + "; ".join(differences) + "); use the original input and parameters, or "
                             "another output folder")
        self.parts = {int(block): entry for block, entry in saved["parts"].items()
                      if (self.folder / entry["file"]).is_file()}

    def add(self, block: int, entry: dict[str, Any]) -> None:
        """Record a finished part and rewrite the manifest."""
        self.parts[block] = entry
        self.save()

    def save(self, *, complete: bool = False) -> None:
        """Write the manifest atomically."""
        text = dumps({"format": FORMAT, "fingerprint": self.fingerprint, **self.header, "complete": complete,
                      "parts": {str(block): self.parts[block] for block in sorted(self.parts)}})
        with atomic_path(self.path) as tmp:
            tmp.write_text(text)


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
    indices = np.full((n_rows, k), -1, dtype=np.int64)
    similarities = np.full((n_rows, k), np.nan, dtype=np.float32)
    covered = np.zeros(n_rows, dtype=bool)
    for entry in manifest["parts"].values():
        first, rows = entry["first_row"], entry["rows"]
        table = open_parquet(folder / entry["file"]).read(columns=["id", "neighbor_id", "rank", "similarity"])
        ids = table.column("id").to_numpy()
        ranks = table.column("rank").to_numpy().astype(np.int64) - 1
        outside = ids.size and (ids.min() < first or ids.max() >= first + rows or ranks.min() < 0
                                or ranks.max() >= k)
        if outside:
            raise ValueError(f"{folder / entry['file']} holds rows outside its manifest entry; it is corrupt")
        indices[ids, ranks] = table.column("neighbor_id").to_numpy()
        similarities[ids, ranks] = table.column("similarity").to_numpy()
        covered[first : first + rows] = True
    if not covered.all():
        missing = np.flatnonzero(~covered)
        raise ValueError(f"{folder} is unfinished: rows {missing[0]}..{missing[-1]} have no part yet; run "
                         f"the same command again with --resume to finish it")
    return TopK(indices=indices, similarities=similarities, n_corpus=n_corpus, params=manifest["params"])


def _read(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}")
        return manifest
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} cannot be read ({exc}); delete the folder to start over") from None
