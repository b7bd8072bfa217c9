"""Hugging Face checkpoints: config.json plus model.safetensors, sharded
model-0000i-of-0000n.safetensors with model.safetensors.index.json, or pytorch_model*.bin."""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import replace

from pyconv.catalog import FLOAT_DTYPES, CanonicalTensor, Catalog, StoredTensor, nbytes, view2d
from pyconv.errors import FormatError, LayoutError
from pyconv.formats import register_format
from pyconv.io.jsonfile import config_architecture, load_config, load_json
from pyconv.io.safetensors import layout_like_save_file, read_safetensors
from pyconv.plan import FP8_BLOCK, PlannedFile, TargetSpec, plan_file_copy, plan_text_file, plan_whole_tensor

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"
CONFIG = "config.json"

# Weight files are never carried over as extra files: the writer produces its own.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".distcp")
_WEIGHT_INDEX_SUFFIX = ".index.json"

TORCH_DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def detect(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, n)) for n in (SAFETENSORS_INDEX, SAFETENSORS_SINGLE, BIN_INDEX, BIN_SINGLE))


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
    from pyconv.io.torchzip import iter_tensors, read_torch_checkpoint

    checkpoint = read_torch_checkpoint(path)
    out = {}
    for name, ref in iter_tensors(checkpoint.obj):
        out[name] = StoredTensor(ref.path, ref.offset, ref.dtype, tuple(ref.shape))
    return out


def extra_files(root: str) -> tuple[tuple[str, int], ...]:
    extra = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if name == CONFIG or name.startswith(".") or not os.path.isfile(path) or os.path.islink(path):
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(_WEIGHT_INDEX_SUFFIX):
            continue
        extra.append((path, os.path.getsize(path)))
    return tuple(extra)


def read(path: str) -> Catalog:
    root = os.path.abspath(path)
    metadata: dict[str, str] = {}
    if os.path.isfile(os.path.join(root, SAFETENSORS_INDEX)):
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
    stored = _link_fp8_scales(stored, config)
    # Source order: file by file, offset by offset, so output shards read sources sequentially.
    ordered = sorted(stored.items(), key=lambda kv: (kv[1].path, kv[1].offset))
    tensors = {name: CanonicalTensor.whole(name, st) for name, st in ordered}
    return Catalog("hf", root, tensors, config, architecture, extra_files(root), metadata)


SCALE_SUFFIX = "_scale_inv"  # X.weight -> X.weight_scale_inv (float32, one per 128 x 128 block)
FP8_QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [FP8_BLOCK, FP8_BLOCK],
                           "activation_scheme": "dynamic"}


def scale_grid(shape: tuple[int, ...]) -> tuple[int, int]:
    rows, cols = view2d(shape)
    return -(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)


def _link_fp8_scales(stored: dict[str, StoredTensor], config: dict | None) -> dict[str, StoredTensor]:
    """Each F8_E4M3 weight with a `weight_scale_inv` beside it carries that scale grid."""
    block = ((config or {}).get("quantization_config") or {}).get("weight_block_size") or [FP8_BLOCK, FP8_BLOCK]
    linked = dict(stored)
    for name, scale in stored.items():
        weight = stored.get(name[:-len(SCALE_SUFFIX)]) if name.endswith(".weight" + SCALE_SUFFIX) else None
        if weight is None or weight.dtype != "F8_E4M3":
            continue
        if list(block) != [FP8_BLOCK, FP8_BLOCK]:
            raise FormatError(f"config.json: weight_block_size {block} is not supported (pyconv reads 128 x 128 blocks)")
        if scale.dtype != "F32" or tuple(scale.shape) != scale_grid(weight.shape):
            raise FormatError(f"{scale.path}: {name} is {scale.dtype} {list(scale.shape)}, expected F32 "
                              f"{list(scale_grid(weight.shape))} for the {list(weight.shape)} weight")
        linked[name[:-len(SCALE_SUFFIX)]] = replace(weight, scale=scale)
    return linked


def is_quantizable(name: str, tensor: CanonicalTensor) -> bool:
    """The weights DeepSeek-V3 stores in fp8: 2-D linear weights inside the layers, not norms,
    routers or embeddings."""
    leaf = name.rsplit(".", 2)[-2] if name.count(".") >= 2 else name
    return (tensor.dtype in FLOAT_DTYPES and len(tensor.shape) == 2 and name.endswith(".weight")
            and _IN_LAYER.search(name) is not None and "norm" not in leaf
            and leaf not in ("gate", "shared_expert_gate", "router"))


