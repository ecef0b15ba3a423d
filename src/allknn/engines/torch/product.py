"""The precisions of the torch engine's products, within the certificate's bound.

Lower precisions round the inputs to that format (round to nearest even)
and sum in float32, which is what :func:`allknn.topk.bounds.product_error`
bounds: on CPU the rounded values are multiplied by float32 matmul; on CUDA
by TF32 tensor cores (``allow_tf32``), which hold bf16, fp16 and tf32 values
exactly, so the bound of the rounded inputs still holds.
"""

from __future__ import annotations

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
