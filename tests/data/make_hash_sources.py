"""Writes tests/data/hash_matrix_sources.json: for each source checkpoint of the output-hash matrix
(tests/test_output_hashes.py), its config.json and the names, dtypes and shapes of the tensors
transformers' save_pretrained writes for it. The test fills the tensors with a fixed arithmetic
pattern, so the matrix does not depend on transformers' initialisation or version.

Run once, by hand, with transformers installed: python tests/data/make_hash_sources.py [NAME ...]
(names: add or replace only those sources, leaving the others as recorded)
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

import transformers

COMMON = dict(vocab_size=96, max_position_embeddings=64)
LLAMA_LIKE = dict(COMMON, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2)
MLA = dict(COMMON, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_rope_head_dim=8, v_head_dim=16,
           qk_nope_head_dim=16, first_k_dense_replace=1)

SOURCES = {
    "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **{**LLAMA_LIKE, "intermediate_size": 112}, head_dim=24, tie_word_embeddings=False)),
    "llama_bias": (transformers.LlamaForCausalLM, transformers.LlamaConfig(
        **LLAMA_LIKE, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)),
    "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(**LLAMA_LIKE, sliding_window=32)),
    "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**LLAMA_LIKE, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(
        **LLAMA_LIKE, head_dim=24, rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3_moe": (transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(
        **LLAMA_LIKE, head_dim=24, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, tie_word_embeddings=False)),
    "mixtral": (transformers.MixtralForCausalLM, transformers.MixtralConfig(
        **LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": (transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig(
        **LLAMA_LIKE, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=4,
        num_experts_per_tok=2)),
    "deepseek_v3": (transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config(
        **MLA, q_lora_rank=48, n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2,
        num_experts_per_tok=4, routed_scaling_factor=2.5)),
    "deepseek_v3_no_q_lora": (transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config(
        **MLA, q_lora_rank=None, n_routed_experts=4, n_shared_experts=2, n_group=1, topk_group=1,
        num_experts_per_tok=2, routed_scaling_factor=1.0)),
    "deepseek_v2": (transformers.DeepseekV2ForCausalLM, transformers.DeepseekV2Config(
        **MLA, n_routed_experts=8, routed_scaling_factor=1.5, q_lora_rank=None, n_shared_experts=2,
        num_experts_per_tok=2)),
    "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
        **LLAMA_LIKE, head_dim=16, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0)),
    "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
        **LLAMA_LIKE, head_dim=16, sliding_window=8, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}})),
    "olmo2": (transformers.Olmo2ForCausalLM, transformers.Olmo2Config(
        **LLAMA_LIKE, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "glm4_moe": (transformers.Glm4MoeForCausalLM, transformers.Glm4MoeConfig(
        **LLAMA_LIKE, head_dim=16, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, use_qk_norm=True, attention_bias=True,
        partial_rotary_factor=0.5, num_nextn_predict_layers=0)),
    "olmoe": (transformers.OlmoeForCausalLM, transformers.OlmoeConfig(
        **{**LLAMA_LIKE, "intermediate_size": 32}, num_experts=4, num_experts_per_tok=2, pad_token_id=0,
        bos_token_id=1, eos_token_id=2)),
    "deepseek_v32": (transformers.DeepseekV32ForCausalLM, transformers.DeepseekV32Config(
        **MLA, q_lora_rank=48, n_routed_experts=8, n_shared_experts=1, n_group=4, topk_group=2,
        num_experts_per_tok=4, routed_scaling_factor=2.5, index_n_heads=2, index_head_dim=16, index_topk=8,
        num_nextn_predict_layers=0)),
    "gpt2": (transformers.GPT2LMHeadModel, transformers.GPT2Config(
        vocab_size=96, n_positions=64, n_embd=48, n_layer=4, n_head=4, activation_function="gelu_new")),
    "bert": (transformers.MegatronBertForPreTraining, transformers.MegatronBertConfig(
        vocab_size=96, hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, type_vocab_size=2, layer_norm_eps=1e-5)),
}


def describe(model_cls, config) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model_cls(config).save_pretrained(tmp)
        cfg = json.load(open(os.path.join(tmp, "config.json")))
        tensors = []
        for name in sorted(os.listdir(tmp)):
            if name.endswith(".safetensors"):
                with open(os.path.join(tmp, name), "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
                header.pop("__metadata__", None)
                tensors += [[k, v["dtype"], v["shape"]] for k, v in sorted(header.items(), key=lambda kv:
                                                                            kv[1]["data_offsets"])]
    cfg.pop("transformers_version", None)
    return {"config": cfg, "tensors": tensors}


def main(names: list[str]) -> None:
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hash_matrix_sources.json")
    if names:
        with open(path) as f:
            out = json.load(f)
        out.update({name: describe(*SOURCES[name]) for name in names})
        with open(path, "w") as f:
            json.dump(out, f, indent=1, sort_keys=True)
            f.write("\n")
        return
    out = {name: describe(cls, config) for name, (cls, config) in SOURCES.items()}
    # DeepSeek-V3 with its multi-token-prediction layer (HF layer num_hidden_layers), as released.
    mtp = json.loads(json.dumps(out["deepseek_v3"]))
    layers = mtp["config"]["num_hidden_layers"]
    last = f"model.layers.{layers - 1}."
    hidden = mtp["config"]["hidden_size"]
    extra = [[n.replace(last, f"model.layers.{layers}."), d, s] for n, d, s in mtp["tensors"] if n.startswith(last)]
    extra += [[f"model.layers.{layers}.{leaf}", "F32", shape] for leaf, shape in (
        ("enorm.weight", [hidden]), ("hnorm.weight", [hidden]), ("eh_proj.weight", [hidden, 2 * hidden]),
        ("shared_head.norm.weight", [hidden]))]
    # copies of the embedding and the head, equal to them (the "copy" field names the tensor copied)
    extra += [[f"model.layers.{layers}.embed_tokens.weight", "F32", [96, hidden], "model.embed_tokens.weight"],
              [f"model.layers.{layers}.shared_head.head.weight", "F32", [96, hidden], "lm_head.weight"]]
    mtp["tensors"] += extra
    mtp["config"]["num_nextn_predict_layers"] = 1
    out["deepseek_v3_mtp"] = mtp
    with open(path, "w") as f:
        json.dump(out, f, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {path}: {len(out)} sources", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
