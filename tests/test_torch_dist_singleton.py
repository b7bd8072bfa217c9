"""Megatron-Core's `singleton_local_shards` layout of torch_dist checkpoints.

`model.sharded_state_dict(metadata={'singleton_local_shards': True})` (Megatron-Core >= 0.14)
saves every layer under its own keys (`decoder.layers.3....`), a gated fc1 as `..._w` (gate) and
`..._v` (up) each cut by TP on its own, and every routed expert under its own keys
(`decoder.layers.3.mlp.experts.experts.5.linear_fc1.weight_w`). Megatron-Core 0.16.1 itself saves
the fixtures (CPU, gloo, local spec): Llama (SwiGLU, GQA), GPT-2 and Qwen2-MoE at TP=1 in this
process, Llama at TP=2, Mixtral at TP=1 x EP=2 and Qwen2-MoE at TP=2 under one torchrun start,
each also in the default layout; a Llama the Megatron-LM way (args and content_metadata in
common.pt, iter_0000007/) and one in a NeMo 2 directory (`module.` keys in weights/).

Proven here: each converts to HF bit for bit (every tensor against the transformers model's,
transformers' logits on reload) and to Megatron (`--to megatron`) byte for byte as the default
layout's save of the same model does; a checkpoint mixing the layouts, or whose content_metadata
contradicts its keys, is a FormatError naming the file and the key. And pyconv's writers record
content_metadata {'singleton_local_shards': False}: Megatron-Core's load_content_metadata returns
it, and dist_checkpointing.load with a sharded state dict built from it loads pyconv's torch_dist
and NeMo 2 output with transformers' logits (built for the singleton layout instead, it cannot).

Also a script: under torchrun, `--jobs JOBS.json` runs the Megatron-Core saves (see `_run_jobs`).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

import megatron_harness as mh
from conftest import example_input, load_hf_tensors
from test_torch_dist_moe import moe_model

ATOL = 1e-5
TORCHRUN = {"llama_tp2": ("llama", 2, 1), "mixtral_ep2": ("mixtral", 1, 2), "qwen2_moe_tp2": ("qwen2_moe", 2, 1)}
needs_megatron = pytest.mark.skipif(not mh.megatron_available(), reason="megatron-core is not installed")
pytestmark = [needs_megatron,
              pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


# ---- Megatron-Core's side (in this process, or one torchrun rank) ----------------------------------

def content_metadata(singleton: bool) -> dict:
    """What Megatron-LM's save records (checkpointing.py `_build_sharded_state_dict_metadata`, the
    process group dropped; no distributed optimizer), with the layout flag as asked."""
    return {"singleton_local_shards": singleton, "chained_optim_avoid_prefix": True}


def megatron_save(hf_dir, out_dir, tp: int, ep: int = 1, singleton: bool = True, prefix: str = "",
                  megatron_lm: bool = False) -> None:
    """test_torch_dist's save (inside megatron_parallel(tp, 1, ep)) with Megatron-LM's metadata for
    the asked layout, recorded as content_metadata."""
    from test_torch_dist import megatron_save as save

    save(hf_dir, out_dir, tp, megatron_lm=megatron_lm, ep=ep, prefix=prefix, metadata=content_metadata(singleton))


def load_logits(ckpt_dir, hf_dir, metadata: dict | None, input_ids, prefix: str = ""):
    """Inside megatron_parallel(1): Megatron-Core loads the checkpoint as Megatron-LM and NeMo do
    (the sharded state dict built with the given metadata) into a NaN-filled GPTModel, strictly,
    and runs the forward."""
    import torch
    from megatron.core import dist_checkpointing

    cfg = mh._config_dict(hf_dir)
    model = mh.gpt_model_from_hf_config(cfg, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    sharded = model.sharded_state_dict(prefix=prefix, metadata=dict(metadata or {}))
    loaded = dist_checkpointing.load({"model": sharded}, str(ckpt_dir))["model"]
    model.load_state_dict({k[len(prefix):]: v for k, v in loaded.items()}, strict=True)
    return mh.forward_logits(model, input_ids, cfg["vocab_size"])


def _run_jobs(jobs_file) -> int:
    """Every rank takes part in every save: {"save": HF_DIR, "out": DIR, "tp": N, "ep": N,
    "singleton": bool}."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    try:
        for job in json.loads(Path(jobs_file).read_text()):
            with mh.megatron_parallel(job["tp"], 1, job["ep"]):
                megatron_save(job["save"], job["out"], job["tp"], job["ep"], job["singleton"])
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def run_torchrun_jobs(jobs: list, nproc: int, timeout: float = 300.0) -> None:
    jobs_file = Path(jobs[0]["out"]).parent / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    mh.run_torchrun(["--jobs", jobs_file], nproc, timeout, script=Path(__file__).resolve())


