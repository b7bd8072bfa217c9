"""Hostile conditions beyond hostile bytes: a destination that appears during the run, two
processes converting into one destination, a source made of symlinks into the destination, FIFOs
named like shards, stray rank directories and trackers that are not what they say. Each ends in
one line and exit 2 (or one winner), with nothing lost and no temporary left behind."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from conftest import file_tree as tree

import pyconv
from pyconv.errors import FormatError, LayoutError, OutputError


def run_cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "pyconv", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def no_temporaries(parent) -> bool:
    return not [n for n in os.listdir(parent) if ".pyconv-tmp" in n or ".pyconv-old" in n]


@pytest.fixture
def llama(tiny_models):
    return tiny_models["llama"][1]


def test_a_destination_that_appears_during_the_run_is_never_replaced(llama, tmp_path):
    dst = tmp_path / "out"

    def phase(name):
        if name == "committing":  # another process got there first
            dst.mkdir()
            (dst / "theirs.txt").write_text("theirs")

    with pytest.raises(OutputError) as e:
        pyconv.reshard(llama, dst, to="hf", phase=phase)
    assert str(e.value) == (f"{dst}: destination appeared while this conversion ran (another process writing "
                            "it?); it was left as it is")
    assert os.listdir(dst) == ["theirs.txt"] and no_temporaries(tmp_path)


def test_two_processes_into_one_destination_one_wins(llama, tmp_path):
    dst = tmp_path / "out"
    procs = [subprocess.Popen([sys.executable, "-m", "pyconv", "reshard", llama, str(dst), "--to", "megatron",
                               "--tp", str(tp)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tp in (1, 2)]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for code, _, err in results if code == 2)
    assert loser.startswith("pyconv: error: ") and ("destination appeared" in loser or "destination exists" in loser)
    winner_tp = 1 + [code for code, _, _ in results].index(0)
    assert pyconv.open(dst).summary()["tp"] == winner_tp and no_temporaries(tmp_path)


def test_force_refuses_a_source_made_of_links_into_the_destination(llama, tmp_path):
    """A hub cache's snapshot: the source directory holds symlinks; here they point into the
    destination, which --force would replace (and so delete the source's bytes)."""
    blobs = tmp_path / "blobs"
    shutil.copytree(llama, blobs)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for name in os.listdir(blobs):
        os.symlink(blobs / name, snapshot / name)
    before = tree(blobs)
    with pytest.raises(OutputError) as e:
        pyconv.reshard(snapshot, blobs, to="hf", force=True)
    assert "inside the destination; replacing the destination would destroy it" in str(e.value)
    assert tree(blobs) == before and no_temporaries(tmp_path)
    r = run_cli("reshard", snapshot, blobs, "--to", "hf", "--force")
    assert r.returncode == 2 and tree(blobs) == before


@pytest.mark.parametrize("victim", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_fifo_named_like_a_checkpoint_file_is_refused_at_once(llama, tmp_path, victim):
    src = tmp_path / "src"
    pyconv.reshard(llama, src, to="hf", max_shard_size="1GB")  # model.safetensors, config, tokenizer files
    os.remove(src / victim)
    os.mkfifo(src / victim)
    started = time.monotonic()
    r = run_cli("reshard", src, tmp_path / "out", "--to", "hf", timeout=30)
    assert time.monotonic() - started < 20
    assert r.returncode == 2 and r.stderr == (f"pyconv: error: {src / victim}: a FIFO, not a regular file: pyconv "
                                              "reads checkpoints made of regular files\n")
    assert not (tmp_path / "out").exists()


def test_fifos_in_megatron_and_dcp_trees(llama, tmp_path):
    pyconv.reshard(llama, tmp_path / "meg", to="megatron")
    pyconv.reshard(llama, tmp_path / "td", to="torch_dist")
    for root, victim in ((tmp_path / "meg", "release/mp_rank_00/model_optim_rng.pt"),
                         (tmp_path / "meg", "latest_checkpointed_iteration.txt"),
                         (tmp_path / "td", "release/__0_0.distcp"), (tmp_path / "td", "release/.metadata")):
        os.replace(root / victim, tmp_path / "kept")
        os.mkfifo(root / victim)
        r = run_cli("inspect", root, timeout=30)
        assert r.returncode == 2 and f"{root / victim}: a FIFO" in r.stderr, r.stderr
        os.remove(root / victim)
        os.replace(tmp_path / "kept", root / victim)


def test_stray_rank_directory_is_refused_by_name(llama, tmp_path):
    pyconv.reshard(llama, tmp_path / "meg", to="megatron", pp=2)  # mp_rank_00_000, mp_rank_00_001
    release = tmp_path / "meg" / "release"
    pyconv.reshard(llama, tmp_path / "other", to="megatron")
    shutil.copytree(tmp_path / "other" / "release" / "mp_rank_00", release / "mp_rank_00")
    with pytest.raises(FormatError) as e:
        pyconv.open(tmp_path / "meg")
    assert str(e.value) == (f"{release}: rank directories named two ways (mp_rank_00 and mp_rank_00_000), which "
                            "cannot both belong to one checkpoint: remove the stray ones")


@pytest.mark.parametrize("text, shown", [("\u00b2", "'²'"), ("12\u0663", "'12٣'"), ("7" + " " * 70 + "x", None)])
def test_trackers_that_are_not_iteration_numbers(llama, tmp_path, text, shown):
    pyconv.reshard(llama, tmp_path / "meg", to="megatron", iteration=7)
    tracker = tmp_path / "meg" / "latest_checkpointed_iteration.txt"
    tracker.write_text(text)
    r = run_cli("inspect", tmp_path / "meg")
    assert r.returncode == 2 and r.stderr.startswith(f"pyconv: error: {tracker}: expected 'release' or an iteration "
                                                     "number, found ") and r.stderr.count("\n") == 1, r.stderr
    if shown:
        assert shown in r.stderr


def test_only_iterations_pyconv_can_read_are_written(llama, tmp_path):
    r = run_cli("reshard", llama, tmp_path / "meg", "--to", "megatron", "--iteration", "-5")
    assert r.returncode == 2 and r.stderr == "pyconv: error: iteration must be a whole number >= 0, got -5\n"
    with pytest.raises(LayoutError, match="vocab_divisible_by must be a positive integer"):
        pyconv.reshard(llama, tmp_path / "x", to="megatron", vocab_divisible_by=0)
    pyconv.reshard(llama, tmp_path / "big", to="megatron", iteration=123456789)  # more than 7 digits
    assert (tmp_path / "big" / "iter_123456789").is_dir()
    assert pyconv.open(tmp_path / "big").summary()["iteration"] == "123456789"
    assert not (tmp_path / "meg").exists()


def test_dcp_tiling_check_is_linear_in_the_chunks():
    """32,000 chunks of one tensor took minutes (every chunk against every chunk of its dim-0 band)."""
    from pyconv.io.dcp import MAX_TILING_CELLS, DcpChunk, _check_tiling

    n = 32_000
    started = time.monotonic()
    _check_tiling("w", (8, 4 * n), [DcpChunk((0, 4 * i), (8, 4), None) for i in range(n)], "w")
    _check_tiling("w", (n, 2, 8), [DcpChunk((i, j, 0), (1, 1, 8), None) for i in range(n // 2) for j in range(2)]
                  + [DcpChunk((n // 2, 0, 0), (n - n // 2, 2, 8), None)], "w")
    assert time.monotonic() - started < 5
    with pytest.raises(FormatError, match=r"chunks at offsets \[0, 124\] and \[0, 126\] overlap"):
        _check_tiling("w", (8, 4 * n), [DcpChunk((0, 4 * i), (8, 4), None) for i in range(n - 1)]
                      + [DcpChunk((0, 126), (8, 4), None)], "w")
    # Each row cut at its own column: as many grid cells as rows x rows; refused at once, not checked for hours.
    rows = 2048
    irregular = [c for i in range(rows) for c in (DcpChunk((i, 0), (1, i + 1), None),
                                                  DcpChunk((i, i + 1), (1, rows - i), None))]
    started = time.monotonic()
    with pytest.raises(FormatError, match=f"pyconv checks tilings of up to {MAX_TILING_CELLS} cells"):
        _check_tiling("w", (rows, rows + 1), irregular, "w")
    assert time.monotonic() - started < 5


def test_a_pickle_bomb_is_refused_before_it_is_built(tmp_path):
    """A data.pkl of nothing but empty lists (one byte each) would build ~56 bytes of objects per
    byte: 300 MB of it was OOM-killed. prescan estimates what the load would build and stops."""
    import resource

    from pyconv.io.unpickle import MAX_UNPICKLED_BYTES, restricted_load

    bomb = b"\x80\x02(" + b"]" * 20_000_000 + b"l."
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(FormatError, match=rf"bomb.pkl: unpickling would build more than {MAX_UNPICKLED_BYTES >> 20} "
                                          r"MiB of objects by byte \d+ of 20000005 \(a pickle bomb\?\)"):
        restricted_load(bomb, "bomb.pkl")
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 400


def test_a_config_claiming_ten_million_layers_is_refused_at_once(llama, tmp_path):
    import json

    src = tmp_path / "src"
    shutil.copytree(llama, src)
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 10**7
    (src / "config.json").write_text(json.dumps(config))
    for to in ("torch_dist", "nemo", "megatron"):
        started = time.monotonic()
        with pytest.raises(LayoutError, match="the config says 10000000 layers, but the tensors hold 6"):
            pyconv.plan_reshard(src, to=to)
        assert time.monotonic() - started < 10


def test_torch_dist_args_claiming_ten_million_layers(llama, tmp_path):
    import torch

    pyconv.reshard(llama, tmp_path / "td", to="torch_dist")
    common = tmp_path / "td" / "release" / "common.pt"
    state = torch.load(common, weights_only=False)
    state["args"].num_layers = 10**7
    torch.save(state, common)
    started = time.monotonic()
    with pytest.raises(FormatError, match="stacks 6 layers, the model config says 10000000"):
        pyconv.open(tmp_path / "td")
    assert time.monotonic() - started < 10


@pytest.fixture(scope="module")
def transposed_source(tmp_path_factory):
    """~100 MB of transposed fp32 views: casting them (transposing copies on one thread) takes
    several of the executor's 100 ms progress ticks, so a tick can truncate the file mid-run."""
    import torch

    src = tmp_path_factory.mktemp("shrinking") / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    torch.save({"a": torch.randn(4096, 4096, generator=g).t(), "b": torch.randn(2048, 4096, generator=g).t()},
               src / "pytorch_model.bin")
    return src


def _truncating_tick(path):
    def tick(done, total):
        if not tick.fired:
            tick.fired = True
            os.truncate(path, 1000)
        return True

    tick.fired = False
    return tick


@pytest.mark.parametrize("how", ["cast", "verify"])
def test_a_source_that_shrinks_during_the_run_is_an_error_not_sigbus(transposed_source, tmp_path, how):
    src = tmp_path / "src"
    shutil.copytree(transposed_source, src)
    if how == "verify":
        pyconv.reshard(src, tmp_path / "good", to="hf")
    bin_file = src / "pytorch_model.bin"
    size = os.path.getsize(bin_file)
    tick = _truncating_tick(bin_file)
    with pytest.raises(FormatError) as e:
        if how == "cast":
            pyconv.reshard(src, tmp_path / "out", to="hf", dtype="bf16", threads=1, progress=tick)
        else:
            pyconv.verify(src, tmp_path / "good", threads=1, progress=tick)
    assert tick.fired
    assert str(e.value) == (f"{bin_file}: the file changed while it was read (it was {size} bytes, it is 1000 "
                            "bytes): another process truncated or rewrote it")
    assert not (tmp_path / "out").exists() and no_temporaries(tmp_path)


def test_a_config_json_of_many_megabytes_is_refused_unread(llama, tmp_path):
    import json

    from pyconv.io.jsonfile import MAX_CONFIG_BYTES

    src = tmp_path / "src"
    shutil.copytree(llama, src)
    config = json.loads((src / "config.json").read_text())
    config["id2label"] = {str(i): "x" * 40 for i in range(200_000)}  # ~10 MB
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError) as e:
        pyconv.open(src)
    assert str(e.value) == f"{src / 'config.json'}: config is larger than {MAX_CONFIG_BYTES} bytes"


def test_a_header_of_many_empty_tensors_costs_memory_in_proportion(tmp_path):
    """#15 item 10: a header of 200,000 empty tensors (11.7 MB; the probe's had 1.6M) is read into
    a catalog with peak memory within 16x its size over the interpreter's own (the json-module
    reader took 24x; the core's parser and StoredTensors about 10x)."""
    import json
    import struct

    header = {f"t{i}": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]} for i in range(200_000)}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    code = ("import resource, sys, pyconv\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "n = len(pyconv.open(sys.argv[1]).keys())\n"
            "print(n, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "model")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    count, before_kib, after_kib = map(int, proc.stdout.split())
    assert count == 200_000
    assert (after_kib - before_kib) * 1024 <= 16 * len(raw), (after_kib - before_kib, len(raw))
