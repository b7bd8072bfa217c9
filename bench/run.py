#!/usr/bin/env python3
"""The benchmark suite: pyconv against the copy limit and the reference algorithms.

    python bench/run.py [--sizes 1,2,4,8] [--moe-size 2] [--cache warm,cold] [--json FILE]
                        [--plots DIR] [--markdown FILE]

For every size it generates a synthetic checkpoint (bench/synth.py), then, with a warm page cache
and again after `echo 3 > /proc/sys/vm/drop_caches` (root), runs and measures each step as a
separate command, checks every output, and removes the outputs and the source afterwards:

dense Llama-like bf16 (--sizes, GiB):
  cp              `cp -r SRC OUT && sync`                                   the copy limit
  to_meg          pyconv HF -> Megatron tp4 pp2                             verify vs SRC
  to_meg_2ranks   the same under `torchrun --nproc-per-node 2`              byte-identical to to_meg
  to_hf           pyconv Megatron tp4 pp2 -> HF                             verify vs SRC
  relayout        pyconv Megatron tp4 pp2 -> Megatron tp2 pp4               verify vs SRC
  peer_to_meg, peer_to_hf, peer_relayout: the same three conversions by bench/peers/gather_split.py
DeepSeek-like MoE with fp8 weights (--moe-size, GiB):
  cp
  to_deepseek     pyconv HF -> DeepSeek mp4 (fp8 kept)                      byte-identical to the peer
  peer_deepseek   bench/peers/deepseek_convert.py (convert.py's algorithm)
  to_bf16         pyconv fp8 -> bf16 HF (dequantized)                       verify vs the peer
  peer_bf16       bench/peers/fp8_cast_bf16.py (fp8_cast_bf16.py's algorithm)

Every step reports wall time (the whole command, start-up included), bytes and GB/s written, the
ratio to cp of the same source in the same cache state, the ratio to its peer, and the peak
resident anonymous and file-backed memory of the command's whole process tree (sampled from
/proc/PID/status every 20 ms). A peer whose predicted memory exceeds what the machine has free is
skipped and recorded as such. Sizes accept units (64MiB, 1.5GiB); a bare number is GiB.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synth  # noqa: E402
from measure import (GB, GiB, MiB, core_identity, dir_files, drop_caches, filesystem,  # noqa: E402
                     free_page_reporting, machine, pyconv_argv, run_measured, warm)

HERE = os.path.dirname(os.path.abspath(__file__))
PEERS = os.path.join(HERE, "peers")

# Which peer does the same conversion as which pyconv step.
PEER_OF = {"to_meg": "peer_to_meg", "to_hf": "peer_to_hf", "relayout": "peer_relayout",
           "to_deepseek": "peer_deepseek", "to_bf16": "peer_bf16"}


def parse_size(text: str) -> int:
    t = text.strip().upper()
    for suffix, mult in (("GIB", GiB), ("MIB", MiB), ("GB", 10**9), ("MB", 10**6), ("G", GiB)):
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * mult)
    return int(float(t) * GiB)


def size_label(n: int) -> str:
    return f"{n / GiB:g} GiB" if n >= GiB // 2 else f"{n / MiB:g} MiB"


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class LoadSampler:
    """Samples /proc/loadavg every few seconds for the whole run (the machine may be shared)."""

    def __init__(self, every_s: float = 5.0):
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._t0 = time.time()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)

    def _run(self, every_s: float) -> None:
        while not self._stop.is_set():
            self.samples.append((round(time.time() - self._t0, 1), os.getloadavg()[0]))
            self._stop.wait(every_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# ----------------------------------------------------------------------------- checks

def _pyconv_verify(a: str, b: str) -> dict:
    r = subprocess.run(pyconv_argv() + ["verify", a, b, "--json"], capture_output=True, text=True)
    if r.returncode not in (0, 1):
        return {"ok": False, "how": f"pyconv verify {a} {b}", "error": r.stderr[-2000:]}
    report = json.loads(r.stdout)
    return {"ok": report["equal"], "how": f"pyconv verify (bitwise, {report['compared']} tensors) against {b}",
            "report": None if report["equal"] else report}


def verify_against(src: str):
    def check(out: str, ctx: dict) -> dict:
        return _pyconv_verify(out, src)
    return check


def same_files(a: str, b: str, extra: tuple[str, ...] = ()) -> dict:
    """Every file of a and b byte for byte (names and contents); `extra`: files a may hold besides."""
    fa, fb = dir_files(a), dir_files(b)
    fa = {n: size for n, size in fa.items() if n not in extra}
    if sorted(fa) != sorted(fb):
        return {"ok": False, "how": f"same files as {b}", "error": f"file lists differ: {sorted(fa)} vs {sorted(fb)}"}
    differing = [n for n in fa if not filecmp.cmp(os.path.join(a, n), os.path.join(b, n), shallow=False)]
    return {"ok": not differing, "how": f"byte-identical to {b} ({len(fa)} files)",
            **({"error": f"differ: {differing}"} if differing else {})}


def same_names_and_sizes(a: str, b: str) -> dict:
    ok = dir_files(a) == dir_files(b)
    return {"ok": ok, "how": "cp: same file names and sizes as the source"}


def bf16_matches_peer(src: str):
    """pyconv's bf16 output against the reference algorithm's, bit for bit: both dequantize the
    fp8 weights and keep the float32 router bias (`e_score_correction_bias`) float32."""
    def check(out: str, ctx: dict) -> dict:
        peer = ctx["outputs"].get("peer_bf16")
        if not peer:
            return {"ok": None, "how": "not checked: the reference peer was skipped"}
        r = subprocess.run(pyconv_argv() + ["verify", out, peer, "--json"], capture_output=True, text=True)
        if r.returncode not in (0, 1):
            return {"ok": False, "how": "pyconv verify against the peer", "error": r.stderr[-2000:]}
        rep = json.loads(r.stdout)
        ok = not rep["missing"] and not rep["extra"] and not rep["different"]
        return {"ok": ok, "how": f"pyconv verify against the peer: {rep['compared']} tensors bitwise",
                **({} if ok else {"report": rep})}
    return check


# ----------------------------------------------------------------------------- steps

class Step:
    def __init__(self, name, label, argv, src, out, check, peer=False, predicted_bytes=None, keep=False):
        self.name, self.label, self.argv, self.src, self.out = name, label, argv, src, out
        self.check, self.peer, self.predicted_bytes, self.keep = check, peer, predicted_bytes, keep


def torchrun_argv() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "torchrun")
    return [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "torch.distributed.run"]


def dense_steps(src: str, work: str, meta: dict, threads: list[str], ranks: int) -> list[Step]:
    S = meta["tensor_bytes"]
    j = lambda n: os.path.join(work, n)  # noqa: E731
    pc = pyconv_argv()
    meg = j("meg")
    gs = [sys.executable, os.path.join(PEERS, "gather_split.py")]
    gs_bytes = int(2.3 * S + 0.5 * GiB)
    steps = [
        Step("cp", "cp -r + sync", ["sh", "-c", 'cp -r "$0" "$1" && sync', src, j("cp")], src, j("cp"),
             lambda out, ctx: same_names_and_sizes(out, src)),
        Step("to_meg", "pyconv HF -> Megatron tp4 pp2",
             pc + ["reshard", src, meg, "--to", "megatron", "--tp", "4", "--pp", "2", "--force"] + threads,
             src, meg, verify_against(src), keep=True),
    ]
    if ranks > 1:
        steps.append(Step("to_meg_2ranks" if ranks == 2 else f"to_meg_{ranks}ranks",
                          f"pyconv HF -> Megatron tp4 pp2, torchrun {ranks} ranks",
                          torchrun_argv() + ["--standalone", f"--nproc-per-node={ranks}", "-m", "pyconv", "reshard",
                                             src, j("meg_ranks"), "--to", "megatron", "--tp", "4", "--pp", "2",
                                             "--force"] + threads,
                          src, j("meg_ranks"), lambda out, ctx: same_files(out, meg)))
    steps += [
        Step("to_hf", "pyconv Megatron tp4 pp2 -> HF", pc + ["reshard", meg, j("hf"), "--to", "hf", "--force"] + threads,
             meg, j("hf"), verify_against(src)),
        Step("relayout", "pyconv Megatron tp4 pp2 -> tp2 pp4",
             pc + ["reshard", meg, j("meg24"), "--to", "megatron", "--tp", "2", "--pp", "4", "--force"] + threads,
             meg, j("meg24"), verify_against(src)),
        Step("peer_to_meg", "gather-split HF -> Megatron tp4 pp2",
             gs + [src, j("p_meg"), "--to", "megatron", "--tp", "4", "--pp", "2"], src, j("p_meg"),
             verify_against(src), peer=True, predicted_bytes=gs_bytes),
        Step("peer_to_hf", "gather-split Megatron tp4 pp2 -> HF", gs + [meg, j("p_hf"), "--to", "hf"], meg, j("p_hf"),
             verify_against(src), peer=True, predicted_bytes=gs_bytes),
        Step("peer_relayout", "gather-split Megatron tp4 pp2 -> tp2 pp4",
             gs + [meg, j("p_meg24"), "--to", "megatron", "--tp", "2", "--pp", "4"], meg, j("p_meg24"),
             verify_against(src), peer=True, predicted_bytes=gs_bytes),
    ]
    return steps


def moe_steps(src: str, work: str, meta: dict, threads: list[str]) -> list[Step]:
    S = meta["tensor_bytes"]
    j = lambda n: os.path.join(work, n)  # noqa: E731
    pc = pyconv_argv()
    experts = meta["config"]["n_routed_experts"]
    largest_file = max(size for name, size in meta["files"].items() if name.endswith(".safetensors"))

    def deepseek_check(out, ctx):
        if ctx["outputs"].get("peer_deepseek"):
            # convert.py's files byte for byte; pyconv adds the config.json it reads them back with
            return same_files(out, ctx["outputs"]["peer_deepseek"], extra=("config.json",))
        # No peer output: read it back through pyconv (with the config.json pyconv wrote beside it).
        return _pyconv_verify(out, src)

    return [
        Step("cp", "cp -r + sync", ["sh", "-c", 'cp -r "$0" "$1" && sync', src, j("cp")], src, j("cp"),
             lambda out, ctx: same_names_and_sizes(out, src)),
        # The peer runs first so that pyconv's output can be compared with its output.
        Step("peer_deepseek", "convert.py algorithm HF -> DeepSeek mp4",
             [sys.executable, os.path.join(PEERS, "deepseek_convert.py"), "--hf-ckpt-path", src, "--save-path",
              j("p_ds"), "--n-experts", str(experts), "--model-parallel", "4"], src, j("p_ds"),
             lambda out, ctx: {"ok": None, "how": "judged by comparison with pyconv's output (to_deepseek)"},
             peer=True, predicted_bytes=int(1.3 * S + 0.5 * GiB), keep=True),
        Step("to_deepseek", "pyconv HF -> DeepSeek mp4 (fp8)",
             pc + ["reshard", src, j("ds"), "--to", "deepseek", "--tp", "4", "--force"] + threads, src, j("ds"),
             deepseek_check),
        Step("peer_bf16", "fp8_cast_bf16.py algorithm fp8 -> bf16 HF",
             [sys.executable, os.path.join(PEERS, "fp8_cast_bf16.py"), "--input-fp8-hf-path", src,
              "--output-bf16-hf-path", j("p_bf16")], src, j("p_bf16"),
             lambda out, ctx: {"ok": None, "how": "judged by comparison with pyconv's output (to_bf16)"},
             peer=True, predicted_bytes=int(5 * largest_file + 0.5 * GiB), keep=True),
        Step("to_bf16", "pyconv fp8 -> bf16 HF",
             pc + ["reshard", src, j("bf16"), "--to", "hf", "--dtype", "bf16", "--force"] + threads, src, j("bf16"),
             bf16_matches_peer(src)),
    ]


def source_dtypes(src: str) -> dict[str, str]:
    out = {}
    for name in os.listdir(src):
        if name.endswith(".safetensors"):
            with open(os.path.join(src, name), "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            out.update((k, v["dtype"]) for k, v in header.items() if k != "__metadata__")
    return out


def child_env(args, torch_child: bool) -> dict:
    """Children run with a bytecode cache, as an installed package does: a development shell with
    PYTHONDONTWRITEBYTECODE=1 would make every pyconv start compile its modules (~0.3 s of CPU
    here). The cache goes under --workdir, not into the source tree."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = os.path.join(os.path.abspath(args.workdir), "pycache")
    if torch_child:
        env["OMP_NUM_THREADS"] = "1"  # torchrun sets it anyway, with a warning
    return env


