"""`pyconv verify`: checkpoints compared through canonical names, across formats and layouts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import pyconv


def cli(*args):
    return subprocess.run([sys.executable, "-m", "pyconv", "verify", *map(str, args)], capture_output=True, text=True)


def single_file_copy(src, dst, edit=None, drop=None, add=None):
    """An HF checkpoint in one model.safetensors, with one tensor edited, dropped or added."""
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors.update(load_file(f))
    if edit:
        name, index, value = edit
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[index] = value
    if drop:
        del tensors[drop]
    if add:
        tensors.update(add)
    dst.mkdir()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(src / "config.json", dst / "config.json")
    return dst


def test_equal_across_formats_and_layouts(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2, pp=3)
    pyconv.reshard(tmp_path / "meg", tmp_path / "meg2", to="megatron", tp=4)
    report = pyconv.verify(src, tmp_path / "meg2")
    assert report.equal and report.compared == len(pyconv.open(src))
    r = cli(src, tmp_path / "meg", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["equal"] is True


def test_a_changed_element_is_found(tiny_models, tmp_path):
    _, src = tiny_models["gpt2"]
    from pathlib import Path

    name = "transformer.h.2.mlp.c_fc.weight"
    original = load_file(next(f for f in Path(src).glob("*.safetensors") if name in load_file(f)))[name]
    changed = single_file_copy(Path(src), tmp_path / "changed", edit=(name, 1234, 5.0))
    report = pyconv.verify(src, changed)
    assert not report.equal and [d.name for d in report.different] == [name]
    d = report.different[0]
    assert (d.reason, d.differing, d.first_index) == ("values", 1, 1234)
    assert d.max_abs_diff == pytest.approx(abs(5.0 - original.view(-1)[1234].item()))
    r = cli(src, changed)
    assert r.returncode == 1 and name in r.stdout and "1 of" in r.stdout


def test_missing_extra_and_shape(tiny_models, tmp_path):
    from pathlib import Path

    _, src = tiny_models["qwen2"]
    other = single_file_copy(Path(src), tmp_path / "other", drop="model.norm.weight",
                             add={"model.extra.weight": torch.zeros(3)})
    report = pyconv.verify(src, other)
    assert report.missing == ["model.norm.weight"] and report.extra == ["model.extra.weight"]
    r = cli(src, other, "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["missing"] == ["model.norm.weight"]


def test_dtype_and_tolerance(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    pyconv.reshard(src, tmp_path / "bf16", dtype="bf16")
    report = pyconv.verify(src, tmp_path / "bf16")
    assert not report.equal and {d.reason for d in report.different} == {"dtype"}
    assert cli(src, tmp_path / "bf16", "--atol", "1e-2", "--rtol", "1e-2").returncode == 0
    r = cli(src, tmp_path / "bf16", "--atol", "1e-7", "--rtol", "0")
    assert r.returncode == 1 and "values differ" in r.stdout


def test_bad_input_exits_2(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    r = cli(src, tmp_path / "nope")
    assert r.returncode == 2 and r.stderr.startswith("pyconv: error:") and "nope" in r.stderr


def test_a_tied_head_stored_on_one_side_is_compared_with_the_embedding(tiny_models, tmp_path):
    """transformers' GPT-2 .bin stores lm_head.weight (tied to wte); Megatron stores no output
    layer for a tied model. The two are the same model; a head that is not the embedding is not."""
    model, src = tiny_models["gpt2"]
    assert model.config.tie_word_embeddings
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "bin").mkdir()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    shutil.copy(f"{src}/config.json", tmp_path / "bin" / "config.json")
    pyconv.reshard(src, tmp_path / "meg", to="megatron", tp=2)
    assert "lm_head.weight" in pyconv.open(tmp_path / "bin").keys()
    assert "lm_head.weight" not in pyconv.open(tmp_path / "meg").keys()
    for a, b in ((tmp_path / "bin", tmp_path / "meg"), (tmp_path / "meg", tmp_path / "bin")):
        report = pyconv.verify(a, b)
        assert report.equal and not report.missing and not report.extra, report.summary()
    state["lm_head.weight"] = state["lm_head.weight"].clone()
    state["lm_head.weight"][3, 5] += 1.0
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    report = pyconv.verify(tmp_path / "bin", tmp_path / "meg")
    assert not report.equal and [d.name for d in report.different] == ["lm_head.weight"]
