"""DeepSeek-V3: multi-latent attention (MLA), the first `first_k_dense_replace` layers with a
dense SwiGLU MLP, the others a mixture of experts routed by sigmoid scores with a score
correction bias, plus shared experts. Megatron-Core names as in 0.16
(`megatron/core/transformer/multi_latent_attention.py`, `models/gpt/gpt_layer_specs.py`):

    HF self_attn.                 Megatron-Core self_attention.                   TP rule
    q_a_proj        [q_lora, H]   linear_q_down_proj          TE: whole on every rank (TELinear
                                                              'duplicated'); local spec: column
    q_a_layernorm   [q_lora]      TE: linear_q_up_proj.layer_norm_weight, local: q_layernorm
    q_b_proj        [n*(dn+dr), q_lora]  linear_q_up_proj                         column (heads)
    q_proj (q_lora_rank None)     linear_q_proj                                   column (heads)
    kv_a_proj_with_mqa [kv_lora+dr, H]  linear_kv_down_proj   as q_a_proj
    kv_a_layernorm  [kv_lora]     TE: linear_kv_up_proj.layer_norm_weight, local: kv_layernorm
    kv_b_proj       [n*(dn+dv), kv_lora] linear_kv_up_proj                        column (heads)
    o_proj          [H, n*dv]     linear_proj                                     row

Row orders agree, so every tensor moves as is: per head, q rows are [nope | rope] in both (HF
splits q into [qk_nope_head_dim, qk_rope_head_dim], Megatron into [qk_head_dim,
qk_pos_emb_head_dim]); kv_b_proj's per-head rows are [k_nope | v] in both; kv_a_proj_with_mqa is
[kv_lora_rank | rope] in both. The rope dimensions: HF with `rope_interleave` (its default, and
DeepSeek's layout) takes the even then the odd rope channels and rotates halves; Megatron-Core's
MLA (`multi_latent_attention=True` in rope_utils._apply_rotary_pos_emb_bshd) does the same
de-interleave before its half rotation. HF without rope_interleave rotates the raw halves, which
Megatron-Core has no setting for: refused rather than silently scrambled.

Router: HF `mlp.gate.weight` / `e_score_correction_bias` -> `mlp.router.weight` / `expert_bias`
(sigmoid scores, group-limited top-k, normalised top-k weights times routed_scaling_factor).

Multi-token prediction (`num_nextn_predict_layers` in HF, `mtp_num_layers` in Megatron): HF layer
num_hidden_layers + i is Megatron-Core's `mtp.layers.i` (multi_token_prediction.py):

    HF model.layers.{L+i}.        Megatron-Core mtp.layers.i.
    enorm, hnorm                  enorm, hnorm (the embedding's and the hidden state's norms)
    eh_proj       [H, 2H]         eh_proj (column parallel; input [enorm(e); hnorm(h)] in both)
    <decoder layer tensors>       transformer_layer.<the same names as decoder.layers.N.>
    shared_head.norm              final_layernorm
    embed_tokens, shared_head.head  none: Megatron shares the model's embedding and output layer

Without num_nextn_predict_layers in the config such layers are dropped (with a note).
"""

from __future__ import annotations

from dataclasses import replace

from pyconv.errors import FormatError, LayoutError
from pyconv.families import (
    COLUMN, GATED_FC1, LATENT_DOWN, LAYER, MTP, REPLICATED, ROW, Family, ModelDims, TensorMapping, hf_int,
    register_family,
)
from pyconv.families.common import arg, original_hf_config, positive_number, rope_theta
from pyconv.families.llama import DENSE_MLP, EMBEDDING, HEAD, MOE_NORM, llama_megatron_args
from pyconv.families.mixtral import expert_mappings

L = "model.layers.*."
M = "decoder.layers.*."
A = L + "self_attn."
S = M + "self_attention."


def _q_rows(d: ModelDims) -> int:
    return d.heads * (d.qk_nope_dim + d.qk_rope_dim)


def _has_q_lora(d: ModelDims) -> bool:
    return d.q_lora_rank > 0


def _no_q_lora(d: ModelDims) -> bool:
    return d.q_lora_rank == 0


