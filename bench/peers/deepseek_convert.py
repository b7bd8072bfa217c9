#!/usr/bin/env python3
"""Peer for the benchmark: DeepSeek-V3's inference/convert.py algorithm (Hugging Face ->
model-parallel `model{i}-mp{N}.safetensors`).

For every source file, `safe_open` it and for every tensor: rename it (strip "model.", then
self_attn -> attn, mlp -> ffn, weight_scale_inv -> scale, e_score_correction_bias -> bias, then
the module name through the table below), and for every rank either keep it whole (replicated),
keep it only on the rank that owns the routed expert, or `narrow(dim, ...).contiguous()` its part.
Every rank's state dict is held in memory until the end, then written with `save_file`;
tokenizer files are copied.

    python deepseek_convert.py --hf-ckpt-path SRC --save-path DST --n-experts 16 --model-parallel 4

Standalone: torch and safetensors only.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil

import torch
from safetensors.torch import safe_open, save_file

# Hugging Face module name -> (DeepSeek module name, dim split across ranks or None: replicated).
TABLE = {
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None), "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0), "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0), "o_proj": ("wo", 1),
    "gate": ("gate", None), "gate_proj": ("w1", 0), "down_proj": ("w2", 1), "up_proj": ("w3", 0),
    "norm": ("norm", None), "lm_head": ("head", 0), "scale": ("scale", None),
}
RENAMES = (("self_attn", "attn"), ("mlp", "ffn"), ("weight_scale_inv", "scale"), ("e_score_correction_bias", "bias"))


def rename(hf_name: str) -> tuple[str, int | None]:
    name = hf_name[len("model."):] if hf_name.startswith("model.") else hf_name
    for old, new in RENAMES:
        name = name.replace(old, new)
    key = name.split(".")[-2]
    if key not in TABLE:
        raise SystemExit(f"{hf_name}: module {key!r} is not in the table")
    new_key, dim = TABLE[key]
    return name.replace(key, new_key), dim


def convert(src: str, dst: str, n_experts: int, mp: int, mtp_layer: int) -> None:
    per_rank = n_experts // mp
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(mp)]
    for path in glob.glob(os.path.join(src, "*.safetensors")):
        with safe_open(path, framework="pt", device="cpu") as f:
            for hf_name in f.keys():
                if f"model.layers.{mtp_layer}" in hf_name:  # multi-token prediction layer: dropped
                    continue
                param = f.get_tensor(hf_name)
                name, dim = rename(hf_name)
                routed = "experts" in name and "shared_experts" not in name
                for i in range(mp):
                    if routed:
                        if int(name.split(".")[-3]) // per_rank != i:
                            continue
                        ranks[i][name] = param
                    elif dim is None:
                        ranks[i][name] = param
                    else:
                        if param.size(dim) % mp:
                            raise SystemExit(f"{hf_name}: dim {dim} ({param.size(dim)}) does not divide by {mp}")
                        size = param.size(dim) // mp
                        ranks[i][name] = param.narrow(dim, i * size, size).contiguous()
    os.makedirs(dst, exist_ok=True)
    for i in range(mp):
        save_file(ranks[i], os.path.join(dst, f"model{i}-mp{mp}.safetensors"))
    for path in glob.glob(os.path.join(src, "*token*")):
        shutil.copyfile(path, os.path.join(dst, os.path.basename(path)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hf-ckpt-path", required=True)
    ap.add_argument("--save-path", required=True)
    ap.add_argument("--n-experts", type=int, required=True)
    ap.add_argument("--model-parallel", type=int, required=True)
    ap.add_argument("--mtp-layer", type=int, default=61, help="index of the layer that is dropped (DeepSeek-V3: 61)")
    a = ap.parse_args()
    if a.n_experts % a.model_parallel:
        raise SystemExit("the number of experts must divide by the model parallel size")
    convert(a.hf_ckpt_path, a.save_path, a.n_experts, a.model_parallel, a.mtp_layer)


if __name__ == "__main__":
    main()
