"""GPT-2: learned positions, LayerNorm with bias, GELU, biases everywhere, tied lm_head, and
HF Conv1D weights stored [in, out] (transposed relative to Megatron's [out, in])."""

from __future__ import annotations

from pyconv.families import (
    COLUMN, FIRST_STAGE, LAST_STAGE, LAYER, QKV, REPLICATED, ROW, VOCAB, Family, ModelDims, TensorMapping, hf_int,
    register_family,
)
from pyconv.families.common import arg, original_hf_config

L = "transformer.h.*."
M = "decoder.layers.*."


def _norm(hf: str, te: str, local: str):
    return TensorMapping((L + hf,), {"te": M + te, "local": M + local}, REPLICATED, LAYER, lambda d: (d.hidden,))


GPT2_MAPPINGS = (
    TensorMapping(("transformer.wte.weight",), "embedding.word_embeddings.weight", VOCAB, FIRST_STAGE,
                  lambda d: (d.vocab, d.hidden)),
    TensorMapping(("transformer.wpe.weight",), "embedding.position_embeddings.weight", REPLICATED, FIRST_STAGE,
                  lambda d: (d.max_positions, d.hidden)),
    _norm("ln_1.weight", "self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    _norm("ln_1.bias", "self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    TensorMapping((L + "attn.c_attn.weight",), M + "self_attention.linear_qkv.weight", QKV, LAYER,
                  lambda d: (d.hidden, 3 * d.hidden), transposed=True),
    TensorMapping((L + "attn.c_attn.bias",), M + "self_attention.linear_qkv.bias", QKV, LAYER,
                  lambda d: (3 * d.hidden,)),
    TensorMapping((L + "attn.c_proj.weight",), M + "self_attention.linear_proj.weight", ROW, LAYER,
                  lambda d: (d.hidden, d.hidden), transposed=True),
    TensorMapping((L + "attn.c_proj.bias",), M + "self_attention.linear_proj.bias", REPLICATED, LAYER,
                  lambda d: (d.hidden,)),
    _norm("ln_2.weight", "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    _norm("ln_2.bias", "mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
    TensorMapping((L + "mlp.c_fc.weight",), M + "mlp.linear_fc1.weight", COLUMN, LAYER,
                  lambda d: (d.hidden, d.ffn), transposed=True),
    TensorMapping((L + "mlp.c_fc.bias",), M + "mlp.linear_fc1.bias", COLUMN, LAYER, lambda d: (d.ffn,)),
    TensorMapping((L + "mlp.c_proj.weight",), M + "mlp.linear_fc2.weight", ROW, LAYER,
                  lambda d: (d.ffn, d.hidden), transposed=True),
    TensorMapping((L + "mlp.c_proj.bias",), M + "mlp.linear_fc2.bias", REPLICATED, LAYER, lambda d: (d.hidden,)),
    TensorMapping(("transformer.ln_f.weight",), "decoder.final_layernorm.weight", REPLICATED, LAST_STAGE,
                  lambda d: (d.hidden,)),
    TensorMapping(("transformer.ln_f.bias",), "decoder.final_layernorm.bias", REPLICATED, LAST_STAGE,
                  lambda d: (d.hidden,)),
    TensorMapping(("lm_head.weight",), "output_layer.weight", VOCAB, LAST_STAGE,
                  lambda d: (d.vocab, d.hidden), optional=True),
)


def gpt2_dims(config: dict) -> ModelDims:
    hidden = hf_int(config, "n_embd")
    heads = hf_int(config, "n_head")
    return ModelDims(num_layers=hf_int(config, "n_layer"), hidden=hidden, heads=heads, groups=heads,
                     head_dim=hidden // heads, ffn=config.get("n_inner") or 4 * hidden,
                     vocab=hf_int(config, "vocab_size"), max_positions=hf_int(config, "n_positions"),
                     tied=bool(config.get("tie_word_embeddings", True)))


# HF's tanh approximations of GELU, Megatron-LM's --openai-gelu; the exact GELU otherwise.
_TANH_GELU = ("gelu_new", "gelu_fast", "gelu_pytorch_tanh")


def gpt2_megatron_args(config: dict, dims: ModelDims) -> dict:
    return dict(
        openai_gelu=config.get("activation_function", "gelu_new") in _TANH_GELU,
        num_layers=dims.num_layers, hidden_size=dims.hidden, ffn_hidden_size=dims.ffn,
        num_attention_heads=dims.heads, num_query_groups=dims.heads, group_query_attention=False,
        kv_channels=dims.head_dim, normalization="LayerNorm", swiglu=False, add_bias_linear=True, add_qkv_bias=True,
        position_embedding_type="learned_absolute", max_position_embeddings=dims.max_positions,
        seq_length=dims.max_positions, norm_epsilon=float(config.get("layer_norm_epsilon", 1e-5)),
        untie_embeddings_and_output_weights=not dims.tied, vocab_size=dims.vocab)


def gpt2_hf_config(args: dict) -> dict:
    where = "megatron args"
    config = original_hf_config(args)
    config.update(
        architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=arg(args, "hidden_size", where),
        n_head=arg(args, "num_attention_heads", where), n_layer=arg(args, "num_layers", where),
        n_positions=arg(args, "max_position_embeddings", where),
        layer_norm_epsilon=float(args.get("norm_epsilon", 1e-5)),
        vocab_size=args["vocab_size"] if "vocab_size" in args else arg(args, "padded_vocab_size", where),
        tie_word_embeddings=not args.get("untie_embeddings_and_output_weights", False))
    config.setdefault("activation_function", "gelu_new" if args.get("openai_gelu", True) else "gelu")
    ffn = args.get("ffn_hidden_size")
    if ffn and (ffn != 4 * config["n_embd"] or config.get("n_inner")):  # None means 4 * n_embd
        config["n_inner"] = ffn
    else:
        config.setdefault("n_inner", None)
    return config


GPT2 = register_family(Family(
    name="gpt2",
    architectures=("GPT2LMHeadModel",),
    mappings=GPT2_MAPPINGS,
    dims_from_hf=gpt2_dims,
    megatron_args_from_hf=gpt2_megatron_args,
    hf_config_from_megatron=gpt2_hf_config,
    megatron_features=frozenset({"layernorm", "pos_learned_absolute"}),
    megatron_optional=frozenset({"linear_bias", "qkv_bias"}),
    nemo_classes=("nemo.collections.llm.gpt.model.base", "GPTModel", "GPTConfig"),
    legacy_megatron_stack="decoder",
    ignored_hf=(L + "attn.bias", L + "attn.masked_bias"),
))
