"""A single file is a source: model.safetensors or a pytorch_model.bin state dict (with the
config.json and tokenizer files beside it), a Megatron-Core model_optim_rng.pt of a tp = pp = 1
run. Each converts to what its directory converts to."""

from __future__ import annotations

import filecmp
import os

import pytest
import torch

import pyconv
from pyconv.errors import FormatError


def _same(a, b, names):
    for name in names:
        assert filecmp.cmp(os.path.join(a, name), os.path.join(b, name), shallow=False), name


def test_one_safetensors_file(tiny_models, tmp_path):
    src = tiny_models["llama"][1]
    single = tmp_path / "single"
    pyconv.reshard(src, single, to="hf", max_shard_size="1GB")  # one model.safetensors, config, tokenizer
    ckpt = pyconv.open(single / "model.safetensors")
    assert (ckpt.format, ckpt.architecture) == ("hf", "LlamaForCausalLM")
    pyconv.reshard(single / "model.safetensors", tmp_path / "a", to="megatron", tp=2)
    pyconv.reshard(single, tmp_path / "b", to="megatron", tp=2)
    names = [os.path.relpath(os.path.join(d, f), tmp_path / "b") for d, _, fs in os.walk(tmp_path / "b") for f in fs]
    assert "tokenizer.json" in names
    _same(tmp_path / "a", tmp_path / "b", names)


def test_one_pytorch_model_bin(tiny_models, tmp_path):
    model, _ = tiny_models["gpt2"]
    (tmp_path / "bin").mkdir()
    torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "bin" / "pytorch_model.bin")
    model.config.architectures = ["GPT2LMHeadModel"]
    model.config.to_json_file(tmp_path / "bin" / "config.json")
    assert pyconv.open(tmp_path / "bin" / "pytorch_model.bin").format == "hf"
    pyconv.reshard(tmp_path / "bin" / "pytorch_model.bin", tmp_path / "a", to="hf")
    pyconv.reshard(tmp_path / "bin", tmp_path / "b", to="hf")
    _same(tmp_path / "a", tmp_path / "b", ["model.safetensors", "config.json"])


def test_one_megatron_core_rank_file(tiny_models, tmp_path):
    src = tiny_models["qwen2"][1]
    pyconv.reshard(src, tmp_path / "meg", to="megatron")
    rank_file = tmp_path / "meg" / "release" / "mp_rank_00" / "model_optim_rng.pt"
    assert pyconv.open(rank_file).format == "megatron"
    pyconv.reshard(rank_file, tmp_path / "a", to="hf")
    pyconv.reshard(tmp_path / "meg", tmp_path / "b", to="hf")
    _same(tmp_path / "a", tmp_path / "b", ["model.safetensors", "config.json"])


def test_one_rank_of_a_larger_run_is_refused(tiny_models, tmp_path):
    pyconv.reshard(tiny_models["llama"][1], tmp_path / "meg", to="megatron", tp=2)
    rank_file = tmp_path / "meg" / "release" / "mp_rank_01" / "model_optim_rng.pt"
    with pytest.raises(FormatError) as e:
        pyconv.open(rank_file)
    assert str(e.value) == (f"{rank_file}: one rank of a checkpoint with tensor_model_parallel_size=2: convert the "
                            "directory holding all of its mp_rank_* directories")
