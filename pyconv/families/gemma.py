"""Gemma 2 and Gemma 3 (text): the Llama layout with a norm before and after both the attention
and the MLP, Gemma's `(1 + weight)` RMSNorms, GeGLU, embeddings scaled by sqrt(hidden), soft-capped
attention and final logits (Gemma 2), q/k norms per head and separate rope bases for sliding and
full layers (Gemma 3), sliding-window layers as `layer_types` lists them.

Megatron-Core 0.16.1 has neither post-norms nor soft-capping: names, shapes and args follow
Megatron-Bridge's Gemma bridges (NVIDIA-NeMo/Megatron-Bridge @067f987d, src/megatron/bridge/
models/gemma/gemma2_bridge.py, gemma3_bridge.py and their providers): the post-attention and
post-MLP norms are `post_layernorm` inside linear_proj and linear_fc2 (its
TERowParallelLinearLayerNorm), the norm weights are copied as stored and Megatron applies
`1 + weight` through `layernorm_zero_centered_gamma` (Megatron-LM's --apply-layernorm-1p), the
soft caps and query_pre_attn_scalar are the provider's fields. Sliding windows are Megatron-Core's
`window_size` (left = sliding_window - 1, as the bridge writes it) and `window_attn_skip_freq` as a
per-layer list (1: sliding) taken from HF's layer_types, where the bridge hard-codes Gemma 2's
alternation and Gemma 3's 5:1 pattern. transformers 5.24's modeling_gemma2.py / modeling_gemma3.py.

HF's `post_attention_layernorm` is the norm AFTER the attention here (Llama's is the pre-MLP one):
the pre-MLP norm is `pre_feedforward_layernorm`."""

from __future__ import annotations

from pyconv.errors import LayoutError
from pyconv.families import (
    GATED_FC1, LAYER, QKV, REPLICATED, ROW, Family, LanguageModelOf, ModelDims, TensorMapping, register_family,
    register_multimodal,
)
from pyconv.families.common import arg, original_hf_config, positive_number, rope_parameters, rope_theta
from pyconv.families.llama import EMBEDDING, HEAD, llama_dims, llama_hf_config, llama_megatron_args
from pyconv.families.qwen3 import QK_NORM

L = "model.layers.*."
M = "decoder.layers.*."


def _hidden(d: ModelDims):
    return (d.hidden,)


GEMMA2_LAYER = (
    TensorMapping((L + "input_layernorm.weight",),
                  {"te": M + "self_attention.linear_qkv.layer_norm_weight", "local": M + "input_layernorm.weight"},
                  REPLICATED, LAYER, _hidden),
    TensorMapping((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
                  M + "self_attention.linear_qkv.weight", QKV, LAYER, lambda d: (d.heads * d.head_dim, d.hidden)),
    TensorMapping((L + "self_attn.o_proj.weight",), M + "self_attention.linear_proj.weight", ROW, LAYER,
                  lambda d: (d.hidden, d.heads * d.head_dim)),
    TensorMapping((L + "post_attention_layernorm.weight",), M + "self_attention.linear_proj.post_layernorm.weight",
                  REPLICATED, LAYER, _hidden),
    TensorMapping((L + "pre_feedforward_layernorm.weight",),
                  {"te": M + "mlp.linear_fc1.layer_norm_weight", "local": M + "pre_mlp_layernorm.weight"},
                  REPLICATED, LAYER, _hidden),
    TensorMapping((L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), M + "mlp.linear_fc1.weight", GATED_FC1,
                  LAYER, lambda d: (d.ffn, d.hidden)),
    TensorMapping((L + "mlp.down_proj.weight",), M + "mlp.linear_fc2.weight", ROW, LAYER,
                  lambda d: (d.hidden, d.ffn)),
    TensorMapping((L + "post_feedforward_layernorm.weight",), M + "mlp.linear_fc2.post_layernorm.weight",
                  REPLICATED, LAYER, _hidden),
)
GEMMA2_MAPPINGS = EMBEDDING + GEMMA2_LAYER + HEAD
GEMMA3_MAPPINGS = EMBEDDING + GEMMA2_LAYER + QK_NORM + HEAD

# HF's activation -> Megatron-LM's openai_gelu (the tanh GELU: MB's fast_gelu is the same function).
_ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu_fast": True, "gelu": False}


def _activation(config: dict) -> str:
    return config.get("hidden_activation") or config.get("hidden_act") or "gelu_pytorch_tanh"


def gemma_dims(config: dict) -> ModelDims:
    if config.get("attention_bias"):
        raise LayoutError("config.json: Gemma with attention_bias: Megatron-Bridge's post-norm linear layer "
                          "(TERowParallelLinearLayerNorm) has no bias")
    if config.get("use_bidirectional_attention"):
        raise LayoutError("config.json: use_bidirectional_attention (EmbeddingGemma) is not a causal GPT model")
    if _activation(config) not in _ACTIVATIONS:
        raise LayoutError(f"config.json: hidden_activation '{_activation(config)}' has no Megatron equivalent "
                          f"(known: {', '.join(_ACTIVATIONS)})")
    return llama_dims({**config, "tie_word_embeddings": config.get("tie_word_embeddings", True)})


def layer_types(config: dict, layers: int, default_pattern: int) -> list[str]:
    """transformers' layer_types: given, or every default_pattern-th layer full, the others sliding."""
    given = config.get("layer_types")
    if given is None:
        pattern = int(config.get("sliding_window_pattern", config.get("_sliding_window_pattern", default_pattern)))
        given = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(layers)]
    if not isinstance(given, list) or len(given) != layers or set(given) - {"sliding_attention", "full_attention"}:
        raise LayoutError(f"config.json: layer_types must list {layers} of sliding_attention/full_attention, "
                          f"got {given!r}")
    return given


