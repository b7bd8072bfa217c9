"""GLM-4.5 / GLM-4.6 (Glm4MoeForCausalLM): grouped-query attention with q/k/v biases and optional
per-head q/k norms (`use_qk_norm`), partial rotary embeddings (`partial_rotary_factor`, the first
dims of each head rotated by halves, as Megatron-Core's rotary_percent), the first
`first_k_dense_replace` layers dense, the others DeepSeek-V3's mixture of experts (sigmoid router
with the score-correction bias, group-limited top-k, normalised weights times
routed_scaling_factor, shared experts) and its multi-token-prediction layer (HF layer
num_hidden_layers: enorm, hnorm, eh_proj, shared_head.norm), which Megatron-Core holds as
`mtp.layers.i` as for DeepSeek-V3. transformers 5.24's modeling_glm4_moe.py; Megatron-Bridge's
GLM-4.5 bridge (@067f987d, models/glm/glm45_bridge.py) maps the same names: QKV and its bias,
q_layernorm / k_layernorm, router and expert_bias, experts and shared_experts as Megatron-Core's
GPT layer names.

transformers keeps the router's weight and its correction bias in float32
(_keep_in_fp32_modules_strict): a --dtype cast leaves both as they are."""

from __future__ import annotations

from dataclasses import replace

from pyconv.errors import LayoutError
from pyconv.families import LAYER, REPLICATED, Family, ModelDims, TensorMapping, hf_int, register_family
from pyconv.families.common import arg, positive_number, rope_parameters
from pyconv.families.deepseek_v3 import DEEPSEEK_MTP, MOE, _optional_int, _router_groups, first_dense_from_freq
from pyconv.families.llama import ATTENTION, DENSE_MLP, EMBEDDING, HEAD, llama_dims, llama_hf_config, llama_megatron_args

L = "model.layers.*."
M = "decoder.layers.*."

QK_NORM = (
    TensorMapping((L + "self_attn.q_norm.weight",), M + "self_attention.q_layernorm.weight", REPLICATED, LAYER,
                  lambda d: (d.head_dim,), optional=True),
    TensorMapping((L + "self_attn.k_norm.weight",), M + "self_attention.k_layernorm.weight", REPLICATED, LAYER,
                  lambda d: (d.head_dim,), optional=True),
)
# The router's weight stays float32 through a cast, as transformers keeps it.
ROUTER_FP32 = tuple(replace(m, keep_dtype=True) if m.hf == (L + "mlp.gate.weight",) else m for m in MOE)
GLM4_MOE_MAPPINGS = EMBEDDING + ATTENTION + QK_NORM + DENSE_MLP + ROUTER_FP32 + HEAD


def glm4_moe_dims(config: dict) -> ModelDims:
    layers = hf_int(config, "num_hidden_layers")
    first_dense = _optional_int(config, "first_k_dense_replace")
    if not 0 <= first_dense <= layers:
        raise LayoutError(f"config.json: first_k_dense_replace {first_dense} outside 0..{layers}")
    moe_ffn = hf_int(config, "moe_intermediate_size")
    return replace(llama_dims(config), num_experts=hf_int(config, "n_routed_experts"), moe_ffn=moe_ffn,
                   shared_ffn=moe_ffn * _optional_int(config, "n_shared_experts"), first_dense_layers=first_dense,
                   mtp_layers=_optional_int(config, "num_nextn_predict_layers"))


def partial_rotary(config: dict, dims: ModelDims) -> float:
    fraction = positive_number(rope_parameters(config).get("partial_rotary_factor",
                                                           config.get("partial_rotary_factor", 1.0)), "partial_rotary_factor")
    if not 0 < fraction <= 1 or int(dims.head_dim * fraction) % 2:
        raise LayoutError(f"config.json: partial_rotary_factor {fraction} of head_dim {dims.head_dim} is not an even "
                          "number of rotated dims")
    return fraction