def _run_once(step: Step, cache: str, args, ctx: dict, cp_wall: float | None) -> dict:
    if os.path.exists(step.out):
        shutil.rmtree(step.out)
    if cache == "cold":
        drop_caches()
    else:
        warm(step.src)
    os.sync()
    if args.settle:
        time.sleep(args.settle)
    r = run_measured(step.argv, env=child_env(args, "torch" in " ".join(step.argv)), check=False)
    r["stdout"], r["stderr"] = r["stdout"][-1000:], r["stderr"][-2000:]
    if r["returncode"] != 0:
        r["check"] = {"ok": False, "how": "the command failed", "error": r["stderr"]}
        shutil.rmtree(step.out, ignore_errors=True)
        return r
    written = dir_files(step.out)
    r["bytes_written"] = sum(written.values())
    r["files_written"] = len(written)
    r["check"] = step.check(step.out, ctx)
    if step.keep:  # a later step reads or is compared with this output
        ctx["outputs"][step.name] = step.out
    else:
        shutil.rmtree(step.out, ignore_errors=True)
    return r


def run_steps(kind: str, size: int, src: str, meta: dict, steps: list[Step], cache: str, args, info: dict) -> None:
    """Runs every step --repeat times (peers once), checking every output; one row per step with
    the median wall time and the largest memory figures of its runs."""
    ctx = {"source_dtypes": source_dtypes(src), "outputs": {}}
    rows = {}
    for step in steps:
        rows[step.name] = {"kind": kind, "size_bytes": size, "size_label": size_label(size), "cache": cache,
                           "step": step.name, "label": step.label, "peer": step.peer,
                           "source_bytes": meta["tensor_bytes"], "largest_tensor": meta["largest_tensor"],
                           "argv": step.argv, "runs": []}
        info["rows"].append(rows[step.name])
    for rep in range(args.repeat):
        cp_wall = None
        for step in steps:
            row = rows[step.name]
            if step.peer and (rep > 0 or "skipped" in row):
                continue
            if step.peer and step.predicted_bytes is not None:
                avail = mem_available() - int(args.mem_margin_gib * GiB)
                row["predicted_peak_bytes"] = step.predicted_bytes
                if step.predicted_bytes > avail:
                    row["skipped"] = (f"needs ~{step.predicted_bytes / GiB:.1f} GiB, {max(avail, 0) / GiB:.1f} GiB "
                                      f"available after a {args.mem_margin_gib:g} GiB margin")
                    print(f"  {cache} {size_label(size):>8} {step.name:<14} skipped: {row['skipped']}", file=sys.stderr)
                    continue
            r = _run_once(step, cache, args, ctx, cp_wall)
            r["repeat"] = rep
            row["runs"].append(r)
            if step.name == "cp" and r["returncode"] == 0:
                cp_wall = r["wall_s"]
            r["ratio_to_cp"] = r["wall_s"] / cp_wall if cp_wall else None
            ok = r["check"]["ok"]
            print(f"  {cache} {size_label(size):>8} {step.name:<14} {r['wall_s']:7.2f} s  "
                  f"CPU {r['user_s'] + r['sys_s']:6.2f} s  x cp {r['ratio_to_cp'] or 0:5.2f}  "
                  f"anon {r['peak_rss_anon_bytes'] / MiB:8.1f} MiB  file {r['peak_rss_file_bytes'] / MiB:8.1f} MiB  "
                  f"load {r['loadavg1_before']:.2f}  check: {'ok' if ok else ('-' if ok is None else 'FAILED')}"
                  + (f" ({r['check'].get('error', '')[-300:]})" if ok is False else ""), file=sys.stderr, flush=True)
    for out in ctx["outputs"].values():
        shutil.rmtree(out, ignore_errors=True)
    for row in rows.values():
        good = [r for r in row["runs"] if r["returncode"] == 0]
        checks = [r["check"] for r in row["runs"]]
        if checks:  # the first failed check if any, else the first run's
            row["check"] = next((c for c in checks if c["ok"] is False), checks[0])
        if not good:
            continue
        wall = statistics.median(r["wall_s"] for r in good)
        written = good[0]["bytes_written"]
        row.update(
            wall_s=wall, wall_s_all=[round(r["wall_s"], 3) for r in good],
            cpu_s=statistics.median(r["user_s"] + r["sys_s"] for r in good),
            bytes_written=written, files_written=good[0]["files_written"], written_gb_per_s=written / wall / GB,
            peak_rss_anon_bytes=max(r["peak_rss_anon_bytes"] for r in good),
            peak_rss_file_bytes=max(r["peak_rss_file_bytes"] for r in good),
            loadavg1_before=[round(r["loadavg1_before"], 2) for r in good],
            others_cpu_s=[round(r["others_cpu_s"], 2) for r in good])
    cp = rows.get("cp")
    for row in rows.values():
        if "wall_s" in row and cp is not None and "wall_s" in cp:
            row["ratio_to_cp"] = row["wall_s"] / cp["wall_s"]
            # Paired within each repetition: the spread of the ratio on a shared machine.
            row["ratio_to_cp_per_repeat"] = [round(r["ratio_to_cp"], 3) for r in row["runs"]
                                             if r.get("ratio_to_cp") is not None]
        peer = rows.get(PEER_OF.get(row["step"], ""))
        if peer is not None and "wall_s" in row:
            row["peer_step"] = peer["step"]
            row["peer_speedup"] = peer["wall_s"] / row["wall_s"] if "wall_s" in peer else None
            if "wall_s" not in peer:
                row["peer_skipped"] = peer.get("skipped") or "failed"


