"""Megatron-Core as the judge of Megatron checkpoints, on CPU (gloo, no TransformerEngine).

Importable by tests and runnable as a script under torchrun::

    torchrun --nproc-per-node 2 tests/megatron_harness.py --ckpt DIR --hf-config CONFIG.json \\
        --tp 2 --input IDS.pt --out LOGITS.pt          # forward pass, full-vocab logits to LOGITS.pt
    torchrun --nproc-per-node 2 tests/megatron_harness.py --save-from HF_DIR --ckpt OUT --tp 2
                                                       # Megatron-Core itself writes a checkpoint
    torchrun --nproc-per-node 2 tests/megatron_harness.py --ckpt DIR ... --tp 1 --ep 2
                                                       # expert parallelism: world = tp * ep
    torchrun --nproc-per-node 2 tests/megatron_harness.py --jobs JOBS.json
                                                       # several forward passes, one process start

Public functions
  translate_hf_config(hf_config, tp, pp, ep)  HF config -> TransformerConfig / GPTModel keyword arguments
  gpt_model_from_hf_config(hf_config, tp, pp, ep=1)  a GPTModel (local spec); needs megatron_parallel()
  load_megatron_checkpoint(model, ckpt_dir, tp_rank, pp_rank, ep_rank, ep)  strict load of one rank's file
  megatron_logits(ckpt_dir, hf_config, tp, input_ids, ep=1)  [b, s, true_vocab] fp32 logits
  megatron_logits_many(runs)  the same for several (ckpt, config, tp, ep, ids), one torchrun per world size
  save_with_megatron(hf_model_dir, out_dir, tp, ep=1)  per-rank torch checkpoint from Megatron's state_dict()
  megatron_parallel(tp, pp, ep)  context: gloo process group (world size 1 if none) + parallel_state

Families: llama, mistral, qwen2, gpt2 (dense); gemma2, gemma3_text, olmo2 and olmoe (Megatron-Bridge's
layers reproduced in tests/bridge_layers.py); glm4_moe; mixtral and qwen2_moe (mixture of experts: sequential
local experts, `allgather` token dispatcher, expert parallelism `ep` with expert-TP = tp and the
data-parallel size = ep, so a run has tp * pp * ep processes); deepseek_v3 (multi-latent attention
through the local spec's MLASelfAttention with q/kv layernorms, dense first layers, sigmoid router
with expert_bias, shared experts). Expert tensor parallelism: `etp` (default tp); a world of
world_size(tp, pp, ep, etp) processes, each loading mp_rank_<TP rank>_<EP rank> as Megatron-LM names it.

Megatron-Core must not leave state behind in a pytest process: in-process runs (tp * pp * ep == 1)
apply the CPU patches and initialise torch.distributed / parallel_state only inside
`megatron_parallel()`, and undo both on exit; larger worlds run in a torchrun subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).resolve()

# Megatron's default; padded vocab = ceil(V / (divisible_by * tp)) * divisible_by * tp.
MAKE_VOCAB_SIZE_DIVISIBLE_BY = 128
CHECKPOINT_VERSION = 3.0


def megatron_available() -> bool:
    """True when megatron-core is importable (psutil and einops are optional imports of it; the
    dense GPT paths used here run without them)."""
    try:
        return importlib.util.find_spec("megatron.core") is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------
# HF config -> Megatron-Core config
# --------------------------------------------------------------------------------------------------

def _config_dict(hf_config) -> dict:
    """Accept a dict, a transformers PretrainedConfig, a config.json path or a model directory."""
    if isinstance(hf_config, dict):
        return dict(hf_config)
    if isinstance(hf_config, (str, os.PathLike)):
        p = Path(hf_config)
        if p.is_dir():
            p = p / "config.json"
        return json.loads(p.read_text())
    if hasattr(hf_config, "to_dict"):
        return hf_config.to_dict()
    raise TypeError(f"cannot read an HF config from {type(hf_config).__name__}")


def padded_vocab_size(vocab_size: int, tp: int, divisible_by: int = MAKE_VOCAB_SIZE_DIVISIBLE_BY) -> int:
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def gelu_new(x):
    """HF "gelu_new" (NewGELUActivation), written the same way so the two agree bit for bit.
    (Megatron's own `openai_gelu` is wrapped in torch.compile, which a CPU test must avoid.)"""
    import torch

    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def gelu_tanh(x):
    import torch.nn.functional as F

    return F.gelu(x, approximate="tanh")


def _activation(name: str):
    import torch.nn.functional as F

    table = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu, "relu": F.relu,
             "gelu_new": gelu_new, "gelu_fast": gelu_new,  # gelu_fast: same function, other rounding
             "gelu_pytorch_tanh": gelu_tanh}
    if name not in table:
        raise NotImplementedError(f"activation {name!r} has no Megatron equivalent in this harness")
    return table[name]


def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    theta = rp.get("rope_theta", cfg.get("rope_theta", 10000.0))
    return float(theta)


def _rope_scaling(cfg: dict) -> dict:
    """GPTModel kwargs for the HF rope scaling: Llama 3.x's (rope_scaling, rope_scaling_factor; the
    low/high frequency factors and original context Megatron-Core fixes at 1, 4 and 8192) and
    linear position interpolation (seq_len_interpolation_factor)."""
    rp = cfg.get("rope_parameters") or {}
    rs = cfg.get("rope_scaling") or {}
    params = rp if rp.get("rope_type", "default") != "default" else rs
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return {}
    if rope_type == "linear":
        return {"seq_len_interpolation_factor": float(params["factor"])}
    if rope_type == "llama3":
        fixed = (params.get("low_freq_factor"), params.get("high_freq_factor"),
                 params.get("original_max_position_embeddings"))
        if fixed != (1.0, 4.0, 8192) and fixed != (1, 4, 8192):
            raise NotImplementedError(f"llama3 rope with {fixed}: Megatron-Core fixes 1, 4, 8192")
        return {"rope_scaling": True, "rope_scaling_factor": float(params["factor"])}
    raise NotImplementedError(f"rope_type {rope_type!r} (plain, linear and llama3 RoPE are translated)")


def _moe_transformer_config(cfg: dict, model_type: str, tp: int, ep: int, etp: int | None = None) -> dict:
    """TransformerConfig kwargs of the mixture-of-experts MLP that reproduce HF's numerically.

    HF Mixtral routes by softmax over all experts, top-k, then renormalises the k weights: the same
    as Megatron's top-k on the logits followed by a softmax over those k (moe_router_pre_softmax=
    False). Qwen2-MoE with norm_topk_prob=False keeps softmax-over-all-experts weights without
    renormalising: moe_router_pre_softmax=True (softmax first, then top-k). Its shared expert is
    scaled by sigmoid(gate_weight . x): moe_shared_expert_gate=True. No capacity (no token
    dropping), no load-balancing loss, no jitter, no z-loss: inference only.
    """
    if model_type == "mixtral":
        num_experts, moe_ffn = cfg["num_local_experts"], cfg["intermediate_size"]
        pre_softmax, shared = False, None
    elif model_type == "olmoe":  # softmax over all, top k, renormalised with norm_topk_prob; no shared expert
        num_experts, moe_ffn = cfg["num_experts"], cfg["intermediate_size"]
        pre_softmax, shared = not cfg.get("norm_topk_prob", False), None
    elif model_type == "qwen3_moe":  # Qwen2-MoE's routing, no shared expert
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise NotImplementedError("Qwen3-MoE with dense layers (mlp_only_layers / decoder_sparse_step != 1)")
        num_experts = cfg.get("num_experts") or cfg["num_local_experts"]
        moe_ffn, pre_softmax, shared = cfg["moe_intermediate_size"], not cfg.get("norm_topk_prob", False), None
    else:  # qwen2_moe
        if cfg.get("mlp_only_layers") or cfg.get("decoder_sparse_step", 1) != 1:
            raise NotImplementedError("Qwen2-MoE with dense layers (mlp_only_layers / decoder_sparse_step != 1)")
        num_experts, moe_ffn = cfg["num_experts"], cfg["moe_intermediate_size"]
        pre_softmax = not cfg.get("norm_topk_prob", False)
        shared = cfg.get("shared_expert_intermediate_size") or None
    if num_experts % ep:
        raise ValueError(f"num_experts = {num_experts} is not divisible by ep = {ep}")
    return dict(
        num_moe_experts=num_experts, moe_ffn_hidden_size=moe_ffn,
        moe_router_topk=cfg.get("num_experts_per_tok", 2), moe_router_pre_softmax=pre_softmax,
        moe_router_score_function="softmax", moe_router_topk_scaling_factor=None,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None,
        moe_input_jitter_eps=None, moe_expert_capacity_factor=None,
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False,
        moe_permute_fusion=False, moe_router_fusion=False,
        moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=shared is not None,
        moe_shared_expert_overlap=False,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=tp if etp is None else etp,
    )