def glm4_moe_megatron_args(config: dict, dims: ModelDims) -> dict:
    topk = hf_int(config, "num_experts_per_tok")
    if not config.get("norm_topk_prob", True) and topk > 1:
        raise LayoutError("config.json: norm_topk_prob is false: Megatron-Core's sigmoid router always "
                          "normalises the top-k weights")
    groups, group_topk = _router_groups(config, topk)
    base = llama_megatron_args({**config, "mlp_bias": False, "attention_out_bias": False}, dims)
    return {
        **base, "rotary_percent": partial_rotary(config, dims), "qk_layernorm": bool(config.get("use_qk_norm")),
        "num_experts": dims.num_experts, "moe_ffn_hidden_size": dims.moe_ffn,
        "moe_layer_freq": [0] * dims.first_dense_layers + [1] * (dims.num_layers - dims.first_dense_layers),
        "moe_shared_expert_intermediate_size": dims.shared_ffn or None,
        "moe_router_topk": topk, "moe_router_num_groups": groups, "moe_router_group_topk": group_topk,
        "moe_router_score_function": "sigmoid", "moe_router_enable_expert_bias": True,
        "moe_router_topk_scaling_factor": positive_number(config.get("routed_scaling_factor", 1.0),
                                                          "routed_scaling_factor"),
        "moe_router_pre_softmax": False, "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 0.0,
        "mtp_num_layers": dims.mtp_layers or None, **({"mtp_loss_scaling_factor": 0.1} if dims.mtp_layers else {}),
    }


def glm4_moe_hf_config(args: dict) -> dict:
    where = "megatron args"
    config = llama_hf_config(args, "Glm4MoeForCausalLM", "glm4_moe")
    layers, moe_ffn = config["num_hidden_layers"], arg(args, "moe_ffn_hidden_size", where)
    shared = args.get("moe_shared_expert_intermediate_size") or 0
    fraction = float(args.get("rotary_percent") or 1.0)
    params = config.pop("rope_parameters", None) or {"rope_type": "default"}
    config["rope_parameters"] = {**params, "rope_theta": float(args.get("rotary_base", 10000)),
                                 "partial_rotary_factor": fraction}
    config.pop("rope_theta", None)
    config.update(
        attention_bias=bool(args.get("add_qkv_bias")), use_qk_norm=bool(args.get("qk_layernorm")),
        head_dim=args.get("kv_channels") or config.get("head_dim"), moe_intermediate_size=moe_ffn,
        n_routed_experts=arg(args, "num_experts", where), n_shared_experts=shared // moe_ffn,
        num_experts_per_tok=arg(args, "moe_router_topk", where),
        n_group=args.get("moe_router_num_groups") or config.get("n_group", 1),
        topk_group=args.get("moe_router_group_topk") or config.get("topk_group", 1),
        routed_scaling_factor=float(args.get("moe_router_topk_scaling_factor") or 1.0), norm_topk_prob=True,
        first_k_dense_replace=first_dense_from_freq(args.get("moe_layer_freq"), layers, where))
    if args.get("mtp_num_layers"):
        config["num_nextn_predict_layers"] = args["mtp_num_layers"]
    else:  # a source config's value stays (transformers' default is 1, with or without the weights)
        config.setdefault("num_nextn_predict_layers", 0)
    return config


GLM4_MOE = register_family(Family(
    name="glm4_moe",
    architectures=("Glm4MoeForCausalLM",),
    mappings=GLM4_MOE_MAPPINGS,
    dims_from_hf=glm4_moe_dims,
    megatron_args_from_hf=glm4_moe_megatron_args,
    hf_config_from_megatron=glm4_moe_hf_config,
    megatron_features=frozenset({"moe", "swiglu", "rmsnorm", "pos_rope", "sigmoid_router", "expert_bias"}),
    megatron_optional=frozenset({"qk_layernorm", "qkv_bias", "partial_rotary", "shared_expert"}),
    **DEEPSEEK_MTP,
))
