"""Megatron checkpoints as training leaves them: optimizer state inside model_optim_rng.pt, the
distributed optimizer's files (model_rng.pt with mp_rank_TT[_PPP]_DDD/optim.pt as Megatron-LM
before mid-2023 and transformers' scripts write them; distrib_optim.pt beside model_optim_rng.pt
as newer Megatron-LM does), optimizer tensors in a distributed checkpoint, several iterations.
The weights are read, the optimizer state is skipped with a plan note, and an optimizer folder
is never taken for a rank. Judged against the same checkpoint without the training state: the
converted output is byte-identical."""

from __future__ import annotations

import filecmp
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import pyconv
from pyconv.errors import FormatError


def _files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _same_output(a, b):
    assert _files(a) == _files(b)
    _, mismatch, errors = filecmp.cmpfiles(a, b, _files(a), shallow=False)
    assert not mismatch and not errors


def _rank_files(root):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f == "model_optim_rng.pt")


def training_state(model_state: dict) -> dict:
    """What Megatron-LM's save_checkpoint adds beside the model: a real Adam state of the weights
    (torch.optim's state_dict, wrapped as Megatron's mixed-precision optimizer wraps it), the
    scheduler's numbers and the RNG states (numpy's as an array in a tuple)."""
    params = [torch.nn.Parameter(t.clone().float()) for t in model_state.values() if t.is_floating_point()]
    adam = torch.optim.Adam(params, lr=1e-3)
    sum((p * p).sum() for p in params).backward()
    adam.step()
    rng = np.random.RandomState(3).get_state()
    return {
        "optimizer": {"optimizer": adam.state_dict(), "fp32_from_fp16_params": [[p.detach() for p in params[:3]]]},
        "opt_param_scheduler": {"max_lr": 1e-3, "num_steps": 640, "decay_style": "cosine"},
        "rng_state": [{"random_rng_state": ("x", 3), "np_rng_state": rng, "torch_rng_state": torch.get_rng_state(),
                       "cuda_rng_state": torch.zeros(16, dtype=torch.uint8), "rng_tracker_states": {}}],
        "num_floating_point_operations_so_far": 123456,
    }


