#!/usr/bin/env python3
"""Benchmark: HF -> HF with a bf16 cast (and a pure reshard) against `cp -r` + `sync`.

Not a test: run it by hand (see bench/README.md). It

1. generates (or reuses) a synthetic Llama-like fp32 Hugging Face checkpoint of the requested
   size: sharded safetensors + model.safetensors.index.json + config.json, written with numpy
   only (no torch), streamed in chunks so that generating it needs little memory;
2. measures, in the same run and in rotating order:
     cp     `cp -r SRC DST && sync`
     bf16   `pyconv reshard SRC DST --to hf --dtype bf16 --force`      (CLI subprocess)
     copy   `pyconv reshard SRC DST --to hf --max-shard-size S --force` (no cast; S smaller
            than the source shards, so the output files are new files, not renamed copies)
   Every figure is wall time of the whole command, start-up included. For each child the
   peak resident memory is sampled from /proc/PID/status every ~20 ms (VmHWM, RssAnon,
   RssFile, RssShmem; maxima), and wait4() gives its ru_maxrss;
3. prints a table (medians over --repeat runs) and optionally writes every raw figure as JSON.

--cold drops the page cache (`sync; echo 3 > /proc/sys/vm/drop_caches`, needs root) before
every measured step; without it the source is read once up front so that every step starts
with the source in the page cache and no dirty pages.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from measure import (GB, GiB, MiB, core_identity, dir_files, drop_caches, filesystem,  # noqa: E402
                     free_page_reporting, machine, pyconv_argv, read_status, run_in_child, run_measured, wait_idle,
                     warm)

# ----------------------------------------------------------------------------- synthetic model


def _intermediate(hidden: int) -> int:
    # Llama-2-7B's ratio (4096 -> 11008), rounded to a multiple of 256.
    return int(round(hidden * 11008 / 4096 / 256)) * 256


def _layer_elems(hidden: int, inter: int, kv_dim: int) -> int:
    attn = 2 * hidden * hidden + 2 * hidden * kv_dim  # q, o: [H, H]; k, v: [KV, H]
    mlp = 3 * hidden * inter                           # gate, up: [I, H]; down: [H, I]
    norms = 2 * hidden
    return attn + mlp + norms


def model_config(size_bytes: int, hidden: int | None = None) -> dict:
    """A Llama-like config whose fp32 weights total at least size_bytes.

    hidden 4096, intermediate 11008, 32 heads, 8 KV heads (GQA), untied lm_head. The number of
    layers is as many as fit beside a vocabulary of at least 8192; the vocabulary (a multiple
    of 64) takes up the rest, so the total is size_bytes rounded up by less than 64 rows.
    Sizes too small for one 4096-wide layer fall back to a narrower model."""
    for h in ([hidden] if hidden else [4096, 2048, 1024, 512, 256]):
        inter = _intermediate(h)
        heads = max(1, h // 128)
        kv_heads = max(1, heads // 4)
        kv_dim = kv_heads * (h // heads)
        per_layer = 4 * _layer_elems(h, inter, kv_dim)
        fixed = 4 * h  # final norm
        min_vocab = 8192 if h >= 1024 else 1024
        layers = (size_bytes - fixed - 2 * 4 * h * min_vocab) // per_layer
        if layers >= 1:
            rest = size_bytes - fixed - layers * per_layer
            vocab = max(min_vocab, math.ceil(rest / (2 * 4 * h) / 64) * 64)
            return {
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": h, "intermediate_size": inter, "num_hidden_layers": int(layers),
                "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": h // heads,
                "vocab_size": int(vocab), "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
                "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
            }
    raise SystemExit(f"--size-gib {size_bytes / GiB:g} is too small for a Llama-like model")


def model_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in the order transformers' save_pretrained lists a Llama's state dict."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                (p + "mlp.down_proj.weight", (h, inter)),
                (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def _nbytes(shape) -> int:
    return 4 * math.prod(shape)


def split_shards(tensors, max_shard: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """huggingface_hub's greedy split: a new shard when the next tensor would tip it over."""
    shards, cur, cur_size = [], [], 0
    for name, shape in tensors:
        size = _nbytes(shape)
        if cur and cur_size + size > max_shard:
            shards.append(cur)
            cur, cur_size = [], 0
        cur.append((name, shape))
        cur_size += size
    if cur:
        shards.append(cur)
    return shards


