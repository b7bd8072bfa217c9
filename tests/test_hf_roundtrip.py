"""HF -> HF end to end, judged by transformers and the safetensors library, not by pyconv's reader."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from safetensors import safe_open

import pyconv
from conftest import FAMILIES, TOKENIZER_FILES, example_input

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_all(path):
    """Every tensor of an HF directory through the safetensors library."""
    tensors = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), framework="pt") as f:
                for key in f.keys():
                    assert key not in tensors, f"{key} stored twice"
                    tensors[key] = f.get_tensor(key)
    return tensors


def bits(t):
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


def load_with_transformers(model, path):
    loaded, info = type(model).from_pretrained(path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info.get("mismatched_keys"), info
    return loaded.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_reshard_is_bitwise_identical_and_loads(tiny_models, tmp_path, family):
    model, src = tiny_models[family]
    dst = tmp_path / "out"
    report = pyconv.reshard(src, dst, to="hf", max_shard_size="30KB")
    assert report.files >= 3 and report.bytes > 0

    shards = sorted(n for n in os.listdir(dst) if n.endswith(".safetensors"))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.load(open(dst / "model.safetensors.index.json"))
    assert set(index["weight_map"].values()) == set(shards)
    source, output = load_all(src), load_all(dst)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in output.values())
    assert source.keys() == output.keys()
    for name in source:
        assert source[name].dtype == output[name].dtype and torch.equal(bits(source[name]), bits(output[name])), name

    loaded = load_with_transformers(model, dst)
    x = example_input(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)
    for name, text in TOKENIZER_FILES.items():
        assert (dst / name).read_text() == text
    assert (dst / "generation_config.json").exists()


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cast_equals_torch_and_loads(tiny_models, tmp_path, family, dtype):
    model, src = tiny_models[family]
    dst = tmp_path / "out"
    pyconv.reshard(src, dst, dtype=dtype)
    assert os.path.exists(dst / "model.safetensors") and not os.path.exists(dst / "model.safetensors.index.json")
    source, output = load_all(src), load_all(dst)
    for name, t in source.items():
        expected = t.to(TORCH_DTYPES[dtype])
        assert output[name].dtype == expected.dtype, name
        assert torch.equal(bits(output[name]), bits(expected)), name
    config = json.load(open(dst / "config.json"))
    assert config["dtype"] == str(TORCH_DTYPES[dtype]).removeprefix("torch.")
    loaded = load_with_transformers(model, dst)
    assert loaded.dtype == TORCH_DTYPES[dtype]
    reference = type(model).from_pretrained(src, dtype=TORCH_DTYPES[dtype]).eval()
    x = example_input(model)
    with torch.no_grad():
        assert torch.equal(reference(x).logits, loaded(x).logits)


def test_bf16_back_to_fp32_is_exact(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    pyconv.reshard(src, tmp_path / "bf16", dtype="bf16")
    pyconv.reshard(tmp_path / "bf16", tmp_path / "fp32", dtype="fp32", max_shard_size="25KB")
    a, b = load_all(tmp_path / "bf16"), load_all(tmp_path / "fp32")
    for name in a:
        assert b[name].dtype == torch.float32 and torch.equal(a[name].float(), b[name]), name


def test_reads_pytorch_model_bin(tiny_models, tmp_path):
    model, _ = tiny_models["llama"]
    src = tmp_path / "bin"
    src.mkdir()
    model.config.save_pretrained(src)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, src / "pytorch_model.bin")
    dst = tmp_path / "out"
    pyconv.reshard(src, dst, max_shard_size="30KB")
    output = load_all(dst)
    assert output.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(output[name], t), name
    loaded = load_with_transformers(model, dst)
    x = example_input(model)
    with torch.no_grad():
        assert torch.equal(model(x).logits, loaded(x).logits)


def test_reads_sharded_bin_with_index(tiny_models, tmp_path):
    model, _ = tiny_models["gpt2"]
    src = tmp_path / "bin"
    src.mkdir()
    model.config.save_pretrained(src)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    names = list(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
              "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
    weight_map = {}
    for file_name, keys in halves.items():
        torch.save({k: state[k] for k in keys}, src / file_name)
        weight_map.update({k: file_name for k in keys})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    pyconv.reshard(src, tmp_path / "out")
    output = load_all(tmp_path / "out")
    assert output.keys() == state.keys()
    assert all(torch.equal(output[k], state[k]) for k in state)


def test_index_without_total_size_is_tolerated(tiny_models, tmp_path):
    import shutil

    _, src = tiny_models["qwen2"]
    copy = tmp_path / "src"
    shutil.copytree(src, copy)
    index = json.load(open(copy / "model.safetensors.index.json"))
    del index["metadata"]
    (copy / "model.safetensors.index.json").write_text(json.dumps(index))
    pyconv.reshard(copy, tmp_path / "out")
    assert load_all(tmp_path / "out").keys() == load_all(src).keys()


def test_open_is_lazy_and_get_is_a_view(tiny_models):
    model, src = tiny_models["llama"]
    ckpt = pyconv.open(src)
    assert ckpt.format == "hf" and ckpt.architecture == "LlamaForCausalLM"
    state = model.state_dict()
    assert set(ckpt.keys()) == set(state)
    assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in state.values())
    for name in ckpt.keys():
        assert ckpt.shape(name) == tuple(state[name].shape) and ckpt.dtype(name) == "F32"
        t = ckpt.get(name)
        assert torch.equal(t, state[name]), name
    # Zero copy: the tensor's memory lies inside the read-only file mapping.
    import numpy as np

    t = ckpt.get("model.embed_tokens.weight")
    mapping = ckpt._maps[ckpt.catalog.tensors["model.embed_tokens.weight"].blocks[0].stored.path]
    assert memoryview(mapping).readonly
    mapped = np.frombuffer(mapping, dtype=np.uint8)
    start = mapped.__array_interface__["data"][0]
    assert start <= t.data_ptr() and t.data_ptr() + t.numel() * t.element_size() <= start + mapped.size


@pytest.mark.parametrize("family", FAMILIES)
def test_single_file_output_is_byte_identical_to_save_pretrained(tiny_models, tmp_path, family):
    model, src = tiny_models[family]
    model.save_pretrained(tmp_path / "reference")  # one model.safetensors at the default shard size
    pyconv.reshard(src, tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (tmp_path / "reference" / "model.safetensors").read_bytes()
