"""Hugging Face checkpoints: config.json plus model.safetensors, sharded
model-0000i-of-0000n.safetensors with model.safetensors.index.json, or pytorch_model*.bin."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from pyconv.catalog import CanonicalTensor, Catalog, nbytes
from pyconv.dtypes import output_dtypes
from pyconv.errors import FormatError
from pyconv.fp8 import SCALE_SUFFIX, link_scales, scale_grid
from pyconv.io.hfdir import CONFIG, extra_files, split_into_shards, updated_config
from pyconv.io.jsonfile import config_architecture, load_config, load_json
from pyconv.io.safetensors import layout_like_save_file, read_safetensors
from pyconv.plan import PlannedFile, TargetSpec, note_written, plan_file_copy, plan_text_file, plan_whole_tensor
from pyconv.quantized import declared_quantization

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


@dataclass(frozen=True)
class Options:
    max_shard_size: int = 5_000_000_000  # bytes per output file, as huggingface_hub splits



def detect(path: str) -> bool:
    """A directory holding HF weights, or one weights file (*.safetensors, or a *.bin state dict:
    a torch.save archive of a flat dict of tensors)."""
    if os.path.isfile(path):
        return path.endswith(".safetensors") or (path.endswith(".bin") and _is_flat_state_dict(path))
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, n)) for n in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, BIN_INDEX, BIN_SINGLE))


def _is_flat_state_dict(path: str) -> bool:
    from pyconv.io.torchzip import TensorRef, read_torch_checkpoint

    try:
        obj = read_torch_checkpoint(path).obj
    except FormatError:
        return False  # not one of ours, or broken: another adapter or the fallback names the problem
    return isinstance(obj, dict) and bool(obj) and all(type(v) is TensorRef for v in obj.values())


def _read_index(index_path: str) -> dict[str, str]:
    index = load_json(index_path, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{index_path}: index has no 'weight_map' object")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or os.path.basename(shard) != shard or shard in (".", ".."):
            raise FormatError(f"{index_path}: tensor '{name}' maps to {shard!r}, not a file name in the checkpoint directory")
    return weight_map


def _read_sharded(root: str, index_name: str, read_file) -> dict[str, object]:
    index_path = os.path.join(root, index_name)
    weight_map = _read_index(index_path)
    shard_names = sorted(set(weight_map.values()))
    stored = {}
    for shard in shard_names:
        shard_path = os.path.join(root, shard)
        if not os.path.isfile(shard_path):
            first = next(n for n, s in weight_map.items() if s == shard)
            raise FormatError(f"{index_path}: shard '{shard}' (holding '{first}') is missing")
        for name, tensor in read_file(shard_path).items():
            if weight_map.get(name) != shard:
                raise FormatError(f"{shard_path}: tensor '{name}' is not listed for this file in {index_name}")
            stored[name] = tensor
    absent = [n for n in weight_map if n not in stored]
    if absent:
        raise FormatError(f"{index_path}: tensor '{absent[0]}' is listed in '{weight_map[absent[0]]}' but not stored there"
                          + (f" (and {len(absent) - 1} more)" if len(absent) > 1 else ""))
    return stored


def _read_safetensors_tensors(path: str):
    return read_safetensors(path).tensors


def _read_bin_tensors(path: str):
    from pyconv.io.torchzip import read_state_dict

    return read_state_dict(path)


def read(path: str) -> Catalog:
    """A checkpoint directory, or one weights file with the config.json and tokenizer files beside it."""
    root = os.path.abspath(path)
    metadata: dict[str, str] = {}
    single = root if os.path.isfile(root) else None
    if single is not None:
        root = os.path.dirname(single)
        if single.endswith(".safetensors"):
            st = read_safetensors(single)
            stored, metadata = st.tensors, st.metadata
        else:
            stored = _read_bin_tensors(single)
    elif os.path.isfile(os.path.join(root, SAFETENSORS_INDEX)):
        stored = _read_sharded(root, SAFETENSORS_INDEX, _read_safetensors_tensors)
    elif os.path.isfile(os.path.join(root, SAFETENSORS_SINGLE)):
        st = read_safetensors(os.path.join(root, SAFETENSORS_SINGLE))
        stored, metadata = st.tensors, st.metadata
    elif os.path.isfile(os.path.join(root, BIN_INDEX)):
        stored = _read_sharded(root, BIN_INDEX, _read_bin_tensors)
    elif os.path.isfile(os.path.join(root, BIN_SINGLE)):
        stored = _read_bin_tensors(os.path.join(root, BIN_SINGLE))
    else:
        raise FormatError(f"{root}: no {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX}, {BIN_SINGLE} or {BIN_INDEX}")
    config = None
    config_path = os.path.join(root, CONFIG)
    if os.path.isfile(config_path):
        config = load_config(config_path)
    architecture = config_architecture(config) if config else None
    stored = link_scales(stored, config)
    # Source order: file by file, offset by offset, so output shards read sources sequentially.
    ordered = sorted(stored.items(), key=lambda kv: (kv[1].path, kv[1].offset))
    tensors = {name: CanonicalTensor.whole(name, st) for name, st in ordered}
    quantization = declared_quantization(config, root, tensors)
    details = {"quantization": quantization.details()} if quantization is not None else {}
    return Catalog("hf", single or root, tensors, config, architecture, extra_files(root), metadata, details=details)


def plan_output(catalog: Catalog, target: TargetSpec) -> list[PlannedFile]:
    kept = frozenset()
    if target.dtype:  # a cast: the family table says what keeps its dtype (loaded only then)
        from pyconv.families import kept_dtypes

        kept = kept_dtypes(catalog)
    dtypes = output_dtypes(catalog.tensors, target.dtype, kept)
    # fp8: a dequantized weight's scale grid is dropped; a quantized weight gains one, in its shard.
    dequantized = {n + SCALE_SUFFIX for n, t in catalog.tensors.items() if t.dtype == "F8_E4M3" and dtypes[n] != t.dtype}
    quantized = {n for n, t in catalog.tensors.items() if dtypes[n] == "F8_E4M3" and t.dtype != "F8_E4M3"}
    names = [n for n in catalog.tensors if n not in dequantized]
    for name in quantized:
        note_written(name + SCALE_SUFFIX)

    def unit_size(name):
        size = nbytes(dtypes[name], catalog.tensors[name].shape)
        return size + (nbytes("F32", scale_grid(catalog.tensors[name].shape)) if name in quantized else 0)

    sizes = [(name, unit_size(name)) for name in names]
    shards = split_into_shards(sizes, target.options.max_shard_size)
    metadata = {**catalog.metadata, "format": "pt"}
    files: list[PlannedFile] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file_name = SAFETENSORS_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        entries_in = [(name, dtypes[name], catalog.tensors[name].shape) for name in shard]
        entries_in += [(name + SCALE_SUFFIX, "F32", scale_grid(catalog.tensors[name].shape))
                       for name in shard if name in quantized]
        # Laid out as safetensors' save_file lays them out (by dtype, widest first, then by name),
        # which keeps every tensor aligned and the shard byte-identical to save_pretrained's.
        header, entries = layout_like_save_file(entries_in, metadata)
        begins = {name: begin for name, _, _, begin, _ in entries}
        position = max((end for *_, end in entries), default=0)
        tensors = tuple(
            plan_whole_tensor(catalog.tensors[name], dtypes[name], len(header) + begin,
                              len(header) + begins[name + SCALE_SUFFIX] if name in quantized else None)
            for name, _, _, begin, _ in entries if name in catalog.tensors)
        files.append(PlannedFile(file_name, len(header) + position, tensors, ((0, header),)))
        weight_map.update((name, file_name) for name, *_ in entries_in)
    if len(shards) > 1:
        total_size = sum(size for _, size in sizes)
        total_parameters = sum(math.prod(catalog.tensors[n].shape) for n in names)
        index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        files.append(plan_text_file(SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n"))
    if catalog.config is not None:
        fp8_left = any(d == "F8_E4M3" for d in dtypes.values())
        config = updated_config(catalog.config, target.dtype, bool(quantized), fp8_left)
        files.append(plan_text_file(CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n"))
    for path, size in catalog.extra_files:
        files.append(plan_file_copy(path, size, os.path.basename(path)))
    return files