def _write_safetensors(path: str, entries, rng, chunk_elems: int = 8 << 20) -> None:
    """Streams one fp32 safetensors file: header, then each tensor in chunks of random normals."""
    import numpy as np

    entries = sorted(entries, key=lambda e: e[0])  # safetensors' order for a single dtype
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in entries:
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [pos, pos + _nbytes(shape)]}
        pos += _nbytes(shape)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, shape in entries:
            n = math.prod(shape)
            if name.endswith("norm.weight"):
                f.write(np.ones(n, dtype=np.float32).tobytes())
                continue
            while n > 0:
                k = min(n, chunk_elems)
                block = rng.standard_normal(k, dtype=np.float32)
                block *= np.float32(0.02)
                f.write(memoryview(block))
                n -= k
        f.flush()
        os.fsync(f.fileno())


def ensure_checkpoint(workdir: str, size_gib: float, shard_bytes: int, seed: int = 0) -> tuple[str, dict]:
    """The synthetic checkpoint for this size, generated unless a complete one is cached."""
    size_bytes = int(size_gib * GiB)
    cfg = model_config(size_bytes)
    tensors = model_tensors(cfg)
    shards = split_shards(tensors, shard_bytes)
    src = os.path.join(workdir, f"llama-fp32-{size_gib:g}gib")
    meta_path = src + ".bench.json"  # beside the checkpoint, so that cp and pyconv never see it
    want = {"config": cfg, "shard_bytes": shard_bytes, "seed": seed}
    if os.path.isfile(meta_path) and os.path.isdir(src):
        with open(meta_path) as f:
            meta = json.load(f)
        if {k: meta.get(k) for k in want} == want and dir_files(src) == meta.get("files"):
            return src, meta
    # Generate in a forked child: numpy stays out of this process, whose memory high-water mark
    # every child it launches inherits in ru_maxrss (Linux keeps it across fork and exec).
    sys.stdout.flush()
    sys.stderr.flush()
    run_in_child(lambda: _generate(src, meta_path, want, cfg, tensors, shards, seed), f"generating {src}")
    with open(meta_path) as f:
        return src, json.load(f)


