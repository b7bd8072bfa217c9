"""Llama family (also Mistral and Llama 3): GQA, explicit head_dim, RMSNorm, SwiGLU, RoPE,
optional attention/MLP biases, tied or untied embeddings."""

from __future__ import annotations

from pyconv.errors import LayoutError
from pyconv.families import (
    FIRST_STAGE, GATED_FC1, LAST_STAGE, LAYER, QKV, REPLICATED, ROW, VOCAB, Family, ModelDims,
    TensorMapping, hf_int, register_family,
)
from pyconv.families.common import arg, original_hf_config, require, rope_parameters, rope_theta

L = "model.layers.*."
M = "decoder.layers.*."


def _q(d: ModelDims):
    return (d.heads * d.head_dim, d.hidden)


def _kv(d: ModelDims):
    return (d.groups * d.head_dim, d.hidden)


EMBEDDING = (
    TensorMapping(("model.embed_tokens.weight",), "embedding.word_embeddings.weight", VOCAB, FIRST_STAGE,
                  lambda d: (d.vocab, d.hidden)),
)
ATTENTION = (
    TensorMapping((L + "input_layernorm.weight",),
                  {"te": M + "self_attention.linear_qkv.layer_norm_weight", "local": M + "input_layernorm.weight"},
                  REPLICATED, LAYER, lambda d: (d.hidden,)),
    TensorMapping((L + "self_attn.q_proj.weight", L + "self_attn.k_proj.weight", L + "self_attn.v_proj.weight"),
                  M + "self_attention.linear_qkv.weight", QKV, LAYER, lambda d: _q(d)),
    TensorMapping((L + "self_attn.q_proj.bias", L + "self_attn.k_proj.bias", L + "self_attn.v_proj.bias"),
                  M + "self_attention.linear_qkv.bias", QKV, LAYER, lambda d: (_q(d)[0],), optional=True),
    TensorMapping((L + "self_attn.o_proj.weight",), M + "self_attention.linear_proj.weight", ROW, LAYER,
                  lambda d: (d.hidden, d.heads * d.head_dim)),
    TensorMapping((L + "self_attn.o_proj.bias",), M + "self_attention.linear_proj.bias", REPLICATED, LAYER,
                  lambda d: (d.hidden,), optional=True),
)
# TransformerEngine fuses the pre-MLP norm into linear_fc1 of a dense MLP; a MoE layer keeps
# pre_mlp_layernorm (the router needs the normalised input) under both namings.
DENSE_MLP = (
    TensorMapping((L + "post_attention_layernorm.weight",),
                  {"te": M + "mlp.linear_fc1.layer_norm_weight", "local": M + "pre_mlp_layernorm.weight"},
                  REPLICATED, LAYER, lambda d: (d.hidden,), layers="dense"),
    TensorMapping((L + "mlp.gate_proj.weight", L + "mlp.up_proj.weight"), M + "mlp.linear_fc1.weight", GATED_FC1,
                  LAYER, lambda d: (d.ffn, d.hidden), layers="dense"),
    TensorMapping((L + "mlp.gate_proj.bias", L + "mlp.up_proj.bias"), M + "mlp.linear_fc1.bias", GATED_FC1,
                  LAYER, lambda d: (d.ffn,), optional=True, layers="dense"),
    TensorMapping((L + "mlp.down_proj.weight",), M + "mlp.linear_fc2.weight", ROW, LAYER,
                  lambda d: (d.hidden, d.ffn), layers="dense"),
    TensorMapping((L + "mlp.down_proj.bias",), M + "mlp.linear_fc2.bias", REPLICATED, LAYER,
                  lambda d: (d.hidden,), optional=True, layers="dense"),
)
MOE_NORM = (
    TensorMapping((L + "post_attention_layernorm.weight",), M + "pre_mlp_layernorm.weight", REPLICATED, LAYER,
                  lambda d: (d.hidden,), layers="moe"),
)
HEAD = (
    TensorMapping(("model.norm.weight",), "decoder.final_layernorm.weight", REPLICATED, LAST_STAGE,
                  lambda d: (d.hidden,)),
    TensorMapping(("lm_head.weight",), "output_layer.weight", VOCAB, LAST_STAGE,
                  lambda d: (d.vocab, d.hidden), optional=True),
)
LLAMA_MAPPINGS = EMBEDDING + ATTENTION + DENSE_MLP + HEAD


def llama_dims(config: dict) -> ModelDims:
    hidden = hf_int(config, "hidden_size")
    heads = hf_int(config, "num_attention_heads")
    head_dim = config.get("head_dim") or hidden // heads
    return ModelDims(
        num_layers=hf_int(config, "num_hidden_layers"), hidden=hidden, heads=heads,
        groups=hf_int(config, "num_key_value_heads", default=heads), head_dim=int(head_dim),
        ffn=hf_int(config, "intermediate_size"), vocab=hf_int(config, "vocab_size"),
        max_positions=hf_int(config, "max_position_embeddings", default=2048),
        tied=bool(config.get("tie_word_embeddings", False)))


