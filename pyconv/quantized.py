"""Quantized checkpoints: which scheme a checkpoint declares, and what pyconv can do with it.

pyconv transforms one scheme: DeepSeek's block-scaled fp8 (`quant_method: fp8`, 128 x 128
`weight_scale_inv` grids; pyconv.fp8), dequantized in the core or kept as it is. Every other scheme
it recognises — compressed-tensors (`config_groups`: fp8 per tensor or channel, int4/int8 packed
with group scales), MXFP4 (GPT-OSS: `*_blocks` packed e2m1 pairs and `*_scales` e8m0), NVIDIA
ModelOpt (NVFP4, FP8; `hf_quant_config.json`), bitsandbytes, GPTQ, AWQ — is resharded HF -> HF byte
for byte with its config, and refused by name wherever its packed bytes would have to be read as
numbers (a cast, a Megatron-style target), never copied into a float tensor."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pyconv.errors import LayoutError
from pyconv.io.jsonfile import load_json

MODELOPT_CONFIG = "hf_quant_config.json"
# Tensor names that only quantized checkpoints hold (by the suffix after the module's name).
_QUANTIZED_SUFFIXES = ("_blocks", ".weight_scale", ".weight_scale_2", ".input_scale", ".weight_packed",
                       ".weight_zero_point", ".weight_global_scale", ".weight_shape", ".qweight", ".qzeros",
                       ".SCB", ".weight_format")


@dataclass(frozen=True)
class Quantization:
    method: str       # as declared: "compressed-tensors (float-quantized)", "mxfp4", "modelopt NVFP4"...
    where: str        # the file (or tensor) that says so
    transformable: bool  # pyconv can dequantize / reshard it into any target (DeepSeek's block fp8)

    def details(self) -> dict:
        """The catalog's `quantization` entry (inspect shows it; planning checks it)."""
        return {"method": self.method, "declared_by": self.where, "transformable": self.transformable}


def declared_quantization(config: dict | None, root: str, tensor_names) -> Quantization | None:
    """The scheme config.json's quantization_config or ModelOpt's hf_quant_config.json declares, or
    what the tensor names betray when neither does; None for an unquantized checkpoint."""
    quant = (config or {}).get("quantization_config")
    if isinstance(quant, dict):
        method = str(quant.get("quant_method", "unknown"))
        if method == "fp8" and list(quant.get("weight_block_size") or [128, 128]) == [128, 128]:
            return Quantization("fp8 (128 x 128 block scales)", "config.json", True)
        detail = quant.get("format") or quant.get("quant_algo") or quant.get("bits")
        return Quantization(f"{method}" + (f" ({detail})" if detail else ""), "config.json", False)
    modelopt = os.path.join(root, MODELOPT_CONFIG)
    if os.path.isfile(modelopt):
        spec = load_json(modelopt, "ModelOpt quantization config")
        algo = (spec.get("quantization") or {}).get("quant_algo") if isinstance(spec, dict) else None
        return Quantization(f"modelopt {algo or 'unknown'}", MODELOPT_CONFIG, False)
    named = next((n for n in tensor_names if n.endswith(_QUANTIZED_SUFFIXES)), None)
    if named is not None:
        return Quantization("undeclared (tensors named like quantized weights)", f"tensor '{named}'", False)
    return None


def refuse_transforming(quantization: dict | None, path: str, target_format: str, dtype: str | None) -> None:
    """A scheme pyconv cannot transform (`quantization`: a reader's details entry, as
    Quantization.details gives it): HF -> HF without a dtype (byte for byte) only."""
    if quantization is None or quantization["transformable"]:
        return
    what = f"{path}: {quantization['method']} quantization (declared by {quantization['declared_by']})"
    if target_format != "hf":
        raise LayoutError(f"{what} cannot be written as {target_format}: its packed weights would have to be "
                          "dequantized, which pyconv does not do for this scheme yet; it reshards it to hf as it is")
    if dtype is not None:
        raise LayoutError(f"{what}: a dtype would cast around the packed weights without dequantizing them; "
                          "pyconv reshards this scheme only as it is (no dtype)")
