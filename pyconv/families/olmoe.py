"""OLMoE (OlmoeForCausalLM): Llama's pre-norm attention without biases, q/k RMSNorms over the whole
projection (as OLMo 2's: `q_norm` [hidden], `k_norm` [kv_heads * head_dim]) and a mixture of
experts in every layer, routed by a softmax over all experts, top k, renormalised only with
`norm_topk_prob` (Megatron-Core's moe_router_pre_softmax when not), no shared expert.
transformers 5.24's modeling_olmoe.py; names as Megatron-Bridge's OLMoE bridge (@067f987d,
models/olmoe/olmoe_bridge.py: q_layernorm / k_layernorm as wide as the projection, router,
sequential experts). Its OLMoESelfAttention normalises a rank's slice of the projection, so the
model is written at tp 1 (any ep and pp). `clip_qkv` has no Megatron-Core equivalent: refused."""

from __future__ import annotations

from dataclasses import replace

from pyconv.errors import LayoutError
from pyconv.families import LAYER, REPLICATED, Family, ModelDims, TensorMapping, hf_int, register_family
from pyconv.families.common import arg
from pyconv.families.llama import ATTENTION, EMBEDDING, HEAD, MOE_NORM, llama_dims, llama_hf_config, llama_megatron_args
from pyconv.families.mixtral import expert_mappings
from pyconv.families.olmo2 import WHOLE_PROJECTION_QK_NORM, WHOLE_PROJECTION_SINGLE_TP

L = "model.layers.*."
M = "decoder.layers.*."

OLMOE_MAPPINGS = EMBEDDING + ATTENTION + WHOLE_PROJECTION_QK_NORM + MOE_NORM + (
    TensorMapping((L + "mlp.gate.weight",), M + "mlp.router.weight", REPLICATED, LAYER,
                  lambda d: (d.num_experts, d.hidden), layers="moe"),
) + expert_mappings(L + "mlp.experts.#.", "gate_proj.weight", "up_proj.weight", "down_proj.weight") + HEAD


def olmoe_dims(config: dict) -> ModelDims:
    if config.get("clip_qkv") is not None:
        raise LayoutError(f"config.json: clip_qkv {config['clip_qkv']}: Megatron-Core does not clamp q/k/v")
    if config.get("attention_bias"):
        raise LayoutError("config.json: OLMoE with attention_bias: o_proj's bias has no Megatron-Core place "
                          "without MLP biases")
    ffn = hf_int(config, "intermediate_size")
    return replace(llama_dims(config), num_experts=hf_int(config, "num_experts"), moe_ffn=ffn)


def olmoe_megatron_args(config: dict, dims: ModelDims) -> dict:
    return {**llama_megatron_args({**config, "attention_bias": False, "mlp_bias": False}, dims),
            "qk_layernorm": True, "qk_layernorm_whole_projection": True,
            "num_experts": dims.num_experts, "moe_ffn_hidden_size": dims.moe_ffn,
            "moe_router_topk": hf_int(config, "num_experts_per_tok"),
            "moe_router_pre_softmax": not config.get("norm_topk_prob", False),
            "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": float(config.get("router_aux_loss_coef", 0.0))}


def olmoe_hf_config(args: dict) -> dict:
    where = "megatron args"
    config = llama_hf_config(args, "OlmoeForCausalLM", "olmoe")
    config.update(attention_bias=False, num_experts=arg(args, "num_experts", where),
                  num_experts_per_tok=arg(args, "moe_router_topk", where),
                  intermediate_size=arg(args, "moe_ffn_hidden_size", where),
                  norm_topk_prob=not args.get("moe_router_pre_softmax", True))
    config.setdefault("clip_qkv", None)
    return config


OLMOE = register_family(Family(
    name="olmoe",
    architectures=("OlmoeForCausalLM",),
    mappings=OLMOE_MAPPINGS,
    dims_from_hf=olmoe_dims,
    megatron_args_from_hf=olmoe_megatron_args,
    hf_config_from_megatron=olmoe_hf_config,
    megatron_features=frozenset({"moe", "swiglu", "rmsnorm", "pos_rope", "qk_layernorm", "qk_whole_projection"}),
    megatron_optional=frozenset({"softmax_router"}),
    single_tp="OLMoE's " + WHOLE_PROJECTION_SINGLE_TP,
))