def _deepseek_v3_config(cfg: dict, tp: int, ep: int, etp: int | None = None) -> tuple[dict, dict, dict, dict]:
    """MLATransformerConfig kwargs (and GPTModel kwargs, extras, the MoE part) reproducing HF's
    DeepseekV3ForCausalLM: multi-latent attention with q/kv layernorms (local spec: q_layernorm,
    kv_layernorm), plain rope on de-interleaved rope channels (HF rope_interleave=True equals
    Megatron-Core's MLA rope with rotary_interleaved=False), rotary_scaling_factor 1 so the
    softmax scale is 1/sqrt(qk_head_dim + qk_pos_emb_head_dim); the first first_k_dense_replace
    layers dense (moe_layer_freq list); sigmoid router with expert_bias (HF e_score_correction_bias,
    used for choosing only), group-limited top-k (HF sums the top-2 scores of a group,
    Megatron-Core the top topk // group_topk: equal when that is 2), top-k weights normalised
    (norm_topk_prob) and scaled by routed_scaling_factor; shared experts without a gate."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "yarn":  # Megatron-Core's MLA YaRN: rotary_scaling_factor, mscale(_all_dim), beta_fast/slow
        rope = dict(rope_type="yarn", rotary_scaling_factor=float(params["factor"]),
                    mscale=float(params.get("mscale", 1.0)), mscale_all_dim=float(params.get("mscale_all_dim", 0.0)),
                    beta_fast=float(params.get("beta_fast", 32)), beta_slow=float(params.get("beta_slow", 1)),
                    original_max_position_embeddings=int(params.get("original_max_position_embeddings", 4096)))
    elif rope_type == "default":
        rope = dict(rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    else:
        raise NotImplementedError(f"DeepSeek-V3 with rope_type {rope_type!r} (plain and yarn are translated)")
    if not cfg.get("rope_interleave", True):
        raise NotImplementedError("rope_interleave=False has no Megatron-Core MLA equivalent")
    v2 = cfg.get("model_type") == "deepseek_v2"
    if not v2 and not cfg.get("norm_topk_prob", True):
        raise NotImplementedError("norm_topk_prob=False: Megatron-Core's sigmoid router always normalises")
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    topk = cfg["num_experts_per_tok"]
    groups, group_topk = cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    # HF ranks expert groups by their top-2 scores (V3) or their best one (V2's
    # group_limited_greedy); Megatron-Core by the sum of the top topk // group_topk
    hf_group_top = 1 if v2 else 2
    if v2 and cfg.get("topk_method", "greedy") == "greedy":
        groups = group_topk = None
    elif groups > 1 and group_topk < groups:
        if topk // group_topk != hf_group_top:
            raise NotImplementedError(f"HF ranks expert groups by their top-{hf_group_top} scores; Megatron-Core "
                                      f"by top {topk // group_topk}")
    else:
        groups = group_topk = None
    moe = _deepseek_moe_config(cfg, tp, ep, etp, v2, groups, group_topk)
    tc = dict(
        num_layers=layers, hidden_size=cfg["hidden_size"], num_attention_heads=heads, num_query_groups=heads,
        kv_channels=cfg["v_head_dim"], ffn_hidden_size=cfg["intermediate_size"],
        normalization="RMSNorm", layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True, activation_func=_activation(cfg.get("hidden_act", "silu")),
        add_bias_linear=False, add_qkv_bias=False,
        multi_latent_attention=True, qk_layernorm=True, q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=cfg["kv_lora_rank"], qk_head_dim=cfg["qk_nope_head_dim"],
        qk_pos_emb_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"],
        rotary_base=_rope_theta(cfg), rotary_percent=1.0, **rope, **moe,
    )
    gm = dict(position_embedding_type="rope", rotary_percent=1.0, rotary_base=_rope_theta(cfg),
              max_sequence_length=cfg["max_position_embeddings"],
              share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)))
    return tc, gm, dict(swiglu=True, openai_gelu=False), moe


def _deepseek_moe_config(cfg: dict, tp: int, ep: int, etp: int | None, v2: bool, groups, group_topk) -> dict:
    """The MoE part of DeepSeek-V3 (and GLM-4.5, the same routing): the first first_k_dense_replace
    layers dense, sigmoid scores with expert_bias (V2: softmax, no bias), group-limited top-k,
    normalised weights times routed_scaling_factor, shared experts without a gate."""
    experts, topk, layers = cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["num_hidden_layers"]
    if experts % ep:
        raise ValueError(f"num_experts = {experts} is not divisible by ep = {ep}")
    first_dense = cfg.get("first_k_dense_replace") or 0
    shared = (cfg.get("n_shared_experts") or 0) * cfg["moe_intermediate_size"]
    return dict(
        num_moe_experts=experts, moe_ffn_hidden_size=cfg["moe_intermediate_size"],
        moe_layer_freq=[0] * first_dense + [1] * (layers - first_dense),
        moe_router_topk=topk, moe_router_num_groups=groups, moe_router_group_topk=group_topk,
        # V3: sigmoid scores, expert_bias, normalised top-k; V2: softmax over all, top-k unnormalised
        moe_router_score_function="softmax" if v2 else "sigmoid", moe_router_enable_expert_bias=not v2,
        moe_router_topk_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)), moe_router_pre_softmax=v2,
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None,
        moe_input_jitter_eps=None, moe_expert_capacity_factor=None,
        moe_token_dispatcher_type="allgather", moe_grouped_gemm=False, moe_permute_fusion=False,
        moe_router_fusion=False, moe_shared_expert_intermediate_size=shared or None, moe_shared_expert_gate=False,
        moe_shared_expert_overlap=False,
        expert_model_parallel_size=ep, expert_tensor_parallel_size=tp if etp is None else etp,
    )


def _glm4_moe_config(cfg: dict, tp: int, ep: int, etp: int | None) -> tuple[dict, dict, dict, dict]:
    """GLM-4.5: grouped-query attention with q/k/v biases (attention_bias; o_proj has none), per-head
    q/k norms when use_qk_norm, the first partial_rotary_factor of each head rotated by halves
    (rotary_percent), DeepSeek-V3's MoE (first dense layers, sigmoid router with expert_bias)."""
    if not cfg.get("norm_topk_prob", True):
        raise NotImplementedError("norm_topk_prob=False: Megatron-Core's sigmoid router always normalises")
    if _rope_scaling(cfg):
        raise NotImplementedError("GLM-4.5 rope scaling")
    topk, groups, group_topk = cfg["num_experts_per_tok"], cfg.get("n_group") or 1, cfg.get("topk_group") or 1
    if groups > 1 and group_topk < groups:
        if topk // group_topk != 2:
            raise NotImplementedError("HF ranks expert groups by their top-2 scores")
    else:
        groups = group_topk = None
    moe = _deepseek_moe_config(cfg, tp, ep, etp, False, groups, group_topk)
    rp = cfg.get("rope_parameters") or {}
    rotary = float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    tc = dict(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"], num_query_groups=cfg["num_key_value_heads"],
        kv_channels=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
        ffn_hidden_size=cfg["intermediate_size"], normalization="RMSNorm",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)), gated_linear_unit=True,
        activation_func=_activation(cfg.get("hidden_act", "silu")), add_bias_linear=False,
        add_qkv_bias=bool(cfg.get("attention_bias")), qk_layernorm=bool(cfg.get("use_qk_norm")), **moe)
    gm = dict(position_embedding_type="rope", rotary_percent=rotary, rotary_base=_rope_theta(cfg),
              max_sequence_length=cfg["max_position_embeddings"],
              share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)))
    return tc, gm, dict(swiglu=True, openai_gelu=False, block_spec=True), moe


