"""Import optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

_EXTRA = {"pyarrow": "parquet", "pyarrow.parquet": "parquet", "h5py": "hdf5", "distributed": "dask",
          "networkx": "graph", "matplotlib": "report", "zarr": "zarr"}


def optional(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or explain which extra provides it.

    Parameters
    ----------
    module : str
        Dotted module name: ``pyarrow``, ``pyarrow.parquet`` or ``h5py``.
    purpose : str
        What needs it, for the message (e.g. ``"reading .parquet files"``).

    Raises
    ------
    ImportError
        If the module is not installed, saying ``pip install 'allknn[extra]'``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        extra = _EXTRA[module]
        raise ImportError(
            f"{purpose} needs {module.split('.')[0]}, which is not installed; "
            f"pip install 'allknn[{extra}]'"
        ) from exc


def open_parquet(path: Path):
    """Open a parquet file with pyarrow, or say it is unreadable.

    Returns
    -------
    pyarrow.parquet.ParquetFile

    Raises
    ------
    ValueError
        For a truncated or corrupt file, naming it.
    """
    pa = optional("pyarrow", "reading .parquet files")
    pq = optional("pyarrow.parquet", "reading .parquet files")
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(
            f"{path} is not a readable parquet file ({exc}); it may be truncated or corrupt: write it again"
        ) from None
