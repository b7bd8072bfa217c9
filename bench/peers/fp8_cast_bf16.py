#!/usr/bin/env python3
"""Peer for the benchmark: DeepSeek-V3's inference/fp8_cast_bf16.py algorithm (block-scaled fp8
Hugging Face checkpoint -> bf16).

For every safetensors file: load it whole (`load_file`), dequantize every fp8 weight that has a
`weight_scale_inv` (W = fp8 * S per 128 x 128 block, computed in float32, rounded to bf16; the
reference runs a Triton kernel on a GPU, this runs the same arithmetic in torch on the CPU),
drop the scales, `save_file` the file under the same name. The index loses the scales; the
config loses `quantization_config`.

    python fp8_cast_bf16.py --input-fp8-hf-path SRC --output-bf16-hf-path DST

Standalone: torch and safetensors only.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil

import torch
from safetensors.torch import load_file, save_file

BLOCK = 128


def dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W = fp8 * S per block, in float32, rounded to bf16 (the Triton kernel's arithmetic)."""
    rows, cols = weight.shape
    s = scale.repeat_interleave(BLOCK, dim=0)[:rows]  # [rows, column blocks]
    w = weight.to(torch.float32)
    if cols % BLOCK == 0:  # broadcast the scale over each block's columns, no full-size scale matrix
        return (w.view(rows, cols // BLOCK, BLOCK) * s[:, :, None]).view(rows, cols).to(torch.bfloat16)
    return (w * s.repeat_interleave(BLOCK, dim=1)[:, :cols]).to(torch.bfloat16)


def convert(src: str, dst: str) -> None:
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        index = json.load(f)
    weight_map = index["weight_map"]
    loaded: dict[str, dict[str, torch.Tensor]] = {}  # the reference keeps the two latest files

    def tensor(name: str) -> torch.Tensor:
        fname = weight_map[name]
        if fname not in loaded:
            loaded[fname] = load_file(os.path.join(src, fname))
            while len(loaded) > 2:
                del loaded[next(iter(loaded))]
        return loaded[fname][name]

    dropped = []
    for path in sorted(glob.glob(os.path.join(src, "*.safetensors"))):
        fname = os.path.basename(path)
        state = load_file(path)
        loaded[fname] = state
        out = {}
        for name, w in state.items():
            if name.endswith("_scale_inv"):
                continue
            if w.element_size() == 1 and (name + "_scale_inv") in weight_map:
                out[name] = dequantize(w, tensor(name + "_scale_inv"))
                dropped.append(name + "_scale_inv")
            else:
                out[name] = w
        save_file(out, os.path.join(dst, fname), metadata={"format": "pt"})
        while len(loaded) > 2:
            del loaded[next(iter(loaded))]
    for name in dropped:
        weight_map.pop(name, None)
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config.pop("quantization_config", None)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for path in glob.glob(os.path.join(src, "*token*")):
        shutil.copyfile(path, os.path.join(dst, os.path.basename(path)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input-fp8-hf-path", required=True)
    ap.add_argument("--output-bf16-hf-path", required=True)
    a = ap.parse_args()
    convert(a.input_fp8_hf_path, a.output_bf16_hf_path)


if __name__ == "__main__":
    main()
