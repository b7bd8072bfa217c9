"""MindSpore Transformers (MindFormers) safetensors checkpoints.

Fixtures are built here from tiny transformers models by MindFormers' own documented
transforms (QKVConvertOp: q/k/v fused per query group; ConcatConvertOp: gate/up row-interleaved
unless use_interleaved_weight_layout_mlp is false; the legacy w_qkv / w_gate_hidden names),
written with the safetensors library; pyconv's output is judged by safetensors and
transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers
from safetensors.torch import save_file

import pyconv
from conftest import TOKENIZER_FILES, example_input, load_hf_tensors


def _model(kind: str):
    torch.manual_seed(3)
    if kind == "llama":  # GQA, head_dim != hidden/heads, every linear with a bias, untied head
        config = transformers.LlamaConfig(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                          attention_bias=True, mlp_bias=True, max_position_embeddings=64,
                                          tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config)
    else:  # Qwen2: q/k/v biases only, tied head
        config = transformers.Qwen2Config(vocab_size=80, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                          tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def _fuse_qkv(q, k, v, groups, head_dim):
    """MindFormers' QKVConvertOp: [groups, (heads/groups + 2) * head_dim, ...] flattened."""
    tail = q.shape[1:]
    return torch.cat([q.reshape(groups, -1, *tail), k.reshape(groups, head_dim, *tail),
                      v.reshape(groups, head_dim, *tail)], dim=1).reshape(-1, *tail)


def _fuse_fc1(gate, up, interleaved):
    """MindFormers' ConcatConvertOp: rows g0, u0, g1, u1... (or [gate; up] when not interleaved)."""
    if not interleaved:
        return torch.cat([gate, up], dim=0)
    return torch.stack([gate, up], dim=1).reshape(-1, *gate.shape[1:])


MCORE = {"model.embed_tokens.weight": "embedding.word_embeddings.weight", "model.norm.weight":
         "decoder.final_layernorm.weight", "lm_head.weight": "output_layer.weight"}
MCORE_LAYER = {"input_layernorm.weight": "input_layernorm.weight",
               "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
               "self_attn.o_proj": "self_attention.linear_proj", "mlp.down_proj": "mlp.linear_fc2",
               "self_attn.q_proj": "self_attention.linear_q", "self_attn.k_proj": "self_attention.linear_k",
               "self_attn.v_proj": "self_attention.linear_v", "mlp.gate_proj": "mlp.gating",
               "mlp.up_proj": "mlp.hidden", "qkv": "self_attention.linear_qkv", "fc1": "mlp.linear_fc1"}
LEGACY = {"model.embed_tokens.weight": "model.tok_embeddings.embedding_weight", "model.norm.weight":
          "model.norm_out.weight", "lm_head.weight": "lm_head.weight"}
LEGACY_LAYER = {"input_layernorm.weight": "attention_norm.weight", "post_attention_layernorm.weight":
                "ffn_norm.weight", "self_attn.o_proj": "attention.wo", "mlp.down_proj": "feed_forward.w2",
                "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
                "self_attn.v_proj": "attention.wv", "mlp.gate_proj": "feed_forward.w1",
                "mlp.up_proj": "feed_forward.w3", "qkv": "attention.w_qkv", "fc1": "feed_forward.w_gate_hidden"}


