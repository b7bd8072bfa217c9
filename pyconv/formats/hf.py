"""Hugging Face checkpoints: config.json plus model.safetensors, sharded
model-0000i-of-0000n.safetensors with model.safetensors.index.json, or pytorch_model*.bin."""

from __future__ import annotations

import json
import os

from pyconv.catalog import FLOAT_DTYPES, ITEMSIZE, CanonicalTensor, Catalog, nbytes
from pyconv.errors import FormatError, LayoutError
from pyconv.formats import register_format
from pyconv.io.safetensors import layout_like_save_file, read_safetensors
from pyconv.plan import PlannedFile, TargetSpec, plan_file_copy, plan_text_file, plan_whole_tensor

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


def _load_json(path: str, what: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise FormatError(f"{path}: {what} is not valid JSON: {e}") from None


def _read_index(index_path: str) -> dict[str, str]:
    index = _load_json(index_path, "index")
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
    from pyconv.catalog import StoredTensor

    out = {}
    for name, ref in iter_tensors(checkpoint.obj):
        out[name] = StoredTensor(ref.path, ref.offset, ref.dtype, tuple(ref.shape))
    return out


def _extra_files(root: str) -> tuple[tuple[str, int], ...]:
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
        config = _load_json(config_path, "config")
        if not isinstance(config, dict):
            raise FormatError(f"{config_path}: config is not a JSON object")
    architecture = None
    if config:
        archs = config.get("architectures")
        architecture = archs[0] if isinstance(archs, list) and archs else config.get("model_type")
    # Source order: file by file, offset by offset, so output shards read sources sequentially.
    ordered = sorted(stored.items(), key=lambda kv: (kv[1].path, kv[1].offset))
    tensors = {name: CanonicalTensor.whole(name, st) for name, st in ordered}
    return Catalog("hf", root, tensors, config, architecture, _extra_files(root), metadata)


def output_dtype(tensor: CanonicalTensor, dtype: str | None) -> str:
    """The dtype a tensor is written in: floating tensors take the target dtype, others keep theirs."""
    if dtype is None or tensor.dtype == dtype:
        return tensor.dtype
    if tensor.dtype in FLOAT_DTYPES:
        return dtype
    if tensor.dtype in ("F64", "F8_E4M3", "F8_E5M2"):
        raise LayoutError(f"tensor {tensor.name}: cannot cast {tensor.dtype} to {dtype} (supported casts: F32, BF16, F16)")
    return tensor.dtype  # integer and boolean tensors (buffers, masks) are not weights to cast


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


def _updated_config(config: dict, dtype: str | None) -> dict:
    config = dict(config)
    if dtype is not None:
        keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype", "torch_dtype"]
        for k in keys:
            config[k] = TORCH_DTYPE_NAMES[dtype]
    return config


def plan_output(catalog: Catalog, target: TargetSpec) -> list[PlannedFile]:
    dtypes = {name: output_dtype(t, target.dtype) for name, t in catalog.tensors.items()}
    sizes = [(name, nbytes(dtypes[name], t.shape)) for name, t in catalog.tensors.items()]
    shards = split_into_shards(sizes, target.max_shard_size)
    metadata = {**catalog.metadata, "format": "pt"}
    files: list[PlannedFile] = []
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards):
        file_name = SAFETENSORS_SINGLE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # Laid out as safetensors' save_file lays them out (by dtype, widest first, then by name),
        # which keeps every tensor aligned and the shard byte-identical to save_pretrained's.
        header, entries = layout_like_save_file(
            [(name, dtypes[name], catalog.tensors[name].shape) for name in names], metadata)
        position = entries[-1][4] if entries else 0
        tensors = tuple(plan_whole_tensor(catalog.tensors[name], dtypes[name], len(header) + begin)
                        for name, _, _, begin, _ in entries)
        files.append(PlannedFile(file_name, len(header) + position, tensors, ((0, header),)))
        weight_map.update((name, file_name) for name in names)
    if len(shards) > 1:
        total_size = sum(size for _, size in sizes)
        total_parameters = sum(t.nbytes // ITEMSIZE[t.dtype] for t in catalog.tensors.values())
        index = {"metadata": {"total_parameters": total_parameters, "total_size": total_size},
                 "weight_map": dict(sorted(weight_map.items()))}
        files.append(plan_text_file(SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n"))
    if catalog.config is not None:
        files.append(plan_text_file(CONFIG, json.dumps(_updated_config(catalog.config, target.dtype), indent=2, sort_keys=True) + "\n"))
    for path, size in catalog.extra_files:
        files.append(plan_file_copy(path, size, os.path.basename(path)))
    return files


register_format("hf", detect=detect, read=read, plan_output=plan_output)
