"""Qwen2: the Llama layout with q/k/v biases (and no other linear biases)."""

from __future__ import annotations

from pyconv.families import Family, ModelDims, register_family
from pyconv.families.llama import LLAMA_MAPPINGS, llama_dims, llama_hf_config, llama_megatron_args


def qwen2_megatron_args(config: dict, dims: ModelDims) -> dict:
    return {**llama_megatron_args({**config, "attention_bias": False, "mlp_bias": False}, dims), "add_qkv_bias": True}


def is_qwen2_args(args: dict) -> bool:
    return (not args.get("num_experts") and bool(args.get("swiglu")) and args.get("normalization") == "RMSNorm"
            and args.get("position_embedding_type") == "rope"
            and bool(args.get("add_qkv_bias")) and not args.get("add_bias_linear") and not args.get("qk_layernorm"))


QWEN2 = register_family(Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    mappings=LLAMA_MAPPINGS,  # same names; the q/k/v biases are present, o_proj/MLP biases absent
    dims_from_hf=llama_dims,
    megatron_args_from_hf=qwen2_megatron_args,
    hf_config_from_megatron=lambda args: llama_hf_config(args, "Qwen2ForCausalLM", "qwen2"),
    matches_megatron_args=is_qwen2_args,
))
