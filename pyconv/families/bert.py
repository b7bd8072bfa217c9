"""BERT as Hugging Face's MegatronBert holds it (`MegatronBertForPreTraining`): pre-norm layers
(`attention.ln`, `ln`), separate query/key/value, learned positions and token types, a pooler,
the masked-LM head (`cls.predictions.transform` + a vocab-sized bias, decoder tied to the word
embedding) and the next-sentence head (`cls.seq_relationship`).

Megatron-side names are Megatron-Core's BertModel names (`encoder.layers.N...`,
`embedding.tokentype_embeddings`, `pooler.dense`, `lm_head.dense`, `lm_head.layer_norm`,
`output_layer.bias`, `binary_head`);
legacy Megatron checkpoints map onto them in pyconv.formats.legacy_megatron."""

from __future__ import annotations

from dataclasses import dataclass

from pyconv.families import (
    COLUMN, FIRST_STAGE, LAST_STAGE, LAYER, QKV, REPLICATED, ROW, VOCAB, Family, ModelDims, TensorMapping, hf_int,
    register_family,
)
from pyconv.families.common import arg, original_hf_config

L = "bert.encoder.layer.*."
M = "encoder.layers.*."  # Megatron-Core's BertModel calls its TransformerBlock `encoder`
DEFAULT_TOKEN_TYPES = 2  # Megatron's num_tokentypes when the binary head is on


@dataclass(frozen=True)
class BertDims(ModelDims):
    token_types: int = DEFAULT_TOKEN_TYPES  # rows of the token type (segment) embedding


def _token_types(d: ModelDims) -> int:
    return getattr(d, "token_types", DEFAULT_TOKEN_TYPES)


def _hidden(d: ModelDims):
    return (d.hidden,)


def _norm(hf: str, te: str, local: str):
    return TensorMapping((L + hf,), {"te": M + te, "local": M + local}, REPLICATED, LAYER, _hidden)


def _last(hf: str, megatron: str, shape, rule=REPLICATED, optional=False):
    return TensorMapping((hf,), megatron, rule, LAST_STAGE, shape, optional=optional)


