"""Quantized schemes pyconv recognises but does not transform yet (compressed-tensors, MXFP4,
ModelOpt NVFP4, and tensors named like quantized weights without a declaration): `inspect` names
the scheme; HF -> HF resharding keeps every tensor and the config byte for byte; a dtype or a
Megatron-style target is refused by name, exit 2, nothing written (their packed bytes are never
read as numbers). DeepSeek's block fp8, which pyconv does transform, is tests/test_fp8*.py's."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyconv
from pyconv.errors import LayoutError


def _llama_like(hidden=64, layers=2):
    g = torch.Generator().manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(96, hidden, generator=g),
               "model.norm.weight": torch.ones(hidden), "lm_head.weight": torch.randn(96, hidden, generator=g)}
    for i in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{i}.self_attn.{name}.weight"] = torch.randn(hidden, hidden, generator=g)
        tensors[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
    return tensors


def compressed_tensors_fp8(path):
    tensors = {}
    for name, t in _llama_like().items():
        if name.endswith("proj.weight"):
            scale = t.abs().amax(dim=1, keepdim=True) / 448.0
            tensors[name] = (t / scale).to(torch.float8_e4m3fn)
            tensors[name.replace(".weight", ".weight_scale")] = scale
        else:
            tensors[name] = t
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "quantization_config": {
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {"num_bits": 8, "type": "float",
                                                                         "strategy": "channel"}}}}}
    return tensors, config, None, "compressed-tensors (float-quantized)"


def mxfp4(path):
    """GPT-OSS's experts: packed e2m1 pairs in *_blocks [E, rows, cols/32, 16] with e8m0 *_scales."""
    g = torch.Generator().manual_seed(1)
    tensors = {"model.embed_tokens.weight": torch.randn(96, 64, generator=g),
               "model.layers.0.mlp.experts.gate_up_proj_blocks": torch.randint(0, 255, (4, 128, 2, 16), generator=g,
                                                                               dtype=torch.uint8),
               "model.layers.0.mlp.experts.gate_up_proj_scales": torch.randint(118, 130, (4, 128, 2), generator=g,
                                                                               dtype=torch.uint8),
               "model.layers.0.mlp.experts.gate_up_proj_bias": torch.randn(4, 128, generator=g)}
    config = {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss",
              "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}}
    return tensors, config, None, "mxfp4"


def modelopt_nvfp4(path):
    g = torch.Generator().manual_seed(2)
    tensors = {"model.embed_tokens.weight": torch.randn(96, 64, generator=g),
               "model.layers.0.self_attn.q_proj.weight": torch.randint(0, 255, (64, 32), generator=g, dtype=torch.uint8),
               "model.layers.0.self_attn.q_proj.weight_scale": torch.rand(64, 4, generator=g).to(torch.float8_e4m3fn),
               "model.layers.0.self_attn.q_proj.weight_scale_2": torch.tensor(0.01),
               "model.layers.0.self_attn.q_proj.input_scale": torch.tensor(0.5)}
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    modelopt = {"producer": {"name": "modelopt", "version": "0.27.0"},
                "quantization": {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}}
    return tensors, config, modelopt, "modelopt NVFP4"


def undeclared(path):
    tensors, config, _, _ = compressed_tensors_fp8(path)
    del config["quantization_config"]
    return tensors, config, None, "undeclared (tensors named like quantized weights)"


SCHEMES = {"compressed_tensors_fp8": compressed_tensors_fp8, "mxfp4": mxfp4, "modelopt_nvfp4": modelopt_nvfp4,
           "undeclared": undeclared}


def _write(tmp_path, scheme):
    src = tmp_path / "src"
    src.mkdir()
    tensors, config, modelopt, method = SCHEMES[scheme](src)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(config))
    if modelopt is not None:
        (src / "hf_quant_config.json").write_text(json.dumps(modelopt))
    return src, tensors, method


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_named_resharded_as_it_is_and_refused_where_it_would_be_read(tmp_path, scheme):
    src, tensors, method = _write(tmp_path, scheme)
    summary = pyconv.open(src).summary()["quantization"]
    assert summary["method"] == method and summary["transformable"] is False
    r = subprocess.run([sys.executable, "-m", "pyconv", "inspect", str(src)], capture_output=True, text=True)
    assert f"  quantization: {method} (declared by" in r.stdout

    pyconv.reshard(src, tmp_path / "shards", to="hf", max_shard_size="20KB")
    out = {}
    for name in os.listdir(tmp_path / "shards"):
        if name.endswith(".safetensors"):
            out.update(load_file(tmp_path / "shards" / name))
    assert out.keys() == tensors.keys()
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and torch.equal(out[name].reshape(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8)), name
    assert json.loads((tmp_path / "shards" / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    if (src / "hf_quant_config.json").exists():
        assert (tmp_path / "shards" / "hf_quant_config.json").read_bytes() == (src / "hf_quant_config.json").read_bytes()

    with pytest.raises(LayoutError, match=f"{method.split(' (')[0]}.* quantization .*a dtype would cast around"):
        pyconv.reshard(src, tmp_path / "bf16", to="hf", dtype="bf16")
    for to in ("megatron", "torch_dist"):
        r = subprocess.run([sys.executable, "-m", "pyconv", "reshard", str(src), str(tmp_path / to), "--to", to],
                           capture_output=True, text=True)
        assert r.returncode == 2 and f"quantization (declared by " in r.stderr and f"cannot be written as {to}" in \
            r.stderr, r.stderr
        assert not (tmp_path / to).exists()
    assert not (tmp_path / "bf16").exists()
