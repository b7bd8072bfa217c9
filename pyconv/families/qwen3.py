"""Qwen3 and Qwen3-MoE: the Llama layout without biases plus per-head RMSNorms on the queries and
keys (HF `self_attn.q_norm` / `k_norm` [head_dim] -> Megatron-Core's `self_attention.q_layernorm`
/ `k_layernorm` with `qk_layernorm`, the same names under both specs); Qwen3-MoE routes every
layer's MLP to experts with no shared expert."""

from __future__ import annotations

from pyconv.errors import LayoutError
from pyconv.families import LAYER, REPLICATED, Family, ModelDims, TensorMapping, hf_int, register_family
from pyconv.families.common import arg
from pyconv.families.llama import (
    ATTENTION, DENSE_MLP, EMBEDDING, HEAD, MOE_NORM, llama_dims, llama_hf_config, llama_megatron_args,
)
from pyconv.families.mixtral import expert_mappings

L = "model.layers.*."
M = "decoder.layers.*."

QK_NORM = (
    TensorMapping((L + "self_attn.q_norm.weight",), M + "self_attention.q_layernorm.weight", REPLICATED, LAYER,
                  lambda d: (d.head_dim,)),
    TensorMapping((L + "self_attn.k_norm.weight",), M + "self_attention.k_layernorm.weight", REPLICATED, LAYER,
                  lambda d: (d.head_dim,)),
)
QWEN3_MAPPINGS = EMBEDDING + ATTENTION + QK_NORM + DENSE_MLP + HEAD
QWEN3_MOE_MAPPINGS = EMBEDDING + ATTENTION + QK_NORM + MOE_NORM + (
    TensorMapping((L + "mlp.gate.weight",), M + "mlp.router.weight", REPLICATED, LAYER,
                  lambda d: (d.num_experts, d.hidden), layers="moe"),
) + expert_mappings(L + "mlp.experts.#.", "gate_proj.weight", "up_proj.weight", "down_proj.weight") + HEAD


def _refuse_unsupported(config: dict) -> None:
    if config.get("attention_bias"):
        raise LayoutError("config.json: a Qwen3 with attention_bias has no Megatron-Core equivalent here "
                          "(qk_layernorm models are converted without linear biases)")
    if config.get("use_sliding_window"):
        raise LayoutError("config.json: use_sliding_window: Megatron-Core's attention here is full causal")


def qwen3_dims(config: dict) -> ModelDims:
    _refuse_unsupported(config)
    return llama_dims(config)


def qwen3_megatron_args(config: dict, dims: ModelDims) -> dict:
    return {**llama_megatron_args({**config, "attention_bias": False, "mlp_bias": False}, dims), "qk_layernorm": True}


def qwen3_moe_dims(config: dict) -> ModelDims:
    _refuse_unsupported(config)
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        raise LayoutError("config.json: Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step != 1) "
                          "is not supported yet")
    return ModelDims(**{**vars(llama_dims(config)), "num_experts": hf_int(config, _experts_key(config)),
                        "moe_ffn": hf_int(config, "moe_intermediate_size")})


def _experts_key(config: dict) -> str:
    """Qwen's configs say num_experts; transformers 5 saves num_local_experts."""
    return "num_local_experts" if "num_local_experts" in config and "num_experts" not in config else "num_experts"


def qwen3_moe_megatron_args(config: dict, dims: ModelDims) -> dict:
    return {**qwen3_megatron_args(config, dims), "num_experts": dims.num_experts, "moe_ffn_hidden_size": dims.moe_ffn,
            "moe_router_topk": hf_int(config, "num_experts_per_tok"),
            # norm_topk_prob: softmax over the top-k logits (Megatron's pre_softmax False); without
            # it, softmax over every expert, then the top k unnormalised.
            "moe_router_pre_softmax": not config.get("norm_topk_prob", False),  # transformers' default
            "moe_router_load_balancing_type": "aux_loss",
            "moe_aux_loss_coeff": float(config.get("router_aux_loss_coef", 0.0))}


def qwen3_hf_config(args: dict) -> dict:
    config = llama_hf_config(args, "Qwen3ForCausalLM", "qwen3")
    config.update(attention_bias=False, head_dim=args.get("kv_channels") or config["head_dim"])
    return config


def qwen3_moe_hf_config(args: dict) -> dict:
    where = "megatron args"
    config = llama_hf_config(args, "Qwen3MoeForCausalLM", "qwen3_moe")
    config.update(attention_bias=False, head_dim=args.get("kv_channels") or config.get("head_dim"),
                  num_experts_per_tok=args.get("moe_router_topk", 8),
                  moe_intermediate_size=arg(args, "moe_ffn_hidden_size", where),
                  norm_topk_prob=not args.get("moe_router_pre_softmax", False), decoder_sparse_step=1,
                  mlp_only_layers=[])
    config[_experts_key(config)] = arg(args, "num_experts", where)
    return config


QWEN3 = register_family(Family(
    name="qwen3",
    architectures=("Qwen3ForCausalLM",),
    mappings=QWEN3_MAPPINGS,
    dims_from_hf=qwen3_dims,
    megatron_args_from_hf=qwen3_megatron_args,
    hf_config_from_megatron=qwen3_hf_config,
    megatron_features=frozenset({"swiglu", "rmsnorm", "pos_rope", "qk_layernorm"}),
    megatron_optional=frozenset({"linear_bias"}),
    nemo_classes=("nemo.collections.llm.gpt.model.qwen3", "Qwen3Model", "Qwen3Config"),
))
QWEN3_MOE = register_family(Family(
    name="qwen3_moe",
    architectures=("Qwen3MoeForCausalLM",),
    mappings=QWEN3_MOE_MAPPINGS,
    dims_from_hf=qwen3_moe_dims,
    megatron_args_from_hf=qwen3_moe_megatron_args,
    hf_config_from_megatron=qwen3_moe_hf_config,
    megatron_features=frozenset({"moe", "swiglu", "rmsnorm", "pos_rope", "qk_layernorm"}),
    megatron_optional=frozenset({"linear_bias", "softmax_router", "sigmoid_router"}),
    nemo_classes=("nemo.collections.llm.gpt.model.qwen3", "Qwen3Model", "Qwen3MoEConfig"),
))
