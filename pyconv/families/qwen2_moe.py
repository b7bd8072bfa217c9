"""Qwen2-MoE: Qwen2 attention (q/k/v biases), routed experts, and a shared expert scaled by
its own sigmoid gate (Megatron-Core's shared_experts with moe_shared_expert_gate)."""

from __future__ import annotations

from pyconv.families import (
    GATED_FC1, LAYER, REPLICATED, ROW, Family, ModelDims, TensorMapping, hf_int, register_family,
)
from pyconv.families.common import arg
from pyconv.families.llama import ATTENTION, EMBEDDING, HEAD, MOE_NORM, llama_dims, llama_hf_config, llama_megatron_args
from pyconv.families.mixtral import expert_mappings

L = "model.layers.*."
M = "decoder.layers.*."

QWEN2_MOE_MAPPINGS = EMBEDDING + ATTENTION + MOE_NORM + (
    TensorMapping((L + "mlp.gate.weight",), M + "mlp.router.weight", REPLICATED, LAYER,
                  lambda d: (d.num_experts, d.hidden), layers="moe"),
) + expert_mappings(L + "mlp.experts.#.", "gate_proj.weight", "up_proj.weight", "down_proj.weight") + (
    TensorMapping((L + "mlp.shared_expert.gate_proj.weight", L + "mlp.shared_expert.up_proj.weight"),
                  M + "mlp.shared_experts.linear_fc1.weight", GATED_FC1, LAYER, lambda d: (d.shared_ffn, d.hidden),
                  layers="moe"),
    TensorMapping((L + "mlp.shared_expert.down_proj.weight",), M + "mlp.shared_experts.linear_fc2.weight", ROW, LAYER,
                  lambda d: (d.hidden, d.shared_ffn), layers="moe"),
    TensorMapping((L + "mlp.shared_expert_gate.weight",), M + "mlp.shared_experts.gate_weight", REPLICATED, LAYER,
                  lambda d: (1, d.hidden), layers="moe"),
) + HEAD


def qwen2_moe_dims(config: dict) -> ModelDims:
    base = llama_dims(config)
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        from pyconv.errors import LayoutError

        raise LayoutError("Qwen2-MoE with dense layers (mlp_only_layers / decoder_sparse_step != 1) is not supported yet")
    return ModelDims(**{**vars(base), "num_experts": hf_int(config, "num_experts"),
                        "moe_ffn": hf_int(config, "moe_intermediate_size"),
                        "shared_ffn": hf_int(config, "shared_expert_intermediate_size")})


def qwen2_moe_megatron_args(config: dict, dims: ModelDims) -> dict:
    args = llama_megatron_args({**config, "attention_bias": False, "mlp_bias": False}, dims)
    return {**args, "add_qkv_bias": bool(config.get("qkv_bias", True)), "num_experts": dims.num_experts,
            "moe_ffn_hidden_size": dims.moe_ffn, "moe_router_topk": hf_int(config, "num_experts_per_tok"),
            "moe_shared_expert_intermediate_size": dims.shared_ffn, "moe_shared_expert_gate": True,
            # HF renormalises the top-k weights only with norm_topk_prob; Megatron's equivalent is
            # top-k on the logits then softmax (pre_softmax False), else softmax over all then top-k.
            "moe_router_pre_softmax": not config.get("norm_topk_prob", False),
            "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": float(config.get("router_aux_loss_coef", 0.0))}


def qwen2_moe_hf_config(args: dict) -> dict:
    where = "megatron args"
    config = llama_hf_config(args, "Qwen2MoeForCausalLM", "qwen2_moe")
    config.update(num_experts=arg(args, "num_experts", where), num_experts_per_tok=args.get("moe_router_topk", 4),
                  moe_intermediate_size=arg(args, "moe_ffn_hidden_size", where),
                  shared_expert_intermediate_size=arg(args, "moe_shared_expert_intermediate_size", where),
                  qkv_bias=bool(args.get("add_qkv_bias", True)),
                  norm_topk_prob=not args.get("moe_router_pre_softmax", True))
    return config


QWEN2_MOE = register_family(Family(
    name="qwen2_moe",
    architectures=("Qwen2MoeForCausalLM",),
    mappings=QWEN2_MOE_MAPPINGS,
    dims_from_hf=qwen2_moe_dims,
    megatron_args_from_hf=qwen2_moe_megatron_args,
    hf_config_from_megatron=qwen2_moe_hf_config,
    megatron_features=frozenset({"moe", "shared_expert", "shared_expert_gate"}),
    megatron_optional=frozenset({"swiglu", "rmsnorm", "pos_rope", "qkv_bias", "linear_bias", "qk_layernorm", "softmax_router", "sigmoid_router"}),
    nemo_classes=("nemo.collections.llm.gpt.model.base", "GPTModel", "GPTConfig"),
))
