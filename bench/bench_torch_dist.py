#!/usr/bin/env python3
"""Benchmark: HF <-> Megatron-Core torch_dist on a synthetic >= 4 GiB checkpoint, against
`cp -r` + `sync` of the same bytes and PyTorch's own DCP conversion path.

Not a test: run it by hand (see bench/README.md). For a synthetic Llama-like bf16 HF checkpoint
(bench/synth.py, cached under --workdir), each round runs, as separate commands:

  cp_hf        cp -r HF OUT && sync                                     (the copy limit, HF bytes)
  to_td        pyconv reshard HF TD --to torch_dist                     checked: pyconv verify TD HF
  cp_td        cp -r TD OUT && sync                                     (the copy limit, torch_dist bytes)
  to_hf        pyconv reshard TD OUT --to hf                            checked: pyconv verify OUT HF
  peer_to_pt   torch.distributed.checkpoint.format_utils.dcp_to_torch_save(TD, OUT/model.pt) + sync
  peer_to_dcp  ...format_utils.torch_save_to_dcp(OUT/model.pt, OUT2) + sync
                                                                        checked: pyconv verify OUT2 HF

The peers are PyTorch's own offline converters between a DCP directory and one torch.save file:
they load every tensor into memory and keep Megatron's names and stacked layout (no HF names,
no QKV or gate/up split), so they do less than pyconv's conversions; they are the reference for
how fast PyTorch itself gets the bytes out of (and into) the format. Every figure is wall time of
the whole command, start-up included, with the step's input in the page cache (read once just
before); peak resident memory is sampled over the process tree (bench/measure.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synth  # noqa: E402
from measure import GB, GiB, MiB, core_identity, dir_files, filesystem, machine, pyconv_argv, run_measured, \
    warm  # noqa: E402

PEER_TO_PT = ("import sys; from torch.distributed.checkpoint.format_utils import dcp_to_torch_save; "
              "dcp_to_torch_save(sys.argv[1], sys.argv[2])")
PEER_TO_DCP = ("import sys; from torch.distributed.checkpoint.format_utils import torch_save_to_dcp; "
               "torch_save_to_dcp(sys.argv[1], sys.argv[2])")


def sh_sync(argv: list[str]) -> list[str]:
    """argv followed by sync, as one command (its wall time includes writing the data back)."""
    import shlex

    return ["sh", "-c", " ".join(shlex.quote(a) for a in argv) + " && sync"]


def verify(a: str, b: str) -> dict:
    import subprocess

    r = subprocess.run(pyconv_argv() + ["verify", a, b, "--json"], capture_output=True, text=True)
    if r.returncode not in (0, 1):
        return {"ok": False, "error": r.stderr[-2000:]}
    report = json.loads(r.stdout)
    return {"ok": report["equal"], "compared": report["compared"]}


def verify_peer_dcp(src: str, dcp_dir: str) -> dict:
    """The peers' round trip (torch_dist -> model.pt -> DCP) kept every tensor: pyconv reads the
    plain DCP directory (the HF config.json put beside it says what the model is) and compares it
    with the HF source, bit for bit."""
    shutil.copy(os.path.join(src, "config.json"), os.path.join(dcp_dir, "config.json"))
    return verify(dcp_dir, src)


def one_round(src: str, work: str, log: list[dict], round_no: int) -> None:
    td, out, out2 = os.path.join(work, "td"), os.path.join(work, "out"), os.path.join(work, "out2")
    for path in (td, out, out2):
        shutil.rmtree(path, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    steps = [
        ("cp_hf", src, out, sh_sync(["cp", "-r", src, out]), None),
        ("to_td", src, td, pyconv_argv() + ["reshard", src, td, "--to", "torch_dist"], lambda: verify(td, src)),
        ("cp_td", td, out, sh_sync(["cp", "-r", td, out]), None),
        ("to_hf", td, out, pyconv_argv() + ["reshard", td, out, "--to", "hf"], lambda: verify(out, src)),
        ("peer_to_pt", td, out, sh_sync([sys.executable, "-c", PEER_TO_PT, os.path.join(td, "release"),
                                         os.path.join(out, "model.pt")]), None),
        ("peer_to_dcp", out, out2, sh_sync([sys.executable, "-c", PEER_TO_DCP, os.path.join(out, "model.pt"), out2]),
         lambda: verify_peer_dcp(src, out2)),
    ]
    for name, source, dst, argv, check in steps:
        if name == "peer_to_pt":
            os.makedirs(out, exist_ok=True)
        elif name != "peer_to_dcp":
            shutil.rmtree(dst, ignore_errors=True)
        warm(source)
        os.sync()
        time.sleep(2)
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        r = run_measured(argv, env=env)
        read = sum(dir_files(source).values())
        written = sum(dir_files(dst).values())
        row = {"round": round_no, "step": name, "wall_s": r["wall_s"], "cpu_s": r["user_s"] + r["sys_s"],
               "read_bytes": read, "written_bytes": written, "peak_rss_anon_bytes": r["peak_rss_anon_bytes"],
               "peak_rss_file_bytes": r["peak_rss_file_bytes"], "others_cpu_s": r["others_cpu_s"],
               "loadavg1_before": r["loadavg1_before"], "check": check() if check else None}
        log.append(row)
        print(f"  round {round_no} {name:<12} {r['wall_s']:7.2f} s  {written / r['wall_s'] / GB:5.2f} GB/s written  "
              f"anon {r['peak_rss_anon_bytes'] / MiB:8.1f} MiB  load {r['loadavg1_before']:.2f}  "
              f"others {r['others_cpu_s']:.1f} CPU s  check {row['check']}", file=sys.stderr, flush=True)
        if name in ("cp_hf", "cp_td", "to_hf"):
            shutil.rmtree(dst, ignore_errors=True)
    for path in (td, out, out2):
        shutil.rmtree(path, ignore_errors=True)


COPY_OF = {"to_td": "cp_hf", "to_hf": "cp_td", "peer_to_pt": "cp_td", "peer_to_dcp": "cp_hf"}


def table(log: list[dict]) -> str:
    """Medians over the rounds; 'x cp' against the median cp of the bytes the step reads."""
    steps = list(dict.fromkeys(r["step"] for r in log))
    med = {s: statistics.median(r["wall_s"] for r in log if r["step"] == s) for s in steps}
    lines = ["| step | read GB | wrote GB | wall s, median (min-max) | written GB/s | x cp | CPU s | anon MiB | check |",
             "|---|---:|---:|---|---:|---:|---:|---:|---|"]
    for s in steps:
        rows = [r for r in log if r["step"] == s]
        walls = [r["wall_s"] for r in rows]
        cp = COPY_OF.get(s)
        ratio = f"{med[s] / med[cp]:.2f}" if cp in med else "1.00"
        checks = {json.dumps(r["check"], sort_keys=True) for r in rows}
        lines.append(f"| {s} | {rows[0]['read_bytes'] / GB:.2f} | {rows[0]['written_bytes'] / GB:.2f} | "
                     f"{med[s]:.2f} ({min(walls):.2f}-{max(walls):.2f}) | {rows[0]['written_bytes'] / med[s] / GB:.2f} | "
                     f"{ratio} | {statistics.median(r['cpu_s'] for r in rows):.1f} | "
                     f"{max(r['peak_rss_anon_bytes'] for r in rows) / MiB:.0f} | {'; '.join(sorted(checks))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=4.25, help="synthetic checkpoint size (default 4.25 GiB)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/pyconv-bench-td")
    ap.add_argument("--json", help="write every raw figure here")
    ap.add_argument("--keep-source", action="store_true", help="keep the synthetic checkpoint for a later run")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    src, meta = synth.ensure(args.workdir, "dense", int(args.size_gib * GiB))
    print(f"source {src}: {meta['tensor_bytes'] / GiB:.2f} GiB of tensors, {meta['config']['num_hidden_layers']} "
          f"layers, hidden {meta['config']['hidden_size']}, vocab {meta['config']['vocab_size']}", file=sys.stderr)
    info = {"machine": machine(), "filesystem": filesystem(args.workdir), "core": core_identity(),
            "source": {k: meta[k] for k in ("config", "tensor_bytes", "largest_tensor") if k in meta}, "rounds": []}
    work = os.path.join(args.workdir, "work")
    try:
        for i in range(args.rounds):
            one_round(src, work, info["rounds"], i)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not args.keep_source:
            synth.remove(src)
    print(table(info["rounds"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    failed = [r for r in info["rounds"] if r["check"] is not None and not r["check"].get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
