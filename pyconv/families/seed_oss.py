"""Seed-OSS (ByteDance): the Llama layout with q/k/v biases (attention_bias), an o_proj bias of its
own (attention_out_bias) and MLP biases (mlp_bias), Llama's tensor names; the dropout after attention
and MLP (residual_dropout) acts only in training. transformers 5.24's modeling_seed_oss.py.

Its Megatron args are Llama's (qkv bias only: the same args as Qwen2's, which compute the same
model), so a Megatron checkpoint says Seed-OSS only through the HF config pyconv keeps in its args;
without it, it reads as Qwen2."""

from __future__ import annotations

from pyconv.families import Family, register_family
from pyconv.families.llama import LLAMA_MAPPINGS, llama_dims, llama_hf_config, llama_megatron_args

SEED_OSS = register_family(Family(
    name="seed_oss",
    architectures=("SeedOssForCausalLM",),
    mappings=LLAMA_MAPPINGS,
    dims_from_hf=llama_dims,
    megatron_args_from_hf=llama_megatron_args,
    hf_config_from_megatron=lambda args: llama_hf_config(args, "SeedOssForCausalLM", "seed_oss"),
    megatron_features=None,  # indistinguishable from Qwen2's by the args alone (see above)
))
