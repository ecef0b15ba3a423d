"""The precisions of the torch engine's products, within the certificate's bound.

Lower precisions round the inputs to that format (round to nearest even)
and sum in float32, which is what :func:`allknn.topk.bounds.product_error`
bounds: on CPU the rounded values are multiplied by float32 matmul; on CUDA
by TF32 tensor cores (``allow_tf32``), which hold bf16, fp16 and tf32 values
exactly, so the bound of the rounded inputs still holds.
"""

from __future__ import annotations

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


@contextmanager
def torch_settings(precision: str) -> Iterator[None]:
    """One torch thread per tile worker, and on CUDA the TF32 tensor cores
    for the lower precisions, set before any tile and put back after.

    Either setting of the tensor cores stays within the certificate's bound
    (without them the products are only more accurate), so tasks of other
    runs in the same process cannot make a result wrong.
    """
    import torch

    threads, tf32 = torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32
    torch.set_num_threads(1)
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.backends.cuda.matmul.allow_tf32 = tf32
