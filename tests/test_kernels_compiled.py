"""The kernels compiled for a GPU, on a machine without one: Triton's own ptxas builds every
specialization --device cuda launches for sm_90 (H100), and the PTX is checked for what the
interpreter cannot show: no spilled registers, and no floating-point instruction beyond those
bit-exactness allows (no subnormal flushing, approximate division, fma or float conversions;
bench/compile_kernels.py says which). Whether a GPU then computes the same bits as the CPU
path is for tests/test_kernels.py, run on a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "compile_kernels.py"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    # A process of its own: the kernels must be imported with TRITON_INTERPRET unset, and
    # other test modules set it in this one.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))
    r = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--json"], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return [json.loads(line) for line in r.stdout.splitlines()]


def test_every_specialization_compiles(compiled):
    kernels = {row["kernel"].split("[")[0] for row in compiled}
    assert kernels == {"cast_contiguous_kernel", "gather_rows_cast_kernel", "transpose_cast_kernel", "dequant_kernel",
                       "quantize_kernel"}
    assert len(compiled) == 16 * 2 + 12 * 2 + 4 * 5 + 3 + 1  # casts/transposes, gathers by ALIGN, dequant, quantize
    assert all(row["cubin_bytes"] > 0 and row["arch"] == "sm_90" for row in compiled)


def test_no_spills_and_only_exact_float_instructions(compiled):
    bad = {row["kernel"]: row["problems"] for row in compiled if row["problems"]}
    assert not bad, json.dumps(bad, indent=1)
    assert max(row["registers"] for row in compiled) <= 128
    ops_of = {row["kernel"].split("[")[0]: set() for row in compiled}
    for row in compiled:
        ops_of[row["kernel"].split("[")[0]].update(row["float_ops"])
    assert ops_of == {"cast_contiguous_kernel": set(), "gather_rows_cast_kernel": set(), "transpose_cast_kernel": set(),
                      "dequant_kernel": {"mul.rn.f32"}, "quantize_kernel": {"div.rn.f32", "max.f32"}}


def test_the_check_can_fail():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import compile_kernels
    finally:
        sys.path.remove(str(SCRIPT.parent))
    dequant = next(s for s in compile_kernels.specializations() if s.kernel == "dequant_kernel")
    ptx = "\tmul.rn.f32 \t%f3, %f1, %f2;\n"
    assert compile_kernels.problems(dequant, ptx) == []
    assert compile_kernels.problems(dequant, ptx.replace(".rn", ".rn.ftz"))  # flushes subnormals
    assert compile_kernels.problems(dequant, ptx.replace("mul.rn", "fma.rn"))
    assert compile_kernels.problems(dequant, ptx + "\tcvt.rn.bf16.f32 \t%rs1, %f3;\n")
    assert compile_kernels.problems(dequant, "\tdiv.full.f32 \t%f3, %f1, %f2;\n")
    assert compile_kernels.spills({"stack_bytes": 584}) and not compile_kernels.spills({"stack_bytes": 0})
