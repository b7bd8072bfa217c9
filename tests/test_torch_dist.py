"""Megatron-Core distributed checkpoints (torch_dist): checkpoints Megatron-Core itself saves
(`dist_checkpointing.save`, TP=1 in this process, TP=2 under torchrun) convert to HF bit for bit;
pyconv's torch_dist output loads into Megatron-Core's GPTModel (TP=1 and TP=2) and through
PyTorch's own DCP reader; hostile metadata is a FormatError.

Also a script: under torchrun, `--jobs JOBS.json` runs Megatron-Core saves and loads (one process
start for all of them; see `_run_jobs`).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import megatron_harness as mh

ATOL = 1e-5
MEGATRON_LM_ITERATION = 7
needs_megatron = pytest.mark.skipif(not mh.megatron_available(), reason="megatron-core is not installed")
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning")]


# ---- Megatron-Core's side (in this process, or one torchrun rank) ----------------------------------

def megatron_save(hf_dir, out_dir, tp: int, megatron_lm: bool = False, ep: int = 1, prefix: str = "",
                  metadata: dict | None = None) -> None:
    """Inside megatron_parallel(tp, 1, ep): a GPTModel filled from the HF weights, saved with
    dist_checkpointing.save. megatron_lm: as Megatron-LM's training loop saves it (the state under
    "model", args in common.pt, iter_0000007/ and the tracker file). prefix: of every key (NeMo 2
    saves its model's sharded state dict under 'module.'). metadata: the sharded_state_dict
    metadata (e.g. singleton_local_shards), recorded as content_metadata as Megatron-LM does."""
    import torch
    from megatron.core import dist_checkpointing, parallel_state

    cfg = mh._config_dict(hf_dir)
    rank = parallel_state.get_tensor_model_parallel_rank()
    ep_rank = parallel_state.get_expert_model_parallel_rank() if ep > 1 else 0
    model = mh.gpt_model_from_hf_config(cfg, tp, ep=ep)
    shard = mh.megatron_shard(mh.megatron_full_tensors(mh._read_hf_weights(hf_dir), cfg), cfg, tp, rank, ep, ep_rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(shard[name])
    state = model.sharded_state_dict(prefix=prefix, **({"metadata": dict(metadata)} if metadata is not None else {}))
    directory = Path(out_dir)
    if megatron_lm:
        state = {"model": state, "args": mh.megatron_args(cfg, tp, ep=ep), "checkpoint_version": 3.0,
                 "iteration": MEGATRON_LM_ITERATION}
        directory = directory / f"iter_{MEGATRON_LM_ITERATION:07d}"
    directory.mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(state, str(directory), **({"content_metadata": metadata} if metadata is not None else {}))
    if megatron_lm and torch.distributed.get_rank() == 0:
        (Path(out_dir) / "latest_checkpointed_iteration.txt").write_text(str(MEGATRON_LM_ITERATION))


def megatron_load_logits(ckpt_dir, hf_dir, tp: int, input_ids, ep: int = 1):
    """Inside megatron_parallel(tp, 1, ep): Megatron-Core loads the checkpoint (dist_checkpointing.load,
    then a strict load_state_dict into a NaN-filled GPTModel) and runs the forward."""
    import torch
    from megatron.core import dist_checkpointing

    cfg = mh._config_dict(hf_dir)
    model = mh.gpt_model_from_hf_config(cfg, tp, ep=ep)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt_dir))
    model.load_state_dict(loaded["model"], strict=True)
    return mh.forward_logits(model, mh._load_input(input_ids), cfg["vocab_size"])


def _run_jobs(jobs_file) -> int:
    """Every rank takes part in every job: {"save": HF_DIR, "out": DIR, "tp": N} or
    {"load": DIR, "hf": HF_DIR, "tp": N, "input": IDS.pt, "logits": OUT.pt}; "ep": N (default 1)
    for mixture-of-experts models (world = tp * ep)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method="env://")
    try:
        for job in json.loads(Path(jobs_file).read_text()):
            ep = job.get("ep", 1)
            with mh.megatron_parallel(job["tp"], 1, ep):
                if "save" in job:
                    megatron_save(job["save"], job["out"], job["tp"], ep=ep)
                    continue
                logits = megatron_load_logits(job["load"], job["hf"], job["tp"], job["input"], ep)
            if dist.get_rank() == 0:
                torch.save(logits, job["logits"])
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def run_torchrun_jobs(jobs: list, nproc: int, timeout: float = 180.0) -> None:
    jobs_file = Path(jobs[0].get("out") or jobs[0]["logits"]).parent / "jobs.json"
    jobs_file.write_text(json.dumps(jobs))
    mh.run_torchrun(["--jobs", jobs_file], nproc, timeout, script=Path(__file__).resolve())


