"""GPU kernels and the --device cuda path: each kernel's bandwidth as a fraction of a
device-to-device `copy_` of the same bytes in the same process, and end-to-end conversions
with --device cuda against the CPU path (the C++ core) on the same synthetic checkpoints.

    python bench/bench_kernels.py                      # on a GPU: 1 GiB per kernel, 2 GiB checkpoints
    python bench/bench_kernels.py --json out.json
    TRITON_INTERPRET=1 python bench/bench_kernels.py --smoke   # anywhere: tiny sizes, checks it runs

Kernel bytes are what a kernel reads plus what it writes; a copy_ of N bytes reads N and writes
N, so the copy baseline is copy_ of (read + written) / 2 bytes, timed the same way (CUDA events,
median of --repeat runs after a warm-up). Every kernel's output is checked against torch.

End to end: `pyconv.reshard` in this process, device "cpu" then "cuda" (after one unrecorded
warm-up run that compiles the kernels), on a warm page cache; both outputs must be identical.
Under --smoke the figures are meaningless (the interpreter runs the kernels with numpy).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

MiB = 1 << 20


def tree_digest(path: str) -> str:
    h = hashlib.sha256()
    for root, _, names in sorted(os.walk(path)):
        for name in sorted(names):
            full = os.path.join(root, name)
            h.update(os.path.relpath(full, path).encode())
            with open(full, "rb") as f:
                while chunk := f.read(16 * MiB):
                    h.update(chunk)
    return h.hexdigest()


def make_timer(torch, on_gpu: bool):
    def timed(fn, repeat: int) -> float:
        fn()  # warm-up (and compilation)
        times = []
        for _ in range(repeat):
            if on_gpu:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
        return statistics.median(times)
    return timed


def bench_kernels(elements: int, repeat: int) -> list[dict]:
    import torch

    from pyconv._kernels import ops

    on_gpu = not ops.interpreted()
    dev = torch.device("cuda" if on_gpu else "cpu")
    timed = make_timer(torch, on_gpu)
    g = torch.Generator(device=dev).manual_seed(0)
    x32 = torch.randn(elements, generator=g, device=dev)
    cols = 4096 if elements >= 4096 * 6144 else 256
    rows = elements // cols
    heads, kv_heads, head_dim = (32, 8, 128) if rows >= 6144 else (4, 2, 16)
    qkv_rows = (heads + 2 * kv_heads) * head_dim
    w = x32[: (rows // qkv_rows) * qkv_rows * cols].view(-1, cols)
    mat = x32[: rows * cols].view(rows, cols)
    q8, scale = ops.quantize(mat)

    cases = []

    def case(name, fn, read, written, check):
        out = fn()
        assert check(out), f"{name}: output differs from torch"
        cases.append((name, fn, read, written))

    x16 = x32.to(torch.bfloat16)
    h16 = x32.to(torch.float16)
    case("cast F32->BF16", lambda: ops.cast(x32, torch.bfloat16), 4 * elements, 2 * elements,
         lambda o: torch.equal(o.view(torch.int16), x16.view(torch.int16)))
    case("cast BF16->F32", lambda: ops.cast(x16, torch.float32), 2 * elements, 4 * elements,
         lambda o: torch.equal(o.view(torch.int32), x16.float().view(torch.int32)))
    case("cast F16->BF16", lambda: ops.cast(h16, torch.bfloat16), 2 * elements, 2 * elements,
         lambda o: torch.equal(o.view(torch.int16), h16.to(torch.bfloat16).view(torch.int16)))
    # The fused QKV permutation + cast (tp 1: every group) of stacked q/k/v blocks, GQA 32/8, head_dim 128.
    index = ops.qkv_row_index(heads, kv_heads, head_dim).to(dev)
    groups = w.shape[0] // qkv_rows
    full_index = torch.cat([index + k * qkv_rows for k in range(groups)])
    case("qkv permute+cast F32->BF16", lambda: ops.gather_rows(w, full_index, torch.bfloat16), 4 * w.numel(),
         2 * w.numel(), lambda o: torch.equal(o.view(torch.int16), w[full_index].to(torch.bfloat16).view(torch.int16)))
    case("transpose+cast F32->BF16", lambda: ops.transpose_cast(mat, torch.bfloat16), 4 * mat.numel(),
         2 * mat.numel(), lambda o: torch.equal(o.view(torch.int16), mat.t().to(torch.bfloat16).view(torch.int16)))
    expand = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    case("fp8 dequant F8->BF16", lambda: ops.dequantize(q8, scale, torch.bfloat16), mat.numel() + scale.numel() * 4,
         2 * mat.numel(), lambda o: torch.equal(o.view(torch.int16),
                                                (q8.float() * expand).to(torch.bfloat16).view(torch.int16)))
    gr, gc = scale.shape
    padded = torch.zeros(gr * 128, gc * 128, device=dev)
    padded[:rows, :cols] = mat
    ref_scale = padded.view(gr, 128, gc, 128).abs().amax(dim=(1, 3)).clamp(min=1e-4) / 448
    ref_q = (mat / ref_scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]).to(torch.float8_e4m3fn)
    case("fp8 quant F32->F8", lambda: ops.quantize(mat), 4 * mat.numel(), mat.numel() + scale.numel() * 4,
         lambda o: torch.equal(o[0].view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(o[1], ref_scale))

    results = []
    for name, fn, read, written in cases:
        t = timed(fn, repeat)
        n = (read + written) // 2
        a, b = torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev)
        t_copy = timed(lambda: b.copy_(a), repeat)
        del a, b
        results.append({"kernel": name, "bytes_moved": read + written, "seconds": t, "gb_per_s": (read + written) / t / 1e9,
                        "copy_seconds": t_copy, "copy_gb_per_s": 2 * n / t_copy / 1e9, "fraction_of_copy": t_copy / t})
        print(f"  {name:<28} {results[-1]['gb_per_s']:8.1f} GB/s  copy_ {results[-1]['copy_gb_per_s']:8.1f} GB/s  "
              f"{results[-1]['fraction_of_copy']:6.1%}", flush=True)
    return results


def bench_end_to_end(cases, workdir: str, repeat: int, threads: int) -> list[dict]:
    import pyconv

    results = []
    for label, src, options in cases:
        times = {}
        digests = {}
        for device in ("cpu", "cuda"):
            dst = os.path.join(workdir, f"out-{device}")
            runs = []
            for i in range(repeat + (device == "cuda")):  # the first cuda run compiles the kernels
                shutil.rmtree(dst, ignore_errors=True)
                t = time.perf_counter()
                report = pyconv.reshard(src, dst, device=device, threads=threads, force=True, **options)
                if device == "cpu" or i > 0:
                    runs.append(time.perf_counter() - t)
            times[device] = statistics.median(runs)
            digests[device] = tree_digest(dst)
            shutil.rmtree(dst, ignore_errors=True)
        assert digests["cpu"] == digests["cuda"], f"{label}: --device cuda output differs from the CPU path"
        src_bytes = sum(os.path.getsize(os.path.join(r, n)) for r, _, ns in os.walk(src) for n in ns)
        row = {"case": label, "source_bytes": src_bytes, "output_bytes": report.bytes, "cpu_seconds": times["cpu"],
               "cuda_seconds": times["cuda"], "cuda_speedup": times["cpu"] / times["cuda"], "identical": True}
        results.append(row)
        print(f"  {label:<36} cpu {times['cpu']:7.2f} s  cuda {times['cuda']:7.2f} s  "
              f"speed-up {row['cuda_speedup']:5.2f}x  (identical output)", flush=True)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes (for TRITON_INTERPRET=1 on a CPU)")
    p.add_argument("--kernel-mib", type=int, default=1024, help="fp32 elements per kernel, in MiB (default 1024)")
    p.add_argument("--size-gib", type=float, default=2.0, help="synthetic checkpoint size (default 2)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--workdir", default=None, help="where the synthetic checkpoints go (default /tmp/pyconv-bench)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    if args.smoke:
        args.kernel_mib, args.size_gib, args.repeat = 1, 4 / 1024, 1
    workdir = args.workdir or ("/tmp/pyconv-bench-smoke" if args.smoke else "/tmp/pyconv-bench")
    os.makedirs(workdir, exist_ok=True)

    # Checkpoints first: synth forks, which must happen before CUDA is initialised.
    import synth

    size = int(args.size_gib * (1 << 30))
    dense, _ = synth.ensure(workdir, "dense", size)
    moe, _ = synth.ensure(workdir, "moe_fp8", max(size, 8 * MiB) if args.smoke else size)

    import torch

    interpret = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
    if not interpret and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run on a GPU, or with TRITON_INTERPRET=1 and --smoke to check the script")
    device = "cpu (TRITON_INTERPRET=1)" if interpret else torch.cuda.get_device_name()
    print(f"device: {device}", flush=True)
    print("kernels (bandwidth vs a device-to-device copy_ of the same bytes):", flush=True)
    kernels = bench_kernels(args.kernel_mib * MiB // 4, args.repeat)
    print("end to end (pyconv.reshard, warm page cache):", flush=True)
    out_dir = tempfile.mkdtemp(dir=workdir)
    try:
        e2e = bench_end_to_end([
            ("dense bf16 -> hf fp16", dense, dict(to="hf", dtype="fp16")),
            ("dense bf16 -> megatron tp2 fp32", dense, dict(to="megatron", tp=2, dtype="fp32")),
            ("dense bf16 -> hf fp8 (quantize)", dense, dict(to="hf", dtype="fp8")),
            ("deepseek fp8 -> hf bf16 (dequantize)", moe, dict(to="hf", dtype="bf16")),
        ], out_dir, args.repeat, args.threads)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    result = {"device": device, "smoke": args.smoke, "kernels": kernels, "end_to_end": e2e,
              "torch": torch.__version__, "triton": __import__("triton").__version__}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
