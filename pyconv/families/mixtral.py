"""Mixtral: the Llama attention with a mixture-of-experts MLP in every layer
(block_sparse_moe.gate is the router; experts' w1 = gate, w3 = up, w2 = down)."""

from __future__ import annotations

from pyconv.families import (
    GATED_FC1, LAYER, REPLICATED, ROW, Family, ModelDims, TensorMapping, hf_int, register_family,
)
from pyconv.families.common import arg
from pyconv.families.llama import ATTENTION, EMBEDDING, HEAD, MOE_NORM, llama_dims, llama_hf_config, llama_megatron_args

L = "model.layers.*."
M = "decoder.layers.*."
EXPERT = M + "mlp.experts.local_experts.#."


def expert_mappings(hf_expert: str, gate: str, up: str, down: str) -> tuple[TensorMapping, ...]:
    """Routed experts: sequential names by default; TransformerEngine's grouped GEMM names read too."""
    return (
        TensorMapping((hf_expert + gate, hf_expert + up),
                      {"te": EXPERT + "linear_fc1.weight", "local": EXPERT + "linear_fc1.weight",
                       "grouped": M + "mlp.experts.linear_fc1.weight#"},
                      GATED_FC1, LAYER, lambda d: (d.moe_ffn, d.hidden), layers="moe"),
        TensorMapping((hf_expert + down,),
                      {"te": EXPERT + "linear_fc2.weight", "local": EXPERT + "linear_fc2.weight",
                       "grouped": M + "mlp.experts.linear_fc2.weight#"},
                      ROW, LAYER, lambda d: (d.hidden, d.moe_ffn), layers="moe"),
    )


MIXTRAL_MAPPINGS = EMBEDDING + ATTENTION + MOE_NORM + (
    TensorMapping((L + "block_sparse_moe.gate.weight",), M + "mlp.router.weight", REPLICATED, LAYER,
                  lambda d: (d.num_experts, d.hidden), layers="moe"),
) + expert_mappings(L + "block_sparse_moe.experts.#.", "w1.weight", "w3.weight", "w2.weight") + HEAD


def mixtral_dims(config: dict) -> ModelDims:
    base = llama_dims(config)
    return ModelDims(**{**vars(base), "num_experts": hf_int(config, "num_local_experts"), "moe_ffn": base.ffn})


def mixtral_megatron_args(config: dict, dims: ModelDims) -> dict:
    return {**llama_megatron_args(config, dims), "num_experts": dims.num_experts, "moe_ffn_hidden_size": dims.moe_ffn,
            "moe_router_topk": hf_int(config, "num_experts_per_tok", default=2),
            "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": float(config.get("router_aux_loss_coef", 0.0))}


def mixtral_hf_config(args: dict) -> dict:
    where = "megatron args"
    config = llama_hf_config(args, "MixtralForCausalLM", "mixtral")
    config.update(num_local_experts=arg(args, "num_experts", where),
                  num_experts_per_tok=args.get("moe_router_topk", 2),
                  intermediate_size=args.get("moe_ffn_hidden_size") or arg(args, "ffn_hidden_size", where))
    return config


MIXTRAL = register_family(Family(
    name="mixtral",
    architectures=("MixtralForCausalLM",),
    mappings=MIXTRAL_MAPPINGS,
    dims_from_hf=mixtral_dims,
    megatron_args_from_hf=mixtral_megatron_args,
    hf_config_from_megatron=mixtral_hf_config,
    megatron_features=frozenset({"moe", "swiglu", "rmsnorm"}),
    megatron_optional=frozenset({"pos_rope", "linear_bias", "softmax_router", "sigmoid_router"}),
    nemo_classes=("nemo.collections.llm.gpt.model.mixtral", "MixtralModel", "MixtralConfig"),
))