def _gemma_config(cfg: dict, model_type: str) -> tuple[dict, dict, dict]:
    """Gemma 2 / Gemma 3 (text) as Megatron-Bridge runs them (tests/bridge_layers.py adds the layers
    Megatron-Core lacks): GeGLU, scale 1/sqrt(query_pre_attn_scalar), the sliding layers of
    layer_types with a window of sliding_window tokens (the query's own included), Gemma 2's soft
    caps, Gemma 3's q/k norms and its sliding layers' own rope base."""
    layer_types = cfg.get("layer_types") or []
    window = cfg.get("sliding_window")
    sliding = [int(kind == "sliding_attention") for kind in layer_types]
    tc = dict(
        num_layers=cfg["num_hidden_layers"], hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"], num_query_groups=cfg["num_key_value_heads"],
        kv_channels=cfg["head_dim"], ffn_hidden_size=cfg["intermediate_size"], normalization="RMSNorm",
        layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)), gated_linear_unit=True,
        activation_func=_activation(cfg.get("hidden_activation") or cfg.get("hidden_act")),
        add_bias_linear=False, add_qkv_bias=False, qk_layernorm=model_type == "gemma3_text",
        softmax_scale=float(cfg["query_pre_attn_scalar"]) ** -0.5,
        **({"window_size": (window - 1, 0), "window_attn_skip_freq": sliding} if window and any(sliding) else {}))
    rp = cfg.get("rope_parameters") or {}
    full, local = (rp["full_attention"], rp["sliding_attention"]) if "full_attention" in rp else (rp, None)
    gm = dict(position_embedding_type="rope", rotary_percent=1.0, rotary_base=float(full["rope_theta"]),
              max_sequence_length=cfg["max_position_embeddings"],
              share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", True)))
    if full.get("rope_type", "default") == "linear":  # Gemma 3: the full layers' rope only
        gm["seq_len_interpolation_factor"] = float(full["factor"])
    elif full.get("rope_type", "default") != "default":
        raise NotImplementedError(f"Gemma rope_type {full['rope_type']!r}")
    gemma = {"attn_softcap": cfg.get("attn_logit_softcapping"), "final_softcap": cfg.get("final_logit_softcapping"),
             "local_rope_base": float(local["rope_theta"]) if local else None}
    return tc, gm, dict(swiglu=False, openai_gelu=False, gemma=gemma)


def translate_hf_config(hf_config, tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None) -> dict:
    """The Megatron-Core description of an HF model.

    Returns {"family", "transformer_config": {TransformerConfig kwargs}, "gpt_model": {GPTModel
    kwargs except config/spec}, "normalization", "vocab_size" (true), "padded_vocab_size",
    "tied", "num_experts" (None for a dense model)}. Everything here is what makes Megatron's
    forward equal HF's (see the module's tests). `ep` is the expert-parallel size (MoE only).
    """
    cfg = _config_dict(hf_config)
    model_type = cfg.get("model_type")
    moe = {}
    if model_type in ("llama", "qwen2", "mistral", "mixtral", "qwen2_moe", "qwen3", "qwen3_moe", "seed_oss", "phi3",
                      "smollm3", "olmo2", "olmoe"):
        hidden = cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe") and cfg.get("use_sliding_window"):
            raise NotImplementedError("Qwen sliding-window attention")
        if model_type in ("qwen2", "qwen2_moe"):
            # Qwen2: q/k/v biases, none on o_proj or the MLP; Qwen2-MoE: q/k/v biases per qkv_bias
            qkv_bias, linear_bias = bool(cfg.get("qkv_bias", True)), False
        elif model_type in ("qwen3", "qwen3_moe"):
            if cfg.get("attention_bias"):
                raise NotImplementedError("Qwen3 with attention_bias")
            qkv_bias, linear_bias = False, False
        elif model_type == "phi3":  # no biases; q/k/v and gate/up fused in HF only
            qkv_bias, linear_bias = False, False
        elif model_type in ("olmo2", "olmoe"):  # no biases (attention_bias would bias o_proj, not the MLP)
            if cfg.get("attention_bias") or cfg.get("clip_qkv") is not None:
                raise NotImplementedError(f"{model_type} with attention_bias or clip_qkv")
            qkv_bias, linear_bias = False, False
        elif model_type == "seed_oss":
            # Seed-OSS: attention_bias on q/k/v only; o_proj's bias is attention_out_bias
            out_bias, mlp_bias = bool(cfg.get("attention_out_bias", False)), bool(cfg.get("mlp_bias", False))
            if out_bias != mlp_bias:
                raise NotImplementedError("attention_out_bias != mlp_bias has no Megatron-Core equivalent")
            qkv_bias, linear_bias = bool(cfg.get("attention_bias", True)) or mlp_bias, mlp_bias
        else:
            attn_bias, mlp_bias = bool(cfg.get("attention_bias", False)), bool(cfg.get("mlp_bias", False))
            if attn_bias != mlp_bias:
                # Megatron's add_bias_linear covers linear_qkv, linear_proj, fc1 and fc2 together;
                # add_qkv_bias only linear_qkv. HF's attention_bias also covers o_proj.
                raise NotImplementedError("attention_bias != mlp_bias has no Megatron-Core equivalent")
            qkv_bias, linear_bias = attn_bias, attn_bias
            if model_type in ("mistral", "mixtral") and cfg.get("sliding_window"):
                raise NotImplementedError(f"{model_type} sliding-window attention")
        act = cfg.get("hidden_act", "silu")
        tc = dict(
            num_layers=cfg["num_hidden_layers"], hidden_size=hidden, num_attention_heads=heads,
            num_query_groups=kv_heads, kv_channels=head_dim, ffn_hidden_size=cfg["intermediate_size"],
            normalization="RMSNorm", layernorm_epsilon=float(cfg.get("rms_norm_eps", 1e-6)),
            gated_linear_unit=True, activation_func=_activation(act),
            add_bias_linear=linear_bias, add_qkv_bias=qkv_bias,
            # Qwen3: RMSNorm over head_dim on each query and key head (HF q_norm / k_norm)
            qk_layernorm=model_type in ("qwen3", "qwen3_moe"),
        )
        if model_type in ("olmo2", "olmoe"):  # q/k norms over the whole projection; OLMo 2: norms after, not before
            tc["qk_layernorm"] = True
        if model_type == "smollm3":  # NoPE layers: HF's no_rope_layers marks the layers that DO rotate
            tc["no_rope_freq"] = [1 - int(v) for v in cfg["no_rope_layers"]]
        # Phi-3's partial rotary: the first partial_rotary_factor of each head's dims rotate, as rotary_percent does
        rotary = float((cfg.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                              cfg.get("partial_rotary_factor", 1.0)))
        gm = dict(position_embedding_type="rope", rotary_percent=rotary, rotary_base=_rope_theta(cfg),
                  max_sequence_length=cfg["max_position_embeddings"],
                  share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", False)),
                  **_rope_scaling(cfg))
        extra = dict(swiglu=(act in ("silu", "swish")), openai_gelu=False,
                     olmo={"olmo2": "post_norms", "olmoe": "pre_norms"}.get(model_type))
        if model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"):
            moe = _moe_transformer_config(cfg, model_type, tp, ep, etp)
            tc.update(moe)
    elif model_type == "gpt2":
        hidden = cfg["n_embd"]
        heads = cfg["n_head"]
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            raise NotImplementedError("GPT-2 scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn")
        if cfg.get("scale_attn_weights") is False:
            raise NotImplementedError("GPT-2 without attention scaling")
        act = cfg.get("activation_function", "gelu_new")
        tc = dict(
            num_layers=cfg["n_layer"], hidden_size=hidden, num_attention_heads=heads,
            num_query_groups=heads, kv_channels=hidden // heads,
            ffn_hidden_size=cfg.get("n_inner") or 4 * hidden,
            normalization="LayerNorm", layernorm_epsilon=float(cfg.get("layer_norm_epsilon", 1e-5)),
            gated_linear_unit=False, activation_func=_activation(act),
            add_bias_linear=True, add_qkv_bias=True,
        )
        gm = dict(position_embedding_type="learned_absolute", rotary_percent=1.0, rotary_base=10000,
                  max_sequence_length=cfg["n_positions"],
                  share_embeddings_and_output_weights=bool(cfg.get("tie_word_embeddings", True)))
        extra = dict(swiglu=False, openai_gelu=(act in ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")))
    elif model_type in ("gemma2", "gemma3_text"):
        tc, gm, extra = _gemma_config(cfg, model_type)
    elif model_type == "glm4_moe":
        tc, gm, extra, moe = _glm4_moe_config(cfg, tp, ep, etp)
    elif model_type in ("deepseek_v3", "deepseek_v2"):
        tc, gm, extra, moe = _deepseek_v3_config(cfg, tp, ep, etp)
        extra["mla"] = True
    else:
        raise NotImplementedError(f"model_type {model_type!r}")
    if ep != 1 and not moe:
        raise ValueError(f"ep={ep} needs a mixture-of-experts model; {model_type} has no experts")

    tc.update(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        # numerics: exact fp32 eager paths, no dropout, no fusions, no layer-number scaling
        params_dtype=_torch_dtype("float32"), bf16=False, fp16=False,
        hidden_dropout=0.0, attention_dropout=0.0,
        apply_query_key_layer_scaling=False, attention_softmax_in_fp32=True,
        masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
        persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        rotary_interleaved=False, layernorm_zero_centered_gamma=False,
        apply_residual_connection_post_layernorm=False, fp32_residual_connection=False,
        sequence_parallel=False,
        # CPU: build weights on the host; every weight is overwritten by a strict load anyway
        use_cpu_initialization=True, perform_initialization=False,
    )
    vocab = cfg["vocab_size"]
    return dict(family=model_type, transformer_config=tc, gpt_model=gm, normalization=tc["normalization"],
                vocab_size=vocab, padded_vocab_size=padded_vocab_size(vocab, tp),
                tied=gm["share_embeddings_and_output_weights"], num_experts=moe.get("num_moe_experts"), **extra)


def _torch_dtype(name):
    import torch

    return getattr(torch, name)


# --------------------------------------------------------------------------------------------------
# CPU patches and parallel state
# --------------------------------------------------------------------------------------------------

def import_megatron_core():
    """Import the Megatron-Core modules the harness uses, with `torch.compile` made a no-op during
    the import: megatron.core.jit sets `jit_fuser = torch.compile`, and decorating with it pulls in
    torch._dynamo / torch._inductor (~1.5 s CPU per process) for fused kernels that the fp32 eager
    configuration of translate_hf_config() does not use. Functions stay plain eager Python; the
    numerics are the same. No effect when megatron.core is already imported."""
    if "megatron.core.models.gpt" in sys.modules:
        return
    import torch

    compile_ = torch.compile

    def eager(model=None, **kwargs):
        return model if model is not None else (lambda fn: fn)

    torch.compile = eager
    try:
        import megatron.core.models.gpt  # noqa: F401
        import megatron.core.models.gpt.gpt_layer_specs  # noqa: F401
        import megatron.core.parallel_state  # noqa: F401
        import megatron.core.tensor_parallel.random  # noqa: F401
        import megatron.core.transformer.moe.moe_utils  # noqa: F401
        import megatron.core.transformer.transformer_config  # noqa: F401
    finally:
        torch.compile = compile_


_ABSENT = object()


@contextlib.contextmanager
def cpu_patches():
    """The patches Megatron-Core 0.16 needs to run on a CPU with gloo, undone on exit.

    MoE: without TransformerEngine `moe_utils.te_general_gemm` is never defined, and the router's
    gating GEMM (`router_gating_linear`) tests it against None: set it to None (plain torch GEMM).

    MLA: `megatron.core.extensions.transformer_engine` imports without TransformerEngine, its
    classes being MagicMock stand-ins, so multi_latent_attention sets HAVE_TE = True and its
    `isinstance(self.linear_proj, TELinear)` raises TypeError: set HAVE_TE = False there.

    Sliding windows: the softmax builds its window mask on "cuda" (transformer/utils.py
    get_sliding_window_causal_mask): the same mask, built on the CPU."""
    import torch

    import_megatron_core()
    from megatron.core.fusions import fused_softmax
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import multi_latent_attention as mla
    from megatron.core.transformer.moe import moe_utils

    saved = [(torch.cuda, "current_device", torch.cuda.current_device),
             (torch.cuda, "synchronize", torch.cuda.synchronize),
             (mrandom.CudaRNGStatesTracker, "fork", mrandom.CudaRNGStatesTracker.fork),
             (moe_utils, "te_general_gemm", getattr(moe_utils, "te_general_gemm", _ABSENT)),
             (mla, "HAVE_TE", mla.HAVE_TE),
             (fused_softmax, "get_sliding_window_causal_mask",
              getattr(fused_softmax, "get_sliding_window_causal_mask", _ABSENT))]  # absent before 0.15

    def sliding_window_causal_mask(sq, skv, window_size):  # True = masked, as Megatron-Core's
        m = torch.ones(sq, skv, dtype=torch.bool)
        return ~torch.tril(torch.triu(m, diagonal=skv - sq - window_size[0]), diagonal=skv - sq + window_size[1])

    if saved[-1][2] is not _ABSENT:
        fused_softmax.get_sliding_window_causal_mask = sliding_window_causal_mask
    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    mrandom.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    if saved[3][2] is _ABSENT:
        moe_utils.te_general_gemm = None
    if not isinstance(mla.TELinear, type):  # a MagicMock: TransformerEngine is absent
        mla.HAVE_TE = False
    try:
        yield
    finally:
        for obj, attr, value in saved:
            if value is _ABSENT:
                if hasattr(obj, attr):  # set here (te_general_gemm), or never (an absent function)
                    delattr(obj, attr)
            else:
                setattr(obj, attr, value)


def world_size(tp: int, pp: int = 1, ep: int = 1, etp: int | None = None) -> int:
    """Processes a run needs: tp * pp * ep (data-parallel size ep) when expert-TP = tp; with another
    expert-TP size the smallest world both grids divide: pp * lcm(tp, etp * ep)."""
    if etp is None or etp == tp:
        return tp * pp * ep
    return pp * math.lcm(tp, etp * ep)


@contextlib.contextmanager
def megatron_parallel(tp: int = 1, pp: int = 1, ep: int = 1, etp: int | None = None):
    """CPU patches + torch.distributed (gloo) + Megatron parallel_state for tp x pp (x ep).

    Under torchrun (RANK/WORLD_SIZE set) it joins that job (env://); otherwise it creates a world of
    one (in-memory store, no port), which serves tp * pp * ep == 1. Whatever it creates it destroys.
    Expert parallelism: expert-TP = tp and data-parallel size = ep, so the world is tp * pp * ep
    (with tp=1, ep=2 the two processes are data-parallel replicas of the dense weights, each holding
    half of the experts; rank r is EP rank r).
    """
    import torch.distributed as dist

    with cpu_patches(), contextlib.ExitStack() as undo:
        from megatron.core import parallel_state

        if not dist.is_initialized():
            if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
                dist.init_process_group("gloo", init_method="env://")
            else:
                dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
            undo.callback(dist.destroy_process_group)
        world = dist.get_world_size()
        if world != world_size(tp, pp, ep, etp):
            raise RuntimeError(f"tp={tp} x pp={pp} x ep={ep} (etp={etp}) needs {world_size(tp, pp, ep, etp)} "
                               f"processes; this world has {world}"
                               + ("" if world > 1 else " (use torchrun / run_torchrun for tp*pp*ep > 1)"))
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                                     pipeline_model_parallel_size=pp,
                                                     expert_model_parallel_size=ep,
                                                     expert_tensor_parallel_size=tp if etp is None else etp)
            undo.callback(parallel_state.destroy_model_parallel)
        yield


# --------------------------------------------------------------------------------------------------
# Model, load, forward
# --------------------------------------------------------------------------------------------------

def gpt_model_from_hf_config(hf_config, tp: int, pp: int = 1, parallel_output: bool = False, ep: int = 1,
                             etp: int | None = None):
    """A Megatron-Core GPTModel (local spec, no TransformerEngine) for this rank, matching the HF
    model's forward. Call inside `megatron_parallel(tp, pp, ep)`. parallel_output=False gathers the
    vocab-parallel logits on every rank. MoE models get the local spec's MoE layer with sequential
    experts (`mlp.experts.local_experts.J`), num_experts / ep of them on this rank."""
    import_megatron_core()
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    t = translate_hf_config(hf_config, tp, pp, ep, etp)
    if t.get("gemma") or t.get("olmo"):
        from bridge_layers import build_gemma_model, build_olmo_model

        pre = parallel_state.is_pipeline_first_stage() if pp > 1 else True
        post = parallel_state.is_pipeline_last_stage() if pp > 1 else True
        build = build_gemma_model if t.get("gemma") else build_olmo_model
        return build(TransformerConfig(**t["transformer_config"]), t, pre, post, parallel_output)
    if t.get("mla"):  # DeepSeek-V3: MLA everywhere, dense or MoE MLP per moe_layer_freq
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
        from megatron.core.transformer.transformer_config import MLATransformerConfig

        config = MLATransformerConfig(**t["transformer_config"])
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
        for layer_spec in spec.layer_specs:
            layer_spec.submodules.self_attention.submodules.core_attention = mla_dot_product_attention()
    else:
        config = TransformerConfig(**t["transformer_config"])
    if t.get("mla"):
        pass
    elif t.get("block_spec"):  # dense first layers, then MoE (moe_layer_freq)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    elif t["num_experts"]:
        spec = get_gpt_layer_local_spec(num_experts=t["num_experts"], moe_grouped_gemm=False,
                                        normalization=t["normalization"], qk_layernorm=config.qk_layernorm)
    else:
        spec = get_gpt_layer_local_spec(normalization=t["normalization"], qk_layernorm=config.qk_layernorm)
    if pp > 1:
        pre = parallel_state.is_pipeline_first_stage()
        post = parallel_state.is_pipeline_last_stage()
    else:
        pre = post = True
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=t["padded_vocab_size"],
                     pre_process=pre, post_process=post, parallel_output=parallel_output,
                     **t["gpt_model"])
    return model.eval()


def mla_dot_product_attention():
    """The local spec's DotProductAttention for MLA. MultiLatentAttention builds its core attention
    with `k_channels` (qk_head_dim + qk_pos_emb_head_dim) and `v_channels` (v_head_dim), keywords
    only TransformerEngine's attention takes; the local DotProductAttention already computes with
    the query/key and value head sizes of the tensors it gets (its output is heads * kv_channels =
    heads * v_head_dim wide) and MLA passes its softmax_scale, so dropping the two keywords is the
    whole patch (a spec substitution, nothing global)."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class MLADotProductAttention(DotProductAttention):
        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)
            if v_channels is not None and v_channels != self.config.kv_channels:
                raise ValueError(f"v_channels {v_channels} != kv_channels {self.config.kv_channels}: the local "
                                 f"DotProductAttention's output width would be wrong")

    return MLADotProductAttention


def checkpoint_file(ckpt_dir, tp_rank: int, pp_rank: int = 0, pp: int = 1, iteration="release",
                    ep_rank: int = 0, ep: int = 1) -> Path:
    """Megatron-LM's name: mp_rank_TT, then _PPP when pp > 1, then _EEE when ep > 1."""
    sub = f"mp_rank_{tp_rank:02d}" if pp == 1 else f"mp_rank_{tp_rank:02d}_{pp_rank:03d}"
    if ep > 1:
        sub += f"_{ep_rank:03d}"
    it = iteration if iteration == "release" else f"iter_{int(iteration):07d}"
    return Path(ckpt_dir) / it / sub / "model_optim_rng.pt"


def _find_checkpoint_file(ckpt_dir, tp_rank: int, pp_rank: int, ep_rank: int = 0, ep: int = 1) -> Path:
    ckpt_dir = Path(ckpt_dir)
    tracker = ckpt_dir / "latest_checkpointed_iteration.txt"
    it = tracker.read_text().strip() if tracker.exists() else "release"
    candidates = [checkpoint_file(ckpt_dir, tp_rank, pp_rank, 2, it, ep_rank, ep)]  # mp_rank_TT_PPP[_EEE]
    if pp_rank == 0:
        candidates.insert(0, checkpoint_file(ckpt_dir, tp_rank, 0, 1, it, ep_rank, ep))  # mp_rank_TT[_EEE]
    for f in candidates:
        if f.exists():
            return f
    suffix = f"_{ep_rank:03d}" if ep > 1 else ""
    raise FileNotFoundError(f"no mp_rank_{tp_rank:02d}[_{pp_rank:03d}]{suffix}/model_optim_rng.pt "
                            f"under {ckpt_dir}/{it}")


class StateDictMismatch(RuntimeError):
    pass


def load_megatron_checkpoint(model, ckpt_dir, tp_rank: int, pp_rank: int = 0, ep_rank: int = 0,
                             ep: int = 1) -> dict:
    """Strictly load one rank's `model_optim_rng.pt` into `model`; returns the whole checkpoint dict.
    With ep > 1 the file is `mp_rank_TT[_PPP]_EEE` (EEE = ep_rank).

    `_extra_state` keys: the local ColumnParallelLinear / RowParallelLinear report
    `<prefix>_extra_state = None` in state_dict() and a load pre-hook fills a missing one with None,
    so a checkpoint may carry or omit them; any other missing / unexpected key or shape mismatch
    raises StateDictMismatch listing them all.
    """
    import torch

    f = _find_checkpoint_file(ckpt_dir, tp_rank, pp_rank, ep_rank, ep)
    ckpt = torch.load(f, map_location="cpu", weights_only=False)
    if "model" not in ckpt:
        raise StateDictMismatch(f"{f}: no 'model' entry (keys: {sorted(ckpt)})")
    sd = ckpt["model"]
    own = model.state_dict()
    own_keys = {k for k in own if not k.endswith("_extra_state")}
    got_keys = {k for k in sd if not k.endswith("_extra_state")}
    missing, unexpected = sorted(own_keys - got_keys), sorted(got_keys - own_keys)
    bad_shapes = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sorted(own_keys & got_keys)
                  if hasattr(sd[k], "shape") and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad_shapes:
        raise StateDictMismatch(f"{f} does not fit Megatron-Core's GPTModel:\n  missing: {missing}\n"
                                f"  unexpected: {unexpected}\n  shape mismatches: {bad_shapes}")
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:  # e.g. an unexpected _extra_state of a module that has none
        raise StateDictMismatch(f"{f}: {e}") from e
    return ckpt


def forward_logits(model, input_ids, vocab_size: int):
    """Megatron forward with an explicit causal mask (Megatron's default mask is built on "cuda");
    returns [b, s, vocab_size] fp32 (padding columns dropped)."""
    import torch

    b, s = input_ids.shape
    position_ids = torch.arange(s, dtype=torch.long).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]  # True = masked
    with torch.no_grad():
        logits = model(input_ids, position_ids, mask)
    return logits[..., :vocab_size].float().contiguous()


