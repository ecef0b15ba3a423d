"""Memory budgets: parsing them, the tile scratch model and sizing blocks so work stays inside.

Every engine works in tiles of ``block_rows`` squared, chosen here before any
engine is picked; :func:`tile_scratch_bytes` is the one model of that
scratch. Each engine's :meth:`~allknn.engines.base.Engine.working_bytes`
adds what only it allocates (the approximate engine's cell lists and
refinement lists, see :func:`allknn.engines.approx.search.approx_bytes`).
"""

from __future__ import annotations

import math
import numbers
import re

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

PREFERRED_BLOCK_ROWS = 768
"""Rows per block when the budget allows: a 768 x 768 float32 tile (2.25
MiB) is made and consumed by one core while it is still in its L2/L3
cache. On an Intel Xeon (2 MiB of L2 a core) 512-1536 measured within 5%
of each other; on an AMD EPYC (1 MiB of L2 a core) 768 beat 1024 by 4-10%
and 512 or 640 (see BENCHMARKS.md)."""

PREFERRED_SPARSE_BLOCK_ROWS = 2048
"""The same for sparse rows, whose tiles pay a column-table lookup per row
entry and corpus block: larger blocks spread it over more products. On the
benchmark machine 2048 beat 1024 by 10-15% (TF-IDF 0.44 -> 0.39 s, user x
item 100k 6.9 -> 6.3 s); 4096 was no better."""

BLOCK_MULTIPLE = 64
"""Block sizes are multiples of this (see ``allknn.engines.exact.plans``)."""

MIN_BLOCK_ROWS = BLOCK_MULTIPLE


def parse_memory(value: object) -> int:
    """Parse a memory budget such as ``"1GB"``, ``"512MiB"`` or ``2**28``.

    Returns
    -------
    int
        The budget in bytes.
    """
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        size = int(value)
    elif isinstance(value, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"max_memory={value!r} is not a size; write it like '512MB', '2GB' or '1.5GiB'"
            )
        size = int(float(match.group(1)) * _UNITS[unit])
    else:
        raise TypeError(f"max_memory must be a size string like '1GB' or bytes as int, got {value!r}")
    if size <= 0:
        raise ValueError(f"max_memory must be positive, got {value!r}")
    return size


def tile_scratch_bytes(block_rows: int, dim: int, threads: int, *, sparse: bool = False) -> int:
    """Bytes of tile scratch memory a run with these blocks allocates at once.

    Dense, per worker: one float32 tile ``block_rows**2``, its column
    thresholds, and one float64 block of ``block_rows x dim`` while
    normalising. Sparse, per worker: the tile, its column thresholds and a
    table of two int32 per column (the per-block column index is
    input-sized and counted with the input).
    """
    tile = 4 * block_rows * block_rows + 4 * block_rows
    if sparse:
        return threads * (tile + 8 * dim)
    return threads * (tile + 8 * block_rows * dim)


def choose_block_rows(budget: int, dim: int, threads: int, *, sparse: bool = False) -> int:
    """Largest block (up to the cache-friendly preference) that fits the budget.

    Raises
    ------
    ValueError
        If even ``MIN_BLOCK_ROWS`` rows per block exceed the budget.
    """
    per_thread = max(0.0, budget / threads - (8 * dim if sparse else 0))
    quadratic = 4
    linear = 4 if sparse else 4 + 8 * dim
    # largest rows with quadratic rows**2 + linear rows <= per_thread
    rows = int((-linear + math.sqrt(linear * linear + 4 * quadratic * per_thread)) / (2 * quadratic))
    rows = min(rows, PREFERRED_SPARSE_BLOCK_ROWS if sparse else PREFERRED_BLOCK_ROWS)
    rows -= rows % BLOCK_MULTIPLE
    while rows > 0 and tile_scratch_bytes(rows, dim, threads, sparse=sparse) > budget:  # float rounding
        rows -= BLOCK_MULTIPLE
    if rows < MIN_BLOCK_ROWS:
        need = tile_scratch_bytes(MIN_BLOCK_ROWS, dim, threads, sparse=sparse)
        raise ValueError(
            f"max_memory={budget} bytes is too small for {threads} thread(s) at {dim} "
            f"dimensions; give at least {need} bytes or fewer threads"
        )
    return rows


def round_block_rows(block_rows: int) -> int:
    """Round a block size up to a multiple of ``BLOCK_MULTIPLE``."""
    return -(-int(block_rows) // BLOCK_MULTIPLE) * BLOCK_MULTIPLE


def check_block_rows(
    block_rows: object, n_rows: int, budget: int, dim: int, threads: int, *, sparse: bool = False
) -> int:
    """An explicit block size, rounded up to a multiple of ``BLOCK_MULTIPLE``
    and capped at the (rounded) row count.

    Raises
    ------
    ValueError
        If it is not a positive integer, or its working memory exceeds the
        budget.
    """
    if isinstance(block_rows, bool) or not isinstance(block_rows, numbers.Integral) or block_rows < 1:
        raise ValueError(f"block_rows must be a positive integer, got {block_rows!r}")
    rows = cap_block_rows(round_block_rows(block_rows), n_rows)
    need = tile_scratch_bytes(rows, dim, threads, sparse=sparse)
    if need > budget:
        raise ValueError(
            f"block_rows={block_rows} needs {need} bytes of working memory with {threads} thread(s), "
            f"more than max_memory={budget} bytes; raise max_memory or lower block_rows"
        )
    return rows


def cap_block_rows(block_rows: int, n_rows: int) -> int:
    """No larger than the row count rounded up to ``BLOCK_MULTIPLE``."""
    return min(block_rows, round_block_rows(max(n_rows, 1)))