def _has_shared(d: ModelDims) -> bool:
    return d.shared_ffn > 0


MLA = (
    TensorMapping((L + "input_layernorm.weight",), M + "input_layernorm.weight", REPLICATED, LAYER,
                  lambda d: (d.hidden,)),
    TensorMapping((A + "q_a_proj.weight",), S + "linear_q_down_proj.weight", LATENT_DOWN, LAYER,
                  lambda d: (d.q_lora_rank, d.hidden), needs=_has_q_lora),
    TensorMapping((A + "q_a_layernorm.weight",),
                  {"te": S + "linear_q_up_proj.layer_norm_weight", "local": S + "q_layernorm.weight"},
                  REPLICATED, LAYER, lambda d: (d.q_lora_rank,), needs=_has_q_lora),
    TensorMapping((A + "q_b_proj.weight",), S + "linear_q_up_proj.weight", COLUMN, LAYER,
                  lambda d: (_q_rows(d), d.q_lora_rank), needs=_has_q_lora),
    TensorMapping((A + "q_proj.weight",), S + "linear_q_proj.weight", COLUMN, LAYER,
                  lambda d: (_q_rows(d), d.hidden), needs=_no_q_lora),
    TensorMapping((A + "kv_a_proj_with_mqa.weight",), S + "linear_kv_down_proj.weight", LATENT_DOWN, LAYER,
                  lambda d: (d.kv_lora_rank + d.qk_rope_dim, d.hidden)),
    TensorMapping((A + "kv_a_layernorm.weight",),
                  {"te": S + "linear_kv_up_proj.layer_norm_weight", "local": S + "kv_layernorm.weight"},
                  REPLICATED, LAYER, lambda d: (d.kv_lora_rank,)),
    TensorMapping((A + "kv_b_proj.weight",), S + "linear_kv_up_proj.weight", COLUMN, LAYER,
                  lambda d: (d.heads * (d.qk_nope_dim + d.v_head_dim), d.kv_lora_rank)),
    TensorMapping((A + "o_proj.weight",), S + "linear_proj.weight", ROW, LAYER,
                  lambda d: (d.hidden, d.heads * d.v_head_dim)),
)
MOE = MOE_NORM + (
    TensorMapping((L + "mlp.gate.weight",), M + "mlp.router.weight", REPLICATED, LAYER,
                  lambda d: (d.num_experts, d.hidden), layers="moe"),
    TensorMapping((L + "mlp.gate.e_score_correction_bias",), M + "mlp.router.expert_bias", REPLICATED, LAYER,
                  lambda d: (d.num_experts,), layers="moe", keep_dtype=True),
) + expert_mappings(L + "mlp.experts.#.", "gate_proj.weight", "up_proj.weight", "down_proj.weight") + (
    TensorMapping((L + "mlp.shared_experts.gate_proj.weight", L + "mlp.shared_experts.up_proj.weight"),
                  M + "mlp.shared_experts.linear_fc1.weight", GATED_FC1, LAYER, lambda d: (d.shared_ffn, d.hidden),
                  layers="moe", needs=_has_shared),
    TensorMapping((L + "mlp.shared_experts.down_proj.weight",), M + "mlp.shared_experts.linear_fc2.weight", ROW,
                  LAYER, lambda d: (d.hidden, d.shared_ffn), layers="moe", needs=_has_shared),
)
# Dense layers: DENSE_MLP's biases never occur (DeepSeek's MLPs have none).
DEEPSEEK_V3_MAPPINGS = EMBEDDING + MLA + DENSE_MLP + MOE + HEAD
MTP_BEFORE = (
    TensorMapping((L + "enorm.weight",), "mtp.layers.*.enorm.weight", REPLICATED, MTP, lambda d: (d.hidden,)),
    TensorMapping((L + "hnorm.weight",), "mtp.layers.*.hnorm.weight", REPLICATED, MTP, lambda d: (d.hidden,)),
    TensorMapping((L + "eh_proj.weight",), "mtp.layers.*.eh_proj.weight", COLUMN, MTP,
                  lambda d: (d.hidden, 2 * d.hidden)),
)
MTP_AFTER = (
    TensorMapping((L + "shared_head.norm.weight",), "mtp.layers.*.final_layernorm.weight", REPLICATED, MTP,
                  lambda d: (d.hidden,)),
)
# A family's multi-token-prediction layers as DeepSeek-V3 stores them (V3, V3.2, GLM-4.5): HF layers
# past the model, their own tensors before and after a decoder layer, copies of the embedding and head.
DEEPSEEK_MTP = dict(
    drops_extra_layers=True, mtp_before=MTP_BEFORE, mtp_after=MTP_AFTER,
    mtp_hf_copies={"embed_tokens.weight": "model.embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"})


