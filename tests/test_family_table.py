"""A family is one table: a family defined here, in the test, and registered with that one call
converts HF -> Megatron (tp 2, pp 2) -> torch_dist -> NeMo 2 -> HF bitwise, with no other pyconv
code knowing about it. And families are told apart from Megatron args by declared features,
checked for overlap when registered."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import pyconv
from pyconv import families
from pyconv.families import Family, family_for_megatron_args, megatron_features, register_family
from pyconv.families.llama import LLAMA_MAPPINGS, llama_dims, llama_hf_config, llama_megatron_args
from pyconv.errors import FormatError

from test_output_hashes import make_source


def pico_llama(name="pico_llama", features=None) -> Family:
    return Family(
        name=name,
        architectures=("PicoLlamaForCausalLM",),
        mappings=LLAMA_MAPPINGS,
        dims_from_hf=llama_dims,
        megatron_args_from_hf=llama_megatron_args,
        hf_config_from_megatron=lambda args: llama_hf_config(args, "PicoLlamaForCausalLM", "pico_llama"),
        megatron_features=features,
        nemo_classes=("nemo.collections.llm.gpt.model.llama", "LlamaModel", "LlamaConfig"),
    )


@pytest.fixture
def registered():
    families.family_names()  # the built-in tables first
    family = register_family(pico_llama())
    yield family
    del families._FAMILIES[family.name]


def _tensors(path: Path) -> dict[str, bytes]:
    """name -> raw bytes of every tensor of an HF directory, read with the safetensors library."""
    from safetensors.numpy import load_file

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update({k: (str(v.dtype), v.shape, v.tobytes()) for k, v in load_file(file).items()})
    return out


def test_a_family_defined_in_a_test_converts_through_every_megatron_format(registered, tmp_path):
    src = make_source("llama", tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["PicoLlamaForCausalLM"], model_type="pico_llama")
    (src / "config.json").write_text(json.dumps(config))

    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2, pp=2)
    assert pyconv.open(tmp_path / "meg").catalog.details["family"] == "pico_llama"
    pyconv.reshard(tmp_path / "meg", tmp_path / "dist", to="torch_dist")
    pyconv.reshard(tmp_path / "dist", tmp_path / "nemo", to="nemo")
    io = json.loads((tmp_path / "nemo" / "context" / "io.json").read_text())
    assert "LlamaConfig" in json.dumps(io)  # the NeMo class named by the family table
    pyconv.reshard(tmp_path / "nemo", tmp_path / "back", to="hf")

    assert _tensors(tmp_path / "back") == _tensors(src)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["architectures"] == ["PicoLlamaForCausalLM"]


def test_families_are_told_apart_from_megatron_args_alone():
    args = {"swiglu": True, "normalization": "RMSNorm", "position_embedding_type": "rope", "num_experts": 8,
            "qk_layernorm": True, "add_bias_linear": False, "moe_router_score_function": "softmax"}
    assert family_for_megatron_args(args, "args").name == "qwen3_moe"
    assert family_for_megatron_args({**args, "num_experts": None}, "args").name == "qwen3"
    assert family_for_megatron_args({**args, "num_experts": None, "qk_layernorm": False,
                                     "add_qkv_bias": True}, "args").name == "qwen2"
    mla = {**args, "multi_latent_attention": True, "moe_router_score_function": "sigmoid"}
    assert family_for_megatron_args(mla, "args").name == "deepseek_v3"
    assert family_for_megatron_args({**mla, "moe_router_score_function": "softmax"}, "args").name == "deepseek_v2"
    gpt = {"normalization": "LayerNorm", "position_embedding_type": "learned_absolute", "add_bias_linear": True}
    assert family_for_megatron_args(gpt, "args").name == "gpt2"
    assert family_for_megatron_args({**gpt, "bert_binary_head": True}, "args").name == "bert"
    assert megatron_features({"add_qkv_bias": True, "add_bias_linear": True}) == {"layernorm", "linear_bias"}
    with pytest.raises(FormatError, match="none matches"):
        family_for_megatron_args({**args, "normalization": "LayerNorm"}, "args")


def test_a_family_whose_features_overlap_another_is_refused_when_registered():
    families.family_names()
    with pytest.raises(ValueError, match="would match both it and llama"):
        register_family(pico_llama("pico_overlap", frozenset({"swiglu", "rmsnorm", "pos_rope"})))
    assert "pico_overlap" not in families._FAMILIES