# Megatron-Core applies Llama 3.x's rope scaling with these fixed (rotary_pos_embedding.py,
# RotaryEmbedding._apply_scaling, 0.16.1); only the factor is an argument.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def llama_rope_args(config: dict) -> dict:
    """Megatron-LM's rope scaling args for an HF config's rope_type: llama3 (use_rope_scaling,
    rope_scaling_factor), linear (rotary_seq_len_interpolation_factor: positions divided by the
    factor); any other scaling has no Megatron-Core equivalent for this layout and is refused."""
    params = rope_parameters(config)
    kind = params["rope_type"]
    if kind == "default":
        return {}
    if kind == "linear":
        return {"rotary_seq_len_interpolation_factor": float(params["factor"])}
    if kind == "llama3":
        fixed = {k: params.get(k) for k in LLAMA3_ROPE}
        if any(float(fixed[k] if fixed[k] is not None else -1) != v for k, v in LLAMA3_ROPE.items()):
            raise LayoutError(f"config.json: llama3 rope scaling with {fixed}: Megatron-Core applies it with "
                              f"{LLAMA3_ROPE} only")
        return {"use_rope_scaling": True, "rope_scaling_factor": float(params["factor"])}
    raise LayoutError(f"config.json: rope_type '{kind}' has no Megatron-Core equivalent for this model "
                      "(plain, linear and llama3 rope are written)")


def llama_megatron_args(config: dict, dims: ModelDims) -> dict:
    # o_proj's bias: attention_out_bias where the config has it (Seed-OSS), else attention_bias (Llama).
    qkv_bias = bool(config.get("attention_bias"))
    out_bias = bool(config.get("attention_out_bias", qkv_bias))
    mlp_bias = bool(config.get("mlp_bias"))
    if out_bias != mlp_bias:
        raise LayoutError(f"{'o_proj' if out_bias else 'the MLP'} has a bias and "
                          f"{'the MLP' if out_bias else 'o_proj'} has none: Megatron-Core has one add_bias_linear "
                          "for linear_proj and the MLP")
    return dict(
        num_layers=dims.num_layers, hidden_size=dims.hidden, ffn_hidden_size=dims.ffn,
        num_attention_heads=dims.heads, num_query_groups=dims.groups, group_query_attention=dims.groups != dims.heads,
        kv_channels=dims.head_dim, normalization="RMSNorm", swiglu=True, add_bias_linear=mlp_bias,
        add_qkv_bias=qkv_bias, position_embedding_type="rope", rotary_base=rope_theta(config),
        rotary_percent=1.0, max_position_embeddings=dims.max_positions, seq_length=dims.max_positions,
        norm_epsilon=float(config.get("rms_norm_eps", 1e-6)),
        untie_embeddings_and_output_weights=not dims.tied, vocab_size=dims.vocab, **llama_rope_args(config))


def llama_hf_config(args: dict, architecture: str = "LlamaForCausalLM", model_type: str = "llama") -> dict:
    where = "megatron args"
    config = original_hf_config(args)
    hidden, heads = arg(args, "hidden_size", where), arg(args, "num_attention_heads", where)
    groups = args.get("num_query_groups") if args.get("group_query_attention") else heads
    config.update(
        architectures=[architecture], model_type=model_type, hidden_size=hidden,
        intermediate_size=arg(args, "ffn_hidden_size", where), num_hidden_layers=arg(args, "num_layers", where),
        num_attention_heads=heads, num_key_value_heads=groups or heads, hidden_act="silu",
        max_position_embeddings=args.get("max_position_embeddings") or args.get("seq_length"),
        rms_norm_eps=float(args.get("norm_epsilon", 1e-6)),
        tie_word_embeddings=not args.get("untie_embeddings_and_output_weights", False),
        vocab_size=require(args, "vocab_size", where) if "vocab_size" in args else arg(args, "padded_vocab_size", where))
    # The args do not carry token ids; some configs default pad_token_id past a small vocabulary
    # (Phi3Config 32000, SmolLM3Config 128004), which transformers refuses to build.
    config.setdefault("pad_token_id", None)
    head_dim = args.get("kv_channels") or hidden // heads
    if head_dim != hidden // heads or "head_dim" in config:  # Qwen2 configs have no head_dim field
        config["head_dim"] = head_dim
    if model_type == "llama":
        config.update(attention_bias=bool(args.get("add_qkv_bias") or args.get("add_bias_linear")),
                      mlp_bias=bool(args.get("add_bias_linear")))
    elif model_type == "seed_oss":
        config.update(attention_bias=bool(args.get("add_qkv_bias") or args.get("add_bias_linear")),
                      attention_out_bias=bool(args.get("add_bias_linear")), mlp_bias=bool(args.get("add_bias_linear")))
    theta = float(args.get("rotary_base", 10000))
    if isinstance(config.get("rope_parameters"), dict):
        config["rope_parameters"] = {**config["rope_parameters"], "rope_theta": theta}
    elif args.get("use_rope_scaling") or args.get("rotary_seq_len_interpolation_factor"):
        config["rope_parameters"] = {"rope_theta": theta, **(
            {"rope_type": "llama3", "factor": float(args.get("rope_scaling_factor", 8.0)), **LLAMA3_ROPE}
            if args.get("use_rope_scaling") else
            {"rope_type": "linear", "factor": float(args["rotary_seq_len_interpolation_factor"])})}
    else:
        config["rope_theta"] = theta
    return config


LLAMA = register_family(Family(
    name="llama",
    architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    mappings=LLAMA_MAPPINGS,
    dims_from_hf=llama_dims,
    megatron_args_from_hf=llama_megatron_args,
    hf_config_from_megatron=llama_hf_config,
    megatron_features=frozenset({"swiglu", "rmsnorm", "pos_rope"}),
    megatron_optional=frozenset({"linear_bias"}),
    nemo_classes=("nemo.collections.llm.gpt.model.llama", "LlamaModel", "LlamaConfig"),
    mindformers=True,
    ignored_hf=(L + "self_attn.rotary_emb.inv_freq",),
))