def _load_input(input_ids):
    import torch

    if isinstance(input_ids, (str, os.PathLike)):
        input_ids = torch.load(input_ids, weights_only=True)
    return torch.as_tensor(input_ids, dtype=torch.long)


def _logits_this_rank(ckpt_dir, hf_config, tp: int, input_ids, ep: int = 1, etp: int | None = None):
    """Inside megatron_parallel(tp, 1, ep, etp): build, load this rank's shard, forward (logits
    gathered). The file is mp_rank_<its TP rank>[_<its EP rank>], as Megatron-LM names it."""
    from megatron.core import parallel_state

    model = gpt_model_from_hf_config(hf_config, tp, ep=ep, etp=etp)
    ep_rank = parallel_state.get_expert_model_parallel_rank() if ep > 1 else 0
    load_megatron_checkpoint(model, ckpt_dir, parallel_state.get_tensor_model_parallel_rank(), 0, ep_rank, ep)
    return forward_logits(model, _load_input(input_ids), _config_dict(hf_config)["vocab_size"])


def megatron_logits(ckpt_dir, hf_config, tp: int, input_ids, timeout: float = 120.0, ep: int = 1):
    """Full-vocab logits [b, s, true_vocab] of Megatron-Core's forward on a checkpoint.

    tp * ep == 1 runs in this process (state undone afterwards); otherwise
    `torchrun --nproc-per-node tp*ep tests/megatron_harness.py ...` in a subprocess.
    """
    return megatron_logits_many([(ckpt_dir, hf_config, tp, ep, input_ids)], timeout=timeout)[0]