# ---- fixtures ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    """{family: (transformers model, HF dir)}: the session's tiny llama and gpt2, and tiny
    Mixtral and Qwen2-MoE (4 experts, 2 layers)."""
    root = tmp_path_factory.mktemp("singleton_models")
    out = {family: tiny_models[family] for family in ("llama", "gpt2")}
    for seed, family in enumerate(("mixtral", "qwen2_moe")):
        model = moe_model(family, seed)
        model.save_pretrained(root / family)
        out[family] = (model, str(root / family))
    return out


def _with_config(ckpt: Path, hf_dir) -> Path:
    """A bare dist_checkpointing.save holds no args: the HF config.json goes beside it."""
    shutil.copy(Path(hf_dir) / "config.json", ckpt / "config.json")
    return ckpt


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
    """Megatron-Core's saves: {(name, layout): dir} for layout 'singleton' and 'default'; names
    'llama', 'gpt2', 'qwen2_moe' (TP=1, this process), 'llama_tp2', 'mixtral_ep2',
    'qwen2_moe_tp2' (torchrun), 'llama_mlm' (Megatron-LM's way, singleton only) and 'nemo'
    (pyconv's NeMo 2 directory of llama with Megatron-Core's singleton `module.` save as weights/)."""
    import pyconv

    root = tmp_path_factory.mktemp("singleton_saves")
    out = {}
    jobs = []
    for name, (family, tp, ep) in TORCHRUN.items():
        for layout in ("singleton", "default"):
            out[(name, layout)] = root / f"{name}_{layout}"
            jobs.append({"save": models[family][1], "out": str(out[(name, layout)]), "tp": tp, "ep": ep,
                         "singleton": layout == "singleton"})
    run_torchrun_jobs(jobs, nproc=2, timeout=300)
    for name, (family, _, _) in TORCHRUN.items():
        for layout in ("singleton", "default"):
            _with_config(out[(name, layout)], models[family][1])

    nemo = root / "nemo"
    pyconv.reshard(models["llama"][1], nemo, to="nemo")
    shutil.rmtree(nemo / "weights")
    with mh.megatron_parallel(1):
        for family in ("llama", "gpt2", "qwen2_moe"):
            for layout in ("singleton", "default"):
                out[(family, layout)] = root / f"{family}_{layout}"
                megatron_save(models[family][1], out[(family, layout)], 1, singleton=layout == "singleton")
                _with_config(out[(family, layout)], models[family][1])
        out[("llama_mlm", "singleton")] = root / "llama_mlm"
        megatron_save(models["llama"][1], root / "llama_mlm", 1, megatron_lm=True)
        megatron_save(models["llama"][1], nemo / "weights", 1, prefix="module.")
    out[("nemo", "singleton")] = nemo
    return out


FAMILY = {"llama": "llama", "gpt2": "gpt2", "qwen2_moe": "qwen2_moe", "llama_tp2": "llama", "mixtral_ep2": "mixtral",
          "qwen2_moe_tp2": "qwen2_moe", "llama_mlm": "llama", "nemo": "llama"}


def assert_hf_equal(model, src, out_dir):
    """Every tensor of the source HF directory bit for bit (for the dense models these are the
    transformers model's state_dict, the tied lm_head aside; transformers 5 fuses MoE experts in
    the module and saves them per expert), and transformers' logits after loading the output."""
    import torch

    from test_torch_dist import assert_transformers_agrees

    out, expected = load_hf_tensors(out_dir), load_hf_tensors(src)
    assert set(out) == set(expected)
    state = model.state_dict()
    if set(state) - {"lm_head.weight"} <= set(expected):
        assert all(torch.equal(expected[name], state[name]) for name in expected)
    differ = [name for name in sorted(expected) if not torch.equal(out[name], expected[name])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ: {differ[:5]}"
    assert_transformers_agrees(model, out_dir)


# ---- what Megatron-Core writes -------------------------------------------------------------------

def _rank(chunk) -> int:
    """The rank that saved a chunk: DCP names its files __{rank}_{n}.distcp."""
    return int(chunk.location.relative_path.split("_")[2])


def test_singleton_layout_facts(saved):
    """What the reader relies on, as Megatron-Core 0.16.1 writes it: per-layer keys, a gated fc1
    as _w and _v of [F, H] each cut by TP on its own (TP=2: rows 0 and F/2 of each), every routed
    expert under its own keys (EP=2: each from one rank), content_metadata in common.pt."""
    import torch

    from pyconv.io.dcp import read_metadata

    tp2 = read_metadata(str(saved[("llama_tp2", "singleton")]))
    assert not any(k.startswith("decoder.layers.") and not k.split(".")[2].isdigit() for k in tp2.tensors)
    for half in ("w", "v"):
        t = tp2.tensors[f"decoder.layers.5.mlp.linear_fc1.weight_{half}"]
        assert t.size == (112, 64)
        assert {(c.offsets, c.sizes, _rank(c)) for c in t.chunks} == {((0, 0), (56, 64), 0), ((56, 0), (56, 64), 1)}
    assert "decoder.layers.5.mlp.linear_fc1.weight" not in tp2.tensors
    assert tp2.tensors["decoder.layers.0.self_attention.linear_qkv.weight"].size == (192, 64)

    ep2 = read_metadata(str(saved[("mixtral_ep2", "singleton")]))
    for e in range(4):
        w = ep2.tensors[f"decoder.layers.1.mlp.experts.experts.{e}.linear_fc1.weight_w"]
        assert w.size == (96, 64) and [_rank(c) for c in w.chunks] == [e // 2]
        assert ep2.tensors[f"decoder.layers.1.mlp.experts.experts.{e}.linear_fc2.weight"].size == (64, 96)
    assert not any(".experts.experts.linear" in k for k in ep2.tensors)
    assert "decoder.layers.1.mlp.experts.experts.3.linear_fc1._extra_state/shard_0_1" in ep2.byte_items

    moe_tp2 = read_metadata(str(saved[("qwen2_moe_tp2", "singleton")]))
    v = moe_tp2.tensors["decoder.layers.0.mlp.experts.experts.2.linear_fc1.weight_v"]
    assert v.size == (32, 64) and {c.offsets for c in v.chunks} == {(0, 0), (16, 0)}
    assert {c.offsets for c in moe_tp2.tensors["decoder.layers.0.mlp.shared_experts.linear_fc1.weight_w"].chunks} \
        == {(0, 0), (24, 0)}

    common = torch.load(saved[("llama", "singleton")] / "common.pt", weights_only=False)
    assert common == {"content_metadata": content_metadata(True)}


# ---- singleton layout -> pyconv --------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2_moe", "llama_tp2", "mixtral_ep2", "qwen2_moe_tp2",
                                  "llama_mlm", "nemo"])
def test_singleton_save_converts_to_hf_bit_for_bit(models, saved, tmp_path, name):
    import pyconv

    info = pyconv.open(saved[(name, "singleton")]).summary()
    assert (info["format"], info["family"]) == ("nemo" if name == "nemo" else "torch_dist", FAMILY[name])
    if name != "nemo":
        assert info["sharded_layout"] == "singleton_local_shards"
        assert info["content_metadata"] == content_metadata(True)
    else:
        assert info["key_style"] == "nemo2"
    pyconv.reshard(saved[(name, "singleton")], tmp_path / "hf", to="hf")
    assert_hf_equal(*models[FAMILY[name]], tmp_path / "hf")


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("name", ["llama", "gpt2", "qwen2_moe", "llama_tp2", "mixtral_ep2", "qwen2_moe_tp2"])
def test_singleton_save_converts_to_megatron_as_the_default_layout_does(saved, tmp_path, name):
    """`--to megatron` of the singleton save writes the same bytes, file for file, as of the
    default layout's save of the same model at the same parallelism."""
    import pyconv

    for layout in ("singleton", "default"):
        pyconv.reshard(saved[(name, layout)], tmp_path / layout, to="megatron", tp=2 if "moe" not in name else 1)
    singleton, default = _files(tmp_path / "singleton"), _files(tmp_path / "default")
    assert any(path.endswith(".pt") for path in default)
    assert singleton.keys() == default.keys()
    assert [p for p in default if singleton[p] != default[p]] == []


# ---- mixed layouts and contradicting metadata --------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_keys(ckpt: Path, edit) -> None:
    """Re-emit .metadata after edit(tensors) renames or drops keys (the bytes stay where they are)."""
    from test_torch_dist import _rewrite_metadata

    _rewrite_metadata(ckpt, edit)


def _renamed(tensors: dict, old: str, new: str) -> dict:
    from dataclasses import replace

    return {(new if k == old else k): (replace(t, fqn=new) if k == old else t) for k, t in tensors.items()}


def test_mixed_layouts_are_refused_naming_file_and_key(saved, tmp_path):
    import pyconv
    from pyconv.errors import FormatError

    llama = saved[("llama", "singleton")]
    stacked = _copy(llama, tmp_path / "stacked")  # one stacked key among singleton ones
    _edit_keys(stacked, lambda ts: _renamed(ts, "decoder.layers.5.mlp.linear_fc2.weight",
                                            "decoder.layers.mlp.linear_fc2.weight"))
    metadata = str(stacked / ".metadata").replace(".", r"\.")
    with pytest.raises(FormatError, match=metadata + r": 'decoder\.layers\.\d\.[a-z_.0-9]+_[wv]' is in Megatron-Core's "
                       r"singleton_local_shards layout but 'decoder\.layers\.mlp\.linear_fc2\.weight' is not \(its "
                       r"layers stacked on an axis\): a checkpoint mixing the two layouts cannot be read"):
        pyconv.open(stacked)

    unsplit = _copy(llama, tmp_path / "unsplit")  # layer 3's fc1 whole, the others split
    _edit_keys(unsplit, lambda ts: {k: t for k, t in _renamed(ts, "decoder.layers.3.mlp.linear_fc1.weight_w",
                                                               "decoder.layers.3.mlp.linear_fc1.weight").items()
                                    if k != "decoder.layers.3.mlp.linear_fc1.weight_v"})
    with pytest.raises(FormatError, match=r"unsplit/\.metadata: .* but 'decoder\.layers\.3\.mlp\.linear_fc1\.weight' "
                                          r"is not \(a gated fc1 not split into _w and _v\)"):
        pyconv.open(unsplit)

    half = _copy(llama, tmp_path / "half")
    _edit_keys(half, lambda ts: {k: t for k, t in ts.items() if k != "decoder.layers.2.mlp.linear_fc1.weight_v"})
    with pytest.raises(FormatError, match=r"half/\.metadata: 'decoder\.layers\.2\.mlp\.linear_fc1\.weight_w' has no "
                                          r"'decoder\.layers\.2\.mlp\.linear_fc1\.weight_v'"):
        pyconv.open(half)

    moe = saved[("qwen2_moe", "singleton")]
    axis = _copy(moe, tmp_path / "axis")  # layer 1's fc2 experts on an axis, the others one key each
    fc2 = "decoder.layers.1.mlp.experts.experts.{}.linear_fc2.weight"
    _edit_keys(axis, lambda ts: {k: t for k, t in _renamed(ts, fc2.format(0),
                                                           "decoder.layers.1.mlp.experts.experts.linear_fc2.weight").items()
                                 if k not in {fc2.format(e) for e in (1, 2, 3)}})
    with pytest.raises(FormatError, match=r"axis/\.metadata: .* but 'decoder\.layers\.1\.mlp\.experts\.experts\."
                                          r"linear_fc2\.weight' is not \(its experts stacked on an axis\)"):
        pyconv.open(axis)

    gap = _copy(moe, tmp_path / "gap")
    _edit_keys(gap, lambda ts: {k: t for k, t in ts.items() if k != fc2.format(2)})
    with pytest.raises(FormatError, match=r"gap/\.metadata: no 'decoder\.layers\.1\.mlp\.experts\.experts\.2\.linear_fc2"
                                          r"\.weight' \(experts \[0, 1, 3\]"):
        pyconv.open(gap)


def test_nemo_mixed_layout_error_names_the_nemo_key(saved, tmp_path):
    import pyconv
    from pyconv.errors import FormatError

    nemo = _copy(saved[("nemo", "singleton")], tmp_path / "nemo")
    _edit_keys(nemo / "weights", lambda ts: _renamed(ts, "module.decoder.layers.0.self_attention.linear_proj.weight",
                                                     "module.decoder.layers.self_attention.linear_proj.weight"))
    with pytest.raises(FormatError, match=r"weights/\.metadata: 'module\.decoder\.layers\.\d\.mlp\.linear_fc1\.weight_[wv]'"
                                          r" is in .* but 'module\.decoder\.layers\.self_attention\.linear_proj\.weight'"):
        pyconv.open(nemo)


def _set_content_metadata(ckpt: Path, metadata: dict) -> None:
    import torch

    torch.save({"content_metadata": metadata}, ckpt / "common.pt")


def test_content_metadata_contradicting_the_keys_is_refused(saved, tmp_path):
    import pyconv
    from pyconv.errors import FormatError

    default = _copy(saved[("llama", "default")], tmp_path / "default")
    _set_content_metadata(default, content_metadata(True))
    with pytest.raises(FormatError, match=r"default/\.metadata: 'decoder\.layers\.[a-z_.0-9]+' is not in Megatron-Core's "
                                          r"singleton_local_shards layout \(its layers stacked on an axis\) but "
                                          r".*default/common\.pt records content_metadata with "
                                          r"singleton_local_shards=True"):
        pyconv.open(default)

    singleton = _copy(saved[("qwen2_moe", "singleton")], tmp_path / "singleton")
    _set_content_metadata(singleton, content_metadata(False))
    with pytest.raises(FormatError, match=r"singleton/\.metadata: '[a-z_.0-9]+' is in Megatron-Core's "
                                          r"singleton_local_shards layout but .*singleton/common\.pt records "
                                          r"content_metadata with singleton_local_shards=False"):
        pyconv.open(singleton)

    _set_content_metadata(singleton, {"singleton_local_shards": "yes"})
    with pytest.raises(FormatError, match=r"common\.pt: 'content_metadata' has singleton_local_shards='yes', not a bool"):
        pyconv.open(singleton)


# ---- pyconv's output -> Megatron-Core, through the content_metadata it records ----------------------

@pytest.fixture(scope="module")
def pyconv_outputs(models, tmp_path_factory):
    import pyconv

    root = tmp_path_factory.mktemp("singleton_pyconv_out")
    pyconv.reshard(models["llama"][1], root / "llama", to="torch_dist")
    # The harness's GPTModel has the local spec: its MoE pre-MLP norm key is the local one.
    pyconv.reshard(models["mixtral"][1], root / "mixtral", to="torch_dist", megatron_naming="local")
    pyconv.reshard(models["llama"][1], root / "nemo", to="nemo")
    return {"llama": root / "llama" / "release", "mixtral": root / "mixtral" / "release",
            "nemo": root / "nemo" / "weights"}


@pytest.mark.parametrize("name", ["llama", "mixtral", "nemo"])
def test_megatron_core_loads_pyconv_output_by_its_content_metadata(models, pyconv_outputs, name):
    """Megatron-LM's and NeMo's loaders build the sharded state dict from
    load_content_metadata(checkpoint): pyconv records {'singleton_local_shards': False}, and
    that state dict loads pyconv's output with transformers' logits; one built for the singleton
    layout finds none of its per-layer keys."""
    import torch
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    import pyconv

    model, src = models[FAMILY.get(name, name)]
    ckpt, prefix = pyconv_outputs[name], "module." if name == "nemo" else ""
    metadata = dist_checkpointing.load_content_metadata(str(ckpt))
    assert metadata == {"singleton_local_shards": False}
    ids = example_input(model)
    with mh.megatron_parallel(1):
        got = load_logits(ckpt, src, metadata, ids, prefix)
        with pytest.raises(CheckpointException, match=r"decoder\.layers\.0\.\S+ from model not in state dict"):
            load_logits(ckpt, src, {"singleton_local_shards": True}, ids, prefix)
    with torch.no_grad():
        want = model(ids).logits.float()
    assert (got - want).abs().max().item() < ATOL
    if name != "nemo":  # pyconv's own reader sees the record too
        assert pyconv.open(ckpt.parent).summary()["content_metadata"] == metadata


if __name__ == "__main__":  # torchrun entry; the guard matters: Megatron's checkpoint code spawns processes
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", required=True)
    sys.exit(_run_jobs(parser.parse_args().jobs))
