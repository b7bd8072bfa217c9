"""Megatron-Core itself is the judge: it loads Megatron checkpoints strictly and its forward pass
must give the Hugging Face logits. These tests prove the harness (tests/megatron_harness.py) that
pyconv's Megatron reader/writer tests plug into."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import megatron_harness as mh

pytestmark = [
    pytest.mark.skipif(not mh.megatron_available(),
                       reason="megatron-core is not installed (pip install -c constraints.txt megatron-core psutil); "
                              "the Megatron-Core judge tests need it"),
    # Megatron-Core's own chatter on CPU without TransformerEngine / Apex
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
]

ATOL = 1e-5
LAYERS = 2


def _tiny_config(family):
    import transformers

    if family == "llama":  # GQA (2 kv heads for 4 query heads) and head_dim 24 != hidden/heads = 16
        return transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                        max_position_embeddings=64, rope_theta=5000.0, tie_word_embeddings=False)
    if family == "qwen2":
        return transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=48, n_layer=LAYERS, n_head=4,
                                       bos_token_id=0, eos_token_id=0)
    raise ValueError(family)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """{family: (model, hf_dir)}: fp32, non-trivial norms and biases, saved as sharded safetensors."""
    import torch
    import transformers

    root = tmp_path_factory.mktemp("megatron_harness_models")
    out = {}
    for seed, family in enumerate(("llama", "qwen2", "gpt2")):
        torch.manual_seed(seed)
        cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
               "gpt2": transformers.GPT2LMHeadModel}[family]
        model = cls(_tiny_config(family)).eval()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1:  # so that a mixed-up norm or bias cannot go unnoticed
                    p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln_" in name else 0.0))
        model.save_pretrained(root / family, max_shard_size="40KB")
        out[family] = (model, str(root / family))
    return out


def example_input(model):
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (2, 11), generator=g)


def _hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits.float()


def _layer_keys(i, *, ln_bias, qkv_bias, linear_bias):
    p = f"decoder.layers.{i}."
    keys = [p + "input_layernorm.weight"] + ([p + "input_layernorm.bias"] if ln_bias else [])
    keys += [p + "self_attention.linear_proj.weight"] + ([p + "self_attention.linear_proj.bias"] if linear_bias else [])
    keys += [p + "self_attention.linear_proj._extra_state", p + "self_attention.linear_qkv.weight"]
    keys += [p + "self_attention.linear_qkv.bias"] if qkv_bias else []
    keys += [p + "self_attention.linear_qkv._extra_state"]
    keys += [p + "pre_mlp_layernorm.weight"] + ([p + "pre_mlp_layernorm.bias"] if ln_bias else [])
    for fc in ("linear_fc1", "linear_fc2"):
        keys += [p + f"mlp.{fc}.weight"] + ([p + f"mlp.{fc}.bias"] if linear_bias else [])
        keys += [p + f"mlp.{fc}._extra_state"]
    return keys


# What Megatron-Core 0.16's GPTModel (local spec) puts in state_dict(), in its order. The local
# Column/RowParallelLinear report `_extra_state` (value None); a tied output layer has no weight
# but still its `_extra_state`.
def expected_keys(family):
    if family == "llama":  # RMSNorm, no biases, untied
        keys = ["embedding.word_embeddings.weight"]
        for i in range(LAYERS):
            keys += _layer_keys(i, ln_bias=False, qkv_bias=False, linear_bias=False)
        return keys + ["decoder.final_layernorm.weight", "output_layer.weight", "output_layer._extra_state"]
    if family == "qwen2":  # RMSNorm, qkv bias only, tied
        keys = ["embedding.word_embeddings.weight"]
        for i in range(LAYERS):
            keys += _layer_keys(i, ln_bias=False, qkv_bias=True, linear_bias=False)
        return keys + ["decoder.final_layernorm.weight", "output_layer._extra_state"]
    if family == "gpt2":  # LayerNorm with bias, all linear biases, learned positions, tied
        keys = ["embedding.word_embeddings.weight", "embedding.position_embeddings.weight"]
        for i in range(LAYERS):
            keys += _layer_keys(i, ln_bias=True, qkv_bias=True, linear_bias=True)
        return keys + ["decoder.final_layernorm.weight", "decoder.final_layernorm.bias", "output_layer._extra_state"]
    raise ValueError(family)


def _load(path):
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def test_translate_hf_config(tiny_models):
    import torch.nn.functional as F

    llama = mh.translate_hf_config(tiny_models["llama"][0].config, tp=2)
    tc, gm = llama["transformer_config"], llama["gpt_model"]
    assert (tc["num_query_groups"], tc["kv_channels"], tc["ffn_hidden_size"]) == (2, 24, 112)
    assert tc["normalization"] == "RMSNorm" and tc["gated_linear_unit"] and tc["activation_func"] is F.silu
    assert tc["layernorm_epsilon"] == 1e-6 and not tc["add_bias_linear"] and not tc["add_qkv_bias"]
    assert gm == dict(position_embedding_type="rope", rotary_percent=1.0, rotary_base=5000.0,
                      max_sequence_length=64, share_embeddings_and_output_weights=False)
    assert (llama["vocab_size"], llama["padded_vocab_size"]) == (96, 256)

    qwen2 = mh.translate_hf_config(tiny_models["qwen2"][0].config, tp=1)
    assert qwen2["transformer_config"]["add_qkv_bias"] and not qwen2["transformer_config"]["add_bias_linear"]
    assert qwen2["tied"] and qwen2["padded_vocab_size"] == 128

    gpt2 = mh.translate_hf_config(tiny_models["gpt2"][0].config, tp=1)
    tc, gm = gpt2["transformer_config"], gpt2["gpt_model"]
    assert tc["normalization"] == "LayerNorm" and tc["layernorm_epsilon"] == 1e-5
    assert tc["add_bias_linear"] and not tc["gated_linear_unit"] and tc["activation_func"] is mh.gelu_new
    assert (tc["ffn_hidden_size"], tc["kv_channels"]) == (192, 12)
    assert gm["position_embedding_type"] == "learned_absolute" and gm["share_embeddings_and_output_weights"]

    with pytest.raises(NotImplementedError):
        mh.translate_hf_config(dict(tiny_models["llama"][0].config.to_dict(), attention_bias=True), tp=1)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_tp1_megatron_saves_and_matches_hf(tiny_models, tmp_path, family):
    model, hf_dir = tiny_models[family]
    ckpt = mh.save_with_megatron(hf_dir, tmp_path / "mg", tp=1)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "release"
    saved = _load(ckpt / "release" / "mp_rank_00" / "model_optim_rng.pt")
    assert saved["checkpoint_version"] == 3.0 and saved["iteration"] == 0
    assert list(saved["model"]) == expected_keys(family)
    assert all(v is None for k, v in saved["model"].items() if k.endswith("_extra_state"))
    args = saved["args"]
    assert (args.vocab_size, args.padded_vocab_size, args.tensor_model_parallel_size) == (96, 128, 1)
    assert args.untie_embeddings_and_output_weights == (family == "llama")
    emb = saved["model"]["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 128 and (emb[96:] == emb[95]).all()  # padded by repeating the last row

    ids = example_input(model)
    got = mh.megatron_logits(ckpt, hf_dir, 1, ids)
    want = _hf_logits(model, ids)
    assert got.shape == want.shape == (2, 11, 96)
    assert (got - want).abs().max().item() < ATOL


def test_in_process_runs_leave_no_state(tiny_models, tmp_path):
    import torch
    import torch.distributed as dist

    current_device = torch.cuda.current_device
    model, hf_dir = tiny_models["gpt2"]
    mh.megatron_logits(mh.save_with_megatron(hf_dir, tmp_path / "mg", tp=1), hf_dir, 1, example_input(model))
    from megatron.core import parallel_state

    assert not dist.is_initialized() and not parallel_state.model_parallel_is_initialized()
    assert torch.cuda.current_device is current_device


def test_extra_state_may_be_omitted_and_mismatches_are_named(tiny_models, tmp_path):
    """Under strict=True a checkpoint may omit the `_extra_state` keys (a load pre-hook supplies
    them); a missing or renamed parameter is reported by name."""
    import torch
    model, hf_dir = tiny_models["qwen2"]
    ckpt = mh.save_with_megatron(hf_dir, tmp_path / "mg", tp=1)
    f = ckpt / "release" / "mp_rank_00" / "model_optim_rng.pt"
    saved = _load(f)
    saved["model"] = {k: v for k, v in saved["model"].items() if not k.endswith("_extra_state")}
    torch.save(saved, f)
    ids = example_input(model)
    assert (mh.megatron_logits(ckpt, hf_dir, 1, ids) - _hf_logits(model, ids)).abs().max().item() < ATOL

    sd = saved["model"]
    sd["decoder.layers.1.mlp.linear_fc9.weight"] = sd.pop("decoder.layers.1.mlp.linear_fc2.weight")
    torch.save(saved, f)
    with pytest.raises(mh.StateDictMismatch, match=r"(?s)missing: \['decoder.layers.1.mlp.linear_fc2.weight'\]"
                                                   r".*unexpected: \['decoder.layers.1.mlp.linear_fc9.weight'\]"):
        mh.megatron_logits(ckpt, hf_dir, 1, ids)


def test_tp2_llama_through_torchrun(tiny_models, tmp_path):
    model, hf_dir = tiny_models["llama"]
    ckpt = mh.save_with_megatron(hf_dir, tmp_path / "mg", tp=2)
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "release"
    shards = [_load(ckpt / "release" / f"mp_rank_{r:02d}" / "model_optim_rng.pt") for r in range(2)]
    for s in shards:
        assert list(s["model"]) == expected_keys("llama")
        assert (s["args"].tensor_model_parallel_size, s["args"].padded_vocab_size) == (2, 256)
        m = s["model"]
        assert m["embedding.word_embeddings.weight"].shape == (128, 64)  # 256 padded rows / 2
        assert m["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (96, 64)  # 1 group x (2q+k+v) x 24
        assert m["decoder.layers.0.self_attention.linear_proj.weight"].shape == (64, 48)
        assert m["decoder.layers.0.mlp.linear_fc1.weight"].shape == (112, 64)  # [gate_r; up_r], 56 each
        assert m["decoder.layers.0.mlp.linear_fc2.weight"].shape == (64, 56)
    # rank 1's vocab rows are all padding (true vocab 96 < 128): copies of the last true row
    emb = shards[0]["model"]["embedding.word_embeddings.weight"]
    assert (shards[1]["model"]["embedding.word_embeddings.weight"] == emb[95]).all()

    ids = example_input(model)
    got = mh.megatron_logits(ckpt, json.loads((Path(hf_dir) / "config.json").read_text()), 2, ids)
    assert got.shape == (2, 11, 96)
    assert (got - _hf_logits(model, ids)).abs().max().item() < ATOL
