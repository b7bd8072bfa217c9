"""Compiles every Triton kernel specialization that --device cuda launches for a GPU
architecture, on any machine: Triton carries its own ptxas, so neither a GPU nor a driver is
needed. For each it reports compile time, registers, spills, shared memory and the floating
point instructions in the PTX.

--check fails (exit 1) if a kernel spills registers or its PTX does more than bit-exactness
allows: the casts are integer code (no float instruction at all, no float cvt),
dequantization has one IEEE multiply (mul.rn.f32), quantization true divisions (div.rn.f32)
and a max; nothing flushes subnormals (.ftz), approximates (.approx, div.full) or fuses
(fma). That is what compiled code must hold to equal the CPU path bit for bit; that a GPU
then runs it so is for tests/test_kernels.py on a GPU to prove.

    python bench/compile_kernels.py [--arch 90,80] [--check] [--json]

Run it with TRITON_INTERPRET unset: under the interpreter triton.jit builds no compilable
function. The kernels are imported as pyconv._kernels, so pyconv must be installed (editable
or not); the repository root is deliberately not put on sys.path, where its source pyconv/
(without _core or _kernels) would shadow the installed one."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Specialization:
    kernel: str  # attribute of pyconv._kernels.cast / .fp8
    signature: dict  # argument name -> Triton type ("*i16", "i64", "constexpr")
    constexprs: dict
    num_warps: int = 4
    allowed_float_ops: frozenset = field(default_factory=frozenset)

    @property
    def name(self) -> str:
        return self.kernel + "[" + ",".join(f"{k}={v}" for k, v in self.constexprs.items()) + "]"


def specializations() -> list[Specialization]:
    """What kernels/ops.py launches on a GPU, in its compiled launch shapes: every source and
    target format pair of the casts, every ALIGN of the row gather, each dequantization
    target, the quantizer."""
    from pyconv._kernels.bits import BF16, E4M3, F16, F32
    from pyconv._kernels.ops import COMPILED_SHAPES as SHAPES
    from pyconv._kernels.ops import SCALE_BLOCK, dequant_block

    pointer = {F32: "*i32", BF16: "*i16", F16: "*i16", E4M3: "*u8"}
    formats = (F32, BF16, F16, E4M3)
    side = math.isqrt(SHAPES["transpose"].elements)
    rows_block_c = 1024  # a row at least 1024 wide: the most columns per program
    dequant_r, dequant_c = dequant_block(1 << 20, SHAPES["dequant"])
    specs = []
    for src in formats:
        for dst in formats:
            specs.append(Specialization(
                "cast_contiguous_kernel",
                {"src": pointer[src], "dst": pointer[dst], "n": "i64", "SRC": "constexpr", "DST": "constexpr",
                 "BLOCK": "constexpr"},
                {"SRC": src, "DST": dst, "BLOCK": SHAPES["cast"].elements}, SHAPES["cast"].num_warps))
            specs.append(Specialization(
                "transpose_cast_kernel",
                {"src": pointer[src], "dst": pointer[dst], "dst_offset": "i64", "rows": "i64", "cols": "i64",
                 "ld": "i64", "SRC": "constexpr", "DST": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
                {"SRC": src, "DST": dst, "BLOCK_R": side, "BLOCK_C": side}, SHAPES["transpose"].num_warps))
            for align in (1, 16) if src != dst else (1, 2, 4, 8, 16):
                specs.append(Specialization(
                    "gather_rows_cast_kernel",
                    {"src": pointer[src], "src_start": "*i64", "dst": pointer[dst], "dst_start": "*i64",
                     "n_rows": "i64", "cols": "i64", "SRC": "constexpr", "DST": "constexpr", "ALIGN": "constexpr",
                     "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
                    {"SRC": src, "DST": dst, "ALIGN": align, "BLOCK_R": SHAPES["rows"].elements // rows_block_c,
                     "BLOCK_C": rows_block_c}, SHAPES["rows"].num_warps))
    for dst in (F32, BF16, F16):
        specs.append(Specialization(
            "dequant_kernel",
            {"q": "*u8", "scales": "*i32", "dst": pointer[dst], "dst_offset": "i64", "rows": "i64", "cols": "i64",
             "ld": "i64", "nk": "i64", "row_base": "i64", "col_base": "i64", "DST": "constexpr",
             "SCALE_BLOCK": "constexpr", "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
            {"DST": dst, "SCALE_BLOCK": SCALE_BLOCK, "BLOCK_R": dequant_r, "BLOCK_C": dequant_c},
            SHAPES["dequant"].num_warps, allowed_float_ops=frozenset({"mul.rn.f32"})))
    specs.append(Specialization(
        "quantize_kernel",
        {"x": "*i32", "q": "*u8", "scales": "*i32", "rows": "i64", "cols": "i64", "nk": "i64", "BLOCK": "constexpr",
         "SUB_ROWS": "constexpr"},
        {"BLOCK": SCALE_BLOCK, "SUB_ROWS": SHAPES["quantize"].elements // SCALE_BLOCK}, SHAPES["quantize"].num_warps,
        allowed_float_ops=frozenset({"div.rn.f32", "max.f32"})))
    return specs


FLOAT_TYPE = re.compile(r"\.(?:f16|f16x2|bf16|bf16x2|f32|f64|e4m3x2|e5m2x2)\b")
OPCODE = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z][a-z0-9_]*(?:\.[a-z0-9_]+)*)", re.MULTILINE)


def float_ops(ptx: str) -> set[str]:
    """The PTX opcodes (with their modifiers) that name a floating-point type, less those that
    only move bits (ld, st, mov, selp: a select of one register or another)."""
    ops = set()
    for opcode in OPCODE.findall(ptx):
        if FLOAT_TYPE.search(opcode) and not opcode.startswith((".", "ld.", "st.", "mov.", "selp.")):
            ops.add(opcode)
    return ops


def problems(spec: Specialization, ptx: str) -> list[str]:
    found = float_ops(ptx)
    out = [f"float instruction {op} (allowed here: {sorted(spec.allowed_float_ops) or 'none'})"
           for op in sorted(found - spec.allowed_float_ops)]
    out += [f"expected {op}, not in the PTX" for op in sorted(spec.allowed_float_ops - found)]
    for marker in (".ftz", ".approx", "fma.", "div.full"):
        if marker in ptx:
            out.append(f"'{marker}' in the PTX")
    return out


def spills(usage: dict) -> list[str]:
    return [f"{usage['stack_bytes']} bytes of stack per thread (registers spilled)"] if usage["stack_bytes"] else []


def compile_one(spec: Specialization, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pyconv._kernels import cast, fp8
    from pyconv._kernels.ops import EXACT

    fn = getattr(cast, spec.kernel, None) or getattr(fp8, spec.kernel)
    started = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, spec.signature, constexprs=spec.constexprs),
                              target=GPUTarget("cuda", arch, 32), options={"num_warps": spec.num_warps, **EXACT})
    seconds = time.perf_counter() - started
    ptx = compiled.asm["ptx"]
    usage = resource_usage(compiled.asm["cubin"])
    return {"kernel": spec.name, "arch": f"sm_{arch}", "num_warps": spec.num_warps, "seconds": round(seconds, 2),
            "cubin_bytes": len(compiled.asm["cubin"]), **usage, "float_ops": sorted(float_ops(ptx)),
            "problems": problems(spec, ptx) + spills(usage)}


def resource_usage(cubin: bytes) -> dict:
    """Registers, stack (spilled registers live there) and shared memory per thread block, as
    Triton's bundled cuobjdump reads them from the cubin (CompiledKernel.n_regs needs a driver)."""
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(usage["REG"]), "stack_bytes": int(usage["STACK"]), "local_bytes": int(usage["LOCAL"]),
            "shared_bytes": int(usage["SHARED"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90", help="compute capabilities, comma-separated (default 90: H100)")
    parser.add_argument("--check", action="store_true", help="exit 1 if any PTX breaks the bit-exactness rules")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on"):
        parser.error("TRITON_INTERPRET is set: unset it to compile")
    failed = 0
    for arch in (int(a) for a in args.arch.split(",")):
        for spec in specializations():
            row = compile_one(spec, arch)
            failed += bool(row["problems"])
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(f"{row['arch']:6} {row['kernel']:64} {row['seconds']:5.2f} s  registers {row['registers']:3}  "
                      f"stack {row['stack_bytes']:4}  smem {row['shared_bytes']:6}  float ops {row['float_ops'] or '-'}"
                      + "".join(f"\n    PROBLEM: {p}" for p in row["problems"]), flush=True)
    if failed:
        print(f"{failed} specialization(s) break the bit-exactness rules", file=sys.stderr)
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