def _optional_int(config: dict, key: str, default: int = 0) -> int:
    value = config.get(key)
    if value is None:
        return default
    return hf_int(config, key)


def deepseek_v3_dims(config: dict) -> ModelDims:
    hidden, heads = hf_int(config, "hidden_size"), hf_int(config, "num_attention_heads")
    layers = hf_int(config, "num_hidden_layers")
    if config.get("attention_bias"):
        raise LayoutError("config.json: attention_bias: Megatron-Core's MLA linears have no biases")
    if not config.get("rope_interleave", True):
        raise LayoutError("config.json: rope_interleave is false: HF then rotates the raw rope halves, while "
                          "Megatron-Core's multi-latent attention always de-interleaves the rope channels first; "
                          "no Megatron setting reproduces it")
    if config.get("moe_layer_freq", 1) != 1:
        raise LayoutError(f"config.json: moe_layer_freq {config['moe_layer_freq']} (only 1 is supported)")
    experts = hf_int(config, "n_routed_experts")
    moe_ffn = hf_int(config, "moe_intermediate_size")
    shared = _optional_int(config, "n_shared_experts")
    first_dense = _optional_int(config, "first_k_dense_replace")
    if not 0 <= first_dense <= layers:
        raise LayoutError(f"config.json: first_k_dense_replace {first_dense} outside 0..{layers}")
    return ModelDims(
        mtp_layers=_optional_int(config, "num_nextn_predict_layers"),
        num_layers=layers, hidden=hidden, heads=heads, groups=heads, head_dim=hf_int(config, "v_head_dim"),
        ffn=hf_int(config, "intermediate_size"), vocab=hf_int(config, "vocab_size"),
        max_positions=_optional_int(config, "max_position_embeddings", 2048),
        tied=bool(config.get("tie_word_embeddings", False)),
        num_experts=experts, moe_ffn=moe_ffn, shared_ffn=moe_ffn * shared, first_dense_layers=first_dense,
        q_lora_rank=_optional_int(config, "q_lora_rank"), kv_lora_rank=hf_int(config, "kv_lora_rank"),
        qk_nope_dim=hf_int(config, "qk_nope_head_dim"), qk_rope_dim=hf_int(config, "qk_rope_head_dim"),
        v_head_dim=hf_int(config, "v_head_dim"))