# ---- fixtures ----------------------------------------------------------------------------------------

def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(ids).logits.float()


def _with_config(ckpt: Path, hf_dir) -> Path:
    """A bare dist_checkpointing.save holds no args: the HF config.json goes beside it."""
    shutil.copy(Path(hf_dir) / "config.json", ckpt / "config.json")
    return ckpt


@pytest.fixture(scope="session")
def saved_tp1(tiny_models, tmp_path_factory):
    """Megatron-Core's own TP=1 saves, in this process: llama and gpt2 bare (+ config.json),
    qwen2 the Megatron-LM way (args in common.pt, tracker, iter_0000007/)."""
    if not mh.megatron_available():
        pytest.skip("megatron-core is not installed")
    root = tmp_path_factory.mktemp("torch_dist_tp1")
    with mh.megatron_parallel(1):
        for family in ("llama", "gpt2"):
            megatron_save(tiny_models[family][1], root / family, 1)
        megatron_save(tiny_models["qwen2"][1], root / "qwen2", 1, megatron_lm=True)
    return {"llama": _with_config(root / "llama", tiny_models["llama"][1]),
            "gpt2": _with_config(root / "gpt2", tiny_models["gpt2"][1]), "qwen2": root / "qwen2"}


@pytest.fixture(scope="session")
def pyconv_torch_dist(tiny_models, tmp_path_factory):
    """pyconv's torch_dist output of each tiny model (vocabulary padded for tp=1)."""
    import pyconv

    root = tmp_path_factory.mktemp("pyconv_torch_dist")
    for family, (_, src) in tiny_models.items():
        pyconv.reshard(src, root / family, to="torch_dist")
    pyconv.reshard(tiny_models["llama"][1], root / "llama_tp2", to="torch_dist", tp=2)
    return root


@pytest.fixture(scope="session")
def torchrun_tp2(tiny_models, pyconv_torch_dist, tmp_path_factory):
    """One torchrun world of 2: Megatron-Core saves llama and gpt2 at TP=2, and loads pyconv's
    llama (padded for tp=1 and for tp=2) and gpt2 output at TP=2 (logits to files)."""
    import torch

    if not mh.megatron_available():
        pytest.skip("megatron-core is not installed")
    root = tmp_path_factory.mktemp("torch_dist_tp2")
    jobs, logits = [], {}
    for family in ("llama", "gpt2"):
        jobs.append({"save": tiny_models[family][1], "out": str(root / f"saved_{family}"), "tp": 2})
    for name, family in (("llama", "llama"), ("llama_tp2", "llama"), ("gpt2", "gpt2")):
        model, src = tiny_models[family]
        torch.save(mh._load_input(example_ids(model)), root / f"ids_{name}.pt")
        logits[name] = root / f"logits_{name}.pt"
        jobs.append({"load": str(pyconv_torch_dist / name / "release"), "hf": src, "tp": 2,
                     "input": str(root / f"ids_{name}.pt"), "logits": str(logits[name])})
    run_torchrun_jobs(jobs, nproc=2)
    return {"saved": {f: _with_config(root / f"saved_{f}", tiny_models[f][1]) for f in ("llama", "gpt2")},
            "logits": {name: torch.load(path, weights_only=True) for name, path in logits.items()}}


def example_ids(model):
    from conftest import example_input

    return example_input(model)


def assert_hf_equal(model, out_dir):
    """The converted HF checkpoint holds the source's tensors bit for bit, and transformers loads it
    into a model with the same logits."""
    import torch
    from safetensors.torch import load_file

    out = load_file(Path(out_dir) / "model.safetensors")
    expected = model.state_dict()
    saved = {k for k in expected if k != "lm_head.weight" or not model.config.tie_word_embeddings}
    assert set(out) == saved
    for name in saved:
        assert torch.equal(out[name], expected[name]), name
    assert_transformers_agrees(model, out_dir)