def megatron_logits_many(runs, timeout: float = 180.0, saves=()) -> list:
    """Logits for several runs, each (ckpt_dir, hf_config, tp, ep, input_ids[, etp]); returns them in order.

    Runs with tp * ep == 1 go in this process; the others are grouped by world size tp * ep, and
    each group is one torchrun job (`--jobs`): one process start (torch + Megatron imports, the
    dominant cost on a small CPU) for all its runs, parallel_state rebuilt between runs.
    `saves`, each (hf_model_dir, out_dir, tp, ep), are save_with_megatron() calls done first, in
    the torchrun job of their world size.
    """
    import tempfile

    import torch

    results: list = [None] * len(runs)
    groups: dict = {}
    save_groups: dict = {}
    for hf_model_dir, out_dir, tp, ep in saves:
        if tp * ep == 1:
            save_with_megatron(hf_model_dir, out_dir, 1)
        else:
            save_groups.setdefault(tp * ep, []).append(dict(save_from=str(hf_model_dir), ckpt=str(out_dir),
                                                            tp=tp, ep=ep))
    for i, (ckpt_dir, hf_config, tp, ep, input_ids, *etp) in enumerate(runs):
        world = world_size(tp, 1, ep, *etp)
        if world == 1:
            with megatron_parallel(1):
                results[i] = _logits_this_rank(ckpt_dir, hf_config, 1, input_ids)
        else:
            groups.setdefault(world, []).append(i)
    for world in sorted(set(groups) | set(save_groups)):
        indices = groups.get(world, [])
        with tempfile.TemporaryDirectory(prefix="megatron_logits_") as tmp:
            jobs = list(save_groups.get(world, []))
            for i in indices:
                ckpt_dir, hf_config, tp, ep, input_ids, *etp = runs[i]
                cfg_path, ids_path = Path(tmp) / f"config{i}.json", Path(tmp) / f"ids{i}.pt"
                cfg_path.write_text(json.dumps(_config_dict(hf_config)))
                torch.save(_load_input(input_ids), ids_path)
                jobs.append(dict(ckpt=str(ckpt_dir), hf_config=str(cfg_path), tp=tp, ep=ep, etp=(etp or [None])[0],
                                 input=str(ids_path), out=str(Path(tmp) / f"logits{i}.pt")))
            jobs_path = Path(tmp) / "jobs.json"
            jobs_path.write_text(json.dumps(jobs))
            run_torchrun(["--jobs", str(jobs_path)], nproc=world, timeout=timeout)
            for i, job in zip(indices, jobs[len(jobs) - len(indices):]):
                results[i] = torch.load(job["out"], weights_only=True)
    return results


