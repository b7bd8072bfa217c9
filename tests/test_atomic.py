"""Nothing lost: output appears atomically; failures and interrupts leave no half-written checkpoint."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

import pyconv
from pyconv.errors import Cancelled, OutputError


def tree_digest(path):
    digest = {}
    for root, _, files in os.walk(path):
        for name in files:
            p = os.path.join(root, name)
            digest[os.path.relpath(p, path)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return digest


def leftovers(dst):
    parent, name = os.path.split(str(dst))
    return [e for e in os.listdir(parent) if e.startswith(f".{name}.pyconv-")]


def test_existing_destination_needs_force(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="exists"):
        pyconv.reshard(src, dst)
    assert (dst / "keep.txt").read_text() == "mine"
    pyconv.reshard(src, dst, force=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()
    assert leftovers(dst) == []


def test_destination_inside_source_is_refused(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    before = tree_digest(src)
    for dst in (src, os.path.join(src, "sub"), os.path.dirname(src)):
        with pytest.raises(OutputError):
            pyconv.reshard(src, dst, force=True)
    assert tree_digest(src) == before


def test_stale_temporaries_of_dead_runs_are_removed(tiny_models, tmp_path):
    _, src = tiny_models["gpt2"]
    dst = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.pyconv-tmp-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    pyconv.reshard(src, dst)
    assert not stale.exists() and leftovers(dst) == []


def test_interrupt_leaves_nothing(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    before = tree_digest(src)
    dst = tmp_path / "out"

    def interrupt(done, total):
        raise KeyboardInterrupt

    with pytest.raises(Cancelled):
        pyconv.reshard(src, dst, progress=interrupt)
    assert not dst.exists() and leftovers(dst) == []
    assert tree_digest(src) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_destination(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(OutputError, match="ro"):
            pyconv.reshard(src, parent / "out")
    finally:
        parent.chmod(0o700)


def test_source_is_untouched(tiny_models, tmp_path):
    _, src = tiny_models["qwen2"]
    before = tree_digest(src)
    stat_before = {n: os.stat(os.path.join(src, n)).st_mtime_ns for n in os.listdir(src)}
    pyconv.reshard(src, tmp_path / "out", dtype="bf16", max_shard_size="20KB")
    assert tree_digest(src) == before
    assert {n: os.stat(os.path.join(src, n)).st_mtime_ns for n in os.listdir(src)} == stat_before


def test_destination_under_a_file_is_refused(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="afile"):
        pyconv.reshard(src, tmp_path / "afile" / "out")
