"""--device cuda end to end: the same plan executed by the Triton path gives the same bytes as
the C++ core. Run under TRITON_INTERPRET=1 (the kernels on CPU tensors, the whole executor
path otherwise unchanged); on a machine with a GPU the in-process tests use it instead."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
if not HAS_GPU:
    # Before anything imports triton (building the fixtures' models may): triton decides at
    # import whether its own jit functions run interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyconv  # noqa: E402
from conftest import file_tree as tree  # noqa: E402
from pyconv import cuda_exec  # noqa: E402
from pyconv.execute import execute_plan  # noqa: E402
from test_fp8_hf import deepseek_fp8  # noqa: E402,F401  (the DeepSeek-V3-style fp8 checkpoint fixture)


@pytest.fixture
def interpreted():
    """Kernels interpreted on the CPU unless a GPU is here (see above)."""
    assert HAS_GPU or os.environ.get("TRITON_INTERPRET") == "1"


def assert_same_tree(got, expected) -> None:
    a, b = tree(got), tree(expected)
    assert sorted(a) == sorted(b), f"files differ: {sorted(set(a) ^ set(b))}"
    differing = [name for name in a if a[name] != b[name]]
    assert not differing, f"{len(differing)} of {len(a)} files differ: {differing[:5]}"


def both_ways(src, tmp_path, **options) -> dict:
    """Runs one plan through the C++ core and through --device cuda; returns the cuda stats."""
    plan = pyconv.plan_reshard(str(src), **options)
    execute_plan(plan, tmp_path / "cpu")
    stats = execute_plan(plan, tmp_path / "cuda", device="cuda")
    assert_same_tree(tmp_path / "cuda", tmp_path / "cpu")
    return plan, stats


def cast_tensors(plan) -> int:
    return sum(any(c.src_dtype != t.dtype or c.scale_source for c in t.copies) or t.quantize is not None
               for f in plan.files for t in f.tensors)


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pyconv", *map(str, args)], capture_output=True, text=True, env=env)


def test_llama_gqa_to_megatron_tp2_bf16_cli_equals_cpu(tiny_models, tmp_path):
    # GQA (4 heads, 2 KV heads, head_dim 24): each rank's linear_qkv is the fused permutation
    # of its q, k, v rows, cast fp32 -> bf16 in one kernel.
    src = tiny_models["llama"][1]
    args = ("reshard", src, None, "--to", "megatron", "--tp", "2", "--dtype", "bf16")
    cpu = run_cli(*[tmp_path / "cpu" if a is None else a for a in args])
    assert cpu.returncode == 0, cpu.stderr
    env = dict(os.environ, **({} if HAS_GPU else {"TRITON_INTERPRET": "1"}))
    gpu = run_cli(*[tmp_path / "cuda" if a is None else a for a in args], "--device", "cuda", env=env)
    assert gpu.returncode == 0, gpu.stderr
    assert_same_tree(tmp_path / "cuda", tmp_path / "cpu")


def test_megatron_tp2_back_to_hf_fp16_in_small_bands(tiny_models, tmp_path, interpreted, monkeypatch):
    # Megatron -> HF: the inverse QKV permutation, row-parallel shards placed side by side,
    # vocab padding dropped; slots of 8 KiB (2 of them) cut tensors into many bands.
    meg = tmp_path / "meg"
    pyconv.reshard(tiny_models["llama"][1], meg, to="megatron", tp=2)
    monkeypatch.setattr(cuda_exec, "SLOT_BYTES", 8192)
    monkeypatch.setattr(cuda_exec, "SLOTS", 2)
    _, stats = both_ways(meg, tmp_path, to="hf", dtype="fp16", max_shard_size="60KB")
    assert stats["device_tasks"] > 50 and stats["tasks"] > stats["device_tasks"] // 2
    assert stats["launches"]["rows"] > 0  # the q, k, v rows gathered out of the fused shards, cast on the way
    assert stats["pinned_slots"] <= 2 and stats["oversized_slots"] == 0  # host memory bounded by the slots


def test_deepseek_fp8_to_bf16_equals_cpu(deepseek_fp8, tmp_path, interpreted):  # noqa: F811
    _, src, _, _ = deepseek_fp8
    plan, stats = both_ways(src, tmp_path, to="hf", dtype="bf16", max_shard_size="300KB")
    assert stats["device_tasks"] == cast_tensors(plan) > 0 and stats["launches"]["dequant"] > 0


def test_deepseek_layout_tp2_cuts_inside_scale_blocks(deepseek_fp8, tmp_path, interpreted):  # noqa: F811
    # DeepSeek's inference layout, mp 2, dequantized: down_proj's 288 columns split 144 / 144,
    # so rank 1's copies start in the middle of a 128-wide scale block.
    _, src, _, _ = deepseek_fp8
    plan, stats = both_ways(src, tmp_path, to="deepseek", tp=2, dtype="bf16")
    assert any(c.scale_source and c.scale_col0 % 128 for f in plan.files for t in f.tensors for c in t.copies)
    assert stats["launches"]["dequant"] > 0


def test_quantize_to_fp8_equals_cpu(deepseek_fp8, tmp_path, interpreted):  # noqa: F811
    _, src, _, _ = deepseek_fp8
    plan, stats = both_ways(src.parent / "bf16-source", tmp_path, to="hf", dtype="fp8", max_shard_size="200KB")
    assert sum(t.quantize is not None for f in plan.files for t in f.tensors) > 10
    assert stats["device_tasks"] == cast_tensors(plan) and stats["launches"]["quantize"] > 10


def test_gpt2_transposed_weights_with_and_without_a_cast(tiny_models, tmp_path, interpreted):
    # GPT-2's Conv1D weights are transposed on the way to Megatron: on the device with a cast,
    # on the host without one.
    src = tiny_models["gpt2"][1]
    plan, stats = both_ways(src, tmp_path / "bf16", to="megatron", tp=2, dtype="bf16")
    assert any(c.transpose for f in plan.files for t in f.tensors for c in t.copies)
    assert stats["device_tasks"] == cast_tensors(plan) > 0 and stats["launches"]["transpose"] > 0
    plan, stats = both_ways(src, tmp_path / "same", to="megatron", tp=2)
    assert stats["device_tasks"] == cast_tensors(plan) == 0


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present")
def test_without_gpu_or_interpreter_exit_2_and_nothing_written(tiny_models, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = run_cli("reshard", tiny_models["llama"][1], tmp_path / "out", "--dtype", "bf16", "--device", "cuda", env=env)
    assert r.returncode == 2, r.stderr
    assert "device cuda: no CUDA GPU" in r.stderr and "TRITON_INTERPRET=1" in r.stderr
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path) == []


def test_cpu_path_imports_neither_torch_nor_triton(tiny_models, tmp_path):
    code = ("import sys, pyconv; pyconv.reshard(sys.argv[1], sys.argv[2], dtype='bf16'); "
            "print(sorted(m for m in ('torch', 'triton', 'pyconv._kernels') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code, tiny_models["llama"][1], tmp_path / "out"], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_llama_qkv_shards_use_the_fused_permutation_kernel(tiny_models, tmp_path, interpreted):
    plan, stats = both_ways(tiny_models["llama"][1], tmp_path, to="megatron", tp=2, dtype="bf16")
    qkv = [t for f in plan.files for t in f.tensors if t.name.endswith("linear_qkv.weight")]
    assert len(qkv) == 2 * 6 and all(len(t.copies) == 3 for t in qkv)  # 1 group per rank: q, k, v blocks
    assert stats["launches"]["rows"] >= len(qkv)


def test_rows_wider_than_a_slot_and_odd_shapes(tmp_path, interpreted, monkeypatch):
    # A 20 KB row does not fit an 8 KiB slot: it gets a slot of its own, which is not recycled.
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    src = tmp_path / "src"
    src.mkdir()
    save_file({"wide": torch.randn(3, 5000, generator=g), "vector": torch.randn(301, generator=g),
               "scalar": torch.tensor(1.5), "ids": torch.arange(7), "empty": torch.zeros(0, 4)}, src / "model.safetensors")
    monkeypatch.setattr(cuda_exec, "SLOT_BYTES", 8192)
    _, stats = both_ways(src, tmp_path, to="hf", dtype="bf16")
    assert stats["device_tasks"] >= 3 + 1  # wide: one band per row; vector: one band
    assert stats["oversized_slots"] == 3 and stats["pinned_slots"] <= cuda_exec.SLOTS


def test_source_truncated_after_planning_is_a_format_error(tiny_models, tmp_path, interpreted):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(tiny_models["llama"][1], src)
    plan = pyconv.plan_reshard(str(src), to="hf", dtype="bf16")
    shard = sorted(src.glob("*.safetensors"))[-1]
    os.truncate(shard, shard.stat().st_size - 100)
    with pytest.raises(pyconv.FormatError, match=f"{shard}: block copy source range .* lies outside the file"):
        execute_plan(plan, tmp_path / "out", device="cuda")
    assert sorted(os.listdir(tmp_path)) == ["src"]  # no destination, no temporary left


def test_plan_is_validated_by_the_core(tiny_models, tmp_path, interpreted):
    """The cuda path has no checks of its own: a plan whose copies overlap (and leave a hole, so
    their areas add up) is refused by _core.validate, with the core's message, before anything runs."""
    import dataclasses

    plan = pyconv.plan_reshard(tiny_models["llama"][1], to="hf", dtype="bf16")
    index, (fi, ti) = next((k, ft) for k, ft in enumerate((fi, ti) for fi, f in enumerate(plan.files)
                                                            for ti in range(len(f.tensors)))
                           if len(plan.files[ft[0]].tensors[ft[1]].copies) == 1
                           and plan.files[ft[0]].tensors[ft[1]].view2d[0] >= 2)
    f = plan.files[fi]
    t = f.tensors[ti]
    (c,) = t.copies
    rows, cols = t.view2d
    copies = (dataclasses.replace(c, rows=rows - 1), dataclasses.replace(c, rows=1))  # row 0 twice, the last never
    tensors = f.tensors[:ti] + (dataclasses.replace(t, copies=copies),) + f.tensors[ti + 1:]
    bad = dataclasses.replace(plan, files=plan.files[:fi] + (dataclasses.replace(f, tensors=tensors),) + plan.files[fi + 1:])
    dst = tmp_path / "out"
    expected = (f"{dst / f.path}: output tensor #{index}: block copies #0 [0+{rows - 1}, 0+{cols}] and #1 [0+1, 0+{cols}] "
                f"overlap in rows [0, 1), columns [0, {cols})")
    with pytest.raises(pyconv.FormatError, match=re.escape(expected)):
        execute_plan(bad, dst, device="cuda")
    assert os.listdir(tmp_path) == []
    with pytest.raises(pyconv.FormatError, match=re.escape(expected.replace(str(dst), str(tmp_path / "direct")))):
        cuda_exec.execute_plan_cuda(bad, str(tmp_path / "direct"))  # called directly, it validates too
    assert os.listdir(tmp_path) == []