# --------------------------------------------------------------------------------------------------
# torchrun
# --------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script_args, nproc: int, timeout: float = 120.0, script=HARNESS) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node nproc SCRIPT *script_args` on a free port (SCRIPT: this harness,
    or a test module with its own torchrun entry)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--nnodes=1",
           "--master-addr=127.0.0.1", f"--master-port={free_port()}", str(script), *map(str, script_args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                           f"{proc.stderr[-8000:]}")
    return proc


# --------------------------------------------------------------------------------------------------
# Reference writer: Megatron-Core's own state_dict(), filled by plain gather/split code
# --------------------------------------------------------------------------------------------------

def _read_hf_weights(hf_model_dir) -> dict:
    """All tensors of an HF checkpoint directory (safetensors, sharded or not; or pytorch_model*.bin)."""
    import torch

    d = Path(hf_model_dir)
    files = []
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if (d / index_name).exists():
            files = sorted(set(json.loads((d / index_name).read_text())["weight_map"].values()))
            break
        if (d / single).exists():
            files = [single]
            break
    if not files:
        raise FileNotFoundError(f"no HF weights in {d}")
    out = {}
    for name in files:
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            out.update(load_file(str(d / name)))
        else:
            out.update(torch.load(d / name, map_location="cpu", weights_only=True))
    return out


def _pad_vocab(w, padded: int):
    import torch

    if w.shape[0] == padded:
        return w
    return torch.cat([w, w[-1:].expand(padded - w.shape[0], *w.shape[1:])], dim=0)


def _interleave_qkv(q, k, v, heads: int, kv_heads: int, head_dim: int):
    """[Q; K; V] (HF rows) -> Megatron-Core linear_qkv rows: per query group j,
    [q heads j*g .. j*g+g-1, k_j, v_j], g = heads // kv_heads. Works for weights and biases."""
    import torch

    g = heads // kv_heads
    rest = q.shape[1:]
    q = q.reshape(kv_heads, g * head_dim, *rest)
    k = k.reshape(kv_heads, head_dim, *rest)
    v = v.reshape(kv_heads, head_dim, *rest)
    return torch.cat([q, k, v], dim=1).reshape(kv_heads * (g + 2) * head_dim, *rest)


