#!/usr/bin/env python3
"""Peer for the benchmark: merging a LoRA adapter the way PEFT users do it today. Load the base
model with transformers (bf16), attach the adapter with PeftModel.from_pretrained, merge_and_unload,
then save_pretrained (safetensors). The whole model is in memory throughout.

    python peft_merge.py --base SRC --adapter ADAPTER --out DST

Standalone: torch, transformers and peft only.
"""

from __future__ import annotations

import argparse

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    model = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, a.adapter).merge_and_unload()
    model.save_pretrained(a.out)


if __name__ == "__main__":
    main()
