"""Synthetic checkpoints for the benchmarks, written with numpy only (no torch), streamed in
chunks so that generating one needs little memory, and cached under a work directory.

dense_llama(size)   Llama-like bf16 Hugging Face checkpoint: hidden 2048 (narrower below ~600 MiB),
                    16 heads / 4 KV heads, SwiGLU, untied lm_head; the layer count (a multiple of 4,
                    so that pipeline 2 and 4 divide it) and the vocabulary fill the size.
deepseek_fp8(size)  DeepSeek-V3-like mixture of experts: MLA attention, one dense layer, then MoE
                    layers of 16 routed experts + 1 shared expert; every linear weight of the layers
                    fp8 e4m3fn with float32 128x128 block scales (`weight_scale_inv`), embeddings,
                    norms and router bf16 / float32, `quantization_config` in config.json. Every
                    dimension that DeepSeek's mp 4 split cuts is a multiple of 4 x 128, so the fp8
                    scale blocks split with their weights.

Values: bf16 with random sign and mantissa and an exponent near 1 (no NaN, no infinity); fp8
random bytes with the two NaN codes replaced; scales random positive floats. Safetensors files are
laid out as `safetensors.torch.save_file` lays them out (tensors sorted by name), in shards of at
most 2 GB, with model.safetensors.index.json.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys

from measure import GiB, dir_files, run_in_child

ITEMSIZE = {"BF16": 2, "F32": 4, "F8_E4M3": 1}
SHARD_BYTES = 2_000_000_000


def _nbytes(dtype: str, shape) -> int:
    return ITEMSIZE[dtype] * math.prod(shape)


# ----------------------------------------------------------------------------- dense Llama

def dense_config(size_bytes: int) -> dict:
    """A Llama-like bf16 config of about size_bytes (the vocabulary, a multiple of 128, absorbs
    the rest; at least 4 layers)."""
    for h in (2048, 1024, 512, 256, 128):
        heads = max(4, h // 128)
        kv_heads = 4
        head_dim = h // heads
        inter = max(256, int(round(h * 11008 / 4096 / 256)) * 256)
        per_layer = 2 * (2 * h * heads * head_dim + 2 * h * kv_heads * head_dim + 3 * h * inter + 2 * h)
        min_vocab = 32000 if h >= 2048 else 1024
        layers = (size_bytes - 2 * 2 * h * min_vocab - 2 * h) // per_layer // 4 * 4
        if layers >= 4:
            rest = size_bytes - layers * per_layer - 2 * h
            vocab = max(min_vocab, rest // (2 * 2 * h) // 128 * 128)
            return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h,
                    "intermediate_size": inter, "num_hidden_layers": int(layers), "num_attention_heads": heads,
                    "num_key_value_heads": kv_heads, "head_dim": head_dim, "vocab_size": int(vocab),
                    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                    "hidden_act": "silu", "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
                    "torch_dtype": "bfloat16"}
    raise SystemExit(f"{size_bytes} bytes is too small for the synthetic Llama")


def dense_tensors(cfg: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    out = [("model.embed_tokens.weight", "BF16", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", "BF16", (h,)), (p + "self_attn.q_proj.weight", "BF16", (q, h)),
                (p + "self_attn.k_proj.weight", "BF16", (kv, h)), (p + "self_attn.v_proj.weight", "BF16", (kv, h)),
                (p + "self_attn.o_proj.weight", "BF16", (h, q)),
                (p + "post_attention_layernorm.weight", "BF16", (h,)),
                (p + "mlp.gate_proj.weight", "BF16", (inter, h)), (p + "mlp.up_proj.weight", "BF16", (inter, h)),
                (p + "mlp.down_proj.weight", "BF16", (h, inter))]
    out += [("model.norm.weight", "BF16", (h,)), ("lm_head.weight", "BF16", (v, h))]
    return out


# ----------------------------------------------------------------------------- DeepSeek-like fp8 MoE

# Dimensions split by mp 4 (q_b and kv_b rows, o_proj columns, dense and shared-expert
# intermediate sizes) are multiples of 4 x 128. The small variant serves sizes under 1 GiB.
DEEPSEEK = dict(hidden=2048, heads=16, q_lora=768, kv_lora=512, nope=128, rope=64, v=128, inter=5632,
                moe_inter=1024, experts=16, vocab=32000)
DEEPSEEK_SMALL = dict(hidden=256, heads=8, q_lora=256, kv_lora=128, nope=128, rope=64, v=128, inter=512,
                      moe_inter=512, experts=8, vocab=1024)


def _deepseek_dims(cfg: dict) -> dict:
    return DEEPSEEK if cfg["hidden_size"] == DEEPSEEK["hidden"] else DEEPSEEK_SMALL


def deepseek_config(size_bytes: int) -> dict:
    d = DEEPSEEK if size_bytes >= GiB else DEEPSEEK_SMALL
    cfg = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": d["hidden"],
           "intermediate_size": d["inter"], "moe_intermediate_size": d["moe_inter"], "num_hidden_layers": 2,
           "num_attention_heads": d["heads"], "num_key_value_heads": d["heads"], "n_routed_experts": d["experts"],
           "n_shared_experts": 1, "num_experts_per_tok": 4, "first_k_dense_replace": 1, "q_lora_rank": d["q_lora"],
           "kv_lora_rank": d["kv_lora"], "qk_nope_head_dim": d["nope"], "qk_rope_head_dim": d["rope"],
           "v_head_dim": d["v"], "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5,
           "norm_topk_prob": True, "vocab_size": d["vocab"], "max_position_embeddings": 4096,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
           "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                   "weight_block_size": [128, 128]}}
    per_moe = sum(_nbytes(dt, s) for n, dt, s in deepseek_tensors(cfg) if ".layers.1." in n)
    fixed = sum(_nbytes(dt, s) for n, dt, s in deepseek_tensors(cfg)) - per_moe
    cfg["num_hidden_layers"] = max(2, 1 + round((size_bytes - fixed) / per_moe))
    return cfg


def deepseek_tensors(cfg: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    d = _deepseek_dims(cfg)
    out: list[tuple[str, str, tuple[int, ...]]] = []

    def fp8(name, rows, cols):
        out.append((name + ".weight", "F8_E4M3", (rows, cols)))
        out.append((name + ".weight_scale_inv", "F32", (math.ceil(rows / 128), math.ceil(cols / 128))))

    h = d["hidden"]
    out.append(("model.embed_tokens.weight", "BF16", (d["vocab"], h)))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", "BF16", (h,)), (p + "post_attention_layernorm.weight", "BF16", (h,)),
                (p + "self_attn.q_a_layernorm.weight", "BF16", (d["q_lora"],)),
                (p + "self_attn.kv_a_layernorm.weight", "BF16", (d["kv_lora"],))]
        fp8(p + "self_attn.q_a_proj", d["q_lora"], h)
        fp8(p + "self_attn.q_b_proj", d["heads"] * (d["nope"] + d["rope"]), d["q_lora"])
        fp8(p + "self_attn.kv_a_proj_with_mqa", d["kv_lora"] + d["rope"], h)
        fp8(p + "self_attn.kv_b_proj", d["heads"] * (d["nope"] + d["v"]), d["kv_lora"])
        fp8(p + "self_attn.o_proj", h, d["heads"] * d["v"])
        if i == 0:
            fp8(p + "mlp.gate_proj", d["inter"], h)
            fp8(p + "mlp.up_proj", d["inter"], h)
            fp8(p + "mlp.down_proj", h, d["inter"])
            continue
        out += [(p + "mlp.gate.weight", "BF16", (d["experts"], h)),
                (p + "mlp.gate.e_score_correction_bias", "F32", (d["experts"],))]
        for e in range(d["experts"]):
            fp8(p + f"mlp.experts.{e}.gate_proj", d["moe_inter"], h)
            fp8(p + f"mlp.experts.{e}.up_proj", d["moe_inter"], h)
            fp8(p + f"mlp.experts.{e}.down_proj", h, d["moe_inter"])
        fp8(p + "mlp.shared_experts.gate_proj", d["moe_inter"], h)
        fp8(p + "mlp.shared_experts.up_proj", d["moe_inter"], h)
        fp8(p + "mlp.shared_experts.down_proj", h, d["moe_inter"])
    out += [("model.norm.weight", "BF16", (h,)), ("lm_head.weight", "BF16", (d["vocab"], h))]
    return out


# ----------------------------------------------------------------------------- writing

def _fill(f, dtype: str, n: int, rng) -> None:
    import numpy as np

    chunk = 32 << 20
    while n:
        k = min(n, chunk)
        if dtype == "BF16":  # random sign and mantissa, exponent 0x78..0x7F: |x| in [2^-7, 2)
            bits = rng.integers(0, 1 << 16, k, dtype=np.uint16)
            f.write(((bits & 0x83FF) | 0x3C00).tobytes())
        elif dtype == "F8_E4M3":  # random bytes; 0x7F and 0xFF are NaN in e4m3fn
            b = rng.integers(0, 256, k, dtype=np.uint8)
            b[(b & 0x7F) == 0x7F] ^= 1
            f.write(b.tobytes())
        else:  # F32: positive, small (scales, router bias)
            f.write((rng.random(k, dtype=np.float32) * np.float32(1e-3) + np.float32(1e-4)).tobytes())
        n -= k


def _write_file(path: str, entries, rng) -> None:
    entries = sorted(entries, key=lambda e: e[0])
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    # save_file orders by dtype alignment, then name; a stable sort by descending itemsize does that.
    entries = sorted(entries, key=lambda e: -ITEMSIZE[e[1]])
    for name, dtype, shape in entries:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + _nbytes(dtype, shape)]}
        pos += _nbytes(dtype, shape)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dtype, shape in entries:
            _fill(f, dtype, math.prod(shape), rng)
        f.flush()
        os.fsync(f.fileno())


def _generate(src: str, meta_path: str, cfg: dict, tensors, seed: int) -> None:
    import numpy as np

    total = sum(_nbytes(dt, s) for _, dt, s in tensors)
    print(f"generating {src} ({total / GiB:.2f} GiB, {len(tensors)} tensors) ...", file=sys.stderr, flush=True)
    shutil.rmtree(src, ignore_errors=True)
    if os.path.exists(meta_path):
        os.unlink(meta_path)
    os.makedirs(src)
    shards, cur, size = [], [], 0
    for t in tensors:
        if cur and size + _nbytes(t[1], t[2]) > SHARD_BYTES:
            shards.append(cur)
            cur, size = [], 0
        cur.append(t)
        size += _nbytes(t[1], t[2])
    shards.append(cur)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, entries in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_file(os.path.join(src, name), entries, rng)
        weight_map.update((n, name) for n, _, _ in entries)
    with open(os.path.join(src, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=2)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:  # a stand-in, copied by every tool
        json.dump({"model_max_length": 4096}, f)
    largest = max(tensors, key=lambda t: _nbytes(t[1], t[2]))
    meta = {"config": cfg, "seed": seed, "files": dir_files(src), "tensor_bytes": total, "tensors": len(tensors),
            "largest_tensor": {"name": largest[0], "dtype": largest[1], "shape": list(largest[2]),
                               "bytes": _nbytes(largest[1], largest[2])}}
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=2)


def ensure(workdir: str, kind: str, size_bytes: int, seed: int = 0) -> tuple[str, dict]:
    """The synthetic checkpoint of this kind ("dense" or "moe_fp8") and size, generated unless
    a complete one is cached; returns (directory, description)."""
    cfg = dense_config(size_bytes) if kind == "dense" else deepseek_config(size_bytes)
    tensors = dense_tensors(cfg) if kind == "dense" else deepseek_tensors(cfg)
    src = os.path.join(workdir, f"{kind}-{size_bytes}")
    meta_path = src + ".bench.json"  # beside the checkpoint, so that cp and pyconv never see it
    if os.path.isfile(meta_path) and os.path.isdir(src):
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("config") == cfg and meta.get("seed") == seed and dir_files(src) == meta.get("files"):
            return src, meta
    sys.stdout.flush()
    sys.stderr.flush()
    # In a forked child: numpy stays out of the measuring process (see measure.run_in_child).
    run_in_child(lambda: _generate(src, meta_path, cfg, tensors, seed), f"generating {src}")
    with open(meta_path) as f:
        return src, json.load(f)


def remove(src: str) -> None:
    shutil.rmtree(src, ignore_errors=True)
    if os.path.exists(src + ".bench.json"):
        os.unlink(src + ".bench.json")
