"""Import optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

_EXTRA = {"pyarrow": "parquet", "pyarrow.parquet": "parquet", "h5py": "hdf5"}


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