BERT_MAPPINGS = (
    TensorMapping(("bert.embeddings.word_embeddings.weight",), "embedding.word_embeddings.weight", VOCAB,
                  FIRST_STAGE, lambda d: (d.vocab, d.hidden)),
    TensorMapping(("bert.embeddings.position_embeddings.weight",), "embedding.position_embeddings.weight",
                  REPLICATED, FIRST_STAGE, lambda d: (d.max_positions, d.hidden)),
    TensorMapping(("bert.embeddings.token_type_embeddings.weight",), "embedding.tokentype_embeddings.weight",
                  REPLICATED, FIRST_STAGE, lambda d: (_token_types(d), d.hidden)),
    _norm("attention.ln.weight", "self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    _norm("attention.ln.bias", "self_attention.linear_qkv.layer_norm_bias", "input_layernorm.bias"),
    TensorMapping(tuple(L + f"attention.self.{n}.weight" for n in ("query", "key", "value")),
                  M + "self_attention.linear_qkv.weight", QKV, LAYER, lambda d: (d.hidden, d.hidden)),
    TensorMapping(tuple(L + f"attention.self.{n}.bias" for n in ("query", "key", "value")),
                  M + "self_attention.linear_qkv.bias", QKV, LAYER, _hidden),
    TensorMapping((L + "attention.output.dense.weight",), M + "self_attention.linear_proj.weight", ROW, LAYER,
                  lambda d: (d.hidden, d.hidden)),
    TensorMapping((L + "attention.output.dense.bias",), M + "self_attention.linear_proj.bias", REPLICATED, LAYER,
                  _hidden),
    _norm("ln.weight", "mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    _norm("ln.bias", "mlp.linear_fc1.layer_norm_bias", "pre_mlp_layernorm.bias"),
    TensorMapping((L + "intermediate.dense.weight",), M + "mlp.linear_fc1.weight", COLUMN, LAYER,
                  lambda d: (d.ffn, d.hidden)),
    TensorMapping((L + "intermediate.dense.bias",), M + "mlp.linear_fc1.bias", COLUMN, LAYER, lambda d: (d.ffn,)),
    TensorMapping((L + "output.dense.weight",), M + "mlp.linear_fc2.weight", ROW, LAYER, lambda d: (d.hidden, d.ffn)),
    TensorMapping((L + "output.dense.bias",), M + "mlp.linear_fc2.bias", REPLICATED, LAYER, _hidden),
    _last("bert.encoder.ln.weight", "encoder.final_layernorm.weight", _hidden),
    _last("bert.encoder.ln.bias", "encoder.final_layernorm.bias", _hidden),
    _last("bert.pooler.dense.weight", "pooler.dense.weight", lambda d: (d.hidden, d.hidden)),
    _last("bert.pooler.dense.bias", "pooler.dense.bias", _hidden),
    _last("cls.predictions.transform.dense.weight", "lm_head.dense.weight", lambda d: (d.hidden, d.hidden)),
    _last("cls.predictions.transform.dense.bias", "lm_head.dense.bias", _hidden),
    _last("cls.predictions.transform.LayerNorm.weight", "lm_head.layer_norm.weight", _hidden),
    _last("cls.predictions.transform.LayerNorm.bias", "lm_head.layer_norm.bias", _hidden),
    _last("cls.predictions.bias", "output_layer.bias", lambda d: (d.vocab,), rule=VOCAB),
    # The decoder shares the word embedding (transformers neither saves nor needs it).
    _last("cls.predictions.decoder.weight", "output_layer.weight", lambda d: (d.vocab, d.hidden), rule=VOCAB,
          optional=True),
    _last("cls.seq_relationship.weight", "binary_head.weight", lambda d: (2, d.hidden), optional=True),
    _last("cls.seq_relationship.bias", "binary_head.bias", lambda d: (2,), optional=True),
)


def bert_dims(config: dict) -> BertDims:
    hidden = hf_int(config, "hidden_size")
    heads = hf_int(config, "num_attention_heads")
    return BertDims(num_layers=hf_int(config, "num_hidden_layers"), hidden=hidden, heads=heads, groups=heads,
                    head_dim=hidden // heads, ffn=hf_int(config, "intermediate_size"),
                    vocab=hf_int(config, "vocab_size"), max_positions=hf_int(config, "max_position_embeddings"),
                    tied=True, token_types=hf_int(config, "type_vocab_size", default=DEFAULT_TOKEN_TYPES))


def bert_megatron_args(config: dict, dims: ModelDims) -> dict:
    return dict(
        num_layers=dims.num_layers, hidden_size=dims.hidden, ffn_hidden_size=dims.ffn,
        num_attention_heads=dims.heads, num_query_groups=dims.heads, group_query_attention=False,
        kv_channels=dims.head_dim, normalization="LayerNorm", swiglu=False, add_bias_linear=True, add_qkv_bias=True,
        position_embedding_type="learned_absolute", max_position_embeddings=dims.max_positions,
        seq_length=dims.max_positions, norm_epsilon=float(config.get("layer_norm_eps", 1e-12)),
        layernorm_epsilon=float(config.get("layer_norm_eps", 1e-12)), num_tokentypes=_token_types(dims),
        bert_binary_head=True, untie_embeddings_and_output_weights=False, vocab_size=dims.vocab,
        tokenizer_type="BertWordPieceLowerCase")


def bert_hf_config(args: dict) -> dict:
    """MegatronBertConfig from Megatron args (num_tokentypes as the token type embedding has rows)."""
    where = "megatron args"
    config = original_hf_config(args)
    hidden = arg(args, "hidden_size", where)
    eps = args.get("norm_epsilon", args.get("layernorm_epsilon"))
    config.update(
        architectures=["MegatronBertForPreTraining"], model_type="megatron-bert", hidden_size=hidden,
        num_attention_heads=arg(args, "num_attention_heads", where), num_hidden_layers=arg(args, "num_layers", where),
        intermediate_size=args.get("ffn_hidden_size") or 4 * hidden,
        max_position_embeddings=arg(args, "max_position_embeddings", where),
        vocab_size=args["vocab_size"] if args.get("vocab_size") else arg(args, "padded_vocab_size", where),
        type_vocab_size=args.get("num_tokentypes") or DEFAULT_TOKEN_TYPES, tie_word_embeddings=True)
    if eps is not None:
        config["layer_norm_eps"] = float(eps)
    config.setdefault("layer_norm_eps", 1e-12)  # MegatronBertConfig's default, as HF's converter leaves it
    config.setdefault("hidden_act", "gelu")
    config.setdefault("pad_token_id", 0)
    return config


BERT = register_family(Family(
    name="bert",
    architectures=("MegatronBertForPreTraining",),
    mappings=BERT_MAPPINGS,
    dims_from_hf=bert_dims,
    megatron_args_from_hf=bert_megatron_args,
    hf_config_from_megatron=bert_hf_config,
    megatron_features=frozenset({"bert"}),
    megatron_optional=frozenset({"layernorm", "pos_learned_absolute", "linear_bias", "qkv_bias"}),
    legacy_megatron_stack="encoder",
    ignored_hf=("bert.embeddings.position_ids",),
))
