"""Qwen2: the Llama layout with q/k/v biases (and no other linear biases)."""

from __future__ import annotations

from pyconv.families import Family, ModelDims, register_family
from pyconv.families.llama import LLAMA_MAPPINGS, llama_dims, llama_hf_config, llama_megatron_args


def qwen2_megatron_args(config: dict, dims: ModelDims) -> dict:
    return {**llama_megatron_args({**config, "attention_bias": False, "mlp_bias": False}, dims), "add_qkv_bias": True}


QWEN2 = register_family(Family(
    name="qwen2",
    architectures=("Qwen2ForCausalLM",),
    mappings=LLAMA_MAPPINGS,  # same names; the q/k/v biases are present, o_proj/MLP biases absent
    dims_from_hf=llama_dims,
    megatron_args_from_hf=qwen2_megatron_args,
    hf_config_from_megatron=lambda args: llama_hf_config(args, "Qwen2ForCausalLM", "qwen2"),
    megatron_features=frozenset({"swiglu", "rmsnorm", "pos_rope", "qkv_bias"}),
    nemo_classes=("nemo.collections.llm.gpt.model.qwen2", "Qwen2Model", "Qwen2Config"),
    mindformers=True,
))
