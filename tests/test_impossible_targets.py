"""Targets Megatron-Core could not build, or options that cannot apply, are refused before anything
is written: exit 2, one line naming the numbers, no destination (not even a temporary). The rules
are Megatron-Core 0.16.1's (TransformerConfig.__post_init__: heads and query groups against tp,
first/last pipeline stages > 0 and middle stages not empty, vpp against the layers of each rank)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import pyconv
from pyconv.errors import LayoutError


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "pyconv", *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def llama(tiny_models):
    model, path = tiny_models["llama"]
    assert (model.config.num_attention_heads, model.config.num_key_value_heads, model.config.num_hidden_layers) == (4, 2, 6)
    return path


REFUSED = [
    (("--to", "megatron", "--tp", "8"),
     "tp=8 does not divide num_attention_heads=4: Megatron-Core splits the attention heads over the tensor-parallel "
     "ranks"),
    (("--to", "megatron", "--tp", "16"), "tp=16 does not divide num_attention_heads=4"),
    (("--to", "torch_dist", "--tp", "8"), "tp=8 does not divide num_attention_heads=4"),
    (("--to", "megatron", "--tp", "3"), "tp=3 does not divide num_attention_heads=4"),
    (("--to", "megatron", "--pp", "4"), "6 layers are not divisible over the 4 remaining pipeline stages"),
    (("--to", "megatron", "--pp", "2", "--vpp", "2"), "pipeline rank 0 holds 3 layers, not divisible into vpp=2 chunks"),
    (("--to", "megatron", "--pp", "2", "--first-stage-layers", "0"),
     "the first pipeline stage must hold at least one layer (first=0)"),
    (("--to", "megatron", "--pp", "2", "--last-stage-layers", "6"),
     "no layers left for the 1 other pipeline stage (num_layers=6, pp=2, first=None, last=6)"),
    (("--to", "megatron", "--pp", "3", "--pipeline-layout", "Et|tt|tt|tL"),
     "pipeline layout 'Et|tt|tt|tL' has 4 stages, not a multiple of pp=3"),
    (("--to", "megatron", "--pp", "4", "--vpp", "2", "--pipeline-layout", "Et|tt|tt|tL"),
     "pipeline layout 'Et|tt|tt|tL' gives vpp=1, not 2"),
    (("--to", "megatron", "--pipeline-layout", "Et|tt|tt|tL", "--pp", "4", "--first-stage-layers", "1"),
     "a pipeline layout places every layer itself"),
    (("--to", "megatron", "--etp", "2"), "etp=2 needs a mixture-of-experts model"),
    (("--to", "megatron", "--ep", "2"), "ep=2 needs a mixture-of-experts model"),
    (("--to", "hf", "--tp", "2"), "option tp does not apply to format 'hf' (its options: max_shard_size)"),
    (("--to", "megatron", "--threads", "0"), "threads must be a positive integer, got 0"),
    (("--to", "megatron", "--threads", "-1"), "threads must be a positive integer, got -1"),
    (("--to", "megatron", "--tp", "0"), "tp must be a positive integer, got 0"),
]


@pytest.mark.parametrize("args, message", REFUSED, ids=[" ".join(a) for a, _ in REFUSED])
def test_refused_before_anything_is_written(llama, tmp_path, args, message):
    out = run_cli("reshard", llama, tmp_path / "out", *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("pyconv: error: ") and message in out.stderr and out.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []


def test_megatron_core_accepts_what_passes(llama, tmp_path):
    """tp a multiple of the query groups (tp 4 over 2 groups) is one Megatron-Core builds: each
    group's rows are split by raw rows, as its attention all-gathers and slices them."""
    pyconv.reshard(llama, tmp_path / "tp4", to="megatron", tp=4)
    assert len(os.listdir(tmp_path / "tp4" / "release")) == 4


def test_the_api_refuses_the_same_without_cli_words(llama, tmp_path):
    with pytest.raises(LayoutError) as e:
        pyconv.reshard(llama, tmp_path / "out", to="megatron", threads=0)
    assert str(e.value) == "threads must be a positive integer, got 0"
    with pytest.raises(LayoutError, match="tp=8 does not divide num_attention_heads=4"):
        pyconv.plan_reshard(llama, to="megatron", tp=8)
    with pytest.raises(LayoutError, match="threads must be a positive integer"):
        pyconv.verify(llama, llama, threads=-2)


def test_query_groups_must_divide_or_be_divided_by_tp():
    from pyconv.families import ModelDims
    from pyconv.mcore.config import check_tensor_parallel

    dims = ModelDims(num_layers=2, hidden=96, heads=12, groups=4, head_dim=8, ffn=64, vocab=32)
    for tp in (1, 2, 4, 12):
        check_tensor_parallel(dims, tp)  # 12 heads; 4 groups: divided by 1, 2, 4, a divisor of 12
    with pytest.raises(LayoutError, match="tp=6 neither divides num_query_groups=4 nor is a multiple of it"):
        check_tensor_parallel(dims, 6)
    with pytest.raises(LayoutError, match="tp=3 neither divides num_query_groups=4"):
        check_tensor_parallel(dims, 3)