def assert_transformers_agrees(model, out_dir):
    """transformers loads the HF output with no missing or unexpected keys and the model's logits."""
    import torch

    loaded, info = type(model).from_pretrained(out_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = example_ids(model)
    assert torch.equal(hf_logits(model, ids), hf_logits(loaded.eval(), ids))


# ---- Megatron-Core -> pyconv ---------------------------------------------------------------------

@needs_megatron
@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_checkpoint_saved_by_megatron_core_tp1_converts_to_hf(tiny_models, saved_tp1, tmp_path, family):
    import pyconv

    info = pyconv.open(saved_tp1[family]).summary()
    assert (info["format"], info["family"], info["padded_vocab_size"]) == ("torch_dist", family, 128)
    assert info["config_from"] == ("common.pt args" if family == "qwen2" else "config.json")
    pyconv.reshard(saved_tp1[family], tmp_path / "hf", to="hf")
    assert_hf_equal(tiny_models[family][0], tmp_path / "hf")


@needs_megatron
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_checkpoint_saved_by_megatron_core_tp2_converts_to_hf(tiny_models, torchrun_tp2, tmp_path, family):
    import pyconv
    from pyconv.io.dcp import read_metadata

    saved = torchrun_tp2["saved"][family]
    md = read_metadata(str(saved))
    assert {c.location.relative_path for t in md.tensors.values() for c in t.chunks} >= {"__0_0.distcp",
                                                                                          "__1_0.distcp"}
    assert md.tensors["embedding.word_embeddings.weight"].size[0] == 256  # padded for tp=2
    pyconv.reshard(saved, tmp_path / "hf", to="hf")
    assert_hf_equal(tiny_models[family][0], tmp_path / "hf")


@needs_megatron
def test_megatron_core_layout_facts(saved_tp1, torchrun_tp2):
    """What the reader relies on, as Megatron-Core 0.16 writes it: stacked TE-style keys, fc1 as
    [gate; up] of the whole tensor (TP=2: gate_r at r*F/2, up_r at F + r*F/2), QKV chunks by TP rank."""
    from pyconv.io.dcp import read_metadata

    tp1, tp2 = read_metadata(str(saved_tp1["llama"])), read_metadata(str(torchrun_tp2["saved"]["llama"]))
    fc1 = "decoder.layers.mlp.linear_fc1.weight"
    assert tp1.tensors[fc1].size == (6, 224, 64)
    assert {(c.offsets, c.sizes) for c in tp1.tensors[fc1].chunks if c.offsets[0] == 0} == {
        ((0, 0, 0), (1, 112, 64)), ((0, 112, 0), (1, 112, 64))}
    assert {(c.offsets, c.sizes) for c in tp2.tensors[fc1].chunks if c.offsets[0] == 0} == {
        ((0, 0, 0), (1, 56, 64)), ((0, 56, 0), (1, 56, 64)), ((0, 112, 0), (1, 56, 64)), ((0, 168, 0), (1, 56, 64))}
    qkv = tp2.tensors["decoder.layers.self_attention.linear_qkv.weight"]
    assert qkv.size == (6, 192, 64) and {c.offsets[1] for c in qkv.chunks} == {0, 96}
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in tp1.tensors
    assert "decoder.layers.mlp.linear_fc1._extra_state/shard_0_6" in tp1.byte_items


# ---- pyconv -> Megatron-Core and PyTorch DCP ----------------------------------------------------------

@needs_megatron
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_megatron_core_loads_pyconv_output_tp1(tiny_models, pyconv_torch_dist, family):
    model, src = tiny_models[family]
    ids = example_ids(model)
    with mh.megatron_parallel(1):
        got = megatron_load_logits(pyconv_torch_dist / family / "release", src, 1, ids)
    assert (got - hf_logits(model, ids)).abs().max().item() < ATOL


@needs_megatron
@pytest.mark.parametrize("name", ["llama", "llama_tp2", "gpt2"])
def test_megatron_core_loads_pyconv_output_tp2_torchrun(tiny_models, torchrun_tp2, name):
    model = tiny_models[name.split("_")[0]][0]
    got = torchrun_tp2["logits"][name]
    assert (got - hf_logits(model, example_ids(model))).abs().max().item() < ATOL


@needs_megatron
def test_pytorch_dcp_reads_pyconv_output_as_megatron_wrote_it(saved_tp1, pyconv_torch_dist):
    """torch.distributed.checkpoint.load (no process group) of pyconv's output gives the tensors
    Megatron-Core saved, key by key."""
    import torch
    import torch.distributed.checkpoint as dcp

    from pyconv.io.dcp import read_metadata

    ours, theirs = read_metadata(str(pyconv_torch_dist / "llama" / "release")), read_metadata(str(saved_tp1["llama"]))
    assert set(ours.tensors) == set(theirs.tensors) and set(theirs.byte_items) <= set(ours.byte_items)
    got = {k: torch.full(t.size, float("nan")) for k, t in ours.tensors.items()}
    want = {k: torch.full(t.size, float("nan")) for k, t in theirs.tensors.items()}
    dcp.load(got, checkpoint_id=str(pyconv_torch_dist / "llama" / "release"))
    dcp.load(want, checkpoint_id=str(saved_tp1["llama"]))
    for key in want:
        assert torch.equal(got[key], want[key]), key
    with open(pyconv_torch_dist / "llama" / "release" / ".metadata", "rb") as f:
        assert type(pickle.load(f)).__name__ == "Metadata"


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_hf_torch_dist_hf_roundtrip(tiny_models, pyconv_torch_dist, tmp_path, family):
    import pyconv

    src = tiny_models[family][1]
    ckpt = pyconv.open(pyconv_torch_dist / family)
    assert (ckpt.format, ckpt.summary()["iteration"], ckpt.summary()["config_from"]) == (
        "torch_dist", "release", "common.pt args")
    pyconv.reshard(pyconv_torch_dist / family, tmp_path / "hf", to="hf")
    assert_hf_equal(tiny_models[family][0], tmp_path / "hf")
    original = json.loads((Path(src) / "config.json").read_text())
    assert json.loads((tmp_path / "hf" / "config.json").read_text()) == original
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (Path(src) / "tokenizer.json").read_bytes()


def test_plain_dcp_save_with_whole_tensor_chunks(tiny_models, pyconv_torch_dist, tmp_path):
    """torch.distributed.checkpoint.save without a process group writes each key as one chunk
    spanning every layer, no metadata.json and no common.pt: read with a config.json beside it."""
    import torch
    import torch.distributed.checkpoint as dcp

    import pyconv
    from pyconv.io.dcp import read_metadata

    release = pyconv_torch_dist / "llama" / "release"
    state = {k: torch.empty(t.size) for k, t in read_metadata(str(release)).tensors.items()}
    dcp.load(state, checkpoint_id=str(release))
    dcp.save(state, checkpoint_id=str(tmp_path / "plain"))
    md = read_metadata(str(tmp_path / "plain"))
    assert all(len(t.chunks) == 1 for t in md.tensors.values())
    assert md.tensors["decoder.layers.mlp.linear_fc1.weight"].chunks[0].sizes == (6, 224, 64)
    _with_config(tmp_path / "plain", tiny_models["llama"][1])
    pyconv.reshard(tmp_path / "plain", tmp_path / "hf", to="hf")
    assert_hf_equal(tiny_models["llama"][0], tmp_path / "hf")


def test_reading_and_writing_never_import_torch(tiny_models, pyconv_torch_dist, tmp_path):
    import pyconv

    code = ("import sys, pyconv; c = pyconv.open(sys.argv[1]); pyconv.reshard(sys.argv[1], sys.argv[2], to='hf'); "
            "pyconv.reshard(sys.argv[3], sys.argv[4], to='torch_dist'); "
            "assert 'torch' not in sys.modules, 'torch was imported'; print(c.format, len(c))")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(pyconv.__file__)))
    out = subprocess.run([sys.executable, "-c", code, str(pyconv_torch_dist / "llama"), str(tmp_path / "hf"),
                          tiny_models["llama"][1], str(tmp_path / "td")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch_dist", "57"]


def test_cli_writes_torch_dist(tiny_models, tmp_path):
    from pyconv.cli import main

    assert main(["reshard", tiny_models["llama"][1], str(tmp_path / "td"), "--to", "torch_dist", "--dtype", "bf16",
                 "--max-shard-size", "200KB"]) == 0
    files = sorted(p.name for p in (tmp_path / "td" / "release").iterdir())
    assert {".metadata", "common.pt", "metadata.json", "__0_0.distcp", "__0_1.distcp"} <= set(files)
    import pyconv

    assert {pyconv.open(tmp_path / "td").dtype(n) for n in pyconv.open(tmp_path / "td").keys()} == {"BF16"}


def test_writer_refuses_pipeline_options(tiny_models, tmp_path):
    import pyconv
    from pyconv.errors import LayoutError

    for option in ("pp", "ep", "first_stage_layers"):  # global tensors load at any pipeline/expert split
        with pytest.raises(LayoutError, match=f"{option} does not apply to format 'torch_dist'"):
            pyconv.reshard(tiny_models["llama"][1], tmp_path / "td", to="torch_dist", **{option: 2})
    assert not (tmp_path / "td").exists()


# ---- hostile input ------------------------------------------------------------------------------------

@pytest.fixture
def copy_of(pyconv_torch_dist, tmp_path):
    """A fresh copy of pyconv's llama torch_dist directory (release/) to damage."""
    count = [0]

    def make(family="llama"):
        count[0] += 1
        dst = tmp_path / f"ckpt{count[0]}"
        shutil.copytree(pyconv_torch_dist / family / "release", dst)
        return dst
    return make


def _read(path):
    import pyconv

    return pyconv.open(path)


def test_truncated_metadata(copy_of):
    from pyconv.errors import FormatError

    ckpt = copy_of()
    data = (ckpt / ".metadata").read_bytes()
    (ckpt / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match=r"\.metadata: malformed pickle"):
        _read(ckpt)
    (ckpt / ".metadata").write_bytes(b"")
    with pytest.raises(FormatError, match=r"\.metadata: empty file"):
        _read(ckpt)


def test_chunk_past_end_of_file(copy_of):
    from pyconv.errors import FormatError

    ckpt = copy_of()
    data_file = ckpt / "__0_0.distcp"
    size = data_file.stat().st_size
    os.truncate(data_file, size - 100)
    with pytest.raises(FormatError, match=r"__0_0\.distcp: 'output_layer\.weight' chunk at offset \[0, 0\] "
                                          r"\(bytes \d+\.\.\d+\) runs past the end of the file"):
        _read(ckpt)


def test_missing_data_file(copy_of):
    from pyconv.errors import FormatError

    ckpt = copy_of()
    (ckpt / "__0_0.distcp").unlink()
    with pytest.raises(FormatError, match=r"__0_0\.distcp: cannot open data file of 'embedding\.word_embeddings"):
        _read(ckpt)


def test_chunk_that_is_not_a_torch_save_archive(copy_of):
    from pyconv.errors import FormatError
    from pyconv.io.dcp import read_metadata

    ckpt = copy_of()
    chunk = read_metadata(str(ckpt)).tensors["decoder.final_layernorm.weight"].chunks[0].location
    with open(ckpt / chunk.relative_path, "r+b") as f:
        f.seek(chunk.offset)
        f.write(b"garbage!")
    with pytest.raises(FormatError, match=r"'decoder\.final_layernorm\.weight' chunk at offset \[0\] .*: not a "
                                          r"torch\.save zip archive"):
        _read(ckpt)


def _rewrite_metadata(ckpt: Path, edit) -> None:
    """Re-emit .metadata after edit(tensors) changes the records."""
    from pyconv.io.dcp import metadata_pickle, read_metadata

    md = read_metadata(str(ckpt))
    tensors = edit(dict(md.tensors))
    (ckpt / ".metadata").write_bytes(metadata_pickle(list(tensors.values()), md.byte_items, "x"))


def test_overlapping_and_missing_chunks(copy_of):
    from dataclasses import replace

    from pyconv.errors import FormatError

    key = "decoder.layers.self_attention.linear_qkv.weight"

    def overlap(tensors):  # layer 1's chunk moved to rows 96.. of layers 0-1: same volume, one overlap
        t = tensors[key]
        moved = replace(t.chunks[1], offsets=(0, 96, 0), sizes=(2, 96, 64))
        tensors[key] = replace(t, chunks=(t.chunks[0], moved) + t.chunks[2:])
        return tensors

    ckpt = copy_of()
    _rewrite_metadata(ckpt, overlap)
    with pytest.raises(FormatError, match=r"'decoder\.layers\.self_attention\.linear_qkv\.weight': chunks at offsets "
                                          r"\[0, 0, 0\] and \[0, 96, 0\] overlap"):
        _read(ckpt)

    def drop(tensors):
        t = tensors[key]
        tensors[key] = replace(t, chunks=t.chunks[:-1])
        return tensors

    ckpt = copy_of()
    _rewrite_metadata(ckpt, drop)
    with pytest.raises(FormatError, match=r"chunks cover 61440 of the 73728 elements of size \[6, 192, 64\]"):
        _read(ckpt)


def test_metadata_pickle_cannot_run_code(copy_of):
    from pyconv.errors import FormatError

    ckpt = copy_of()
    (ckpt / ".metadata").write_bytes(b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.")
    with pytest.raises(FormatError, match=r"refusing to unpickle global 'os\.system'"):
        _read(ckpt)
    (ckpt / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}, 2))
    with pytest.raises(FormatError, match=r"\.metadata: expected a Metadata, found dict"):
        _read(ckpt)


@pytest.mark.parametrize("field, value, message", [
    ("relative_path", "../../etc/passwd", r"relative_path '\.\./\.\./etc/passwd' is not a file name"),
    ("offset", -1, r"offset must be an integer in \[0, 2\*\*63\), got -1"),
    ("length", [[[[1]]]], r"length must be an integer in \[0, 2\*\*63\), got a list"),
    ("transform_descriptors", None, r"stored with transforms \['zstd'\] \(compression"),
])
def test_hostile_storage_info(copy_of, field, value, message):
    from dataclasses import replace

    from pyconv.errors import FormatError
    from pyconv.io import dcp

    ckpt = copy_of()
    md = dcp.read_metadata(str(ckpt))
    items = dict(md.byte_items)
    first = next(iter(items))
    if field != "transform_descriptors":
        items[first] = replace(items[first], **{field: value})
    pickled = dcp.metadata_pickle(list(md.tensors.values()), items, "x")
    if field == "transform_descriptors":  # EMPTY_LIST, 'zstd', APPEND in place of None, once
        pickled = pickled.replace(b"transform_descriptorsN", b"transform_descriptors]X\x04\x00\x00\x00zstda", 1)
    (ckpt / ".metadata").write_bytes(pickled)
    with pytest.raises(FormatError, match=message):
        _read(ckpt)


def test_args_less_checkpoint_without_config_is_refused(copy_of, tmp_path):
    from pyconv.errors import FormatError

    ckpt = copy_of()
    (ckpt / "common.pt").unlink()
    with pytest.raises(FormatError, match=r"common\.pt holds no Megatron args, so the model's dims are unknown: put "
                                          r"the model's Hugging Face config\.json"):
        _read(ckpt)


def test_unknown_key_is_named(copy_of):
    from dataclasses import replace

    from pyconv.errors import FormatError

    def add(tensors):
        t = tensors["decoder.final_layernorm.weight"]
        tensors["decoder.extra_norm.weight"] = replace(t, fqn="decoder.extra_norm.weight")
        return tensors

    ckpt = copy_of()
    _rewrite_metadata(ckpt, add)
    with pytest.raises(FormatError, match=r"tensor 'decoder\.extra_norm\.weight' matches no llama mapping"):
        _read(ckpt)

    def drop(tensors):
        del tensors["decoder.final_layernorm.weight"]
        return tensors

    ckpt = copy_of()
    _rewrite_metadata(ckpt, drop)
    with pytest.raises(FormatError, match=r"no 'decoder\.final_layernorm\.weight' in \.metadata"):
        _read(ckpt)


if __name__ == "__main__":  # torchrun entry; the guard matters: Megatron's checkpoint code spawns processes
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", required=True)
    sys.exit(_run_jobs(parser.parse_args().jobs))


def test_fp8_source_dequantizes_or_is_refused(tmp_path):
    """Block-scaled fp8 weights: --dtype dequantizes them into torch_dist exactly as into HF;
    without a float dtype they are refused before anything is written (they crashed before)."""
    import subprocess
    import sys

    import pyconv
    from pyconv.errors import LayoutError
    from test_output_hashes import make_source

    src = make_source("deepseek_v3_fp8", tmp_path / "src")
    with pytest.raises(LayoutError, match="fp8 with block scales"):
        pyconv.reshard(src, tmp_path / "td", to="torch_dist")
    assert not (tmp_path / "td").exists()
    pyconv.reshard(src, tmp_path / "td", to="torch_dist", dtype="bf16")
    pyconv.reshard(tmp_path / "td", tmp_path / "back", to="hf")
    pyconv.reshard(src, tmp_path / "direct", to="hf", dtype="bf16")
    r = subprocess.run([sys.executable, "-m", "pyconv", "verify", str(tmp_path / "direct"), str(tmp_path / "back")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("to", ["megatron", "torch_dist", "nemo"])
def test_quantizing_to_fp8_is_refused_for_megatron_style_targets(tmp_path, to):
    """--dtype fp8 into a torch checkpoint ended in a TypeError traceback while planning."""
    import pyconv
    from pyconv.errors import LayoutError
    from test_output_hashes import make_source

    src = make_source("llama", tmp_path / "src")
    with pytest.raises(LayoutError, match="cannot hold block-scaled fp8 weights"):
        pyconv.reshard(src, tmp_path / "out", to=to, dtype="fp8")
    assert not (tmp_path / "out").exists()
