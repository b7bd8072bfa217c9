"""MindSpore Transformers (MindFormers) safetensors checkpoints of Llama-like models.

MindFormers has named weights two ways, and both are read:
- its Megatron-Core style models ("mcore"): Megatron-Core local-spec names at TP=1
  (`embedding.word_embeddings.weight`, `decoder.layers.L.self_attention.linear_qkv.weight`,
  `...mlp.linear_fc1.weight`, `decoder.final_layernorm.weight`, `output_layer.weight`), with
  q/k/v either fused per query group as Megatron fuses them or kept apart as `linear_q/k/v`,
  and gate/up fused into `linear_fc1` or kept apart as `mlp.gating` / `mlp.hidden`;
- its older models ("legacy"): `model.tok_embeddings.embedding_weight`,
  `model.layers.L.attention.wq/wk/wv/wo`, `attention.w_qkv` (fused per group),
  `feed_forward.w1/w3/w2`, `feed_forward.w_gate_hidden`, `attention_norm`, `ffn_norm`,
  `model.norm_out.weight`, `lm_head.weight`.
A fused gate/up weight is row-interleaved ([g0; u0; g1; u1; ...]) unless the model was
configured with `use_interleaved_weight_layout_mlp: false`, in which case it is [gate; up].

MindFormers keeps the model config in its YAML, not beside the weights, so pyconv reads the
model's Hugging Face `config.json` from the checkpoint directory (and writes one there);
`use_interleaved_weight_layout_mlp` in it tells the fc1 layout (default: interleaved).
Written checkpoints use the mcore names, fused, interleaved: what MindFormers saves today.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import os
from dataclasses import dataclass, replace

from pyconv.catalog import Catalog, CanonicalTensor, SourceBlock, StoredTensor, nbytes
from pyconv.errors import FormatError, LayoutError
from pyconv.dtypes import output_dtype
from pyconv.io.hfdir import CONFIG, extra_files, split_into_shards, updated_config
from pyconv.io.jsonfile import config_architecture, load_config
from pyconv.io.safetensors import layout_like_save_file, read_safetensors
from pyconv.plan import PlannedFile, PlannedTensor, TargetSpec, copies_for_region, plan_file_copy, plan_text_file

if TYPE_CHECKING:
    from pyconv.families import Family, ModelDims

INTERLEAVED_KEY = "use_interleaved_weight_layout_mlp"
NAME_MAP = "param_name_map.json"
SINGLE_FILE = "model.safetensors"

# Megatron-Core local name (the family tables' "local" naming) -> MindFormers name, per naming.
# The fused q/k/v and gate/up names also have split forms, keyed by the HF name's role.
_MCORE = {}  # identical to the Megatron-Core local names
_LEGACY = {
    "embedding.word_embeddings.weight": "model.tok_embeddings.embedding_weight",
    "decoder.layers.*.input_layernorm.weight": "model.layers.*.attention_norm.weight",
    "decoder.layers.*.self_attention.linear_qkv.weight": "model.layers.*.attention.w_qkv.weight",
    "decoder.layers.*.self_attention.linear_qkv.bias": "model.layers.*.attention.w_qkv.bias",
    "decoder.layers.*.self_attention.linear_proj.weight": "model.layers.*.attention.wo.weight",
    "decoder.layers.*.self_attention.linear_proj.bias": "model.layers.*.attention.wo.bias",
    "decoder.layers.*.pre_mlp_layernorm.weight": "model.layers.*.ffn_norm.weight",
    "decoder.layers.*.mlp.linear_fc1.weight": "model.layers.*.feed_forward.w_gate_hidden.weight",
    "decoder.layers.*.mlp.linear_fc1.bias": "model.layers.*.feed_forward.w_gate_hidden.bias",
    "decoder.layers.*.mlp.linear_fc2.weight": "model.layers.*.feed_forward.w2.weight",
    "decoder.layers.*.mlp.linear_fc2.bias": "model.layers.*.feed_forward.w2.bias",
    "decoder.final_layernorm.weight": "model.norm_out.weight",
    "output_layer.weight": "lm_head.weight",
}
# Split forms: the fused module name -> the names of its parts (q, k, v or gate, up).
_SPLIT = {
    "mcore": {"self_attention.linear_qkv": ("self_attention.linear_q", "self_attention.linear_k",
                                            "self_attention.linear_v"),
              "mlp.linear_fc1": ("mlp.gating", "mlp.hidden")},
    "legacy": {"attention.w_qkv": ("attention.wq", "attention.wk", "attention.wv"),
               "feed_forward.w_gate_hidden": ("feed_forward.w1", "feed_forward.w3")},
}
NAMINGS = {"mcore": _MCORE, "legacy": _LEGACY}


@dataclass(frozen=True)
class Options:
    max_shard_size: int = 5_000_000_000  # bytes per output file, as huggingface_hub splits



def mindspore_name(naming: str, megatron_local: str) -> str:
    return NAMINGS[naming].get(megatron_local, megatron_local)


def split_names(naming: str, fused: str) -> tuple[str, ...] | None:
    """The split names of a fused tensor name ('...linear_qkv.weight' -> q, k, v names), or None."""
    for module, parts in _SPLIT[naming].items():
        marker = "." + module + "."
        if marker in fused:
            return tuple(fused.replace(marker, "." + part + ".") for part in parts)
    return None


# ---- detection --------------------------------------------------------------------------

def _safetensors_files(root: str) -> list[str]:
    if os.path.isfile(root):
        return [root] if root.endswith(".safetensors") else []
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, n) for n in os.listdir(root)
                  if n.endswith(".safetensors") and not n.startswith("."))


def _naming_of(names) -> str | None:
    for name in names:
        if name.startswith(("embedding.word_embeddings.", "decoder.layers.", "decoder.final_layernorm.")):
            return "mcore"
        if name.startswith("model.tok_embeddings.") or ".attention.w" in name or ".feed_forward.w" in name:
            return "legacy"
    return None


def detect(path: str) -> bool:
    files = _safetensors_files(path)
    if not files:
        return False
    try:
        return _naming_of(read_safetensors(files[0]).tensors) is not None
    except FormatError:
        return False


# ---- reading ----------------------------------------------------------------------------

def _config(root: str) -> dict:
    directory = root if os.path.isdir(root) else os.path.dirname(root)
    path = os.path.join(directory, CONFIG)
    if not os.path.isfile(path):
        raise FormatError(f"{directory}: a MindSpore Transformers checkpoint carries no model config; put the "
                          f"model's Hugging Face {CONFIG} beside the weights")
    return load_config(path)


def _family(config: dict, where: str) -> Family:
    from pyconv.families import families_with, family_for_architecture

    family = family_for_architecture(config_architecture(config), where)
    if not family.mindformers:
        names = ", ".join(f.name for f in families_with(lambda f: f.mindformers))
        raise FormatError(f"{where}: MindSpore Transformers naming is supported for Llama-like models "
                          f"({names}), not {family.name}")
    return family


def _entries(family: Family, dims: ModelDims):
    """(mapping, layer) in checkpoint order: embedding, layers, final norm, head."""
    from pyconv.families import FIRST_STAGE, LAST_STAGE, LAYER

    for where in (FIRST_STAGE, LAYER, LAST_STAGE):
        layers = range(dims.num_layers) if where == LAYER else (None,)
        for layer in layers:
            for m in family.mappings:
                if m.where == where and m.applies_to(dims, layer):
                    yield m, layer


def _fill(pattern: str, layer: int | None) -> str:
    return pattern.replace("*", str(layer)) if layer is not None else pattern


def read(path: str) -> Catalog:
    from pyconv.mcore.parallel import shard_pieces
    from pyconv.mcore.names import hf_names

    root = os.path.abspath(path)
    files = _safetensors_files(root)
    if not files:
        raise FormatError(f"{root}: no .safetensors files")
    stored: dict[str, StoredTensor] = {}
    metadata: dict[str, str] = {}
    for file in files:
        st = read_safetensors(file)
        metadata = metadata or st.metadata
        for name, tensor in st.tensors.items():
            if name in stored:
                raise FormatError(f"{file}: tensor '{name}' is also in {stored[name].path}")
            stored[name] = tensor
    naming = _naming_of(stored)
    if naming is None:
        raise FormatError(f"{files[0]}: no MindSpore Transformers tensor names")
    config = _config(root)
    where = os.path.join(root if os.path.isdir(root) else os.path.dirname(root), CONFIG)
    family = _family(config, where)
    dims = family.dims_from_hf(config)
    interleaved = config.get(INTERLEAVED_KEY, True)
    if not isinstance(interleaved, bool):
        raise FormatError(f"{where}: '{INTERLEAVED_KEY}' must be true or false, got {interleaved!r}")

    blocks: dict[str, list[SourceBlock]] = {}
    dtypes: dict[str, str] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    seen: set[str] = set()

    def add(hf_name: str, shape: tuple[int, ...], key: str, block: SourceBlock) -> None:
        if hf_name in dtypes and dtypes[hf_name] != block.stored.dtype:
            raise FormatError(f"{block.stored.path}: '{key}' is {block.stored.dtype} but the rest of "
                              f"{hf_name} is {dtypes[hf_name]}")
        blocks.setdefault(hf_name, []).append(block)
        dtypes[hf_name], shapes[hf_name] = block.stored.dtype, shape

    def expect(key: str, shape: tuple[int, ...]) -> StoredTensor:
        tensor = stored[key]
        if tuple(tensor.shape) != tuple(shape):
            raise FormatError(f"{tensor.path}: tensor '{key}' has shape {list(tensor.shape)}, expected {list(shape)} "
                              f"(hidden {dims.hidden}, heads {dims.heads}, groups {dims.groups}, head_dim "
                              f"{dims.head_dim}, ffn {dims.ffn}, vocab {dims.vocab})")
        seen.add(key)
        return tensor

    padded_vocab = dims.vocab
    for mapping, layer in _entries(family, dims):
        names = hf_names(mapping, layer)
        fused = _fill(mindspore_name(naming, mapping.megatron_name("local")), layer)
        hf_shape = mapping.shape(dims)
        parts = split_names(naming, fused) if len(names) > 1 else None
        if fused in stored:
            if mapping.rule.gated and interleaved:
                _read_interleaved(names, hf_shape, expect(fused, (2 * hf_shape[0],) + hf_shape[1:]), fused, add)
                continue
            if mapping.rule.pads_vocab and stored[fused].shape and stored[fused].shape[0] > dims.vocab:
                padded_vocab = stored[fused].shape[0]  # padded rows are dropped
            pieces = shard_pieces(mapping, names, dims, padded_vocab, 1, 0)
            rows = max(p.dst_row + p.rows for p in pieces)
            tensor = expect(fused, (rows,) + tuple(hf_shape[1:]))
            for piece in pieces:
                if not piece.repeat:
                    add(piece.source, _part_shape(mapping, names.index(piece.source), dims), fused,
                        SourceBlock(tensor, piece.dst_row, piece.dst_col, piece.rows, piece.cols,
                                    piece.row0, piece.col0))
        elif parts and all(p in stored for p in parts):
            for i, (hf_name, part) in enumerate(zip(names, parts)):
                shape = _part_shape(mapping, i, dims)
                add(hf_name, shape, part, CanonicalTensor.whole(hf_name, expect(part, shape)).blocks[0])
        elif mapping.optional:
            continue
        else:
            raise FormatError(f"{files[0] if len(files) == 1 else root}: missing tensor '{fused}'"
                              + (f" (or {', '.join(parts)})" if parts else ""))
    unknown = [k for k in stored if k not in seen]
    if unknown:
        raise FormatError(f"{stored[unknown[0]].path}: tensor '{unknown[0]}' matches no {family.name} tensor in "
                          f"MindSpore Transformers {naming} naming" +
                          (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    tensors = {name: CanonicalTensor(name, dtypes[name], shapes[name], tuple(blocks[name])) for name in blocks}
    hf_config = {k: v for k, v in config.items() if k != INTERLEAVED_KEY}
    details = {"family": family.name, "naming": naming, "fc1_layout": "interleaved" if interleaved else "contiguous",
               "files": len(files), "padded_vocab_size": padded_vocab}
    directory = root if os.path.isdir(root) else os.path.dirname(root)
    extra = tuple(f for f in extra_files(directory) if os.path.basename(f[0]) not in (CONFIG, NAME_MAP))
    return Catalog("mindspore", root, tensors, hf_config, hf_config["architectures"][0], extra, metadata, details)


def _part_shape(mapping, index: int, dims: ModelDims) -> tuple[int, ...]:
    return mapping.rule.part_shape(mapping.shape(dims), index, len(mapping.hf), dims)


def _read_interleaved(names: list[str], hf_shape: tuple[int, ...], tensor: StoredTensor, key: str, add) -> None:
    """[g0; u0; g1; u1; ...] is, row-major, an [n, 2 * in] array with gate on the left."""
    n = hf_shape[0]
    cols = hf_shape[1] if len(hf_shape) > 1 else 1
    paired = replace(tensor, shape=(n, 2 * cols))
    for i, name in enumerate(names):
        add(name, tuple(hf_shape), key, SourceBlock(paired, 0, i * cols, n, cols, 0, 0))


# ---- writing ----------------------------------------------------------------------------

def _check(catalog: Catalog) -> tuple[Family, ModelDims]:
    from pyconv.mcore.config import family_and_dims

    if catalog.config is None:
        raise LayoutError(f"{catalog.path}: no config.json: cannot name the tensors for MindSpore Transformers")
    _family(catalog.config, catalog.path)  # a Llama-like family, or a clear refusal
    return family_and_dims(catalog)  # every tensor checked against the family table and the config


def _planned(catalog: Catalog, mapping, names: list[str], dims: ModelDims, dtype: str):
    """(shape, view, copies) of one MindFormers tensor, to be placed at an offset."""
    from pyconv.mcore.parallel import shard_pieces

    hf_shape = tuple(mapping.shape(dims))
    if mapping.rule.gated:  # row-interleaved: gate | up side by side in an [n, 2 * in] view
        n = hf_shape[0]
        cols = hf_shape[1] if len(hf_shape) > 1 else 1
        copies = [c for i, name in enumerate(names)
                  for c in copies_for_region(catalog.tensors[name], 0, 0, n, cols, 0, i * cols, dtype=dtype)]
        return (2 * n,) + hf_shape[1:], (n, 2 * cols), copies
    pieces = shard_pieces(mapping, names, dims, dims.vocab, 1, 0)
    copies = [c for p in pieces for c in copies_for_region(
        catalog.tensors[p.source], p.row0, p.col0, p.rows, p.cols, p.dst_row, p.dst_col, dtype=dtype)]
    return (max(p.dst_row + p.rows for p in pieces),) + hf_shape[1:], None, copies


def plan_output(catalog: Catalog, target: TargetSpec) -> list[PlannedFile]:
    from pyconv.mcore.names import hf_names

    family, dims = _check(catalog)
    units = []  # (mindspore name, dtype, shape, view, copies)
    for mapping, layer in _entries(family, dims):
        names = hf_names(mapping, layer)
        if not all(n in catalog.tensors for n in names):
            if mapping.optional or (mapping.hf == ("lm_head.weight",) and dims.tied):
                continue
            missing = next(n for n in names if n not in catalog.tensors)
            raise LayoutError(f"{catalog.path}: tensor '{missing}' is missing")
        dtype = output_dtype(catalog.tensors[names[0]], target.dtype)
        if dtype == "F8_E4M3":
            raise LayoutError("MindSpore Transformers checkpoints are written in fp32/bf16/fp16, not fp8")
        shape, view, copies = _planned(catalog, mapping, names, dims, dtype)
        units.append((_fill(mindspore_name("mcore", mapping.megatron_name("local")), layer), dtype, shape, view,
                      copies))
    by_name = {u[0]: u for u in units}
    shards = split_into_shards([(u[0], nbytes(u[1], u[2])) for u in units], target.options.max_shard_size)
    files: list[PlannedFile] = []
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        file_name = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, entries = layout_like_save_file([(n, by_name[n][1], by_name[n][2]) for n in shard],
                                                dict(catalog.metadata))
        tensors = tuple(PlannedTensor(n, by_name[n][1], by_name[n][2], len(header) + begin, tuple(by_name[n][4]),
                                      view=by_name[n][3]) for n, _, _, begin, _ in entries)
        size = len(header) + max((end for *_, end in entries), default=0)
        files.append(PlannedFile(file_name, size, tensors, ((0, header),)))
        weight_map.update((n, file_name) for n in shard)
    if len(shards) > 1:
        files.append(plan_text_file(NAME_MAP, json.dumps({"weight_map": weight_map}, indent=2) + "\n"))
    config = {**updated_config(catalog.config, target.dtype, False, False), INTERLEAVED_KEY: True}
    files.append(plan_text_file(CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n"))
    for path, size in catalog.extra_files:
        files.append(plan_file_copy(path, size, os.path.basename(path)))
    return files
