"""`pyconv demo`: the main job on an embedded default.

Builds a small Llama-style model (GQA) with transformers from a config (no download),
converts it with pyconv (re-sharded; cast to bf16; to Megatron tp 2 pp 2 and back), and shows
that transformers loads each result with no missing or unexpected keys and produces the same
logits, and that `pyconv verify` finds every tensor bit for bit equal across formats.
"""

from __future__ import annotations

import os
import tempfile

DEMO_CONFIG = dict(vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                   rope_theta=500000.0, tie_word_embeddings=False)


def _load(path, dtype):
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise SystemExit(f"transformers reported {problems} loading {path}")
    return model.eval()


def _quiet_other_libraries() -> None:
    """transformers' and huggingface_hub's progress bars and advice would interleave with the steps."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def run_demo(workdir: str | None = None) -> int:
    """Runs the demo in workdir (kept), or in a temporary directory removed afterwards."""
    import importlib.util

    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"pyconv demo needs {' and '.join(missing)}; install with: pip install '.[demo]'")
    _quiet_other_libraries()
    if workdir is not None:
        os.makedirs(workdir, exist_ok=True)
        status = _demo(workdir)
    else:
        with tempfile.TemporaryDirectory(prefix="pyconv-demo-") as scratch:
            status = _demo(scratch)
        print("   (the models were in a temporary directory, now removed; keep them with --workdir DIR)")
    print("demo OK" if status == 0 else "demo FAILED")
    return status


def _demo(workdir: str) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import pyconv

    src = os.path.join(workdir, "llama-hf")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**DEMO_CONFIG)).eval()
    model.save_pretrained(src, max_shard_size="8MB")
    print(f"1. built a tiny Llama (GQA 8 heads / 2 kv heads, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters) with transformers and saved it to {src}")

    ckpt = pyconv.open(src)
    print(f"2. pyconv inspect: format={ckpt.format} architecture={ckpt.architecture} tensors={len(ckpt)} "
          f"bytes={ckpt.total_bytes:,}")

    x = torch.randint(0, DEMO_CONFIG["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(x).logits
    status = 0
    for step, label, dst, kwargs, dtype in (
        (3, "re-sharded at 2MB, fp32", os.path.join(workdir, "llama-hf-2MB"), dict(max_shard_size="2MB"),
         torch.float32),
        (4, "cast to bf16", os.path.join(workdir, "llama-hf-bf16"), dict(dtype="bf16"), torch.bfloat16),
    ):
        report = pyconv.reshard(src, dst, to="hf", force=True, **kwargs)
        converted = _load(dst, None)
        with torch.no_grad():
            expected = reference if dtype == torch.float32 else _load(src, torch.bfloat16)(x).logits
            logits = converted(x).logits
        same = torch.equal(logits, expected)
        status |= 0 if same and converted.dtype == dtype else 1
        print(f"{step}. pyconv reshard ({label}): {report.files} files, {report.bytes:,} bytes in "
              f"{report.seconds:.3f} s -> {dst}\n   transformers loads it ({converted.dtype}, no missing/unexpected "
              f"keys); logits {'identical to' if same else 'DIFFER from'} the "
              f"{'source model' if dtype == torch.float32 else 'source loaded as bf16 by transformers'}")
    megatron, back = os.path.join(workdir, "llama-megatron-tp2-pp2"), os.path.join(workdir, "llama-hf-from-megatron")
    to_megatron = pyconv.reshard(src, megatron, to="megatron", tp=2, pp=2, force=True)
    from_megatron = pyconv.reshard(megatron, back, to="hf", force=True)
    same_weights = pyconv.verify(src, megatron).equal and pyconv.verify(src, back).equal
    with torch.no_grad():
        same = torch.equal(_load(back, None)(x).logits, reference)
    status |= 0 if same and same_weights else 1
    print(f"5. pyconv reshard -> Megatron (tp 2, pp 2): {to_megatron.files} files in {to_megatron.seconds:.3f} s, "
          f"and back to HF in {from_megatron.seconds:.3f} s\n   pyconv verify: every tensor "
          f"{'bit for bit equal' if same_weights else 'NOT equal'}; transformers logits "
          f"{'identical to' if same else 'DIFFER from'} the source model")
    return status