# ----------------------------------------------------------------------------- targets

def evaluate_targets(rows: list[dict]) -> list[dict]:
    """The issue's targets, met or missed per row (reported, never asserted)."""
    out = []
    for r in rows:
        if r["peer"] or r["step"] == "cp" or "wall_s" not in r:
            continue
        t = {"kind": r["kind"], "size_label": r["size_label"], "cache": r["cache"], "step": r["step"]}
        if r["size_bytes"] >= 2 * GiB and r.get("ratio_to_cp") is not None:
            t["wall_le_1.25x_cp"] = r["ratio_to_cp"] <= 1.25
        if r.get("peer_speedup") is not None:
            t["ge_5x_faster_than_peer"] = r["peer_speedup"] >= 5
        t["anon_le_512MiB_plus_largest"] = r["peak_rss_anon_bytes"] <= 512 * MiB + r["largest_tensor"]["bytes"]
        out.append(t)
    return out


def linearity(rows: list[dict]) -> dict:
    """Seconds per GiB of source at each dense size, per step and cache state: time is linear in
    size when these stay flat (max/min reported)."""
    out = {}
    for r in rows:
        if r["kind"] != "dense" or "wall_s" not in r:
            continue
        out.setdefault(f"{r['step']} ({r['cache']})", {})[r["size_label"]] = r["wall_s"] / (r["source_bytes"] / GiB)
    for key, per in out.items():
        vals = list(per.values())
        per["max_over_min"] = max(vals) / min(vals) if len(vals) > 1 and min(vals) > 0 else None
    return out


