"""Scale-out with torchrun: output files split across ranks, rank 0 commits; identical output."""

from __future__ import annotations

import filecmp
import os
import socket
import subprocess
import sys

import pytest

import pyconv
from pyconv.scaleout import partition_files


def test_partition_balances_bytes_and_covers_every_file_once():
    sizes = [100, 5, 60, 40, 40, 1, 0, 30]
    parts = partition_files(sizes, 3)
    assert sorted(i for p in parts for i in p) == list(range(len(sizes)))
    # Largest first onto the least-loaded rank: 100 | 60, 30 | 40, 40, 5, 1, 0.
    assert parts == [[0], [2, 7], [1, 3, 4, 5, 6]]
    assert [sum(sizes[i] for i in p) for p in parts] == [100, 90, 86]
    assert partition_files(sizes, 3) == parts  # deterministic: every rank computes the same split
    assert partition_files([7], 4) == [[0], [], [], []]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
                           f"--master-port={free_port()}", "-m", "pyconv", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def same_tree(a, b):
    cmp = filecmp.dircmp(a, b)
    assert not cmp.left_only and not cmp.right_only and not cmp.diff_files and not cmp.funny_files, cmp.report()
    for sub in cmp.common_dirs:
        same_tree(os.path.join(a, sub), os.path.join(b, sub))
    for name in cmp.common_files:  # dircmp's shallow compare looks at stat only
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name


@pytest.mark.parametrize("to, layout", [("megatron", ["--tp", "2", "--pp", "3"]), ("hf", ["--max-shard-size", "30KB"])])
def test_two_ranks_write_what_one_process_writes(tiny_models, tmp_path, to, layout):
    _, src = tiny_models["llama"]
    r = torchrun("reshard", src, tmp_path / "two", "--to", to, *layout)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("wrote ") == 1  # rank 0 reports for all
    pyconv.reshard(src, tmp_path / "one", to=to, **({"tp": 2, "pp": 3} if to == "megatron" else
                                                      {"max_shard_size": "30KB"}))
    same_tree(tmp_path / "one", tmp_path / "two")
    assert [e for e in os.listdir(tmp_path) if ".pyconv-" in e] == []


def test_a_refused_destination_fails_on_every_rank(tiny_models, tmp_path):
    _, src = tiny_models["gpt2"]
    (tmp_path / "exists").mkdir()
    r = torchrun("reshard", src, tmp_path / "exists", "--to", "hf")
    assert r.returncode != 0 and "destination exists" in r.stderr
    assert os.listdir(tmp_path / "exists") == [] and [e for e in os.listdir(tmp_path) if ".pyconv-" in e] == []