def megatron_full_tensors(hf_weights: dict, hf_config) -> dict:
    """HF tensors -> unsharded Megatron-Core tensors (local names, vocab not yet padded; routed
    experts under their global index: `mlp.experts.local_experts.<e>`, made local by megatron_shard)."""
    cfg = _config_dict(hf_config)
    t = translate_hf_config(cfg)
    tc = t["transformer_config"]
    heads, kv_heads, d = tc["num_attention_heads"], tc["num_query_groups"], tc["kv_channels"]
    out = {}

    def get(*names):
        for n in names:
            if n in hf_weights:
                return hf_weights[n]
        raise KeyError(f"none of {names} in the HF checkpoint")

    if t["family"] in ("deepseek_v3", "deepseek_v2"):
        return _deepseek_v3_full_tensors(get, t)

    if t["family"] == "gpt2":
        def g2(name):
            return get(f"transformer.{name}", name)

        out["embedding.word_embeddings.weight"] = g2("wte.weight")
        out["embedding.position_embeddings.weight"] = g2("wpe.weight")
        for i in range(tc["num_layers"]):
            p, m = f"h.{i}.", f"decoder.layers.{i}."
            for hf_n, mg_n in (("ln_1", "input_layernorm"), ("ln_2", "pre_mlp_layernorm")):
                out[m + mg_n + ".weight"] = g2(p + hf_n + ".weight")
                out[m + mg_n + ".bias"] = g2(p + hf_n + ".bias")
            # Conv1D stores [in, out]: transpose to Linear's [out, in]
            qkv_w = g2(p + "attn.c_attn.weight").t()
            qkv_b = g2(p + "attn.c_attn.bias")
            H = qkv_w.shape[0] // 3
            out[m + "self_attention.linear_qkv.weight"] = _interleave_qkv(*qkv_w.split(H, 0), heads, kv_heads, d)
            out[m + "self_attention.linear_qkv.bias"] = _interleave_qkv(*qkv_b.split(H, 0), heads, kv_heads, d)
            out[m + "self_attention.linear_proj.weight"] = g2(p + "attn.c_proj.weight").t()
            out[m + "self_attention.linear_proj.bias"] = g2(p + "attn.c_proj.bias")
            out[m + "mlp.linear_fc1.weight"] = g2(p + "mlp.c_fc.weight").t()
            out[m + "mlp.linear_fc1.bias"] = g2(p + "mlp.c_fc.bias")
            out[m + "mlp.linear_fc2.weight"] = g2(p + "mlp.c_proj.weight").t()
            out[m + "mlp.linear_fc2.bias"] = g2(p + "mlp.c_proj.bias")
        out["decoder.final_layernorm.weight"] = g2("ln_f.weight")
        out["decoder.final_layernorm.bias"] = g2("ln_f.bias")
        if not t["tied"]:
            out["output_layer.weight"] = get("lm_head.weight")
        return {k: v.contiguous() for k, v in out.items()}

    out["embedding.word_embeddings.weight"] = get("model.embed_tokens.weight")
    for i in range(tc["num_layers"]):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        out[m + "input_layernorm.weight"] = get(p + "input_layernorm.weight")
        out[m + "pre_mlp_layernorm.weight"] = get(p + "post_attention_layernorm.weight")
        a = p + "self_attn."
        out[m + "self_attention.linear_qkv.weight"] = _interleave_qkv(
            get(a + "q_proj.weight"), get(a + "k_proj.weight"), get(a + "v_proj.weight"), heads, kv_heads, d)
        if tc["add_qkv_bias"] or tc["add_bias_linear"]:
            out[m + "self_attention.linear_qkv.bias"] = _interleave_qkv(
                get(a + "q_proj.bias"), get(a + "k_proj.bias"), get(a + "v_proj.bias"), heads, kv_heads, d)
        out[m + "self_attention.linear_proj.weight"] = get(a + "o_proj.weight")
        if tc.get("qk_layernorm"):
            out[m + "self_attention.q_layernorm.weight"] = get(a + "q_norm.weight")
            out[m + "self_attention.k_layernorm.weight"] = get(a + "k_norm.weight")
        if t["family"] == "glm4_moe":  # DeepSeek-V3's MLP: dense first layers, then experts
            _deepseek_mlp_full_tensors(out, get, t, i)
            continue
        if t["num_experts"]:
            _moe_full_tensors(out, get, t, p, m)
            continue
        # gate and up stay separate here; the TP split makes [gate_r; up_r] per rank
        out[m + "mlp.linear_fc1.weight"] = (get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight"))
        out[m + "mlp.linear_fc2.weight"] = get(p + "mlp.down_proj.weight")
        if tc["add_bias_linear"]:
            out[m + "self_attention.linear_proj.bias"] = get(a + "o_proj.bias")
            out[m + "mlp.linear_fc1.bias"] = (get(p + "mlp.gate_proj.bias"), get(p + "mlp.up_proj.bias"))
            out[m + "mlp.linear_fc2.bias"] = get(p + "mlp.down_proj.bias")
    out["decoder.final_layernorm.weight"] = get("model.norm.weight")
    if not t["tied"]:
        out["output_layer.weight"] = get("lm_head.weight")
    return out


def _moe_full_tensors(out: dict, get, t: dict, p: str, m: str) -> None:
    """One MoE layer: router, routed experts (global index), shared expert and its gate.
    HF Mixtral: block_sparse_moe.gate, experts.E.w1 (gate) / w3 (up) / w2 (down); HF Qwen2-MoE:
    mlp.gate, mlp.experts.E.{gate,up,down}_proj, mlp.shared_expert.*, mlp.shared_expert_gate."""
    if t["family"] == "mixtral":
        moe, (g, u, d) = p + "block_sparse_moe.", ("w1", "w3", "w2")
    else:
        moe, (g, u, d) = p + "mlp.", ("gate_proj", "up_proj", "down_proj")
    out[m + "mlp.router.weight"] = get(moe + "gate.weight")
    for e in range(t["num_experts"]):
        x, y = f"{moe}experts.{e}.", f"{m}mlp.experts.local_experts.{e}."
        out[y + "linear_fc1.weight"] = (get(x + g + ".weight"), get(x + u + ".weight"))  # [gate_r; up_r]
        out[y + "linear_fc2.weight"] = get(x + d + ".weight")
    if t["transformer_config"].get("moe_shared_expert_intermediate_size"):
        s = p + "mlp.shared_expert."
        out[m + "mlp.shared_experts.linear_fc1.weight"] = (get(s + "gate_proj.weight"), get(s + "up_proj.weight"))
        out[m + "mlp.shared_experts.linear_fc2.weight"] = get(s + "down_proj.weight")
        out[m + "mlp.shared_experts.gate_weight"] = get(p + "mlp.shared_expert_gate.weight")  # [1, hidden]


def _deepseek_v3_full_tensors(get, t: dict) -> dict:
    """DeepSeek-V3 HF tensors under Megatron-Core's local-spec MLA names (unsharded; routed experts
    under their global index). Every MLA tensor keeps its rows: HF's per-head [nope | rope] (q) and
    [k_nope | v] (kv_b_proj) and [kv_lora | rope] (kv_a_proj_with_mqa) are Megatron's orders."""
    tc = t["transformer_config"]
    out = {"embedding.word_embeddings.weight": get("model.embed_tokens.weight")}
    for i in range(tc["num_layers"]):
        p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
        a, s = p + "self_attn.", m + "self_attention."
        out[m + "input_layernorm.weight"] = get(p + "input_layernorm.weight")
        if tc["q_lora_rank"]:
            out[s + "linear_q_down_proj.weight"] = get(a + "q_a_proj.weight")
            out[s + "q_layernorm.weight"] = get(a + "q_a_layernorm.weight")
            out[s + "linear_q_up_proj.weight"] = get(a + "q_b_proj.weight")
        else:
            out[s + "linear_q_proj.weight"] = get(a + "q_proj.weight")
        out[s + "linear_kv_down_proj.weight"] = get(a + "kv_a_proj_with_mqa.weight")
        out[s + "kv_layernorm.weight"] = get(a + "kv_a_layernorm.weight")
        out[s + "linear_kv_up_proj.weight"] = get(a + "kv_b_proj.weight")
        out[s + "linear_proj.weight"] = get(a + "o_proj.weight")
        out[m + "pre_mlp_layernorm.weight"] = get(p + "post_attention_layernorm.weight")
        _deepseek_mlp_full_tensors(out, get, t, i)
    out["decoder.final_layernorm.weight"] = get("model.norm.weight")
    if not t["tied"]:
        out["output_layer.weight"] = get("lm_head.weight")
    return out


def _deepseek_mlp_full_tensors(out: dict, get, t: dict, i: int) -> None:
    """Layer i's MLP as DeepSeek-V3 (and GLM-4.5) hold it: dense where moe_layer_freq says so, else
    the router (with V3's expert_bias), routed experts (global index) and the shared experts."""
    tc = t["transformer_config"]
    p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
    if not tc["moe_layer_freq"][i]:
        out[m + "mlp.linear_fc1.weight"] = (get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight"))
        out[m + "mlp.linear_fc2.weight"] = get(p + "mlp.down_proj.weight")
        return
    out[m + "mlp.router.weight"] = get(p + "mlp.gate.weight")
    if t["transformer_config"]["moe_router_enable_expert_bias"]:  # DeepSeek-V3's, not V2's
        out[m + "mlp.router.expert_bias"] = get(p + "mlp.gate.e_score_correction_bias")
    for e in range(tc["num_moe_experts"]):
        x, y = f"{p}mlp.experts.{e}.", f"{m}mlp.experts.local_experts.{e}."
        out[y + "linear_fc1.weight"] = (get(x + "gate_proj.weight"), get(x + "up_proj.weight"))
        out[y + "linear_fc2.weight"] = get(x + "down_proj.weight")
    if tc["moe_shared_expert_intermediate_size"]:
        x = p + "mlp.shared_experts."
        out[m + "mlp.shared_experts.linear_fc1.weight"] = (get(x + "gate_proj.weight"), get(x + "up_proj.weight"))
        out[m + "mlp.shared_experts.linear_fc2.weight"] = get(x + "down_proj.weight")


# MLA's local-spec linears: all ColumnParallelLinear (the down projections too; their outputs are
# gathered again before the layernorm).
_MLA_COLUMN_LEAVES = ("linear_q_down_proj.weight", "linear_q_up_proj.weight", "linear_q_proj.weight",
                      "linear_kv_down_proj.weight", "linear_kv_up_proj.weight")


def megatron_shard(full: dict, hf_config, tp: int, tp_rank: int, ep: int = 1, ep_rank: int = 0) -> dict:
    """The simple gather/split way: one rank's tensors from the unsharded ones. Routed experts:
    expert e goes to EP rank e // (E/ep) as local expert e % (E/ep); inside it the TP rules apply."""
    import re

    import torch

    t = translate_hf_config(hf_config, tp, 1, ep)
    padded = t["padded_vocab_size"]
    per_rank = (t["num_experts"] or 1) // ep
    out = {}
    for name, w in full.items():
        match = re.search(r"\.local_experts\.(\d+)\.", name)
        if match:
            e = int(match.group(1))
            if e // per_rank != ep_rank:
                continue
            name = name[:match.start()] + f".local_experts.{e % per_rank}." + name[match.end():]
        leaf = name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1]
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            out[name] = _pad_vocab(w, padded).chunk(tp, 0)[tp_rank]
        elif isinstance(w, tuple):  # gated fc1: [gate_r; up_r]
            gate, up = w
            out[name] = torch.cat([gate.chunk(tp, 0)[tp_rank], up.chunk(tp, 0)[tp_rank]], 0)
        elif leaf in ("linear_qkv.weight", "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias") + _MLA_COLUMN_LEAVES:
            out[name] = w.chunk(tp, 0)[tp_rank]  # column parallel
        elif leaf in ("linear_proj.weight", "linear_fc2.weight"):
            out[name] = w.chunk(tp, 1)[tp_rank]  # row parallel (its bias is replicated)
        else:
            out[name] = w  # norms, row-parallel biases, position embeddings: replicated
    return {k: v.contiguous() for k, v in out.items()}


def megatron_args(hf_config, tp: int, pp: int = 1, ep: int = 1) -> argparse.Namespace:
    """The `args` a Megatron-LM checkpoint carries, for this model."""
    t = translate_hf_config(hf_config, tp, pp, ep)
    tc, gm = t["transformer_config"], t["gpt_model"]
    moe = {}
    if t["num_experts"]:
        moe = dict(num_experts=t["num_experts"], moe_ffn_hidden_size=tc["moe_ffn_hidden_size"],
                   moe_router_topk=tc["moe_router_topk"], moe_router_pre_softmax=tc["moe_router_pre_softmax"],
                   moe_router_score_function=tc["moe_router_score_function"],
                   moe_router_load_balancing_type=tc["moe_router_load_balancing_type"],
                   moe_aux_loss_coeff=tc["moe_aux_loss_coeff"], moe_grouped_gemm=False,
                   moe_token_dispatcher_type=tc["moe_token_dispatcher_type"],
                   moe_shared_expert_intermediate_size=tc["moe_shared_expert_intermediate_size"],
                   moe_shared_expert_gate=tc["moe_shared_expert_gate"],
                   expert_model_parallel_size=ep, expert_tensor_parallel_size=tp)
    if t.get("mla"):  # Megatron-LM's --multi-latent-attention, --q-lora-rank ... (DeepSeek-V3)
        moe.update({k: tc[k] for k in (
            "multi_latent_attention", "qk_layernorm", "q_lora_rank", "kv_lora_rank", "qk_head_dim",
            "qk_pos_emb_head_dim", "v_head_dim", "rope_type", "rotary_scaling_factor", "mscale", "mscale_all_dim",
            "moe_layer_freq", "moe_router_num_groups", "moe_router_group_topk", "moe_router_enable_expert_bias",
            "moe_router_topk_scaling_factor")})
    if t["family"] == "glm4_moe":  # DeepSeek-V3's routing and dense first layers
        moe.update({k: tc[k] for k in ("moe_layer_freq", "moe_router_num_groups", "moe_router_group_topk",
                                        "moe_router_enable_expert_bias", "moe_router_topk_scaling_factor")})
    if not t.get("mla"):  # MLA's args carry their own qk_layernorm
        moe["qk_layernorm"] = bool(tc.get("qk_layernorm"))
    return argparse.Namespace(**moe,
        num_layers=tc["num_layers"], hidden_size=tc["hidden_size"], ffn_hidden_size=tc["ffn_hidden_size"],
        num_attention_heads=tc["num_attention_heads"], num_query_groups=tc["num_query_groups"],
        group_query_attention=tc["num_query_groups"] != tc["num_attention_heads"],
        kv_channels=tc["kv_channels"], normalization=tc["normalization"], norm_epsilon=tc["layernorm_epsilon"],
        swiglu=t["swiglu"], openai_gelu=t["openai_gelu"],
        add_bias_linear=tc["add_bias_linear"], add_qkv_bias=tc["add_qkv_bias"],
        position_embedding_type=gm["position_embedding_type"], rotary_base=gm["rotary_base"],
        rotary_percent=gm["rotary_percent"], rotary_interleaved=False,
        max_position_embeddings=gm["max_sequence_length"], seq_length=gm["max_sequence_length"],
        vocab_size=t["vocab_size"], padded_vocab_size=t["padded_vocab_size"],
        make_vocab_size_divisible_by=MAKE_VOCAB_SIZE_DIVISIBLE_BY,
        untie_embeddings_and_output_weights=not t["tied"],
        params_dtype=tc["params_dtype"], fp16=False, bf16=False,
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        apply_query_key_layer_scaling=False, hidden_dropout=0.0, attention_dropout=0.0,
        transformer_impl="local", ckpt_format="torch", use_legacy_models=False,
    )


def _save_this_rank(hf_model_dir, out_dir, tp: int, ep: int = 1) -> Path:
    """Inside megatron_parallel(tp, 1, ep): build this rank's GPTModel, fill it, save its state_dict()."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state

    rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank() if ep > 1 else 0
    cfg = _config_dict(hf_model_dir)
    model = gpt_model_from_hf_config(cfg, tp, ep=ep)
    shard = megatron_shard(megatron_full_tensors(_read_hf_weights(hf_model_dir), cfg), cfg, tp, rank, ep, ep_rank)
    params = dict(model.named_parameters())
    params.update({n: b for n, b in model.named_buffers() if n in shard})  # e.g. the router's expert_bias
    missing = sorted(set(params) - set(shard))
    unused = sorted(set(shard) - set(params))
    if missing or unused:
        raise StateDictMismatch(f"reference mapping vs GPTModel parameters: missing {missing}, unused {unused}")
    with torch.no_grad():
        for name, p in params.items():
            if tuple(p.shape) != tuple(shard[name].shape):
                raise StateDictMismatch(f"{name}: model {tuple(p.shape)} vs mapped {tuple(shard[name].shape)}")
            p.copy_(shard[name])
    ckpt = {"model": model.state_dict_for_save_checkpoint(), "args": megatron_args(cfg, tp, 1, ep),
            "checkpoint_version": CHECKPOINT_VERSION, "iteration": 0}
    f = checkpoint_file(out_dir, rank, ep_rank=ep_rank, ep=ep)
    f.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, f)
    if dist.is_initialized():
        dist.barrier()
    if dist.get_rank() == 0:
        (Path(out_dir) / "latest_checkpointed_iteration.txt").write_text("release")
    return f


def save_with_megatron(hf_model_dir, out_dir, tp: int = 1, timeout: float = 120.0, ep: int = 1) -> Path:
    """A release checkpoint written from Megatron-Core's own GPTModel.state_dict() per TP rank:
    `out_dir/latest_checkpointed_iteration.txt` ("release") and
    `out_dir/release/mp_rank_TT[_EEE]/model_optim_rng.pt`. tp * ep > 1 runs under torchrun."""
    out_dir = Path(out_dir)
    if tp * ep == 1:
        with megatron_parallel(1):
            _save_this_rank(hf_model_dir, out_dir, 1)
    else:
        run_torchrun(["--save-from", str(hf_model_dir), "--ckpt", str(out_dir), "--tp", str(tp), "--ep", str(ep)],
                     nproc=tp * ep, timeout=timeout)
    return out_dir


# --------------------------------------------------------------------------------------------------
# script entry (one process per rank under torchrun)
# --------------------------------------------------------------------------------------------------

def _run_jobs(jobs_file) -> int:
    """--jobs: a JSON list of forward runs {ckpt, hf_config, tp, ep, input, out} and saves
    {save_from, ckpt, tp, ep}; every process of the world takes part in every job (world = tp * ep);
    rank 0 saves each forward run's logits."""
    import torch
    import torch.distributed as dist

    jobs = json.loads(Path(jobs_file).read_text())
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method="env://")
    try:
        for job in jobs:
            tp, ep, etp = int(job.get("tp", 1)), int(job.get("ep", 1)), job.get("etp")
            with megatron_parallel(tp, 1, ep, etp):
                if job.get("save_from"):
                    _save_this_rank(job["save_from"], job["ckpt"], tp, ep)
                    continue
                logits = _logits_this_rank(job["ckpt"], job["hf_config"], tp, job["input"], ep, etp)
            if dist.get_rank() == 0:
                torch.save(logits, job["out"])
        dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", help="JSON list of forward runs {ckpt, hf_config, tp, ep, input, out} (one world)")
    ap.add_argument("--ckpt", help="Megatron checkpoint directory (read, or written with --save-from)")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--ep", type=int, default=1, help="expert-parallel size (MoE); the world is tp * ep")
    ap.add_argument("--hf-config", help="HF config.json (forward mode)")
    ap.add_argument("--input", help="torch.save'd LongTensor [b, s] of token ids (forward mode)")
    ap.add_argument("--out", help="where rank 0 torch.saves the logits [b, s, vocab] (forward mode)")
    ap.add_argument("--save-from", help="HF model directory: write --ckpt from Megatron's state_dict()")
    a = ap.parse_args(argv)
    if a.jobs:
        return _run_jobs(a.jobs)
    if not a.ckpt:
        ap.error("--ckpt is required (or --jobs)")

    import torch

    with megatron_parallel(a.tp, 1, a.ep):
        import torch.distributed as dist

        if a.save_from:
            _save_this_rank(a.save_from, a.ckpt, a.tp, a.ep)
            return 0
        if not (a.hf_config and a.input and a.out):
            ap.error("forward mode needs --hf-config, --input and --out")
        logits = _logits_this_rank(a.ckpt, a.hf_config, a.tp, a.input, a.ep)
        if dist.get_rank() == 0:
            torch.save(logits, a.out)
        dist.barrier()
    return 0


if __name__ == "__main__":  # the guard matters: Megatron's checkpoint code spawns processes
    sys.exit(main())
