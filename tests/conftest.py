"""Tiny models built from configs with transformers (never downloaded), as session fixtures."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

TOKENIZER_FILES = {
    # Stand-ins: pyconv carries these over byte for byte; their content does not matter.
    "tokenizer.json": json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}) + "\n",
    "tokenizer_config.json": json.dumps({"model_max_length": 128}) + "\n",
    "special_tokens_map.json": json.dumps({"bos_token": "<s>"}) + "\n",
}


def _tiny_config(family: str):
    import transformers

    if family == "llama":
        # GQA (2 kv heads for 4 query heads) and head_dim 24 != hidden/heads = 16.
        return transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=6,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=24,
                                        max_position_embeddings=64, tie_word_embeddings=False)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=96, n_positions=64, n_embd=48, n_layer=6, n_head=4)
    if family == "qwen2":
        return transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True)
    raise ValueError(family)


def build_tiny_model(family: str, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = _tiny_config(family)
    model_cls = {"llama": transformers.LlamaForCausalLM, "gpt2": transformers.GPT2LMHeadModel,
                 "qwen2": transformers.Qwen2ForCausalLM}[family]
    model = model_cls(config).eval()
    # Non-trivial norms and biases so that a mixed-up tensor cannot go unnoticed.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name or "ln_" in name else 0.0))
    return model


def save_tiny_model(model, path, **kwargs):
    model.save_pretrained(path, **kwargs)
    for name, text in TOKENIZER_FILES.items():
        with open(os.path.join(path, name), "w") as f:
            f.write(text)
    return str(path)


FAMILIES = ("llama", "gpt2", "qwen2")


@pytest.fixture(autouse=True)
def _run_outside_the_source_tree(tmp_path, monkeypatch):
    """Subprocesses (`python -m pyconv`) must import the installed package, not ./pyconv."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{family: (model, path)} saved as fp32 safetensors, sharded at 40 KB."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for family in FAMILIES:
        model = build_tiny_model(family)
        out[family] = (model, save_tiny_model(model, root / family, max_shard_size="40KB"))
    return out


def example_input(model):
    import torch

    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (2, 11), generator=g)


def load_hf_tensors(path):
    """Every tensor of an HF directory, through the safetensors library (the independent judge)."""
    from safetensors.torch import load_file

    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, name)))
    return out


def hf_logits(model, ids):
    """transformers' fp32 logits for the ids, no grad."""
    import torch

    with torch.no_grad():
        return model(ids).logits.float()


def config_json(path) -> dict:
    """The config.json of a checkpoint directory."""
    return json.loads((Path(path) / "config.json").read_text())


def round_trip(src, tmp_path, to: str, **options) -> Path:
    """src -> `to` (with options) -> hf under tmp_path; asserts every tensor comes back bit for bit
    and config.json as it was. Returns the HF directory."""
    import pyconv
    import torch

    pyconv.reshard(src, Path(tmp_path) / "mid", to=to, **options)
    back = Path(tmp_path) / "hf"
    pyconv.reshard(Path(tmp_path) / "mid", back, to="hf")
    got, want = load_hf_tensors(back), load_hf_tensors(src)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want), [k for k in want if not torch.equal(got[k], want[k])]
    assert config_json(back) == config_json(src)
    return back


def forget_hf_config(checkpoint) -> None:
    """Deletes the HF config pyconv keeps in the args of every rank file of a Megatron checkpoint,
    so that reading it back must rebuild the config from the args alone."""
    import torch

    for rank_file in sorted(Path(checkpoint).glob("*/mp_rank_*/model_optim_rng.pt")):
        state = torch.load(rank_file, weights_only=False)
        del state["args"].pyconv_hf_config
        torch.save(state, rank_file)


def with_config(src, dst, **changes) -> Path:
    """dst: every file of src linked, config.json rewritten with `changes`."""
    dst = Path(dst)
    dst.mkdir(parents=True)
    for entry in os.listdir(src):
        if entry != "config.json":
            os.symlink(os.path.join(src, entry), dst / entry)
    (dst / "config.json").write_text(json.dumps({**config_json(src), **changes}))
    return dst


def nontrivial_vectors(model):
    """Every 1-D parameter (norm weights, biases) drawn at random, norms around 1: a tiny model
    built from a config has them all ones or zeros, where a mix-up of two goes unnoticed."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def flatten_state_dict(tree: dict, prefix: str = "") -> dict:
    """{dotted.name: leaf} of a nested state dict (a legacy Megatron model tree)."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten_state_dict(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def file_tree(root) -> dict:
    """Every file under root by relative path -> its bytes."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            full = os.path.join(dirpath, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
    return out