# ----------------------------------------------------------------------------- output

def fmt_check(r: dict) -> str:
    if "skipped" in r:
        return "skipped: " + r["skipped"]
    c = r.get("check") or {}
    how = " ".join(os.path.basename(w) if w.startswith("/") else w for w in c.get("how", "").split(" "))
    return {True: "ok", False: "FAILED", None: "-"}[c.get("ok")] + (": " + how if how else "")


def markdown(info: dict) -> str:
    reps = info.get("repeat", 1)
    lines = [f"| model | size | cache | step | wall s{' (median of ' + str(reps) + ')' if reps > 1 else ''} | CPU s "
             "| GB written | GB/s written | x cp | peer x slower | anon MiB | file MiB | largest tensor MiB | check |",
             "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in info["rows"]:
        lt = r["largest_tensor"]["bytes"] / MiB
        model = "Llama bf16" if r["kind"] == "dense" else "DeepSeek-like fp8 MoE"
        if "wall_s" not in r:
            lines.append(f"| {model} | {r['size_label']} | {r['cache']} | {r['label']} | - | - | - | - | - | - | - | - "
                         f"| {lt:.1f} | {fmt_check(r)} |")
            continue
        ratio = f"{r['ratio_to_cp']:.2f}" if r.get("ratio_to_cp") else "-"
        peer = (f"{r['peer_speedup']:.1f}" if r.get("peer_speedup") else
                ("skipped" if r.get("peer_skipped") else "-"))
        lines.append(f"| {model} | {r['size_label']} | {r['cache']} | {r['label']} | {r['wall_s']:.2f} "
                     f"| {r['cpu_s']:.2f} | {r['bytes_written'] / GB:.2f} | {r['written_gb_per_s']:.2f} | {ratio} "
                     f"| {peer} | {r['peak_rss_anon_bytes'] / MiB:.1f} | {r['peak_rss_file_bytes'] / MiB:.1f} "
                     f"| {lt:.1f} | {fmt_check(r)} |")
    return "\n".join(lines) + "\n"


def targets_markdown(info: dict) -> str:
    """Issue 7's targets per pyconv row: met, missed, or - (does not apply)."""
    mark = {True: "met", False: "**missed**", None: "-"}
    lines = ["| model | size | cache | step | wall <= 1.25x cp (>= 2 GiB) | >= 5x faster than its peer "
             "| anon <= 512 MiB + largest tensor |", "|---|---|---|---|---|---|---|"]
    for t in info.get("targets", []):
        model = "Llama bf16" if t["kind"] == "dense" else "DeepSeek-like fp8 MoE"
        lines.append(f"| {model} | {t['size_label']} | {t['cache']} | {t['step']} | {mark[t.get('wall_le_1.25x_cp')]} "
                     f"| {mark[t.get('ge_5x_faster_than_peer')]} | {mark[t.get('anon_le_512MiB_plus_largest')]} |")
    lin = info.get("linearity_s_per_gib") or {}
    if lin:
        sizes = sorted({k for per in lin.values() for k in per if k != "max_over_min"}, key=lambda s: float(s.split()[0]))
        lines += ["", "Seconds per GiB of source (time linear in size when a row is flat):", "",
                  "| step (cache) | " + " | ".join(sizes) + " | max/min |", "|---|" + "--:|" * (len(sizes) + 1)]
        for key, per in lin.items():
            mm = per.get("max_over_min")
            tail = f" | {mm:.2f} |" if mm else " | - |"
            lines.append(f"| {key} | " + " | ".join(f"{per[s]:.2f}" if s in per else "-" for s in sizes) + tail)
    return "\n".join(lines) + "\n"


def write_outputs(info: dict, args) -> int:
    table = markdown(info) + "\n" + targets_markdown(info)
    print(table)
    print(f"load average (1 min) during the run: {info['loadavg1']}", file=sys.stderr)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table)
    if args.plots:
        import plot

        for path in plot.plot(info, args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--sizes", default="1,2,4,8", help="dense Llama-like bf16 sizes, comma-separated (default 1,2,4,8 GiB; '' for none)")
    ap.add_argument("--moe-size", default="2", help="DeepSeek-like fp8 MoE size (default 2 GiB; '' for none)")
    ap.add_argument("--cache", default="warm,cold", help="warm, cold or both (default warm,cold; cold needs root)")
    ap.add_argument("--workdir", default="/tmp/pyconv-bench", help="sources and outputs (default /tmp/pyconv-bench)")
    ap.add_argument("--json", metavar="FILE", help="every raw figure")
    ap.add_argument("--markdown", metavar="FILE", help="the results table as Markdown")
    ap.add_argument("--plots", metavar="DIR", help="write PNG plots here (bench/plot.py; needs matplotlib)")
    ap.add_argument("--ranks", type=int, default=2, help="torchrun processes of the scale-out step (default 2; 1: skip it)")
    ap.add_argument("--no-peers", action="store_true", help="skip the reference peers")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of every cp and pyconv step per size and cache state, medians reported (peers run once)")
    ap.add_argument("--threads", type=int, default=None, help="--threads for pyconv (default: its own)")
    ap.add_argument("--settle", type=float, default=2.0, help="pause before each step, seconds (default 2)")
    ap.add_argument("--mem-margin-gib", type=float, default=3.0,
                    help="a peer runs only if its predicted peak fits in MemAvailable minus this (default 3)")
    ap.add_argument("--keep-sources", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--report", metavar="JSON", help="run nothing: print the table (and --markdown, --plots) of a saved JSON")
    args = ap.parse_args(argv)

    if args.report:
        with open(args.report) as f:
            info = json.load(f)
        return write_outputs(info, args)
    caches = [c.strip() for c in args.cache.split(",") if c.strip()]
    if any(c not in ("warm", "cold") for c in caches):
        ap.error("--cache takes warm, cold or warm,cold")
    if "cold" in caches and os.geteuid() != 0:
        ap.error("--cache cold needs root (it writes /proc/sys/vm/drop_caches)")
    jobs = [("dense", parse_size(s)) for s in args.sizes.split(",") if s.strip()]
    jobs += [("moe_fp8", parse_size(args.moe_size))] if args.moe_size.strip() else []
    threads = ["--threads", str(args.threads)] if args.threads else []
    os.makedirs(args.workdir, exist_ok=True)
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": machine(),
            "filesystem": filesystem(args.workdir), "free_page_reporting": free_page_reporting(),
            "pyconv_core": core_identity(), "argv": sys.argv, "settle_s": args.settle, "repeat": args.repeat,
            "rows": [], "sources": []}
    started = time.time()
    with LoadSampler() as load:
        for kind, size in jobs:
            src, meta = synth.ensure(args.workdir, kind, size)
            info["sources"].append({"kind": kind, "size_bytes": size, "tensor_bytes": meta["tensor_bytes"],
                                    "tensors": meta["tensors"], "files": len(meta["files"]),
                                    "largest_tensor": meta["largest_tensor"], "config": meta["config"]})
            work = os.path.join(args.workdir, "out")
            os.makedirs(work, exist_ok=True)
            for cache in caches:
                steps = (dense_steps(src, work, meta, threads, args.ranks) if kind == "dense"
                         else moe_steps(src, work, meta, threads))
                if args.no_peers:
                    steps = [s for s in steps if not s.peer]
                run_steps(kind, size, src, meta, steps, cache, args, info)
            shutil.rmtree(work, ignore_errors=True)
            if not args.keep_sources:
                synth.remove(src)
    info["seconds"] = time.time() - started
    info["load_samples"] = load.samples
    loads = [v for _, v in load.samples]
    info["loadavg1"] = {"min": min(loads), "median": statistics.median(loads), "max": max(loads)} if loads else None
    info["pyconv_core_after"] = core_identity()
    info["targets"] = evaluate_targets(info["rows"])
    info["linearity_s_per_gib"] = linearity(info["rows"])
    failed = [r for r in info["rows"] if (r.get("check") or {}).get("ok") is False]
    info["all_outputs_checked"] = not failed and all(
        "skipped" in r or (r.get("check") or {}).get("ok") is not None or r["peer"] for r in info["rows"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
    write_outputs(info, args)
    if failed:
        print(f"{len(failed)} output(s) FAILED their check: "
              + ", ".join(f"{r['step']} ({r['size_label']}, {r['cache']})" for r in failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
