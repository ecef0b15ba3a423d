"""The checks of arguments to the public functions, and their error messages.

The rule: a check of what the caller passed (types, ranges, shapes, bad
rows, option values) lives here. A check of what a file holds is made by
the reader or writer of that format (``allknn.readers``, ``allknn.writers``),
a check of an engine's own options by the engine that declares them
(``Engine.options``, ``check_combination``, ``refusal``), and the
scikit-learn estimator raises what scikit-learn's checks expect.
"""

from __future__ import annotations

import numbers
import os

import numpy as np
import scipy.sparse

INVALID_CHOICES = ("raise", "drop")


def as_matrix(data: object, name: str) -> np.ndarray | scipy.sparse.csr_matrix:
    """Return ``data`` as a 2-D numeric ndarray without copying when possible.

    float16/32/64 arrays (and memory maps) are returned as they are; other
    real numeric dtypes are accepted as they are too and converted block by
    block later. scipy sparse matrices and arrays of any format become a
    canonical CSR matrix.

    Raises
    ------
    TypeError
        If ``data`` is not numeric (strings, objects, complex, ragged lists).
    ValueError
        If ``data`` is not 2-D or has no rows or no columns.
    """
    if isinstance(data, np.ndarray):
        array = data
    else:
        if scipy.sparse.issparse(data):
            return as_csr(data, name)
        try:
            array = np.asarray(data)
        except (ValueError, TypeError) as exc:
            raise TypeError(
                f"{name} could not be read as a numeric matrix ({exc}); pass a 2-D array "
                f"of floats with rows of equal length"
            ) from None
    kind = array.dtype.kind
    if kind not in "fiub":
        raise TypeError(
            f"{name} has dtype {array.dtype}, which is not a real number type; pass a "
            f"float16, float32 or float64 matrix (for example {name}.astype('float32'))"
        )
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (rows x dimensions) but has shape {array.shape}; "
            f"reshape it, e.g. {name}.reshape(1, -1) for a single row"
        )
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} has shape {array.shape}; it needs at least one row and one column")
    return array


def check_same_width(corpus: np.ndarray, queries: np.ndarray) -> None:
    """Raise if the queries and the corpus have different dimensions."""
    if queries.shape[1] != corpus.shape[1]:
        raise ValueError(
            f"queries have {queries.shape[1]} dimensions but X has {corpus.shape[1]}; "
            f"both must be embedded in the same space"
        )


def check_k(k: object, n_candidates: int, *, self_join: bool) -> int:
    """Return ``k`` as an int after checking ``1 <= k <= n_candidates``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be a positive integer, got {k!r}")
    k = int(k)
    if k < 1:
        raise ValueError(f"k must be at least 1, got k={k}")
    if n_candidates == 0 and self_join:
        raise ValueError("a self-join needs at least two (valid) rows: each row's neighbours are the other "
                         "rows; add rows, or search it against a corpus with queries=")
    if k > n_candidates:
        where = "other rows (self excluded)" if self_join else "corpus rows"
        raise ValueError(
            f"k={k} is too large: each row has only {n_candidates} candidate "
            f"{where}; pass k <= {n_candidates}"
        )
    return k


def check_threads(threads: object) -> int:
    """Return the worker thread count (``None``: the usable CPUs)."""
    if threads is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    return int(threads)


BACKENDS = ("numba", "torch")


def check_backend(backend: object, device: object, method: str) -> str:
    """The engine ``method`` a backend and device select: ``"torch"`` for
    ``backend="torch"`` or a CUDA device (with ``method`` ``"exact"`` or
    ``"auto"``), else ``method`` itself."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    from allknn.engines.torch.devices import parse_devices  # names only: torch is not imported

    devices = ("cpu",) if device is None else parse_devices(device)
    if backend == "numba" and devices[0] == "cpu":
        if devices != ("cpu",):
            raise ValueError(f"device={device!r} runs on the torch engine; pass backend='torch'")
        return method
    if method not in ("exact", "auto", "torch"):
        raise ValueError(f"backend='torch' runs the exact engine; method={method!r} does not run on it")
    return "torch"


def check_invalid_choice(invalid: object) -> str:
    """Check the ``invalid=`` option."""
    if invalid not in INVALID_CHOICES:
        raise ValueError(f"invalid must be one of {INVALID_CHOICES}, got {invalid!r}")
    return str(invalid)