def _window_args(config: dict, dims: ModelDims, default_pattern: int) -> dict:
    window = config.get("sliding_window")
    kinds = layer_types(config, dims.num_layers, default_pattern)
    if window is None or "sliding_attention" not in kinds:
        return {"window_size": None, "window_attn_skip_freq": None}
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise LayoutError(f"config.json: sliding_window must be a positive integer, got {window!r}")
    return {"window_size": (window - 1, 0),
            "window_attn_skip_freq": [int(kind == "sliding_attention") for kind in kinds]}


def _common_args(config: dict, dims: ModelDims, theta: float) -> dict:
    args = llama_megatron_args({**config, "attention_bias": False, "mlp_bias": False,
                                "rope_parameters": {"rope_type": "default", "rope_theta": theta}}, dims)
    scalar = positive_number(config.get("query_pre_attn_scalar", dims.head_dim), "query_pre_attn_scalar")
    return {**args, "swiglu": False, "gated_linear_unit": True, "openai_gelu": _ACTIVATIONS[_activation(config)],
            "apply_layernorm_1p": True, "query_pre_attn_scalar": scalar, "softmax_scale": scalar ** -0.5}  # as transformers scales


def gemma2_megatron_args(config: dict, dims: ModelDims) -> dict:
    if rope_parameters(config)["rope_type"] != "default":
        raise LayoutError(f"config.json: Gemma 2 with rope_type '{rope_parameters(config)['rope_type']}': the "
                          "Megatron-Bridge Gemma 2 layer applies plain RoPE")
    caps = {key: None if config.get(key) is None else positive_number(config[key], key)
            for key in ("attn_logit_softcapping", "final_logit_softcapping")}
    return {**_common_args(config, dims, rope_theta(config)), **_window_args(config, dims, 2), **caps}