def _rope_args(config: dict) -> dict:
    """Megatron-LM's MLA rope arguments: plain rope, or YaRN with its factors."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return dict(rope_type="rope", rotary_scaling_factor=1.0)
    if rope_type != "yarn":
        raise LayoutError(f"config.json: rope type '{rope_type}' has no Megatron-Core MLA equivalent (rope or yarn)")
    context = params.get("original_max_position_embeddings", 4096)
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise FormatError(f"config.json: yarn original_max_position_embeddings must be a positive integer, got "
                          f"{repr(context)[:60]}")
    return dict(rope_type="yarn", rotary_scaling_factor=positive_number(params.get("factor"), "yarn factor"),
                mscale=positive_number(params.get("mscale", 1.0), "yarn mscale", zero=True),
                mscale_all_dim=positive_number(params.get("mscale_all_dim", 0.0), "yarn mscale_all_dim", zero=True),
                beta_fast=positive_number(params.get("beta_fast", 32), "yarn beta_fast"),
                beta_slow=positive_number(params.get("beta_slow", 1), "yarn beta_slow"),
                original_max_position_embeddings=context)


def _router_groups(config: dict, topk: int, hf_group_top: int = 2) -> tuple[int | None, int | None]:
    """moe_router_num_groups / moe_router_group_topk. HF scores a group by the sum of its top
    hf_group_top scores (DeepSeek-V3: 2; V2's group_limited_greedy: its maximum, 1); Megatron-Core
    by its top (topk // group_topk): they agree when those are equal, or when every group is kept."""
    groups, group_topk = _optional_int(config, "n_group", 1), _optional_int(config, "topk_group", 1)
    if groups <= 1 or group_topk >= groups:
        return None, None
    if topk // group_topk != hf_group_top:
        raise LayoutError(f"config.json: n_group {groups}, topk_group {group_topk}, num_experts_per_tok {topk}: "
                          f"HF ranks groups by their top-{hf_group_top} scores, Megatron-Core by their top "
                          f"{topk // group_topk}; no Megatron setting reproduces this routing")
    return groups, group_topk


def deepseek_v3_megatron_args(config: dict, dims: ModelDims) -> dict:
    topk = hf_int(config, "num_experts_per_tok")
    if not config.get("norm_topk_prob", True) and topk > 1:
        raise LayoutError("config.json: norm_topk_prob is false: Megatron-Core's sigmoid router always "
                          "normalises the top-k weights")
    return _mla_moe_args(config, dims, _router_groups(config, topk), "sigmoid", expert_bias=True, pre_softmax=False)


def _mla_moe_args(config: dict, dims: ModelDims, groups_topk: tuple, score_function: str, expert_bias: bool,
                  pre_softmax: bool) -> dict:
    """Megatron-LM's args of a DeepSeek MLA + MoE model, with its router's scoring."""
    topk = hf_int(config, "num_experts_per_tok")
    groups, group_topk = groups_topk
    # The Llama args without Llama's rope scaling: MLA's (yarn) is _rope_args' below.
    plain_rope = {"rope_scaling": None, "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta(config)}}
    base = llama_megatron_args({**config, "attention_bias": False, "mlp_bias": False, **plain_rope}, dims)
    return {
        **base, "kv_channels": dims.v_head_dim,
        "multi_latent_attention": True, "qk_layernorm": True,
        "q_lora_rank": dims.q_lora_rank or None, "kv_lora_rank": dims.kv_lora_rank,
        "qk_head_dim": dims.qk_nope_dim, "qk_pos_emb_head_dim": dims.qk_rope_dim, "v_head_dim": dims.v_head_dim,
        **_rope_args(config),
        "num_experts": dims.num_experts, "moe_ffn_hidden_size": dims.moe_ffn,
        "moe_layer_freq": [0] * dims.first_dense_layers + [1] * (dims.num_layers - dims.first_dense_layers),
        "moe_shared_expert_intermediate_size": dims.shared_ffn or None,
        "moe_router_topk": topk, "moe_router_num_groups": groups, "moe_router_group_topk": group_topk,
        "moe_router_score_function": score_function, "moe_router_enable_expert_bias": expert_bias,
        "moe_router_topk_scaling_factor": positive_number(config.get("routed_scaling_factor", 1.0),
                                                          "routed_scaling_factor"),
        "moe_router_pre_softmax": pre_softmax, "moe_router_dtype": "fp32",
        "moe_router_load_balancing_type": "seq_aux_loss", "moe_aux_loss_coeff": 0.0,
        "mtp_num_layers": dims.mtp_layers or None,
        **({"mtp_loss_scaling_factor": 0.1} if dims.mtp_layers else {}),
    }


def first_dense_from_freq(freq, num_layers: int, where: str) -> int:
    """Megatron's moe_layer_freq (an int: every Nth layer is MoE; or a 0/1 list per layer) as a
    count of leading dense layers, the only pattern DeepSeek-V3 (first_k_dense_replace) has."""
    if freq is None or freq == 1:
        return 0
    if isinstance(freq, (list, tuple)) and len(freq) == num_layers and set(freq) <= {0, 1}:
        first = freq.index(1) if 1 in freq else num_layers
        if all(v == 1 for v in freq[first:]):
            return first
    raise FormatError(f"{where}: moe_layer_freq {freq!r} is not a run of dense layers followed by MoE layers")


def _rope_config(config: dict, args: dict) -> dict:
    """The rope fields of the HF config: the source config's own (transformers 5's rope_parameters,
    or the older rope_theta + rope_scaling that DeepSeek's and Kimi's released configs carry) with
    the theta from the args; from the args alone, rope_parameters with their YaRN factors."""
    theta = float(args.get("rotary_base", 10000))
    if isinstance(config.get("rope_parameters"), dict):
        return {"rope_parameters": {**config["rope_parameters"], "rope_theta": theta}}
    if "rope_theta" in config or "rope_scaling" in config:
        return {"rope_theta": theta}
    if args.get("rope_type") == "yarn":
        return {"rope_parameters": {
            "rope_type": "yarn", "rope_theta": theta, "factor": float(args["rotary_scaling_factor"]),
            **{k: float(args[k]) for k in ("mscale", "mscale_all_dim", "beta_fast", "beta_slow") if k in args},
            "original_max_position_embeddings": int(args.get("original_max_position_embeddings", 4096))}}
    return {"rope_parameters": {"rope_type": "default", "rope_theta": theta}}


def deepseek_v3_hf_config(args: dict) -> dict:
    where = "megatron args"
    config = original_hf_config(args)
    hidden, heads = arg(args, "hidden_size", where), arg(args, "num_attention_heads", where)
    layers, moe_ffn = arg(args, "num_layers", where), arg(args, "moe_ffn_hidden_size", where)
    shared = args.get("moe_shared_expert_intermediate_size") or 0
    if shared % moe_ffn:
        raise FormatError(f"{where}: moe_shared_expert_intermediate_size {shared} is not a multiple of "
                          f"moe_ffn_hidden_size {moe_ffn} (HF counts shared experts)")
    rope = _rope_config(config, args)
    if not config or "rope_interleave" in config:  # DeepSeek-V3.2's config has no such field
        config["rope_interleave"] = True
    config.update(
        architectures=config.get("architectures") or ["DeepseekV3ForCausalLM"],
        model_type=config.get("model_type", "deepseek_v3"), hidden_size=hidden,
        intermediate_size=arg(args, "ffn_hidden_size", where), moe_intermediate_size=moe_ffn,
        num_hidden_layers=layers, num_attention_heads=heads,
        n_routed_experts=arg(args, "num_experts", where), n_shared_experts=shared // moe_ffn,
        num_experts_per_tok=arg(args, "moe_router_topk", where),
        n_group=args.get("moe_router_num_groups") or config.get("n_group", 1),
        topk_group=args.get("moe_router_group_topk") or config.get("topk_group", 1),
        routed_scaling_factor=float(args.get("moe_router_topk_scaling_factor") or 1.0),
        first_k_dense_replace=first_dense_from_freq(args.get("moe_layer_freq"), layers, where),
        q_lora_rank=args.get("q_lora_rank") or None, kv_lora_rank=arg(args, "kv_lora_rank", where),
        qk_nope_head_dim=arg(args, "qk_head_dim", where), qk_rope_head_dim=arg(args, "qk_pos_emb_head_dim", where),
        v_head_dim=arg(args, "v_head_dim", where), norm_topk_prob=True, hidden_act="silu", attention_bias=False,
        rms_norm_eps=float(args.get("norm_epsilon", 1e-6)),
        max_position_embeddings=args.get("max_position_embeddings") or args.get("seq_length"),
        tie_word_embeddings=not args.get("untie_embeddings_and_output_weights", False),
        vocab_size=args.get("vocab_size") or arg(args, "padded_vocab_size", where), **rope)
    if args.get("mtp_num_layers"):
        config["num_nextn_predict_layers"] = args["mtp_num_layers"]
    else:  # a source config's value stays (transformers' default is 1, with or without the weights)
        config.setdefault("num_nextn_predict_layers", 0)
    config.setdefault("num_key_value_heads", heads)  # MLA's weights do not depend on it
    config["qk_head_dim"] = config["qk_nope_head_dim"] + config["qk_rope_head_dim"]
    config["head_dim"] = config["qk_rope_head_dim"]
    return config


# ---- DeepSeek-V2 (and V2-Lite) -------------------------------------------------------------------
# The same multi-latent attention and MoE layout without the score-correction bias; its router
# takes the softmax over every expert, the top k without renormalising (transformers ignores
# norm_topk_prob here), times routed_scaling_factor: Megatron-Core's softmax router with
# pre_softmax. group_limited_greedy ranks groups by their best expert.

DEEPSEEK_V2_MAPPINGS = tuple(m for m in DEEPSEEK_V3_MAPPINGS if m.hf != (L + "mlp.gate.e_score_correction_bias",))


def deepseek_v2_dims(config: dict) -> ModelDims:
    if config.get("num_nextn_predict_layers"):
        raise LayoutError("config.json: DeepSeek-V2 with multi-token-prediction layers is not a known layout")
    return deepseek_v3_dims(config)


def deepseek_v2_megatron_args(config: dict, dims: ModelDims) -> dict:
    topk, method = hf_int(config, "num_experts_per_tok"), config.get("topk_method", "greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise LayoutError(f"config.json: topk_method {method!r} (greedy or group_limited_greedy)")
    groups = _router_groups(config, topk, hf_group_top=1) if method == "group_limited_greedy" else (None, None)
    return _mla_moe_args(config, dims, groups, "softmax", expert_bias=False, pre_softmax=True)


def deepseek_v2_hf_config(args: dict) -> dict:
    config = deepseek_v3_hf_config(args)
    original = original_hf_config(args)
    for v3_only in ("rope_interleave", "num_nextn_predict_layers", "norm_topk_prob"):
        config.pop(v3_only, None)
        if v3_only in original:  # norm_topk_prob: transformers' V2 keeps it, unused
            config[v3_only] = original[v3_only]
    config.update(architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2",
                  topk_method="group_limited_greedy" if args.get("moe_router_num_groups") else "greedy")
    return config


# What Megatron args of an MLA + MoE model may also say (recognition from args alone).
MLA_OPTIONAL = frozenset({"swiglu", "rmsnorm", "layernorm", "pos_rope", "pos_yarn", "qk_layernorm", "shared_expert",
                          "shared_expert_gate", "linear_bias"})


DEEPSEEK_V3 = register_family(Family(
    name="deepseek_v3",
    # Kimi K2's configs say DeepseekV3ForCausalLM; Megatron-Bridge's bridge knows it as KimiK2ForCausalLM.
    architectures=("DeepseekV3ForCausalLM", "KimiK2ForCausalLM"),
    mappings=DEEPSEEK_V3_MAPPINGS,
    dims_from_hf=deepseek_v3_dims,
    megatron_args_from_hf=deepseek_v3_megatron_args,
    hf_config_from_megatron=deepseek_v3_hf_config,
    megatron_features=frozenset({"mla", "moe"}),
    megatron_optional=MLA_OPTIONAL | {"sigmoid_router", "expert_bias"},
    deepseek_inference=True,
    **DEEPSEEK_MTP,
))
DEEPSEEK_V2 = register_family(Family(
    name="deepseek_v2",
    architectures=("DeepseekV2ForCausalLM",),
    mappings=DEEPSEEK_V2_MAPPINGS,
    dims_from_hf=deepseek_v2_dims,
    megatron_args_from_hf=deepseek_v2_megatron_args,
    hf_config_from_megatron=deepseek_v2_hf_config,
    megatron_features=frozenset({"mla", "moe", "softmax_router"}),
    megatron_optional=MLA_OPTIONAL,
    deepseek_inference=True,
))


# ---- DeepSeek-V3.2 ---------------------------------------------------------------------------------
# DeepSeek-V3's table plus the lightning indexer of DeepSeek sparse attention (DSA) in every
# attention layer: HF self_attn.indexer.{wq_b [n*d, q_lora], wk [d, H], k_norm (LayerNorm weight and
# bias) [d], weights_proj [n, H]} -> Megatron-Core 0.16.1's DSAttention indexer
# (experimental_attention_variant "dsa", transformer/experimental_attention_variant/dsa.py:
# core_attention.indexer.linear_wq_b / linear_wk / k_norm / linear_weights_proj, all 'duplicated':
# whole on every tensor-parallel rank). Megatron-Core builds DSA with TransformerEngine only
# (models/gpt/experimental_attention_variant_module_specs.py), whose MLA names fuse the q/kv norms
# into linear_q_up_proj / linear_kv_up_proj: the TE naming.

IDX = A + "indexer."
DSA_INDEXER = S + "core_attention.indexer."


def _has_indexer(d: ModelDims) -> bool:
    return d.index_heads > 0


INDEXER = (
    TensorMapping((IDX + "wq_b.weight",), DSA_INDEXER + "linear_wq_b.weight", REPLICATED, LAYER,
                  lambda d: (d.index_heads * d.index_head_dim, d.q_lora_rank), needs=_has_indexer),
    TensorMapping((IDX + "wk.weight",), DSA_INDEXER + "linear_wk.weight", REPLICATED, LAYER,
                  lambda d: (d.index_head_dim, d.hidden), needs=_has_indexer),
    TensorMapping((IDX + "k_norm.weight",), DSA_INDEXER + "k_norm.weight", REPLICATED, LAYER,
                  lambda d: (d.index_head_dim,), needs=_has_indexer),
    TensorMapping((IDX + "k_norm.bias",), DSA_INDEXER + "k_norm.bias", REPLICATED, LAYER,
                  lambda d: (d.index_head_dim,), needs=_has_indexer),
    TensorMapping((IDX + "weights_proj.weight",), DSA_INDEXER + "linear_weights_proj.weight", REPLICATED, LAYER,
                  lambda d: (d.index_heads, d.hidden), needs=_has_indexer),
)
DEEPSEEK_V32_MAPPINGS = EMBEDDING + MLA + INDEXER + DENSE_MLP + MOE + HEAD


def deepseek_v32_dims(config: dict) -> ModelDims:
    dims = deepseek_v3_dims(config)
    if not dims.q_lora_rank:
        raise LayoutError("config.json: DeepSeek-V3.2 without q_lora_rank: its indexer reads the compressed query")
    return replace(dims, index_heads=hf_int(config, "index_n_heads"), index_head_dim=hf_int(config, "index_head_dim"))


def deepseek_v32_megatron_args(config: dict, dims: ModelDims) -> dict:
    return {**deepseek_v3_megatron_args(config, dims), "experimental_attention_variant": "dsa",
            "dsa_indexer_n_heads": dims.index_heads, "dsa_indexer_head_dim": dims.index_head_dim,
            "dsa_indexer_topk": hf_int(config, "index_topk")}


def deepseek_v32_hf_config(args: dict) -> dict:
    where = "megatron args"
    config = deepseek_v3_hf_config(args)
    if "architectures" not in original_hf_config(args):
        config.update(architectures=["DeepseekV32ForCausalLM"], model_type="deepseek_v32")
    config.update(index_n_heads=arg(args, "dsa_indexer_n_heads", where),
                  index_head_dim=arg(args, "dsa_indexer_head_dim", where),
                  index_topk=arg(args, "dsa_indexer_topk", where))
    return config


DEEPSEEK_V32 = register_family(Family(
    name="deepseek_v32",
    architectures=("DeepseekV32ForCausalLM",),
    mappings=DEEPSEEK_V32_MAPPINGS,
    dims_from_hf=deepseek_v32_dims,
    megatron_args_from_hf=deepseek_v32_megatron_args,
    hf_config_from_megatron=deepseek_v32_hf_config,
    megatron_features=frozenset({"mla", "moe", "dsa"}),
    megatron_optional=MLA_OPTIONAL | {"sigmoid_router", "expert_bias"},
    deepseek_inference=True,
    **DEEPSEEK_MTP,
    te_names_only=("Megatron-Core 0.16.1 builds DeepSeek sparse attention with TransformerEngine only "
                   "(experimental_attention_variant_module_specs.py), under its names"),
))