def _first_rows(rows: np.ndarray, limit: int = 5) -> str:
    shown = ", ".join(str(int(r)) for r in rows[:limit])
    return shown + (", ..." if rows.size > limit else "")


def raise_for_bad_rows(name: str, zero_rows: np.ndarray, nonfinite_rows: np.ndarray) -> None:
    """Raise a ValueError naming zero and NaN/Inf rows, if there are any.

    Parameters
    ----------
    name : str
        ``"X"`` or ``"queries"``.
    zero_rows, nonfinite_rows : ndarray of int64
        Sorted row numbers of all-zero rows and of rows holding NaN or Inf.
    """
    problems = []
    if nonfinite_rows.size:
        problems.append(
            f"{nonfinite_rows.size} row(s) containing NaN or Inf (rows {_first_rows(nonfinite_rows)})"
        )
    if zero_rows.size:
        problems.append(
            f"{zero_rows.size} all-zero row(s), which have no cosine similarity "
            f"(rows {_first_rows(zero_rows)})"
        )
    if problems:
        raise ValueError(
            f"{name} has " + " and ".join(problems) + "; fix or remove them, or pass "
            "invalid='drop' to leave them out (their results are index -1, similarity NaN)"
        )


def raise_if_no_valid_rows(name: str, n_rows: int) -> None:
    """Raise when dropping invalid rows left nothing."""
    raise ValueError(f"all {n_rows} rows of {name} are zero or contain NaN/Inf; nothing to search")


def check_fraction(value: object, name: str) -> float:
    """A number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def check_optional_count(value: object, name: str) -> int | None:
    """None or a positive integer."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    return int(value)


def check_count(value: object, name: str) -> int | None:
    """None or a non-negative integer."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer or None, got {value!r}")
    return int(value)


def rows_to_keep(norms: np.ndarray, *, name: str, invalid: str) -> np.ndarray | None:
    """Rows with a finite, non-zero norm; ``None`` when that is all of them.

    Raises
    ------
    ValueError
        For zero or NaN/Inf rows with ``invalid="raise"`` (naming them), or
        when no row is left.
    """
    finite = np.isfinite(norms)
    good = finite & (norms > 0)
    if good.all():
        return None
    if invalid == "raise":
        raise_for_bad_rows(name, np.flatnonzero(finite & (norms == 0)), np.flatnonzero(~finite))
    kept = np.flatnonzero(good)
    if kept.size == 0:
        raise_if_no_valid_rows(name, norms.size)
    return kept


def check_min_similarity(value: object) -> float | None:
    """None or a finite number (similarities lie in [-1, 1])."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise ValueError(f"min_similarity must be a finite number or None, got {value!r}")
    if not -1.0 <= value <= 1.0:
        raise ValueError(f"min_similarity={value!r} is outside [-1, 1], where cosine similarities lie; "
                         f"it would keep {'no' if value > 1 else 'every'} neighbour")
    return float(value)


def check_row_limit(n_rows: int, limit: int, name: str) -> None:
    """Row ids are packed in 32 bits by the engine: refuse larger inputs."""
    if n_rows >= limit:
        raise ValueError(
            f"{name} has {n_rows} rows; one search handles fewer than {limit}: split it and use "
            f"queries= against each part"
        )


def as_csr(data: object, name: str) -> scipy.sparse.csr_matrix:
    """A canonical CSR copy-or-view of a sparse input (sorted, no duplicates).

    Raises
    ------
    TypeError
        For a non-real dtype.
    ValueError
        For an empty shape.
    """
    if data.dtype.kind not in "fiub":
        raise TypeError(
            f"{name} has dtype {data.dtype}, which is not a real number type; pass a float32 or "
            f"float64 sparse matrix (for example {name}.astype('float32'))"
        )
    matrix = scipy.sparse.csr_matrix(data)
    if matrix.shape[0] == 0 or matrix.shape[1] == 0:
        raise ValueError(f"{name} has shape {matrix.shape}; it needs at least one row and one column")
    if not matrix.has_canonical_format:
        matrix = matrix.copy()
        matrix.sum_duplicates()
    return matrix
