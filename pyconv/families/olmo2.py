"""OLMo 2: the Llama layout with the norms after the attention and the MLP instead of before them
(`h + post_attention_layernorm(attn(h))`, `h + post_feedforward_layernorm(mlp(h))`) and RMSNorms
on the whole query and key projections (`q_norm` [heads * head_dim], `k_norm` [kv_heads *
head_dim], before the heads are split). transformers 5.24's modeling_olmo2.py.

Megatron-Core 0.16.1 has neither, and Megatron-Bridge has no OLMo 2 bridge (@067f987d): the names
are those of its layers that do express them. Post-norms: EXAONE 4.0's (models/exaone/exaone4,
linear_proj / linear_fc2 as TERowParallelLinearLayerNorm, `...linear_proj.post_layernorm`,
`...linear_fc2.post_layernorm`, plain column-parallel linear_qkv / linear_fc1 with no norm fused).
Whole-projection q/k norms: OLMoE's (models/olmoe/olmoe_provider.py, OLMoESelfAttention's
`q_layernorm` / `k_layernorm` as wide as the projection, applied before the per-head reshape). That
attention normalises the rank's own slice of the projection, so it is only the model at tp 1:
pyconv refuses tp > 1 by name. The args say so (`post_layernorm`, `qk_layernorm_whole_projection`),
which also tells an OLMo 2 from a Qwen3 in args alone."""

from __future__ import annotations

from pyconv.errors import LayoutError
from pyconv.families import (
    GATED_FC1, LAYER, QKV, REPLICATED, ROW, Family, ModelDims, TensorMapping, register_family,
)
from pyconv.families.llama import EMBEDDING, HEAD, llama_dims, llama_hf_config, llama_megatron_args

L = "model.layers.*."
M = "decoder.layers.*."

# q/k RMSNorms over the whole projection (OLMo 2, OLMoE), as wide as q_proj's and k_proj's output.
WHOLE_PROJECTION_QK_NORM = (
    TensorMapping((L + "self_attn.q_norm.weight",), M + "self_attention.q_layernorm.weight", REPLICATED, LAYER,
                  lambda d: (d.heads * d.head_dim,)),
    TensorMapping((L + "self_attn.k_norm.weight",), M + "self_attention.k_layernorm.weight", REPLICATED, LAYER,
                  lambda d: (d.groups * d.head_dim,)),
)
# Why such a norm is the model at tp 1 only.
WHOLE_PROJECTION_SINGLE_TP = ("q/k norms over the whole projection: Megatron-Core's q_layernorm is per head, and the "
                              "whole-projection norm (Megatron-Bridge's OLMoE attention) normalises a rank's slice "
                              "only")
OLMO2_LAYER = (
    TensorMapping((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
                  M + "self_attention.linear_qkv.weight", QKV, LAYER, lambda d: (d.heads * d.head_dim, d.hidden)),
) + WHOLE_PROJECTION_QK_NORM + (
    TensorMapping((L + "self_attn.o_proj.weight",), M + "self_attention.linear_proj.weight", ROW, LAYER,
                  lambda d: (d.hidden, d.heads * d.head_dim)),
    TensorMapping((L + "post_attention_layernorm.weight",), M + "self_attention.linear_proj.post_layernorm.weight",
                  REPLICATED, LAYER, lambda d: (d.hidden,)),
    TensorMapping((L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), M + "mlp.linear_fc1.weight", GATED_FC1,
                  LAYER, lambda d: (d.ffn, d.hidden)),
    TensorMapping((L + "mlp.down_proj.weight",), M + "mlp.linear_fc2.weight", ROW, LAYER,
                  lambda d: (d.hidden, d.ffn)),
    TensorMapping((L + "post_feedforward_layernorm.weight",), M + "mlp.linear_fc2.post_layernorm.weight",
                  REPLICATED, LAYER, lambda d: (d.hidden,)),
)
OLMO2_MAPPINGS = EMBEDDING + OLMO2_LAYER + HEAD


def olmo2_dims(config: dict) -> ModelDims:
    if config.get("attention_bias"):
        raise LayoutError("config.json: OLMo 2 with attention_bias: the post-norm linear layer "
                          "(TERowParallelLinearLayerNorm) has no bias")
    if config.get("hidden_act", "silu") != "silu":
        raise LayoutError(f"config.json: OLMo 2 with hidden_act '{config['hidden_act']}': its Megatron layer is SwiGLU")
    return llama_dims(config)


def olmo2_megatron_args(config: dict, dims: ModelDims) -> dict:
    return {**llama_megatron_args({**config, "attention_bias": False, "mlp_bias": False}, dims),
            "qk_layernorm": True, "qk_layernorm_whole_projection": True, "post_layernorm": True}


def olmo2_hf_config(args: dict) -> dict:
    config = llama_hf_config(args, "Olmo2ForCausalLM", "olmo2")
    config["attention_bias"] = False
    return config


OLMO2 = register_family(Family(
    name="olmo2",
    architectures=("Olmo2ForCausalLM",),
    mappings=OLMO2_MAPPINGS,
    dims_from_hf=olmo2_dims,
    megatron_args_from_hf=olmo2_megatron_args,
    hf_config_from_megatron=olmo2_hf_config,
    megatron_features=frozenset({"swiglu", "rmsnorm", "pos_rope", "qk_layernorm", "qk_whole_projection",
                                 "post_layernorm"}),
    single_tp="OLMo 2's " + WHOLE_PROJECTION_SINGLE_TP,
))