@pytest.fixture(scope="module")
def megatron_tp2(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("training") / "plain"
    pyconv.reshard(tiny_models["llama"][1], root, to="megatron", tp=2)
    return root


def test_optimizer_state_inside_the_rank_files(megatron_tp2, tmp_path):
    trained = tmp_path / "trained"
    shutil.copytree(megatron_tp2, trained)
    for f in _rank_files(trained):
        obj = torch.load(f, weights_only=False)
        obj.update(training_state(obj["model"]))
        torch.save(obj, f)
    plan = pyconv.plan_reshard(trained, to="hf")
    assert plan.notes == ("optimizer state not converted (weights only): 'opt_param_scheduler' and 'optimizer' "
                          "in the rank files",)
    pyconv.reshard(megatron_tp2, tmp_path / "a", to="hf")
    pyconv.reshard(trained, tmp_path / "b", to="hf")
    _same_output(tmp_path / "a", tmp_path / "b")
    cli = subprocess.run([sys.executable, "-m", "pyconv", "reshard", str(trained), str(tmp_path / "c"), "--to", "hf"],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr
    assert "note: optimizer state not converted (weights only)" in cli.stdout
    inspect = subprocess.run([sys.executable, "-m", "pyconv", "inspect", str(trained)], capture_output=True, text=True)
    assert "note:         optimizer state not converted" in inspect.stdout


def _distributed_optimizer_layout(plain, out, dp=2):
    """model_optim_rng.pt -> model_rng.pt, and per data-parallel rank d an
    mp_rank_TT[_PPP]_DDD/optim.pt holding that rank's part of the optimizer."""
    shutil.copytree(plain, out)
    for f in _rank_files(out):
        rank_dir = os.path.dirname(f)
        os.rename(f, os.path.join(rank_dir, "model_rng.pt"))
        state = torch.load(os.path.join(rank_dir, "model_rng.pt"), weights_only=False)["model"]
        for d in range(dp):
            optim_dir = f"{rank_dir}_{d:03d}"
            os.makedirs(optim_dir)
            torch.save({"optimizer": training_state(state)["optimizer"]}, os.path.join(optim_dir, "optim.pt"))


def test_model_rng_with_optimizer_folders_named_like_ranks(megatron_tp2, tmp_path):
    # tp 2, pp 1: the optimizer folders mp_rank_00_000, mp_rank_00_001... look like (tp, pp) ranks
    _distributed_optimizer_layout(megatron_tp2, tmp_path / "dist")
    release = tmp_path / "dist" / "release"
    assert {"mp_rank_00_000", "mp_rank_00_001", "mp_rank_01_000", "mp_rank_01_001"} <= set(os.listdir(release))
    ckpt = pyconv.open(tmp_path / "dist")
    assert ckpt.format == "megatron" and (ckpt.summary()["tp"], ckpt.summary()["pp"]) == (2, 1)
    assert ckpt.catalog.notes == ("optimizer state not converted (weights only): 4 optimizer files (optim.pt)",)
    pyconv.reshard(megatron_tp2, tmp_path / "a", to="hf")
    pyconv.reshard(tmp_path / "dist", tmp_path / "b", to="hf")
    _same_output(tmp_path / "a", tmp_path / "b")


def test_distrib_optim_beside_the_model(megatron_tp2, tmp_path):
    trained = tmp_path / "trained"
    shutil.copytree(megatron_tp2, trained)
    for f in _rank_files(trained):
        torch.save({"param_state": torch.arange(10.0)}, os.path.join(os.path.dirname(f), "distrib_optim.pt"))
    assert pyconv.open(trained).catalog.notes == (
        "optimizer state not converted (weights only): 2 optimizer files (distrib_optim.pt)",)
    pyconv.reshard(megatron_tp2, tmp_path / "a", to="hf")
    pyconv.reshard(trained, tmp_path / "b", to="hf")
    _same_output(tmp_path / "a", tmp_path / "b")


def test_legacy_gpt2_with_the_distributed_optimizer_of_transformers_script(tmp_path):
    """The layout transformers' checkpoint_reshaping_and_interoperability.py reads and writes with
    --use_distributed_optimizer: release/mp_rank_00/model_rng.pt beside release/mp_rank_00_000/optim.pt."""
    import transformers

    from test_legacy_megatron import _gpt2_logits, _load_hf, legacy_rank_dicts, save_legacy, tiny_gpt2

    model = tiny_gpt2()
    src = save_legacy(legacy_rank_dicts(model, "gpt2", 1, 1, 3.0), tmp_path / "legacy", "dir")
    rank_dir = os.path.join(src, "release", "mp_rank_00")
    os.rename(os.path.join(rank_dir, "model_optim_rng.pt"), os.path.join(rank_dir, "model_rng.pt"))
    os.makedirs(rank_dir + "_000")
    torch.save({"optimizer": {"state": {0: {"exp_avg": torch.zeros(4)}}}}, os.path.join(rank_dir + "_000", "optim.pt"))
    ckpt = pyconv.open(src)
    assert ckpt.format == "megatron-legacy" and ckpt.catalog.details["pp"] == 1
    assert ckpt.catalog.notes == ("optimizer state not converted (weights only): 1 optimizer file (optim.pt)",)
    pyconv.reshard(src, tmp_path / "hf", to="hf")
    assert torch.equal(_gpt2_logits(_load_hf(transformers.GPT2LMHeadModel, tmp_path / "hf")), _gpt2_logits(model))


def test_only_optimizer_folders_is_named(megatron_tp2, tmp_path):
    _distributed_optimizer_layout(megatron_tp2, tmp_path / "dist")
    release = tmp_path / "dist" / "release"
    for rank in ("mp_rank_00", "mp_rank_01"):
        shutil.rmtree(release / rank)
    with pytest.raises(FormatError) as e:
        pyconv.open(tmp_path / "dist")
    assert str(e.value) == (f"{release}: no mp_rank_* directory holding model_optim_rng.pt or model_rng.pt "
                            "(only optimizer files: optim.pt)")


def test_several_iterations_follow_the_tracker(tiny_models, tmp_path):
    """iter_0000100 holds Llama, iter_0000200 Qwen2's weights; the tracker says which is read.
    Without the tracker the choice is refused by name; one iteration alone is read."""
    root = tmp_path / "run"
    pyconv.reshard(tiny_models["llama"][1], tmp_path / "i100", to="megatron", iteration=100)
    pyconv.reshard(tiny_models["qwen2"][1], tmp_path / "i200", to="megatron", iteration=200)
    root.mkdir()
    shutil.copytree(tmp_path / "i100" / "iter_0000100", root / "iter_0000100")
    shutil.copytree(tmp_path / "i200" / "iter_0000200", root / "iter_0000200")
    for tracked, architecture in (("100", "LlamaForCausalLM"), ("200", "Qwen2ForCausalLM")):
        (root / "latest_checkpointed_iteration.txt").write_text(tracked)
        ckpt = pyconv.open(root)
        assert (ckpt.architecture, ckpt.summary()["iteration"]) == (architecture, tracked)
    pyconv.reshard(root, tmp_path / "hf200", to="hf")
    pyconv.reshard(tmp_path / "i200", tmp_path / "hf200_alone", to="hf")
    for name in ("model.safetensors", "config.json"):  # (the tokenizer files stayed beside i200)
        assert filecmp.cmp(tmp_path / "hf200" / name, tmp_path / "hf200_alone" / name, shallow=False)
    os.remove(root / "latest_checkpointed_iteration.txt")
    with pytest.raises(FormatError) as e:
        pyconv.open(root)
    assert str(e.value) == (f"{root}: no latest_checkpointed_iteration.txt to say which of iter_0000100, "
                            f"iter_0000200 to read; convert one of them (e.g. {root / 'iter_0000200'})")
    assert pyconv.open(root / "iter_0000100").architecture == "LlamaForCausalLM"
    shutil.rmtree(root / "iter_0000200")
    assert pyconv.open(root).summary()["iteration"] == "100"


def test_torch_dist_optimizer_tensors_are_noted(tiny_models, tmp_path):
    import torch.distributed.checkpoint as dcp

    from pyconv.io.dcp import read_metadata

    plain = tmp_path / "plain"
    pyconv.reshard(tiny_models["llama"][1], plain, to="torch_dist")
    release = plain / "release"
    state = {k: torch.empty(t.size) for k, t in read_metadata(str(release)).tensors.items()}
    dcp.load(state, checkpoint_id=str(release))
    optimizer = {f"optimizer.state.exp_avg.{k}": torch.zeros_like(v) for k, v in list(state.items())[:5]}
    trained = tmp_path / "trained"
    shutil.copytree(plain, trained)
    for name in os.listdir(trained / "release"):
        if name == ".metadata" or name.endswith(".distcp"):
            os.remove(trained / "release" / name)
    dcp.save({**state, **optimizer}, checkpoint_id=str(trained / "release"))
    assert pyconv.open(trained).catalog.notes == (
        "optimizer state not converted (weights only): 5 'optimizer.*' tensors of the distributed checkpoint",)
    pyconv.reshard(plain, tmp_path / "a", to="hf")
    pyconv.reshard(trained, tmp_path / "b", to="hf")
    _same_output(tmp_path / "a", tmp_path / "b")