def _generate(src, meta_path, want, cfg, tensors, shards, seed) -> None:
    import numpy as np

    print(f"generating {src} ({sum(_nbytes(s) for _, s in tensors) / GiB:.2f} GiB fp32, "
          f"{len(tensors)} tensors, {len(shards)} shards) ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    shutil.rmtree(src, ignore_errors=True)
    if os.path.exists(meta_path):
        os.unlink(meta_path)
    os.makedirs(src)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, entries in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(src, name), entries, rng)
        weight_map.update((n, name) for n, _ in entries)
    total = sum(_nbytes(s) for _, s in tensors)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    largest = max(tensors, key=lambda t: _nbytes(t[1]))
    meta = {**want, "files": dir_files(src), "tensor_bytes": total, "tensors": len(tensors),
            "largest_tensor": {"name": largest[0], "shape": list(largest[1]), "bytes": _nbytes(largest[1])}}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)
    print(f"generated in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size-gib", type=float, default=2.0, help="synthetic fp32 checkpoint size (default 2)")
    ap.add_argument("--workdir", default="/tmp/pyconv-bench",
                    help="where the source (cached between runs) and outputs go (default /tmp/pyconv-bench)")
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every measured step (root)")
    ap.add_argument("--repeat", type=int, default=3, help="measured runs of each step (default 3)")
    ap.add_argument("--json", metavar="FILE", help="write every raw figure here")
    ap.add_argument("--src-shard-size", default="1GB", help="source shard size, decimal GB/MB (default 1GB)")
    ap.add_argument("--copy-shard-size", default="500MB",
                    help="--max-shard-size of the no-cast reshard (default 500MB)")
    ap.add_argument("--threads", type=int, default=None, help="pass --threads to pyconv (default: its own)")
    ap.add_argument("--steps", default="cp,bf16,copy", help="which steps, comma-separated (default cp,bf16,copy)")
    ap.add_argument("--warmup", type=int, default=1,
                    help="unrecorded rounds of every step before the measured ones (default 1)")
    ap.add_argument("--settle", type=float, default=5.0, metavar="SECONDS",
                    help="pause after removing the previous outputs, before each step (default 5). On VMs with "
                         "free page reporting (virtio-balloon) freed memory goes back to the host after ~2 s and "
                         "is slow to touch again (measured here: buffered writes cost 2-8x more CPU after a 6 s "
                         "pause than right after the free); the pause makes every step start in that state")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="before each measured step wait up to SECONDS for the CPUs to be idle "
                         "(< 25%% of one CPU busy over 1 s); for shared machines (default 0: off)")
    ap.add_argument("--keep", action="store_true", help="keep the outputs of the last run")
    args = ap.parse_args(argv)

    def parse_size(text: str) -> int:
        t = text.strip().upper()
        for suffix, mult in (("GIB", GiB), ("MIB", MiB), ("GB", 10**9), ("MB", 10**6)):
            if t.endswith(suffix):
                return int(float(t[: -len(suffix)]) * mult)
        return int(t)

    os.makedirs(args.workdir, exist_ok=True)
    src, meta = ensure_checkpoint(args.workdir, args.size_gib, parse_size(args.src_shard_size))
    src_files = dir_files(src)
    src_bytes = sum(src_files.values())

    steps_all = {
        "cp": ("cp -r + sync", lambda dst: ["sh", "-c", 'cp -r "$0" "$1" && date +%s.%N && sync', src, dst]),
        "bf16": ("pyconv reshard --dtype bf16",
                 lambda dst: pyconv_argv() + ["reshard", src, dst, "--to", "hf", "--dtype", "bf16", "--force", "--json"]
                 + (["--threads", str(args.threads)] if args.threads else [])),
        "copy": (f"pyconv reshard --max-shard-size {args.copy_shard_size}",
                 lambda dst: pyconv_argv() + ["reshard", src, dst, "--to", "hf", "--max-shard-size",
                                              args.copy_shard_size, "--force", "--json"]
                 + (["--threads", str(args.threads)] if args.threads else [])),
    }
    steps = [s.strip() for s in args.steps.split(",") if s.strip()]
    for s in steps:
        if s not in steps_all:
            ap.error(f"unknown step {s!r}")
    outdir = os.path.join(args.workdir, "out")
    os.makedirs(outdir, exist_ok=True)
    dsts = {s: os.path.join(outdir, s) for s in steps}

    def clean() -> None:
        for d in dsts.values():
            shutil.rmtree(d, ignore_errors=True)
        os.sync()

    core_before = core_identity()
    info = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": machine(),
            "filesystem": filesystem(args.workdir), "source": src, "source_bytes": src_bytes,
            "source_files": len(src_files), "config": meta["config"], "tensors": meta["tensors"],
            "largest_tensor": meta["largest_tensor"], "cold": args.cold, "repeat": args.repeat,
            "pyconv_core": core_before, "settle_s": args.settle, "wait_idle_s": args.wait_idle,
            "free_page_reporting": free_page_reporting(), "runs": []}
    # ru_maxrss of every child starts from this process's high-water mark (see ensure_checkpoint).
    info["launcher_vmhwm_bytes"] = (read_status(os.getpid()) or {}).get("VmHWM")

    clean()
    if not args.cold:
        warm(src)
    for rep in range(-args.warmup, args.repeat):
        order = steps[rep % len(steps):] + steps[:rep % len(steps)]  # rotate: each step leads once
        for s in order:
            clean()
            if args.cold:
                drop_caches()
            else:
                warm(src)  # cheap when cached; undoes any eviction by other processes
            time.sleep(args.settle)
            # The CPUs' busy fraction over the last second (in CPUs), waiting for idle if asked.
            busy_before = wait_idle(max(args.wait_idle, 0.0))
            label, make = steps_all[s]
            wall_clock0 = time.time()
            r = run_measured(make(dsts[s]))
            if rep < 0:
                print(f"  [warm-up] {s:<5} {r['wall_s']:7.2f} s", file=sys.stderr, flush=True)
                continue
            if s == "cp":  # cp prints the time it finished; the rest of the wall time is sync
                try:
                    r["cp_s"] = float(r["stdout"].split()[0]) - wall_clock0
                    r["sync_s"] = r["wall_s"] - r["cp_s"]
                except (ValueError, IndexError):
                    pass
            written = dir_files(dsts[s])
            r.update(step=s, label=label, cpu_busy_before=busy_before, repeat=rep, position=order.index(s),
                     bytes_read=src_bytes, bytes_written=sum(written.values()), files_written=len(written))
            if s != "cp":
                try:
                    report = json.loads(r["stdout"])
                    r["pyconv_internal_s"] = report.get("seconds")
                except ValueError:
                    pass
            info["runs"].append(r)
            print(f"  [{rep}] {s:<5} {r['wall_s']:7.2f} s  busy before {busy_before:4.2f} CPUs  anon {r['peak_rss_anon_bytes'] / MiB:7.1f} MiB  "
                  f"file {r['peak_rss_file_bytes'] / MiB:7.1f} MiB  CPU {r['user_s'] + r['sys_s']:5.2f} s  "
                  f"others' CPU {r['others_cpu_s']:5.2f} s  load {r['loadavg1_before']:.2f}",
                  file=sys.stderr, flush=True)
    if not args.keep:
        clean()
    info["pyconv_core_after"] = core_identity()
    if info["pyconv_core_after"] != core_before:
        print("warning: the compiled core changed during the run; figures mix two builds", file=sys.stderr)

    # ---- summary: medians per step
    summary = {}
    cp_runs = [r for r in info["runs"] if r["step"] == "cp"]
    cp_med = statistics.median(r["wall_s"] for r in cp_runs) if cp_runs else None
    for s in steps:
        rs = [r for r in info["runs"] if r["step"] == s]
        wall = statistics.median(r["wall_s"] for r in rs)
        written = statistics.median(r["bytes_written"] for r in rs)
        row = {
            "label": steps_all[s][0], "runs": len(rs), "wall_s_median": wall, "wall_s_min": min(r["wall_s"] for r in rs),
            "wall_s_max": max(r["wall_s"] for r in rs), "bytes_read": src_bytes, "bytes_written": written,
            "read_gb_per_s": src_bytes / wall / GB, "written_gb_per_s": written / wall / GB,
            "ratio_to_cp": wall / cp_med if cp_med else None,
            "cpu_s_median": statistics.median(r["user_s"] + r["sys_s"] for r in rs),
            "peak_rss_anon_bytes": max(r["peak_rss_anon_bytes"] for r in rs),
            "peak_rss_file_bytes": max(r["peak_rss_file_bytes"] for r in rs),
            "peak_vmhwm_bytes": max(r["peak_vmhwm_bytes"] for r in rs),
            "ru_maxrss_bytes": max(r["ru_maxrss_bytes"] for r in rs),
        }
        for key in ("cp_s", "sync_s"):
            vals = [r[key] for r in rs if key in r]
            if vals:
                row[key + "_median"] = statistics.median(vals)
        internal = [r["pyconv_internal_s"] for r in rs if r.get("pyconv_internal_s") is not None]
        if internal:
            row["pyconv_internal_s_median"] = statistics.median(internal)
        if cp_runs:  # the same ratio paired within each repeat, to show the spread
            pairs = [(r["wall_s"], next(c["wall_s"] for c in cp_runs if c["repeat"] == r["repeat"])) for r in rs]
            row["ratio_to_cp_per_repeat"] = [round(a / b, 3) for a, b in pairs]
        summary[s] = row
    info["summary"] = summary

    cfg = meta["config"]
    lt = meta["largest_tensor"]
    print()
    print(f"source: {src}: {src_bytes / GiB:.2f} GiB ({src_bytes / GB:.2f} GB) in {len(src_files)} files, "
          f"{meta['tensors']} fp32 tensors; hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, "
          f"vocab {cfg['vocab_size']}; largest tensor {lt['name']} {lt['shape']} = {lt['bytes'] / MiB:.0f} MiB")
    print(f"{'cold' if args.cold else 'warm'} page cache, {args.repeat} run(s) per step, medians; "
          f"{info['machine']['cpus']} CPUs, {info['filesystem']}")
    head = (f"{'step':<38} {'read GB':>8} {'wrote GB':>8} {'wall s':>7} {'min s':>6} {'src GB/s':>8} "
            f"{'out GB/s':>8} {'x cp':>5} {'CPU s':>6} {'anon MiB':>8} {'file MiB':>8} {'HWM MiB':>8} {'maxrss MiB':>10}")
    print(head)
    print("-" * len(head))
    for s, row in summary.items():
        ratio = f"{row['ratio_to_cp']:.2f}" if row["ratio_to_cp"] is not None else "-"
        print(f"{row['label']:<38} {row['bytes_read'] / GB:8.2f} {row['bytes_written'] / GB:8.2f} "
              f"{row['wall_s_median']:7.2f} {row['wall_s_min']:6.2f} {row['read_gb_per_s']:8.2f} "
              f"{row['written_gb_per_s']:8.2f} {ratio:>5} {row['cpu_s_median']:6.2f} "
              f"{row['peak_rss_anon_bytes'] / MiB:8.1f} {row['peak_rss_file_bytes'] / MiB:8.1f} "
              f"{row['peak_vmhwm_bytes'] / MiB:8.1f} {row['ru_maxrss_bytes'] / MiB:10.1f}")
    busy = [r["cpu_busy_before"] for r in info["runs"] if r.get("cpu_busy_before") is not None]
    others = [r["others_cpu_s"] / r["wall_s"] for r in info["runs"]]
    info["contention"] = {"busy_before_median_cpus": statistics.median(busy) if busy else None,
                          "others_cpus_during_median": statistics.median(others) if others else None}
    print(f"contention: CPUs busy in the second before a step (median) {info['contention']['busy_before_median_cpus']:.2f}, "
          f"CPUs used by everything else during a step (median, incl. kernel writeback) "
          f"{info['contention']['others_cpus_during_median']:.2f}, of {info['machine']['cpus']}")
    if "cp" in summary and "cp_s_median" in summary["cp"]:
        print(f"cp -r alone {summary['cp']['cp_s_median']:.2f} s, then sync {summary['cp']['sync_s_median']:.2f} s (medians)")
    for s, row in summary.items():
        if "pyconv_internal_s_median" in row:
            print(f"{row['label']}: {row['pyconv_internal_s_median']:.2f} s inside pyconv.reshard, "
                  f"{row['wall_s_median'] - row['pyconv_internal_s_median']:.2f} s start-up and exit (medians)")
    if "bf16" in summary:
        print("note: the bf16 cast writes half the bytes it reads; 'x cp' compares wall times of different write volumes.")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