_IN_LAYER = re.compile(r"(^|\.)(layers|h)\.\d+\.")


def output_dtype(tensor: CanonicalTensor, dtype: str | None) -> str:
    """The dtype a tensor is written in: floating tensors take the target dtype (fp8: only the
    quantizable weights), block-scaled fp8 weights are dequantized to a float target, others
    keep theirs."""
    if dtype is None or tensor.dtype == dtype:
        return tensor.dtype
    if dtype == "F8_E4M3":
        return dtype if is_quantizable(tensor.name, tensor) else tensor.dtype
    if tensor.dtype in FLOAT_DTYPES:
        return dtype
    if tensor.dtype == "F8_E4M3":
        if any(b.stored.scale is None for b in tensor.blocks):
            raise LayoutError(f"tensor {tensor.name}: an F8_E4M3 weight without its weight_scale_inv cannot be "
                              f"dequantized to {dtype}")
        return dtype
    if tensor.dtype in ("F64", "F8_E5M2"):
        raise LayoutError(f"tensor {tensor.name}: cannot cast {tensor.dtype} to {dtype} (supported casts: F32, BF16, "
                          "F16, and block-scaled F8_E4M3 to those)")
    return tensor.dtype  # integer and boolean tensors (buffers, masks) are not weights to cast


def dtype_kept(catalog: Catalog) -> frozenset[str]:
    """Tensors the family table keeps in their own dtype through a cast: DeepSeek-V3's routing
    bias stays float32, as DeepSeek's fp8_cast_bf16.py and Megatron-Core keep it (a rounded bias
    can change which experts a token goes to). None for an architecture without a table."""
    from pyconv.families import family_for_architecture

    try:
        family = family_for_architecture(catalog.architecture, catalog.path)
    except FormatError:
        return frozenset()
    return frozenset(n for n in catalog.tensors if (m := family.match_hf(n)) is not None and m[0].keep_dtype)


def output_dtypes(catalog: Catalog, dtype: str | None) -> dict[str, str]:
    kept = dtype_kept(catalog) if dtype is not None else frozenset()
    return {name: t.dtype if name in kept else output_dtype(t, dtype) for name, t in catalog.tensors.items()}


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


def _updated_config(config: dict, dtype: str | None, quantized: bool, fp8_left: bool) -> dict:
    config = dict(config)
    if dtype is not None and dtype in TORCH_DTYPE_NAMES:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype", "torch_dtype"]
        for k in keys:
            config[k] = TORCH_DTYPE_NAMES[dtype]
    if quantized:
        config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    elif not fp8_left:
        config.pop("quantization_config", None)  # every fp8 weight was dequantized
    return config


def plan_output(catalog: Catalog, target: TargetSpec) -> list[PlannedFile]:
    dtypes = output_dtypes(catalog, target.dtype)
    # fp8: a dequantized weight's scale grid is dropped; a quantized weight gains one, in its shard.
    dequantized = {n + SCALE_SUFFIX for n, t in catalog.tensors.items() if t.dtype == "F8_E4M3" and dtypes[n] != t.dtype}
    quantized = {n for n, t in catalog.tensors.items() if dtypes[n] == "F8_E4M3" and t.dtype != "F8_E4M3"}
    names = [n for n in catalog.tensors if n not in dequantized]

    def unit_size(name):
        size = nbytes(dtypes[name], catalog.tensors[name].shape)
        return size + (nbytes("F32", scale_grid(catalog.tensors[name].shape)) if name in quantized else 0)

    sizes = [(name, unit_size(name)) for name in names]
    shards = split_into_shards(sizes, target.max_shard_size)
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
            replace(plan_whole_tensor(catalog.tensors[name], dtypes[name], len(header) + begin),
                    quantize=len(header) + begins[name + SCALE_SUFFIX] if name in quantized else None)
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
        config = _updated_config(catalog.config, target.dtype, bool(quantized), fp8_left)
        files.append(plan_text_file(CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n"))
    for path, size in catalog.extra_files:
        files.append(plan_file_copy(path, size, os.path.basename(path)))
    return files


register_format("hf", detect=detect, read=read, plan_output=plan_output)
