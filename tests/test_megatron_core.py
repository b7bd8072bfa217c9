"""Megatron-Core itself as the judge: it loads pyconv's Megatron output strictly into a
GPTModel (CPU, gloo) and computes transformers' logits; a checkpoint Megatron-Core saved
converts to HF with transformers' logits."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import megatron_harness as mh
import pyconv
from conftest import config_json as config_of
from conftest import example_input, hf_logits

pytestmark = [
    pytest.mark.skipif(not mh.megatron_available(), reason="megatron-core is not installed"),
    pytest.mark.filterwarnings("ignore::UserWarning:megatron"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning:megatron"),
]
ATOL = 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_megatron_core_loads_pyconv_output_tp1(tiny_models, tmp_path, family):
    model, src = tiny_models[family]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=1, megatron_naming="local")
    ids = example_input(model)
    got = mh.megatron_logits(tmp_path / "meg", config_of(src), 1, ids)  # load_state_dict(strict=True)
    assert (got - hf_logits(model, ids)).abs().max().item() < ATOL


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_megatron_core_loads_pyconv_output_tp2_torchrun(tiny_models, tmp_path, family):
    model, src = tiny_models[family]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2, megatron_naming="local")
    ids = example_input(model)
    got = mh.megatron_logits(tmp_path / "meg", config_of(src), 2, ids)
    assert (got - hf_logits(model, ids)).abs().max().item() < ATOL


@pytest.mark.parametrize("tp", [1, 2])
def test_checkpoint_saved_by_megatron_core_converts_to_hf(tiny_models, tmp_path, tp):
    model, src = tiny_models["llama"]
    ckpt = mh.save_with_megatron(src, tmp_path / "mg", tp=tp)  # Megatron-Core's own state_dict()
    info = pyconv.open(ckpt).summary()
    assert (info["family"], info["tp"], info["pp"]) == ("llama", tp, 1)
    pyconv.reshard(ckpt, tmp_path / "hf", to="hf")
    out = load_file(tmp_path / "hf" / "model.safetensors")
    for name, tensor in model.state_dict().items():
        assert torch.equal(out[name], tensor), name
    loaded, loading = type(model).from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"]
    ids = example_input(model)
    assert torch.equal(hf_logits(model, ids), hf_logits(loaded.eval(), ids))
    assert os.path.exists(tmp_path / "hf" / "config.json")
