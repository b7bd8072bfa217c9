#!/usr/bin/env python3
"""Benchmark: HF <-> Megatron (tp 4, pp 2) and Megatron relayout against `cp -r` + `sync`.

Not a test: run by hand (bench/README.md). It generates (or reuses) a synthetic Llama-like
bf16 Hugging Face checkpoint (hidden 4096, 32 heads / 8 kv heads, ffn 11008, vocab 32000;
the layer count sets the size), then measures in the same run, rotating the order:

    cp        `cp -r SRC DST && sync`                                   (the copy limit)
    to_meg    `pyconv reshard SRC MEG --to megatron --tp 4 --pp 2`
    to_hf     `pyconv reshard MEG HF --to hf`
    relayout  `pyconv reshard MEG MEG2 --to megatron --tp 2 --pp 4`

Each figure is the wall time of the whole command (start-up included) with the peak resident
anonymous and file-backed memory of the child sampled from /proc/PID/status (bench_hf.py's
run_measured). Ratios are to the cp of the same source bytes measured in the same run.
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
import bench_hf as common  # noqa: E402 - measuring helpers shared with the HF benchmark

GiB = 1 << 30
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 4096, 32, 8, 128, 11008, 32000


def layer_tensors(i: int):
    p = f"model.layers.{i}."
    return [(p + "input_layernorm.weight", (HIDDEN,)),
            (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
            (p + "mlp.gate_proj.weight", (FFN, HIDDEN)),
            (p + "mlp.up_proj.weight", (FFN, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, FFN))]


def nbytes(shape) -> int:
    n = 2
    for s in shape:
        n *= s
    return n


def ensure_bf16_checkpoint(workdir: str, layers: int) -> tuple[str, dict]:
    """Writes the synthetic bf16 checkpoint with random bits (numpy, in a child), unless cached."""
    src = os.path.join(workdir, f"llama-bf16-{layers}l")
    meta_path = src + ".bench.json"
    if os.path.isfile(meta_path) and os.path.isdir(src):
        with open(meta_path) as f:
            return src, json.load(f)
    tensors = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        tensors += layer_tensors(i)
    tensors += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    common.run_in_child(lambda: _generate(src, tensors, layers), f"generating {src}")
    largest = max(tensors, key=lambda t: nbytes(t[1]))
    meta = {"layers": layers, "tensor_bytes": sum(nbytes(s) for _, s in tensors), "tensors": len(tensors),
            "largest_tensor": {"name": largest[0], "bytes": nbytes(largest[1])}}
    with open(meta_path, "w") as f:
        json.dump(meta, f)
    return src, meta


def _generate(src: str, tensors, layers: int) -> None:
    import numpy as np

    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(src)
    rng = np.random.default_rng(0)
    shards, current, size = [], [], 0
    for name, shape in tensors:  # 2 GB shards
        if current and size + nbytes(shape) > 2_000_000_000:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes(shape)
    shards.append(current)
    weight_map = {}
    for i, entries in enumerate(shards):
        file_name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in entries:
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes(shape)]}
            offset += nbytes(shape)
        body = json.dumps(header).encode()
        body += b" " * (-(len(body) + 8) % 8)
        with open(os.path.join(src, file_name), "wb") as f:
            f.write(len(body).to_bytes(8, "little") + body)
            for name, shape in entries:
                left = nbytes(shape) // 2
                while left:
                    n = min(left, 16 << 20)
                    # Normal-ish bf16 values (random sign/mantissa, exponent near 1): no NaNs.
                    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16)
                    bits = (bits & 0x807F) | 0x3C00
                    f.write(bits.tobytes())
                    left -= n
                weight_map[name] = file_name
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(nbytes(s) for _, s in tensors)}, "weight_map": weight_map}, f)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": FFN, "num_hidden_layers": layers, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=12, help="decoder layers (12: 4.4 GiB of bf16)")
    ap.add_argument("--workdir", default="/tmp/pyconv-bench")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--cold", action="store_true", help="drop the page cache before every step (root)")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    src, meta = ensure_bf16_checkpoint(args.workdir, args.layers)
    out = os.path.join(args.workdir, "out-megatron")
    os.makedirs(out, exist_ok=True)
    meg, meg2, hf, cp = (os.path.join(out, n) for n in ("meg", "meg2", "hf", "cp"))
    pyconv = common._pyconv_argv()
    steps = {
        "cp": (["sh", "-c", f"cp -r '{src}' '{cp}' && sync"], cp, src),
        "to_meg": (pyconv + ["reshard", src, meg, "--to", "megatron", "--tp", "4", "--pp", "2", "--force", "--json"],
                   None, src),
        "to_hf": (pyconv + ["reshard", meg, hf, "--to", "hf", "--force", "--json"], None, meg),
        "relayout": (pyconv + ["reshard", meg, meg2, "--to", "megatron", "--tp", "2", "--pp", "4", "--force",
                               "--json"], None, meg),
    }
    results: dict[str, list[dict]] = {k: [] for k in steps}
    for r in range(args.repeat):
        # to_hf and relayout read to_meg's output; cp alternates between first and last.
        order = ["cp", "to_meg", "to_hf", "relayout"] if r % 2 == 0 else ["to_meg", "to_hf", "relayout", "cp"]
        for name in order:
            argv, remove, source = steps[name]
            if remove:
                shutil.rmtree(remove, ignore_errors=True)
            if args.cold:
                common.drop_caches()
            else:
                common.warm(source)
            os.sync()
            run = common.run_measured(argv)
            if name != "cp":
                run["report"] = json.loads(run["stdout"])
            results[name].append(run)
            print(f"  {name:<9} {run['wall_s']:7.2f} s  anon {run['peak_rss_anon_bytes'] / 2**20:7.1f} MiB  "
                  f"file {run['peak_rss_file_bytes'] / 2**20:7.1f} MiB", file=sys.stderr, flush=True)
    cp_wall = statistics.median(x["wall_s"] for x in results["cp"])
    rows = []
    for name, runs in results.items():
        if not runs:
            continue
        wall = statistics.median(x["wall_s"] for x in runs)
        written = runs[0]["report"]["bytes"] if name != "cp" else meta["tensor_bytes"]
        rows.append({"step": name, "wall_s": wall, "written_gb_per_s": written / wall / 1e9, "ratio_to_cp": wall / cp_wall,
                     "peak_anon_mib": max(x["peak_rss_anon_bytes"] for x in runs) / 2**20,
                     "peak_file_mib": max(x["peak_rss_file_bytes"] for x in runs) / 2**20, "runs": len(runs)})
    print(f"\nsource {src}: {meta['tensor_bytes'] / GiB:.2f} GiB bf16, largest tensor "
          f"{meta['largest_tensor']['name']} {meta['largest_tensor']['bytes'] / 2**20:.0f} MiB; "
          f"{'cold' if args.cold else 'warm'} page cache; medians of {args.repeat}")
    print(f"{'step':<10}{'wall s':>9}{'GB/s':>8}{'x cp':>7}{'anon MiB':>10}{'file MiB':>10}")
    for row in rows:
        print(f"{row['step']:<10}{row['wall_s']:>9.2f}{row['written_gb_per_s']:>8.2f}{row['ratio_to_cp']:>7.2f}"
              f"{row['peak_anon_mib']:>10.1f}{row['peak_file_mib']:>10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": common.machine(), "filesystem": common.filesystem(args.workdir), "source": meta,
                       "cold": args.cold, "rows": rows, "raw": results,
                       "date": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
