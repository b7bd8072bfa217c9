#!/usr/bin/env python3
"""Peer for the benchmark: the gather-then-split algorithm of the reference converters.

What Megatron-LM's tools/checkpoint converters and Hugging Face's
`checkpoint_reshaping_and_interoperability.py` do, for a Llama-like model (GQA, SwiGLU, RMSNorm,
untied output layer, Megatron-Core TransformerEngine names):

  1. load every tensor of the source into memory (`torch.load` of every Megatron rank file, or
     every Hugging Face safetensors file);
  2. gather: `torch.cat` the tensor-parallel pieces into whole tensors, renumber pipeline layers;
  3. split: `torch.chunk` per target rank (`.clone()` so that each rank saves only its bytes),
     every rank's state dict held in memory;
  4. `torch.save` per rank (Megatron) or `save_file` per shard (Hugging Face).

    python gather_split.py SRC DST --to megatron --tp 4 --pp 2
    python gather_split.py SRC DST --to hf

SRC is a Hugging Face directory or a Megatron checkpoint directory (with
latest_checkpointed_iteration.txt). Standalone on purpose: it uses torch and safetensors only,
nothing of pyconv, so that it measures the reference approach and nothing else.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil

import torch
from safetensors.torch import load_file, save_file

L = "decoder.layers.{}."


# ----------------------------------------------------------------------------- load + gather

def load_hf(src: str):
    """Every tensor of a Hugging Face checkpoint in memory, gathered into Megatron's global names:
    QKV fused per query group ([q_0..q_{g-1}, k, v] rows per group), gate and up kept whole."""
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    hf = {}
    for path in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        hf.update(load_file(path))
    heads, groups = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hidden = cfg["hidden_size"]
    head_dim = cfg.get("head_dim") or hidden // heads
    model = {"embedding.word_embeddings.weight": hf["model.embed_tokens.weight"],
             "decoder.final_layernorm.weight": hf["model.norm.weight"],
             "output_layer.weight": hf["lm_head.weight"]}
    for i in range(cfg["num_hidden_layers"]):
        p, m = f"model.layers.{i}.", L.format(i)
        q = hf[p + "self_attn.q_proj.weight"].view(groups, heads // groups * head_dim, hidden)
        k = hf[p + "self_attn.k_proj.weight"].view(groups, head_dim, hidden)
        v = hf[p + "self_attn.v_proj.weight"].view(groups, head_dim, hidden)
        model[m + "self_attention.linear_qkv.weight"] = torch.cat([q, k, v], dim=1).reshape(-1, hidden)
        model[m + "self_attention.linear_qkv.layer_norm_weight"] = hf[p + "input_layernorm.weight"]
        model[m + "self_attention.linear_proj.weight"] = hf[p + "self_attn.o_proj.weight"]
        model[m + "mlp.linear_fc1.layer_norm_weight"] = hf[p + "post_attention_layernorm.weight"]
        model[m + "mlp.gate"] = hf[p + "mlp.gate_proj.weight"]
        model[m + "mlp.up"] = hf[p + "mlp.up_proj.weight"]
        model[m + "mlp.linear_fc2.weight"] = hf[p + "mlp.down_proj.weight"]
    args = dict(num_layers=cfg["num_hidden_layers"], hidden_size=hidden, ffn_hidden_size=cfg["intermediate_size"],
                num_attention_heads=heads, num_query_groups=groups, group_query_attention=groups != heads,
                kv_channels=head_dim, normalization="RMSNorm", swiglu=True, add_bias_linear=False,
                add_qkv_bias=False, position_embedding_type="rope", rotary_base=cfg.get("rope_theta", 10000.0),
                rotary_percent=1.0, max_position_embeddings=cfg["max_position_embeddings"],
                seq_length=cfg["max_position_embeddings"], norm_epsilon=cfg.get("rms_norm_eps", 1e-6),
                untie_embeddings_and_output_weights=True, vocab_size=cfg["vocab_size"],
                make_vocab_size_divisible_by=128, params_dtype=torch.bfloat16, bf16=True, iteration=0)
    return model, args


_RANK_DIR = re.compile(r"^mp_rank_(\d+)(?:_(\d+))?$")


def load_megatron(src: str):
    """torch.load of every rank file, then the tensor-parallel pieces concatenated."""
    with open(os.path.join(src, "latest_checkpointed_iteration.txt")) as f:
        it = f.read().strip()
    root = os.path.join(src, "release" if it == "release" else f"iter_{int(it):07d}")
    ranks = {}
    for name in os.listdir(root):
        m = _RANK_DIR.match(name)
        if m:
            ranks[(int(m.group(1)), int(m.group(2) or 0))] = torch.load(
                os.path.join(root, name, "model_optim_rng.pt"), map_location="cpu", weights_only=False)
    tp = 1 + max(t for t, _ in ranks)
    pp = 1 + max(p for _, p in ranks)
    args = dict(vars(ranks[(0, 0)]["args"]))
    per_stage = args["num_layers"] // pp
    model = {}
    for p in range(pp):
        sds = [ranks[(t, p)]["model"] for t in range(tp)]
        for name in sds[0]:
            if name.endswith("_extra_state"):
                continue
            m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
            gname = L.format(p * per_stage + int(m.group(1))) + m.group(2) if m else name
            parts = [sd[name] for sd in sds]
            if name.endswith("linear_fc1.weight"):  # each rank holds [gate_r; up_r]
                halves = [x.chunk(2, dim=0) for x in parts]
                model[gname.replace("linear_fc1.weight", "gate")] = torch.cat([h[0] for h in halves])
                model[gname.replace("linear_fc1.weight", "up")] = torch.cat([h[1] for h in halves])
            elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
                model[gname] = torch.cat(parts, dim=1)
            elif name.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
                model[gname] = torch.cat(parts, dim=0)
            else:  # norms: replicated
                model[gname] = parts[0]
    vocab = args["vocab_size"]
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        model[name] = model[name][:vocab]  # drop the padding rows
    return model, args


# ----------------------------------------------------------------------------- split + save

def save_megatron(model: dict, args: dict, dst: str, tp: int, pp: int) -> None:
    vocab = args["vocab_size"]
    multiple = args.get("make_vocab_size_divisible_by", 128) * tp
    padded = -(-vocab // multiple) * multiple
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):  # pad by repeating the last row
        w = model[name]
        model[name] = torch.cat([w, w[-1:].expand(padded - vocab, -1)]) if padded > vocab else w
    args = {**args, "tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp, "padded_vocab_size": padded}
    per_stage = args["num_layers"] // pp
    out = {}
    for p in range(pp):
        for t in range(tp):
            out[(t, p)] = {}
    for name, w in model.items():
        m = re.match(r"decoder\.layers\.(\d+)\.(.*)", name)
        if m:
            layer = int(m.group(1))
            stages = [layer // per_stage]
            local = L.format(layer % per_stage) + m.group(2)
        elif name.startswith("embedding."):
            stages, local = [0], name
        else:
            stages, local = [pp - 1], name
        if local.endswith(".mlp.up"):
            continue  # joined with gate below
        if local.endswith(".mlp.gate"):
            gates, ups = w.chunk(tp, dim=0), model[name[:-len("gate")] + "up"].chunk(tp, dim=0)
            pieces = [torch.cat([g, u]) for g, u in zip(gates, ups)]
            local = local[:-len("gate")] + "linear_fc1.weight"
        elif local.endswith(("linear_proj.weight", "linear_fc2.weight")):
            pieces = [c.clone() for c in w.chunk(tp, dim=1)]
        elif local.endswith(("linear_qkv.weight", "word_embeddings.weight", "output_layer.weight")):
            pieces = [c.clone() for c in w.chunk(tp, dim=0)]
        else:
            pieces = [w] * tp
        for s in stages:
            for t in range(tp):
                out[(t, s)][local] = pieces[t]
    root = os.path.join(dst, "release")
    for (t, p), sd in sorted(out.items()):
        d = os.path.join(root, f"mp_rank_{t:02d}" + (f"_{p:03d}" if pp > 1 else ""))
        os.makedirs(d, exist_ok=True)
        torch.save({"args": argparse.Namespace(**args), "checkpoint_version": 3.0, "iteration": 0, "model": sd},
                   os.path.join(d, "model_optim_rng.pt"))
    with open(os.path.join(dst, "latest_checkpointed_iteration.txt"), "w") as f:
        f.write("release")


def save_hf(model: dict, args: dict, dst: str, shard_bytes: int = 5_000_000_000) -> None:
    heads, hidden = args["num_attention_heads"], args["hidden_size"]
    groups = args["num_query_groups"] if args.get("group_query_attention") else heads
    head_dim = args.get("kv_channels") or hidden // heads
    hf = {"model.embed_tokens.weight": model["embedding.word_embeddings.weight"]}
    for i in range(args["num_layers"]):
        p, m = f"model.layers.{i}.", L.format(i)
        qkv = model[m + "self_attention.linear_qkv.weight"].view(groups, -1, hidden)
        q, k, v = qkv.split([heads // groups * head_dim, head_dim, head_dim], dim=1)
        hf[p + "input_layernorm.weight"] = model[m + "self_attention.linear_qkv.layer_norm_weight"]
        hf[p + "self_attn.q_proj.weight"] = q.reshape(-1, hidden).clone()
        hf[p + "self_attn.k_proj.weight"] = k.reshape(-1, hidden).clone()
        hf[p + "self_attn.v_proj.weight"] = v.reshape(-1, hidden).clone()
        hf[p + "self_attn.o_proj.weight"] = model[m + "self_attention.linear_proj.weight"]
        hf[p + "post_attention_layernorm.weight"] = model[m + "mlp.linear_fc1.layer_norm_weight"]
        hf[p + "mlp.gate_proj.weight"] = model[m + "mlp.gate"]
        hf[p + "mlp.up_proj.weight"] = model[m + "mlp.up"]
        hf[p + "mlp.down_proj.weight"] = model[m + "mlp.linear_fc2.weight"]
    hf["model.norm.weight"] = model["decoder.final_layernorm.weight"]
    hf["lm_head.weight"] = model["output_layer.weight"]
    hf = {k: v.contiguous() for k, v in hf.items()}
    shards, cur, size = [], {}, 0  # huggingface_hub's greedy split
    for name, t in hf.items():
        n = t.numel() * t.element_size()
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[name] = t
        size += n
    shards.append(cur)
    os.makedirs(dst, exist_ok=True)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(dst, fname), metadata={"format": "pt"})
        weight_map.update((n, fname) for n in shard)
    total = sum(t.numel() * t.element_size() for t in hf.values())
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": args["ffn_hidden_size"], "num_hidden_layers": args["num_layers"],
              "num_attention_heads": heads, "num_key_value_heads": groups, "head_dim": head_dim,
              "vocab_size": args["vocab_size"], "max_position_embeddings": args["max_position_embeddings"],
              "rms_norm_eps": args["norm_epsilon"], "rope_theta": args["rotary_base"], "hidden_act": "silu",
              "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--to", choices=["megatron", "hf"], required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    a = ap.parse_args()
    megatron_src = os.path.exists(os.path.join(a.src, "latest_checkpointed_iteration.txt"))
    model, args = load_megatron(a.src) if megatron_src else load_hf(a.src)
    shutil.rmtree(a.dst, ignore_errors=True)
    if a.to == "megatron":
        save_megatron(model, args, a.dst, a.tp, a.pp)
    else:
        save_hf(model, args, a.dst)
    for path in glob.glob(os.path.join(a.src, "*token*")):
        shutil.copyfile(path, os.path.join(a.dst, os.path.basename(path)))


if __name__ == "__main__":
    main()
