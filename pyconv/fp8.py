"""Block-scaled fp8 (DeepSeek-V3's e4m3 weights): the conventions every format shares.

A quantized weight `X.weight` (F8_E4M3) has `X.weight_scale_inv` beside it: float32, one scale
per 128 x 128 block of the weight's 2-D view, W = q * S.
"""

from __future__ import annotations

from dataclasses import replace

from pyconv.catalog import view2d
from pyconv.dtypes import FP8
from pyconv.errors import FormatError

FP8_BLOCK = 128  # DeepSeek-V3's weight_block_size: scales per 128 x 128 block
SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
                       "activation_scheme": "dynamic"}


def scale_grid(shape: tuple[int, ...]) -> tuple[int, int]:
    rows, cols = view2d(shape)
    return -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)


def link_scales(stored: dict, config: dict | None) -> dict:
    """Each F8_E4M3 weight with a `weight_scale_inv` beside it carries that scale grid."""
    block = ((config or {}).get("quantization_config") or {}).get("weight_block_size") or [FP8_BLOCK, FP8_BLOCK]
    linked = dict(stored)
    for name, scale in stored.items():
        weight = stored.get(name[:-len(SCALE_SUFFIX)]) if name.endswith(".weight" + SCALE_SUFFIX) else None
        if weight is None or weight.dtype != FP8:
            continue
        if list(block) != [FP8_BLOCK, FP8_BLOCK]:
            raise FormatError(f"config.json: weight_block_size {block} is not supported (pyconv reads 128 x 128 blocks)")
        if scale.dtype != "F32" or tuple(scale.shape) != scale_grid(weight.shape):
            raise FormatError(f"{scale.path}: {name} is {scale.dtype} {list(scale.shape)}, expected F32 "
                              f"{list(scale_grid(weight.shape))} for the {list(weight.shape)} weight")
        linked[name[:-len(SCALE_SUFFIX)]] = replace(weight, scale=scale)
    return linked


def scale_names(tensors: dict) -> set[str]:
    """Names of the weight_scale_inv grids that travel with their fp8 weights."""
    return {n + SCALE_SUFFIX for n, t in tensors.items() if t.dtype == FP8 and n + SCALE_SUFFIX in tensors}