def gemma3_rope(config: dict) -> tuple[float, float, float]:
    """(sliding layers' theta, full layers' theta, the full layers' linear scaling factor):
    transformers 5's rope_parameters per layer type, or Gemma 3's older rope_local_base_freq,
    rope_theta and rope_scaling. Megatron-Bridge scales the full (global) layers' rope only."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        local, full = params.get("sliding_attention") or {}, params["full_attention"]
    else:
        local = {"rope_type": "default", "rope_theta": config.get("rope_local_base_freq", 10000.0)}
        full = {**rope_parameters(config), "rope_theta": config.get("rope_theta", 1000000.0)}
    if local.get("rope_type", "default") != "default":
        raise LayoutError(f"config.json: Gemma 3's sliding layers with rope_type '{local['rope_type']}': "
                          "Megatron-Bridge applies plain RoPE there")
    kind = full.get("rope_type", full.get("type", "default"))
    if kind not in ("default", "linear"):
        raise LayoutError(f"config.json: Gemma 3's full-attention layers with rope_type '{kind}': Megatron-Bridge "
                          "applies plain or linear RoPE there")
    factor = positive_number(full.get("factor", 1.0), "the full layers' rope factor") if kind == "linear" else 1.0
    return (positive_number(local.get("rope_theta", 10000.0), "the sliding layers' rope_theta"),
            positive_number(full.get("rope_theta", 1000000.0), "the full layers' rope_theta"), factor)


def gemma3_megatron_args(config: dict, dims: ModelDims) -> dict:
    if config.get("attn_logit_softcapping") or config.get("final_logit_softcapping"):
        raise LayoutError("config.json: Gemma 3 with logit soft-capping: Megatron-Bridge's Gemma 3 layers do not "
                          "cap logits")
    local, full, factor = gemma3_rope(config)
    # rotary_base: the full layers' (Megatron-Core's one rope); with rotary_base_local the bridge's
    # (local, global) pair; rope_scaling_factor: linear, on the full layers only (the bridge's)
    return {**_common_args(config, dims, full), **_window_args(config, dims, 6), "qk_layernorm": True,
            "rotary_base_local": local, "rope_scaling_factor": factor}


def _gemma_hf_config(args: dict, architecture: str, model_type: str) -> dict:
    config = llama_hf_config(args, architecture, model_type)
    original = original_hf_config(args)
    if "hidden_act" in original:  # older Gemma configs carry both names
        config["hidden_act"] = original["hidden_act"]
    else:
        del config["hidden_act"]
    scalar = args.get("query_pre_attn_scalar") or 1.0 / float(arg(args, "softmax_scale", "megatron args")) ** 2
    config.update(hidden_activation="gelu_pytorch_tanh" if args.get("openai_gelu", True) else "gelu",
                  query_pre_attn_scalar=int(round(scalar)) if abs(scalar - round(scalar)) < 1e-6 else scalar,
                  head_dim=args.get("kv_channels") or config.get("head_dim"), attention_bias=False)
    window, skip = args.get("window_size"), args.get("window_attn_skip_freq")
    layers = config["num_hidden_layers"]
    if window:
        if isinstance(skip, int):  # Megatron-Core: every skip-th layer full
            skip = [int((i + 1) % skip != 0) for i in range(layers)]
        sliding = skip if isinstance(skip, list) else [1] * layers
        config.update(sliding_window=int(window[0]) + 1,
                      layer_types=["sliding_attention" if s else "full_attention" for s in sliding])
    elif "sliding_window" not in config:
        config.update(sliding_window=None, layer_types=["full_attention"] * layers)
    return config


def gemma2_hf_config(args: dict) -> dict:
    config = _gemma_hf_config(args, "Gemma2ForCausalLM", "gemma2")
    config.update(attn_logit_softcapping=args.get("attn_logit_softcapping"),
                  final_logit_softcapping=args.get("final_logit_softcapping"))
    return config


def gemma3_hf_config(args: dict) -> dict:
    config = _gemma_hf_config(args, "Gemma3ForCausalLM", "gemma3_text")
    local, full = float(args.get("rotary_base_local", 10000.0)), float(args.get("rotary_base", 1000000.0))
    params = config.get("rope_parameters")
    if "rope_local_base_freq" in config:  # the older config: rope_theta, rope_local_base_freq, rope_scaling
        config.update(rope_theta=full, rope_local_base_freq=local)
    elif isinstance(params, dict) and "full_attention" in params:  # kept from the source config
        params.pop("rope_theta", None)
        params["sliding_attention"] = {**params.get("sliding_attention", {}), "rope_theta": local}
        params["full_attention"] = {**params["full_attention"], "rope_theta": full}
    else:
        config.pop("rope_theta", None)
        factor = float(args.get("rope_scaling_factor") or 1.0)
        scaling = {"rope_type": "linear", "factor": factor} if factor != 1.0 else {"rope_type": "default"}
        config["rope_parameters"] = {"sliding_attention": {"rope_type": "default", "rope_theta": local},
                                     "full_attention": {**scaling, "rope_theta": full}}
    return config


GEMMA2 = register_family(Family(
    name="gemma2",
    architectures=("Gemma2ForCausalLM",),
    mappings=GEMMA2_MAPPINGS,
    dims_from_hf=gemma_dims,
    megatron_args_from_hf=gemma2_megatron_args,
    hf_config_from_megatron=gemma2_hf_config,
    megatron_features=frozenset({"glu", "rmsnorm", "pos_rope", "norm_1p"}),
    nemo_classes=("nemo.collections.llm.gpt.model.gemma2", "Gemma2Model", "Gemma2Config"),
))
GEMMA3 = register_family(Family(
    name="gemma3",
    architectures=("Gemma3ForCausalLM",),
    mappings=GEMMA3_MAPPINGS,
    dims_from_hf=gemma_dims,
    megatron_args_from_hf=gemma3_megatron_args,
    hf_config_from_megatron=gemma3_hf_config,
    megatron_features=frozenset({"glu", "rmsnorm", "pos_rope", "norm_1p", "qk_layernorm"}),
    # NeMo 2.5's Gemma3Config lacks the rope_scaling_factor its model reads; its sized subclasses
    # have it: every field is written explicitly, so the 1B one's defaults do not matter.
    nemo_classes=("nemo.collections.llm.gpt.model.gemma3", "Gemma3Model", "Gemma3Config1B"),
))

# Megatron-Bridge writes the multimodal model as its own Gemma3VLModel (language_model.*, the SigLIP
# vision_tower.* replicated, multi_modal_projector.proj transposed); pyconv writes GPTModel layouts.
# transformers 5.24 saves the older names (language_model.model.*) and reads both.
register_multimodal(LanguageModelOf(
    architecture="Gemma3ForConditionalGeneration", text_architecture="Gemma3ForCausalLM",
    renames=(("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
             ("model.language_model.", "model."), ("lm_head.", "lm_head.")),
    other_parts=("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector."),
    described="the vision tower ('vision_tower.*') and the projector ('multi_modal_projector.*')"))
