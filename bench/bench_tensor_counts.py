#!/usr/bin/env python3
"""Per-tensor costs at the tensor counts of today's MoE checkpoints (issue #16).

    python bench/bench_tensor_counts.py                       # every part, 10k / 50k / 150k tensors
    python bench/bench_tensor_counts.py --parts headers,plan --json /tmp/counts.json

Parts (each figure from its own child process, so that peak RSS is the child's):

headers   one safetensors file of N small tensors (MoE names): reading its header into pyconv's
          catalog objects with the core (yyjson) against the json-module reader it replaced
          (tests/safetensors_reference_reader.py); wall and peak RSS, and the header's size.
plan      DeepSeek-V3-shaped Hugging Face checkpoints with tiny dimensions (61 layers; experts and
          fp8 weights chosen to reach N tensors): time to read the catalog, then to plan each target
          (hf, deepseek mp8, megatron tp2 ep8, torch_dist), in microseconds per output tensor.
convert   the same checkpoints -> DeepSeek mp8 with pyconv and with DeepSeek's convert.py algorithm
          (peers/deepseek_convert.py) in the same run, outputs compared byte for byte; and -> HF.
tiny      the fixed cost of a tiny conversion (HF -> HF, two tensors): median wall of --repeat runs.

Sources are cached under --workdir (about 0.2 GB per 50k tensors).
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from measure import machine, run_measured  # noqa: E402

ITEMSIZE = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
# (layers, routed experts, routed experts in fp8 with 128x128 scales) per tensor count.
SHAPES = {10_000: (61, 48, False), 50_000: (61, 256, False), 150_000: (61, 384, True)}
DIMS = dict(hidden=64, heads=8, moe_inter=32, inter=64, vocab=1024, q_lora=64, kv_lora=32, nope=16, rope=8, v=16)


# ---------------------------------------------------------------------------------- sources

def deepseek_tensors(layers: int, experts: int, fp8: bool) -> list[tuple[str, str, tuple[int, ...]]]:
    d = DIMS
    h = d["hidden"]
    out = [("model.embed_tokens.weight", "BF16", (d["vocab"], h))]

    def linear(name, rows, cols, quantized=False):
        if quantized:
            out.append((name + ".weight", "F8_E4M3", (rows, cols)))
            out.append((name + ".weight_scale_inv", "F32", (-(-rows // 128), -(-cols // 128))))
        else:
            out.append((name + ".weight", "BF16", (rows, cols)))

    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", "BF16", (h,)), (p + "post_attention_layernorm.weight", "BF16", (h,)),
                (p + "self_attn.q_a_layernorm.weight", "BF16", (d["q_lora"],)),
                (p + "self_attn.kv_a_layernorm.weight", "BF16", (d["kv_lora"],))]
        linear(p + "self_attn.q_a_proj", d["q_lora"], h)
        linear(p + "self_attn.q_b_proj", d["heads"] * (d["nope"] + d["rope"]), d["q_lora"])
        linear(p + "self_attn.kv_a_proj_with_mqa", d["kv_lora"] + d["rope"], h)
        linear(p + "self_attn.kv_b_proj", d["heads"] * (d["nope"] + d["v"]), d["kv_lora"])
        linear(p + "self_attn.o_proj", h, d["heads"] * d["v"])
        if i == 0:
            for proj, (r, c) in (("gate_proj", (d["inter"], h)), ("up_proj", (d["inter"], h)), ("down_proj", (h, d["inter"]))):
                linear(p + "mlp." + proj, r, c)
            continue
        out += [(p + "mlp.gate.weight", "BF16", (experts, h)), (p + "mlp.gate.e_score_correction_bias", "F32", (experts,))]
        for e in range(experts):
            for proj, (r, c) in (("gate_proj", (d["moe_inter"], h)), ("up_proj", (d["moe_inter"], h)),
                                 ("down_proj", (h, d["moe_inter"]))):
                linear(p + f"mlp.experts.{e}.{proj}", r, c, fp8)
        for proj, (r, c) in (("gate_proj", (d["moe_inter"], h)), ("up_proj", (d["moe_inter"], h)),
                             ("down_proj", (h, d["moe_inter"]))):
            linear(p + f"mlp.shared_experts.{proj}", r, c)  # split by DeepSeek's mp: kept bf16
    out += [("model.norm.weight", "BF16", (h,)), ("lm_head.weight", "BF16", (d["vocab"], h))]
    return out


def _nbytes(dtype, shape) -> int:
    n = ITEMSIZE[dtype]
    for s in shape:
        n *= s
    return n


def _payload(dtype: str, n: int) -> bytes:
    """Deterministic bytes without NaN: fp8 codes 0x00-0x7e, bf16 of modest magnitude, small f32."""
    if dtype == "F8_E4M3":
        return bytes((i * 37) % 0x7E for i in range(n))
    if dtype == "F32":
        return struct.pack(f"<{n // 4}f", *((1 + (i % 97)) * 1e-3 for i in range(n // 4)))
    return b"".join(struct.pack("<H", 0x3C00 | (i * 131) % 0x3FF) for i in range(n // 2))


def write_safetensors(path: str, entries) -> None:
    """Laid out as save_file lays it out (by itemsize, widest first, then by name)."""
    entries = sorted(entries, key=lambda e: (-ITEMSIZE[e[1]], e[0]))
    header, pos = {}, 0
    for name, dtype, shape in entries:
        n = _nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    cache: dict = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _, dtype, shape in entries:
            key = (dtype, _nbytes(dtype, shape))
            if key not in cache:
                cache[key] = _payload(*key)
            f.write(cache[key])


def deepseek_source(workdir: str, count: int) -> tuple[str, int]:
    layers, experts, fp8 = SHAPES[count]
    src = os.path.join(workdir, f"deepseek-{layers}x{experts}{'-fp8' if fp8 else ''}")
    tensors = deepseek_tensors(layers, experts, fp8)
    if os.path.isfile(os.path.join(src, "config.json")):
        return src, len(tensors)
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(src)
    shards, cur, size = [], [], 0
    for t in tensors:
        if cur and size + _nbytes(t[1], t[2]) > 100_000_000:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += _nbytes(t[1], t[2])
    shards.append(cur)
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(src, name), shard)
        weight_map.update((n, name) for n, _, _ in shard)
    d = DIMS
    config = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": d["hidden"],
              "intermediate_size": d["inter"], "moe_intermediate_size": d["moe_inter"], "num_hidden_layers": layers,
              "num_attention_heads": d["heads"], "num_key_value_heads": d["heads"], "n_routed_experts": experts,
              "n_shared_experts": 1, "num_experts_per_tok": 8, "first_k_dense_replace": 1, "q_lora_rank": d["q_lora"],
              "kv_lora_rank": d["kv_lora"], "qk_nope_head_dim": d["nope"], "qk_rope_head_dim": d["rope"],
              "v_head_dim": d["v"], "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
              "vocab_size": d["vocab"], "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    if fp8:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [128, 128]}
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return src, len(tensors)


# ---------------------------------------------------------------------------------- parts

def _child(code: str) -> dict:
    """Runs python -c code (which prints one JSON line last) measured; returns its JSON plus wall/RSS."""
    r = run_measured([sys.executable, "-c", textwrap.dedent(code)])
    out = json.loads(r["stdout"].strip().splitlines()[-1])
    out.update(wall_s=round(r["wall_s"], 3), peak_rss_mib=round(r["peak_rss_bytes"] / 2**20, 1))
    return out


def part_headers(workdir: str, counts: list[int]) -> list[dict]:
    rows = []
    for n in counts:
        path = os.path.join(workdir, f"header-{n}.safetensors")
        if not os.path.isfile(path):
            write_safetensors(path, [(f"model.layers.{i // 768}.mlp.experts.{(i // 3) % 256}.{('gate', 'up', 'down')[i % 3]}"
                                      f"_proj.weight", "BF16", (2, 2)) for i in range(n)])
        header_bytes = struct.unpack("<Q", open(path, "rb").read(8))[0]
        for reader, code in (("core", "from pyconv.io.safetensors import _read_header as read"),
                             ("json module (before)", f"sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); "
                                                      "from safetensors_reference_reader import reference_read_header as read")):
            row = _child(f"""
                import json, sys, time
                {code}
                t = time.perf_counter(); f = read({path!r}); dt = time.perf_counter() - t
                print(json.dumps({{"read_s": round(dt, 4), "tensors": len(f.tensors)}}))""")
            row.update(part="headers", reader=reader, header_mib=round(header_bytes / 2**20, 2))
            rows.append(row)
            print(f"headers {n:>7}: {reader:<22} read {row['read_s']:.3f} s, process {row['wall_s']:.2f} s, "
                  f"peak RSS {row['peak_rss_mib']} MiB (header {row['header_mib']} MiB)", flush=True)
    return rows


TARGETS = [("hf", {}), ("deepseek", {"tp": 8}), ("megatron", {"tp": 2, "ep": 8}), ("torch_dist", {})]


def part_plan(workdir: str, counts: list[int]) -> list[dict]:
    rows = []
    for n in counts:
        src, tensors = deepseek_source(workdir, n)
        for to, options in TARGETS:
            # Megatron checkpoints hold no block-scaled fp8: those targets dequantize (as they must).
            dtype = "bf16" if SHAPES[n][2] and to in ("megatron", "torch_dist") else None
            row = _child(f"""
                import json, time
                from pyconv.api import target_spec
                from pyconv.formats import get_format, read_checkpoint
                t = time.perf_counter(); catalog = read_checkpoint({src!r}); read = time.perf_counter() - t
                spec = target_spec({to!r}, {dtype!r}, **{options!r})
                t = time.perf_counter(); files = get_format({to!r}).plan_output(catalog, spec); plan = time.perf_counter() - t
                out = sum(len(f.tensors) for f in files if f.kind == "weights")
                print(json.dumps({{"read_s": round(read, 3), "plan_s": round(plan, 3), "output_tensors": out}}))""")
            row.update(part="plan", source_tensors=tensors, target=to, options=options, dtype=dtype,
                       us_per_output_tensor=round(row["plan_s"] / row["output_tensors"] * 1e6, 1),
                       read_us_per_tensor=round(row["read_s"] / tensors * 1e6, 1))
            rows.append(row)
            print(f"plan {tensors:>7} -> {to:<10} {row['output_tensors']:>7} tensors: plan {row['plan_s']:.2f} s "
                  f"({row['us_per_output_tensor']} us/tensor), read {row['read_s']:.2f} s", flush=True)
    return rows


def part_convert(workdir: str, counts: list[int], peers: bool) -> list[dict]:
    rows = []
    for n in counts:
        src, tensors = deepseek_source(workdir, n)
        experts = SHAPES[n][1]
        steps = [("pyconv -> deepseek mp8", [sys.executable, "-m", "pyconv", "reshard", src, "OUT", "--to", "deepseek",
                                             "--tp", "8"]),
                 ("pyconv -> hf", [sys.executable, "-m", "pyconv", "reshard", src, "OUT", "--to", "hf"])]
        if peers:
            steps.insert(0, ("convert.py algorithm -> mp8",
                             [sys.executable, os.path.join(HERE, "peers", "deepseek_convert.py"), "--hf-ckpt-path", src,
                              "--save-path", "OUT", "--n-experts", str(experts), "--model-parallel", "8"]))
        outs = {}
        for label, argv in steps:
            out = os.path.join(workdir, "out-" + label.split()[0].replace(".", "") + "-" + argv[-1])
            shutil.rmtree(out, ignore_errors=True)
            r = run_measured([a if a != "OUT" else out for a in argv])
            outs[label] = out
            row = dict(part="convert", source_tensors=tensors, step=label, wall_s=round(r["wall_s"], 3),
                       peak_rss_mib=round(r["peak_rss_bytes"] / 2**20, 1))
            rows.append(row)
            print(f"convert {tensors:>7}: {label:<30} {row['wall_s']:.2f} s, peak RSS {row['peak_rss_mib']} MiB", flush=True)
        if peers:
            a, b = outs["convert.py algorithm -> mp8"], outs["pyconv -> deepseek mp8"]
            same = all(filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False)
                       for f in sorted(os.listdir(a)) if f.endswith(".safetensors"))
            peer = next(r for r in rows if r["step"].startswith("convert.py") and r["source_tensors"] == tensors)
            ours = next(r for r in rows if r["step"] == "pyconv -> deepseek mp8" and r["source_tensors"] == tensors)
            rows.append(dict(part="convert", source_tensors=tensors, step="comparison", byte_identical=same,
                             pyconv_over_peer=round(ours["wall_s"] / peer["wall_s"], 3)))
            print(f"convert {tensors:>7}: pyconv / convert.py = {ours['wall_s'] / peer['wall_s']:.2f}; "
                  f"outputs byte-identical: {same}", flush=True)
        for out in outs.values():
            shutil.rmtree(out, ignore_errors=True)
    return rows


def part_tiny(workdir: str, repeat: int) -> list[dict]:
    src = os.path.join(workdir, "tiny")
    if not os.path.isdir(src):
        os.makedirs(src)
        write_safetensors(os.path.join(src, "model.safetensors"), [("a.weight", "BF16", (4, 4)), ("b.weight", "F32", (4,))])
    out = os.path.join(workdir, "tiny-out")
    walls = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        walls.append(run_measured([sys.executable, "-m", "pyconv", "reshard", src, out, "--to", "hf"])["wall_s"])
    python = [run_measured([sys.executable, "-c", "pass"])["wall_s"] for _ in range(repeat)]
    row = dict(part="tiny", median_wall_s=round(statistics.median(walls), 3), min_wall_s=round(min(walls), 3),
               python_startup_median_s=round(statistics.median(python), 3), runs=repeat)
    print(f"tiny HF -> HF: median {row['median_wall_s']} s (min {row['min_wall_s']}), bare python start "
          f"{row['python_startup_median_s']} s", flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return [row]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--counts", default="10000,50000,150000", help="tensor counts (of " + ", ".join(map(str, SHAPES)) + ")")
    ap.add_argument("--header-counts", default="10000,50000,100000,150000", help="entries of the header part")
    ap.add_argument("--parts", default="headers,plan,convert,tiny")
    ap.add_argument("--workdir", default="/tmp/pyconv-bench-counts")
    ap.add_argument("--repeat", type=int, default=10, help="runs of the tiny conversion (default 10)")
    ap.add_argument("--no-peers", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",") if c]
    unknown = [c for c in counts if c not in SHAPES]
    if unknown:
        ap.error(f"--counts: no shape for {unknown}; known: {sorted(SHAPES)}")
    os.makedirs(args.workdir, exist_ok=True)
    parts = args.parts.split(",")
    rows: list[dict] = []
    if "headers" in parts:
        rows += part_headers(args.workdir, [int(c) for c in args.header_counts.split(",") if c])
    if "plan" in parts:
        rows += part_plan(args.workdir, counts)
    if "convert" in parts:
        rows += part_convert(args.workdir, counts, not args.no_peers)
    if "tiny" in parts:
        rows += part_tiny(args.workdir, args.repeat)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "commit": commit, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
