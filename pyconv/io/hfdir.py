"""What every directory of Hugging Face style shares (hf, deepseek, mindspore): config.json,
the files carried over beside the weights, and shard splitting as huggingface_hub does it."""

from __future__ import annotations

import os

from pyconv.dtypes import with_config_dtype

CONFIG = "config.json"

# Weight files are never carried over as extra files: the writer produces its own.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".distcp")
_WEIGHT_INDEX_SUFFIX = ".index.json"


def extra_files(root: str) -> tuple[tuple[str, int], ...]:
    """(path, size) of the files beside the weights (tokenizer, generation config...)."""
    extra = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name == CONFIG or name.startswith(".") or not os.path.isfile(path) or os.path.islink(path):
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(_WEIGHT_INDEX_SUFFIX):
            continue
        extra.append((path, os.path.getsize(path)))
    return tuple(extra)


def split_into_shards(sizes: list[tuple[str, int]], max_shard_size: int) -> list[list[str]]:
    """Greedy split in order, as huggingface_hub does: a tensor larger than the limit gets
    a shard of its own; otherwise a new shard starts when the next tensor would tip it over."""
    shards: list[list[str]] = []
    current: list[str] = []
    current_size = 0
    for name, size in sizes:
        if size > max_shard_size:
            shards.append([name])
            continue
        if current and current_size + size > max_shard_size:
            shards.append(current)
            current, current_size = [], 0
        current.append(name)
        current_size += size
    if current:
        shards.append(current)
    return shards


def updated_config(config: dict, dtype: str | None, quantized: bool, fp8_left: bool) -> dict:
    """config.json after a conversion: the new dtype; quantization_config added when weights were
    quantized to fp8, dropped when every fp8 weight was dequantized."""
    from pyconv.fp8 import QUANTIZATION_CONFIG

    config = with_config_dtype(dict(config), dtype)
    if quantized:
        config["quantization_config"] = dict(QUANTIZATION_CONFIG)
    elif not fp8_left and (config.get("quantization_config") or {}).get("quant_method") == "fp8":
        config.pop("quantization_config")  # every block-fp8 weight dequantized; other schemes travel as they are
    return config
