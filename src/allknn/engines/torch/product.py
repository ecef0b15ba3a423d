"""The precisions of the torch engine's products, within the certificate's bound.

Lower precisions round the inputs to that format (round to nearest even)
and sum in float32, which is what :func:`allknn.topk.bounds.product_error`
bounds: on CPU the rounded values are multiplied by float32 matmul; on CUDA
by TF32 tensor cores (``allow_tf32``), which hold bf16, fp16 and tf32 values
exactly, so the bound of the rounded inputs still holds.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")

_TF32_DROPPED_BITS = 13
"""float32 mantissa bits a tf32 value does not have."""


def rounded(tensor: Any, precision: str) -> Any:
    """``tensor`` (float32) with every value rounded to ``precision``, still float32."""
    import torch

    if precision == "fp32":
        return tensor
    if precision == "bf16":
        return tensor.to(torch.bfloat16).to(torch.float32)
    if precision == "fp16":
        return tensor.to(torch.float16).to(torch.float32)
    bits = tensor.view(torch.int32)
    half = (1 << (_TF32_DROPPED_BITS - 1)) - 1
    bits = (bits + half + ((bits >> _TF32_DROPPED_BITS) & 1)) & ~((1 << _TF32_DROPPED_BITS) - 1)
    return bits.view(torch.float32)


_SETTINGS = threading.Condition()
_HELD: dict[str, Any] = {"precision": None, "count": 0, "saved": None}


@contextmanager
def torch_settings(precision: str) -> Iterator[None]:
    """One torch thread per tile worker, and on CUDA the TF32 tensor cores
    for the lower precisions, set before any tile and put back after.

    The settings are global to the process, and an fp32 product made with
    TF32 on would be outside fp32's bound: runs (or Dask tasks) of one
    precision share the settings, and one of another precision waits until
    they are done.
    """
    import torch

    with _SETTINGS:
        while _HELD["count"] and _HELD["precision"] != precision:
            _SETTINGS.wait()
        if not _HELD["count"]:
            _HELD["saved"] = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32)
            torch.set_num_threads(1)
            torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
            _HELD["precision"] = precision
        _HELD["count"] += 1
    try:
        yield
    finally:
        with _SETTINGS:
            _HELD["count"] -= 1
            if not _HELD["count"]:
                threads, tf32 = _HELD["saved"]
                torch.set_num_threads(threads)
                torch.backends.cuda.matmul.allow_tf32 = tf32
                _SETTINGS.notify_all()
