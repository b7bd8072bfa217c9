"""Phi-3 (Phi-3, Phi-3.5, Phi-4-mini/medium): the Llama layout with the projections HF already
fuses, `qkv_proj` ([q; k; v] rows) and `gate_up_proj` ([gate; up] rows), taken apart into
Megatron-Core's per-group `linear_qkv` and per-rank `[gate_r; up_r]` `linear_fc1` by the QKV and
gated-fc1 shard rules with row offsets; partial rotary embeddings (`partial_rotary_factor`,
Phi-4-mini's 0.75) as `rotary_percent`, which rotates the first dims of each head as
transformers' Phi3 does. transformers 5.24's modeling_phi3.py. LongRoPE (`rope_type: longrope`,
Phi-3-*-128k) has no Megatron-Core equivalent and is refused for Megatron targets; it travels
unchanged HF -> HF."""

from __future__ import annotations

from pyconv.errors import LayoutError
from pyconv.families import (
    FIRST_STAGE, GATED_FC1, LAST_STAGE, LAYER, QKV, REPLICATED, ROW, VOCAB, Family, ModelDims, TensorMapping,
    register_family,
)
from pyconv.families.common import positive_number, rope_parameters
from pyconv.families.llama import llama_dims, llama_hf_config, llama_megatron_args

L = "model.layers.*."
M = "decoder.layers.*."

PHI3_MAPPINGS = (
    TensorMapping(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", VOCAB, FIRST_STAGE,
                  lambda d: (d.vocab, d.hidden)),
    TensorMapping((L + "input_layernorm.weight",),
                  {"te": M + "self_attention.linear_qkv.layer_norm_weight", "local": M + "input_layernorm.weight"},
                  REPLICATED, LAYER, lambda d: (d.hidden,)),
    TensorMapping((L + "self_attn.qkv_proj.weight",), M + "self_attention.linear_qkv.weight", QKV, LAYER,
                  lambda d: ((d.heads + 2 * d.groups) * d.head_dim, d.hidden)),
    TensorMapping((L + "self_attn.o_proj.weight",), M + "self_attention.linear_proj.weight", ROW, LAYER,
                  lambda d: (d.hidden, d.heads * d.head_dim)),
    TensorMapping((L + "post_attention_layernorm.weight",),
                  {"te": M + "mlp.linear_fc1.layer_norm_weight", "local": M + "pre_mlp_layernorm.weight"},
                  REPLICATED, LAYER, lambda d: (d.hidden,)),
    TensorMapping((L + "mlp.gate_up_proj.weight",), M + "mlp.linear_fc1.weight", GATED_FC1, LAYER,
                  lambda d: (2 * d.ffn, d.hidden)),
    TensorMapping((L + "mlp.down_proj.weight",), M + "mlp.linear_fc2.weight", ROW, LAYER,
                  lambda d: (d.hidden, d.ffn)),
    TensorMapping(("model.norm.weight",), "decoder.final_layernorm.weight", REPLICATED, LAST_STAGE,
                  lambda d: (d.hidden,)),
    TensorMapping(("lm_head.weight",), "output_layer.weight", VOCAB, LAST_STAGE,
                  lambda d: (d.vocab, d.hidden), optional=True),
)


def partial_rotary_factor(config: dict) -> float:
    """transformers 5 keeps it in rope_parameters; older Phi configs at the top level."""
    return positive_number(rope_parameters(config).get("partial_rotary_factor", config.get("partial_rotary_factor", 1.0)),
                           "partial_rotary_factor")


def phi3_megatron_args(config: dict, dims: ModelDims) -> dict:
    if rope_parameters(config)["rope_type"] == "longrope":
        raise LayoutError("config.json: Phi-3's LongRoPE (rope_type longrope, short/long factors) has no Megatron-Core "
                          "equivalent; it converts HF -> HF only")
    args = llama_megatron_args({**config, "attention_bias": False, "mlp_bias": False}, dims)
    fraction = partial_rotary_factor(config)
    if not 0 < fraction <= 1 or int(dims.head_dim * fraction) % 2:
        raise LayoutError(f"config.json: partial_rotary_factor {fraction} of head_dim {dims.head_dim} is not an even "
                          "number of rotated dims")
    return {**args, "rotary_percent": fraction}


def phi3_hf_config(args: dict) -> dict:
    config = llama_hf_config(args, "Phi3ForCausalLM", "phi3")
    fraction = float(args.get("rotary_percent") or 1.0)
    if "rope_parameters" in config:
        config["rope_parameters"] = {**config["rope_parameters"], "partial_rotary_factor": fraction}
    else:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta", 10000.0),
                                     "partial_rotary_factor": fraction}
    return config


PHI3 = register_family(Family(
    name="phi3",
    architectures=("Phi3ForCausalLM",),
    mappings=PHI3_MAPPINGS,
    dims_from_hf=llama_dims,
    megatron_args_from_hf=phi3_megatron_args,
    hf_config_from_megatron=phi3_hf_config,
    # With every dim rotated its args are Llama's (the same model); partial rotary tells it apart.
    megatron_features=frozenset({"swiglu", "rmsnorm", "pos_rope", "partial_rotary"}),
    nemo_classes=("nemo.collections.llm.gpt.model.phi3mini", "Phi3Model", "Phi3Config"),
))
