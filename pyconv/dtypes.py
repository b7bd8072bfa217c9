"""The one table of dtype names, and the cast policy.

pyconv names dtypes as safetensors does (F32, BF16, F8_E4M3...). Each row says what the same
dtype is called in torch (`torch.float32`, which is also how Megatron's `params_dtype` and a
config.json's `dtype` spell it), its itemsize, and the legacy typed-storage class torch.save
writes it with (None: torch pickles it as an UntypedStorage plus the dtype).
"""

from __future__ import annotations

import re
from typing import NamedTuple

from pyconv.errors import LayoutError


class Dtype(NamedTuple):
    name: str            # safetensors
    torch: str           # torch.<name>
    itemsize: int
    storage: str | None  # torch's typed storage class


DTYPES = tuple(Dtype(*row) for row in (
    ("BOOL", "bool", 1, "BoolStorage"),
    ("U8", "uint8", 1, "ByteStorage"),
    ("I8", "int8", 1, "CharStorage"),
    ("I16", "int16", 2, "ShortStorage"),
    ("U16", "uint16", 2, None),
    ("F16", "float16", 2, "HalfStorage"),
    ("BF16", "bfloat16", 2, "BFloat16Storage"),
    ("I32", "int32", 4, "IntStorage"),
    ("U32", "uint32", 4, None),
    ("F32", "float32", 4, "FloatStorage"),
    ("F64", "float64", 8, "DoubleStorage"),
    ("I64", "int64", 8, "LongStorage"),
    ("U64", "uint64", 8, None),
    ("F8_E4M3", "float8_e4m3fn", 1, None),
    ("F8_E5M2", "float8_e5m2", 1, None),
))

ITEMSIZE = {d.name: d.itemsize for d in DTYPES}
TORCH_NAME = {d.name: d.torch for d in DTYPES}                      # F32 -> float32
FROM_TORCH_NAME = {d.torch: d.name for d in DTYPES}                 # float32 -> F32
STORAGE_TYPES = {d.name: (d.storage, d.torch) for d in DTYPES if d.storage}  # what torch.save writes typed
FLOAT_DTYPES = ("F32", "BF16", "F16")  # what the core casts between; also a model's params_dtype
FP8 = "F8_E4M3"

# --dtype spellings
ALIASES = {
    "fp32": "F32", "float32": "F32", "f32": "F32",
    "bf16": "BF16", "bfloat16": "BF16",
    "fp16": "F16", "float16": "F16", "f16": "F16", "half": "F16",
    "fp8": "F8_E4M3", "float8_e4m3fn": "F8_E4M3", "e4m3": "F8_E4M3",
}


def parse_dtype(name: str | None) -> str | None:
    if name is None:
        return None
    key = name.lower()
    if key not in ALIASES:
        raise LayoutError(f"unknown dtype '{name}' (choose fp32, bf16, fp16 or fp8)")
    return ALIASES[key]


def model_dtype(target_dtype: str | None, tensor_dtypes) -> str:
    """The model's floating dtype in a written config (Megatron's params_dtype, NeMo's): a float
    target dtype, else the first floating dtype among the source tensors, else F32."""
    if target_dtype in FLOAT_DTYPES:
        return target_dtype
    return next((d for d in tensor_dtypes if d in FLOAT_DTYPES), "F32")


def with_config_dtype(config: dict, dtype: str | None) -> dict:
    """config.json with its `dtype` (and `torch_dtype` where the config has that key) saying dtype."""
    if dtype not in FLOAT_DTYPES:
        return config
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype", "torch_dtype"]
    return {**config, **{k: TORCH_NAME[dtype] for k in keys}}


_IN_LAYER = re.compile(r"(^|\.)(layers|h)\.\d+\.")


def is_quantizable(name: str, tensor) -> bool:
    """The weights --dtype fp8 quantizes, as DeepSeek-V3 stores them in fp8: 2-D linear weights
    inside the layers, not norms, routers or embeddings."""
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
    return (tensor.dtype in FLOAT_DTYPES and len(tensor.shape) == 2 and name.endswith(".weight")
            and _IN_LAYER.search(name) is not None and "norm" not in leaf
            and leaf not in ("gate", "shared_expert_gate", "router"))


def output_dtype(tensor, dtype: str | None) -> str:
    """The dtype a canonical tensor is written in: floating tensors take the target dtype (fp8:
    only the quantizable weights), block-scaled fp8 weights are dequantized to a float target,
    others keep theirs."""
    if dtype is None or tensor.dtype == dtype:
        return tensor.dtype
    if dtype == FP8:
        return dtype if is_quantizable(tensor.name, tensor) else tensor.dtype
    if tensor.dtype in FLOAT_DTYPES:
        return dtype
    if tensor.dtype == FP8:
        if any(b.stored.scale is None for b in tensor.blocks):
            raise LayoutError(f"tensor {tensor.name}: an F8_E4M3 weight without its weight_scale_inv cannot be "
                              f"dequantized to {dtype}")
        return dtype
    if tensor.dtype in ("F64", "F8_E5M2"):
        raise LayoutError(f"tensor {tensor.name}: cannot cast {tensor.dtype} to {dtype} (supported casts: F32, BF16, "
                          "F16, and block-scaled F8_E4M3 to those)")
    return tensor.dtype  # integer and boolean tensors (buffers, masks) are not weights to cast


def output_dtypes(tensors: dict, dtype: str | None, kept: frozenset[str] = frozenset()) -> dict[str, str]:
    """{name: output dtype} of canonical tensors; `kept` (names a family table marks keep_dtype)
    keep their own dtype through a cast."""
    return {name: t.dtype if name in kept else output_dtype(t, dtype) for name, t in tensors.items()}
