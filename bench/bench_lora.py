#!/usr/bin/env python3
"""Merging a LoRA adapter while converting (issue #21): pyconv against PEFT's merge_and_unload +
save_pretrained (peers/peft_merge.py) in the same run.

    python bench/bench_lora.py                        # 2 GiB Llama-like bf16 model, rank-64 adapter
    python bench/bench_lora.py --size 4 --rank 16 --json /tmp/lora.json

The base is bench/synth.py's dense Llama (cached under --workdir); the adapter targets every
q/k/v/o/gate/up/down projection of every layer, in PEFT's file layout (adapter_config.json +
adapter_model.safetensors, bf16 factors, random values). Steps, each its own measured process:

  pyconv -> hf          pyconv reshard BASE OUT --to hf --merge-lora ADAPTER
  pyconv -> megatron    pyconv reshard BASE OUT --to megatron --tp 2 --merge-lora ADAPTER
  peft merge + save     peers/peft_merge.py

and the pyconv HF output compared with the peer's by `pyconv verify` (bf16: PEFT rounds the
delta to bf16 before adding it, pyconv rounds once, so they differ by at most a few bf16 ulps).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from measure import GiB, machine, run_in_child, run_measured  # noqa: E402
from synth import dense_tensors, ensure  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(base: str, meta: dict, out: str, rank: int) -> int:
    """A PEFT-layout adapter on every targeted linear weight; returns the adapter's bytes."""
    def write():
        import numpy as np

        rng = np.random.default_rng(1)
        header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
        for name, _, shape in dense_tensors(meta["config"]):
            module = name[:-len(".weight")]
            if module.rsplit(".", 1)[-1] not in TARGETS:
                continue
            rows, cols = shape
            for key, dims in (("lora_A", (rank, cols)), ("lora_B", (rows, rank))):
                values = (rng.standard_normal(dims, dtype=np.float32) * 0.02).astype(np.float32)
                data = (values.view(np.uint32) >> 16).astype("<u2").tobytes()  # bf16 bits (truncated)
                header[f"base_model.model.{module}.{key}.weight"] = {
                    "dtype": "BF16", "shape": list(dims), "data_offsets": [offset, offset + len(data)]}
                blobs.append(data)
                offset += len(data)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-(len(raw) + 8) % 8)
        with open(os.path.join(out, "adapter_model.safetensors"), "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for data in blobs:
                f.write(data)

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    run_in_child(write, "writing the adapter")
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
                   "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
                   "use_dora": False, "task_type": "CAUSAL_LM"}, f, indent=2)
    return os.path.getsize(os.path.join(out, "adapter_model.safetensors"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=float, default=2.0, help="base model size in GiB (default 2)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--workdir", default="/tmp/pyconv-bench-lora")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    base, meta = ensure(args.workdir, "dense", int(args.size * GiB))
    adapter = os.path.join(args.workdir, f"adapter-r{args.rank}")
    adapter_bytes = make_adapter(base, meta, adapter, args.rank)
    print(f"base {base}: {meta['tensor_bytes'] / GiB:.2f} GiB; adapter rank {args.rank}: {adapter_bytes / 2**20:.0f} MiB",
          flush=True)
    py = sys.executable
    steps = [("pyconv -> hf", [py, "-m", "pyconv", "reshard", base, "{out}", "--to", "hf", "--merge-lora", adapter,
                               "--threads", str(args.threads)]),
             ("pyconv -> megatron tp2", [py, "-m", "pyconv", "reshard", base, "{out}", "--to", "megatron", "--tp", "2",
                                         "--merge-lora", adapter, "--threads", str(args.threads)])]
    if not args.no_peer:
        steps.append(("peft merge_and_unload + save_pretrained",
                      [py, os.path.join(HERE, "peers", "peft_merge.py"), "--base", base, "--adapter", adapter,
                       "--out", "{out}"]))
    rows, outs = [], {}
    for label, argv_ in steps:
        out = os.path.join(args.workdir, "out-" + str(len(outs)))
        shutil.rmtree(out, ignore_errors=True)
        r = run_measured([a.replace("{out}", out) for a in argv_])
        outs[label] = out
        row = dict(step=label, wall_s=round(r["wall_s"], 2), user_s=round(r["user_s"], 2),
                   peak_rss_anon_mib=round(r["peak_rss_anon_bytes"] / 2**20), peak_rss_mib=round(r["peak_rss_bytes"] / 2**20))
        rows.append(row)
        print(f"{label:<42} {row['wall_s']:>7.2f} s  anon peak {row['peak_rss_anon_mib']:>6} MiB  "
              f"(rss {row['peak_rss_mib']} MiB)", flush=True)
    if not args.no_peer:
        for label, tolerance in (("bitwise", []), ("atol 1/16, rtol 2%", ["--atol", "0.0625", "--rtol", "0.02"])):
            v = subprocess.run([py, "-m", "pyconv", "verify", outs["pyconv -> hf"],
                                outs["peft merge_and_unload + save_pretrained"], "--json", *tolerance],
                               capture_output=True, text=True)
            report = json.loads(v.stdout) if v.stdout.strip().startswith("{") else {"error": v.stderr[-400:]}
            differing = report.get("different") or []
            summary = {"exit": v.returncode, "equal": report.get("equal"), "tensors_differing": len(differing),
                       "elements_differing": sum(d.get("differing", 0) for d in differing),
                       "max_abs_diff": max((d.get("max_abs_diff", 0) for d in differing), default=0.0)}
            rows.append(dict(step=f"verify pyconv vs peft ({label})", **summary))
            print(f"pyconv verify against the peer, {label}: {summary}", flush=True)
    for out in outs.values():
        shutil.rmtree(out, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "size_gib": args.size, "rank": args.rank, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