def test_cancelled_by_progress_leaves_nothing(tiny_models, tmp_path, interpreted):
    plan = pyconv.plan_reshard(tiny_models["llama"][1], to="hf", dtype="bf16")
    seen = []

    def progress(done, total):
        seen.append((done, total))
        return len(seen) < 3

    with pytest.raises(pyconv.errors.Cancelled):
        execute_plan(plan, tmp_path / "out", device="cuda", progress=progress)
    assert len(seen) == 3 and seen[-1][0] < seen[-1][1] and os.listdir(tmp_path) == []


def test_neighbouring_reads_merge():
    R = cuda_exec._Read
    reads = [R("a", 0, 64, 2, 64, 0, 64), R("a", 128, 0, 1, 64, 128, 0), R("b", 192, 0, 1, 64, 192, 0),
             R("b", 256, 128, 2, 64, 256, 64)]  # the last one is strided: not merged
    merged = cuda_exec._merge_reads(reads)
    assert merged == [R("a", 0, 0, 1, 192, 0, 0), R("b", 192, 0, 1, 64, 192, 0), R("b", 256, 128, 2, 64, 256, 64)]


def test_row_interleaved_mindspore_fc1_equals_cpu(tiny_models, tmp_path, interpreted):
    """MindFormers' [g0; u0; g1; u1...] fc1 is planned in an [n, 2 * in] view (PlannedTensor.view)."""
    _, src = tiny_models["llama"]
    plan, _ = both_ways(src, tmp_path, to="mindspore", dtype="bf16")
    assert any(t.view is not None for f in plan.files for t in f.tensors)


@pytest.mark.parametrize("dtype", [None, "bf16"])
def test_strided_views_equal_cpu(tmp_path, interpreted, dtype):
    # Views torch.save kept with their strides: transposing copies, per-row and per-column copies
    # of stepped slices, repeated (stride 0) rows, with a cast on the device or bytes on the host.
    from test_strided_views import view_matrix

    (tmp_path / "src").mkdir()
    torch.save({k: v for k, v in view_matrix().items() if v.dtype != torch.bool or dtype is None},
               tmp_path / "src" / "pytorch_model.bin")
    plan, _ = both_ways(tmp_path / "src", tmp_path, to="hf", dtype=dtype)
    assert sum(c.transpose for f in plan.files for t in f.tensors for c in t.copies) > 5