def mindformers_state(model, naming="mcore", fused=True, interleaved=True):
    """The MindFormers state dict of an HF model, built by MindFormers' transforms."""
    top, per_layer = (MCORE, MCORE_LAYER) if naming == "mcore" else (LEGACY, LEGACY_LAYER)
    prefix = "decoder.layers." if naming == "mcore" else "model.layers."
    hf = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    cfg = model.config
    groups, head_dim = cfg.num_key_value_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    out = {}
    for name, value in hf.items():
        if name in top:
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            out[top[name]] = value
    for layer in range(cfg.num_hidden_layers):
        src, dst = f"model.layers.{layer}.", f"{prefix}{layer}."
        for suffix in ("weight", "bias"):
            q = hf.get(f"{src}self_attn.q_proj.{suffix}")
            gate = hf.get(f"{src}mlp.gate_proj.{suffix}")
            if fused and q is not None:
                out[f"{dst}{per_layer['qkv']}.{suffix}"] = _fuse_qkv(
                    q, hf[f"{src}self_attn.k_proj.{suffix}"], hf[f"{src}self_attn.v_proj.{suffix}"], groups, head_dim)
            if fused and gate is not None:
                out[f"{dst}{per_layer['fc1']}.{suffix}"] = _fuse_fc1(gate, hf[f"{src}mlp.up_proj.{suffix}"], interleaved)
            for part in ("self_attn.o_proj", "mlp.down_proj") + (() if fused else (
                    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")):
                if f"{src}{part}.{suffix}" in hf:
                    out[f"{dst}{per_layer[part]}.{suffix}"] = hf[f"{src}{part}.{suffix}"]
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            out[f"{dst}{per_layer[norm]}"] = hf[f"{src}{norm}"]
    return {k: v.contiguous() for k, v in out.items()}


def save_mindformers(model, path, files=1, interleaved=True, **kwargs):
    os.makedirs(path)
    state = mindformers_state(model, interleaved=interleaved, **kwargs)
    names = list(state)
    if files == 1:
        save_file(state, os.path.join(path, "model.safetensors"))
    else:
        weight_map = {}
        for i in range(files):
            part = names[i::files]
            file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
            save_file({n: state[n] for n in part}, os.path.join(path, file))
            weight_map.update((n, file) for n in part)
        with open(os.path.join(path, "param_name_map.json"), "w") as f:
            json.dump({"weight_map": weight_map}, f)
    config = hf_config(model)
    if not interleaved:
        config["use_interleaved_weight_layout_mlp"] = False
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)
    for name, text in TOKENIZER_FILES.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return str(path)


def hf_config(model) -> dict:
    return {**model.config.to_dict(), "architectures": [type(model).__name__]}


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def assert_bitwise(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(bits(a[name]), bits(b[name])), name


def hf_reference(model):
    return {k: v for k, v in model.state_dict().items()
            if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}


def logits(model, path):
    loaded, info = type(model).from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    x = example_input(model)
    with torch.no_grad():
        return loaded.eval()(x).logits, model(x).logits


VARIANTS = [  # (model, naming, fused, interleaved, files)
    ("llama", "mcore", True, True, 1),
    ("llama", "mcore", True, False, 2),
    ("qwen2", "mcore", False, True, 1),
    ("llama", "legacy", True, True, 3),
    ("qwen2", "legacy", False, True, 1),
]


@pytest.mark.parametrize("kind,naming,fused,interleaved,files", VARIANTS)
def test_mindformers_to_hf_is_bitwise_and_transformers_agrees(tmp_path, kind, naming, fused, interleaved, files):
    model = _model(kind)
    src = save_mindformers(model, tmp_path / "ms", files=files, interleaved=interleaved, naming=naming, fused=fused)
    before = {n: open(os.path.join(src, n), "rb").read() for n in os.listdir(src)}
    ckpt = pyconv.open(src)
    assert ckpt.format == "mindspore"
    pyconv.reshard(src, tmp_path / "hf", to="hf")
    assert_bitwise(load_hf_tensors(tmp_path / "hf"), hf_reference(model))
    got, want = logits(model, tmp_path / "hf")
    assert torch.equal(got, want)
    for name in TOKENIZER_FILES:
        assert open(tmp_path / "hf" / name).read() == TOKENIZER_FILES[name]
    config = json.load(open(tmp_path / "hf" / "config.json"))
    assert "use_interleaved_weight_layout_mlp" not in config
    assert before == {n: open(os.path.join(src, n), "rb").read() for n in os.listdir(src)}  # source untouched


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_hf_to_mindformers_equals_mindformers_own_layout(tmp_path, kind):
    from safetensors.torch import load_file

    model = _model(kind)
    model.save_pretrained(tmp_path / "hf")
    pyconv.reshard(tmp_path / "hf", tmp_path / "ms", to="mindspore")
    written = load_file(tmp_path / "ms" / "model.safetensors")
    assert_bitwise(written, mindformers_state(model))
    config = json.load(open(tmp_path / "ms" / "config.json"))
    assert config["use_interleaved_weight_layout_mlp"] is True
    # And back: bitwise, and loads.
    pyconv.reshard(tmp_path / "ms", tmp_path / "back", to="hf")
    assert_bitwise(load_hf_tensors(tmp_path / "back"), hf_reference(model))


def test_sharded_bf16_round_trip_writes_the_name_map(tmp_path):
    model = _model("llama")
    model.save_pretrained(tmp_path / "hf")
    pyconv.reshard(tmp_path / "hf", tmp_path / "ms", to="mindspore", dtype="bf16", max_shard_size="40KB")
    files = sorted(n for n in os.listdir(tmp_path / "ms") if n.endswith(".safetensors"))
    assert len(files) > 2
    weight_map = json.load(open(tmp_path / "ms" / "param_name_map.json"))["weight_map"]
    assert set(weight_map.values()) == set(files)
    assert set(weight_map) == set(mindformers_state(model))
    pyconv.reshard(tmp_path / "ms", tmp_path / "back", to="hf")
    want = {k: v.to(torch.bfloat16) for k, v in hf_reference(model).items()}
    assert_bitwise(load_hf_tensors(tmp_path / "back"), want)
    assert json.load(open(tmp_path / "back" / "config.json"))["dtype"] == "bfloat16"


def test_mindformers_to_megatron_tp2_pp2_and_back_is_bitwise(tmp_path):
    model = _model("llama")
    src = save_mindformers(model, tmp_path / "ms")
    pyconv.reshard(src, tmp_path / "mg", to="megatron", tp=2, pp=2, megatron_naming="local")
    assert pyconv.open(tmp_path / "mg").format == "megatron"
    pyconv.reshard(tmp_path / "mg", tmp_path / "hf", to="hf")
    assert_bitwise(load_hf_tensors(tmp_path / "hf"), hf_reference(model))
    pyconv.reshard(tmp_path / "mg", tmp_path / "ms2", to="mindspore")
    assert pyconv.verify(src, tmp_path / "ms2").equal


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pyconv", *map(str, args)], capture_output=True, text=True)


def test_bad_mindformers_checkpoints_fail_clearly(tmp_path):
    model = _model("qwen2")
    src = save_mindformers(model, tmp_path / "ms")
    os.remove(os.path.join(src, "config.json"))
    r = run_cli("reshard", src, tmp_path / "out")
    assert r.returncode == 2 and "config.json" in r.stderr and src in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "out")

    state = mindformers_state(model)
    state["decoder.layers.0.self_attention.linear_qkv.weight"] = state[
        "decoder.layers.0.self_attention.linear_qkv.weight"][:-8].contiguous()
    bad = tmp_path / "bad"
    os.makedirs(bad)
    save_file(state, bad / "model.safetensors")
    json.dump(hf_config(model), open(bad / "config.json", "w"))
    r = run_cli("reshard", bad, tmp_path / "out")
    assert r.returncode == 2 and "linear_qkv.weight" in r.stderr and "expected" in r.stderr, r.stderr

    state = mindformers_state(model)
    state["decoder.layers.0.self_attention.linear_extra.weight"] = torch.zeros(2)
    extra = tmp_path / "extra"
    os.makedirs(extra)
    save_file(state, extra / "model.safetensors")
    json.dump(hf_config(model), open(extra / "config.json", "w"))
    r = run_cli("reshard", extra, tmp_path / "out")
    assert r.returncode == 2 and "linear_extra" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "out")


def test_only_llama_like_families_are_written(tmp_path):
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    r = run_cli("reshard", tmp_path / "gpt2", tmp_path / "out", "--to", "mindspore")
    assert r.returncode == 2 and "Llama-like" in r.stderr, r.stderr


def test_plain_hf_directories_are_still_hf(tmp_path):
    model = _model("qwen2")
    model.save_pretrained(tmp_path / "hf")
    assert pyconv.open(tmp_path / "hf").format == "hf"
