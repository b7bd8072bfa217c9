"""Megatron-Core distributed checkpoints (torch_dist) as torch_dist and NeMo 2 share them: keys
of the stacked (or singleton) sharded state dict, reading canonical tensors from DCP chunks,
and planning the .metadata and .distcp files."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass, replace

from pyconv.catalog import CanonicalTensor, Catalog, SourceBlock, StoredTensor
from pyconv.dtypes import output_dtype
from pyconv.errors import FormatError, LayoutError
from pyconv.families import (
    LAYER,
    MTP,
    Family,
    ModelDims,
    TensorMapping,
)
from pyconv.io.dcp import METADATA_FILE, ChunkLocator, DcpChunk, DcpMetadata, DcpTensor
from pyconv.io.jsonfile import load_json
from pyconv.io.torchsave import TensorSlot
from pyconv.mcore.checkpoint import BACKEND_FILE, COMMON_FILE, CONTENT_METADATA, SINGLETON_FLAG
from pyconv.plan import PlannedFile, PlannedTensor, TargetSpec, plan_text_file



def check_backend(directory: str) -> None:
    path = os.path.join(directory, BACKEND_FILE)
    if os.path.isfile(path):
        meta = load_json(path, "checkpoint metadata")
        backend = meta.get("sharded_backend") if isinstance(meta, dict) else None
        if backend != "torch_dist":
            raise FormatError(f"{path}: sharded_backend is {str(backend)[:40]!r}; pyconv reads 'torch_dist' "
                              "(re-save zarr checkpoints with Megatron's --ckpt-convert-format torch_dist)")
    if not os.path.isfile(os.path.join(directory, METADATA_FILE)):
        raise FormatError(f"{directory}: no {METADATA_FILE} (PyTorch DCP metadata): incomplete checkpoint?")


_MTP_KEY = re.compile(r"^mtp\.layers\.(\d+)\.")


def with_mtp_layers(fam: Family, dims: ModelDims, keys) -> ModelDims:
    """dims counting the multi-token-prediction layers the keys hold (`mtp.layers.i.`), for a
    family that has them; the keys decide, as a config may count layers a checkpoint lacks."""
    found = {int(m.group(1)) for m in map(_MTP_KEY.match, keys) if m}
    if not fam.mtp_before or (not found and not dims.mtp_layers):
        return dims
    return replace(dims, mtp_layers=max(found) + 1 if found else 0)


def mtp_keyed_mappings(fam: Family, dims: ModelDims):
    """(mapping, MTP index, HF layer) of every tensor of the MTP layers: keyed per MTP layer
    (`mtp.layers.i.transformer_layer.X`, routed experts on an expert axis), as Megatron-Core
    saves them."""
    for i in range(dims.mtp_layers):
        for mapping in fam.mtp_layer_mappings(dims):
            yield mapping, i, dims.num_layers + i


def stacked_key(name: str) -> str:
    """'decoder.layers.*.mlp.linear_fc1.weight' -> 'decoder.layers.mlp.linear_fc1.weight';
    'decoder.layers.*.mlp.experts.local_experts.#.linear_fc1.weight' ->
    'decoder.layers.mlp.experts.experts.linear_fc1.weight' (the expert axis follows the layer axis)."""
    return name.replace(".*.", ".").replace(".local_experts.#.", ".experts.")


# Megatron-Core's local layer spec renames its norms in the sharded state dict to the names
# TransformerEngine's fused LayerNormLinear modules have (sharded_state_dict_keys_map).
_LOCAL_NORM_KEYS = ((".input_layernorm.", ".self_attention.linear_qkv.layer_norm_"),
                    (".pre_mlp_layernorm.", ".mlp.linear_fc1.layer_norm_"))


def dist_key(mapping: TensorMapping, naming: str = "te", layer: int | None = None, rename_norms: bool = True) -> str:
    """The torch_dist key of a mapping as a model of the given layer spec saves it, stacked or,
    with `layer`, that layer's own key (`decoder.layers.3.mlp.linear_fc1.weight`: Megatron-Core
    saves per-layer keys when the layers differ, e.g. DeepSeek's dense first layers). The two
    specs agree except for a mixture-of-experts layer's pre-MLP norm: TransformerEngine's spec
    keeps it a separate module (`decoder.layers.pre_mlp_layernorm.weight`), the local spec saves
    it as `decoder.layers.mlp.linear_fc1.layer_norm_weight` as for a dense layer. The local spec
    renames its norms so only with a fused linear_qkv (rename_norms; multi-latent attention's
    local spec keeps `input_layernorm`, `pre_mlp_layernorm`)."""
    name = mapping.megatron_name(naming)
    if layer is not None:
        name = name.replace("*", str(layer))
    key = stacked_key(name)
    if naming == "local" and rename_norms:
        for local, te in _LOCAL_NORM_KEYS:
            key = key.replace(local, te)
    return key


def dist_key_candidates(mapping: TensorMapping, layer: int | None = None) -> list[str]:
    """Every key a Megatron-Core model may save a mapping under: TransformerEngine's names, the
    local spec's (renamed norms), and the plain module names of specs without that renaming
    (multi-latent attention's local spec)."""
    raw = stacked_key(mapping.megatron_name("local").replace("*", str(layer)) if layer is not None
                      else mapping.megatron_name("local"))
    return list(dict.fromkeys((dist_key(mapping, "te", layer), dist_key(mapping, "local", layer), raw)))


def leading_axes(mapping: TensorMapping, per_layer: bool = False) -> int:
    """How many stacking axes precede the Megatron tensor: layer (unless the key is per layer),
    then expert."""
    return (mapping.where == LAYER and not per_layer) + mapping.per_expert


def renames_norms(family: Family) -> bool:
    """Whether Megatron-Core's local spec saves this family's norms under TransformerEngine's
    fused names: its keys map exists for attention with a fused linear_qkv."""
    return any(".linear_qkv." in m.megatron_name("te") for m in family.mappings)


def applicable_layers(mapping: TensorMapping, dims: ModelDims) -> list[int]:
    return [layer for layer in range(dims.num_layers) if mapping.applies_to(dims, layer)]


def heterogeneous(family: Family, dims: ModelDims) -> bool:
    """Whether some layers lack tensors others have (dense and MoE MLPs): Megatron-Core then saves
    every layer's tensors under their own keys instead of stacking them."""
    return any(0 < len(applicable_layers(m, dims)) < dims.num_layers for m in family.mappings if m.where == LAYER)


def stack_indices(mapping: TensorMapping, dims: ModelDims, where: str, error=FormatError,
                  layers: list[int] | None = None) -> list[tuple]:
    """(layer, expert) of every slice of a mapping in its key(s), row-major: all layers of a
    stacked key (every layer must have the tensor), or the given layers of per-layer keys."""
    if mapping.where != LAYER:
        return [(None, None)]
    if layers is None:
        layers = applicable_layers(mapping, dims)
        if len(layers) != dims.num_layers:
            raise error(f"{where}: '{dist_key(mapping)}' is stacked over all {dims.num_layers} layers but only "
                        f"{len(layers)} have it")
    experts = range(dims.num_experts) if mapping.per_expert else [None]
    return [(layer, expert) for layer in layers for expert in experts]


def padded_vocab(fam: Family, dims: ModelDims, md: DcpMetadata, directory: str, keys: dict[str, str]) -> int:
    embedding = fam.word_embedding
    key = next((k for k in embedding.megatron_names() if k in keys), None)
    if key is None:
        raise FormatError(f"{directory}: no '{embedding.megatron_names()[0]}' in {METADATA_FILE}")
    size = md.tensors[keys[key]].size
    if len(size) != 2 or size[0] < dims.vocab or size[1] != dims.hidden:
        raise FormatError(f"{directory}: '{keys[key]}' has size {list(size)}, expected [>= vocab {dims.vocab}, "
                          f"hidden {dims.hidden}]")
    return size[0]


# `sharded_state_dict(metadata={'singleton_local_shards': True})` (Megatron-Core >= 0.14; recorded
# in common.pt as content_metadata) saves every layer under its own keys, a gated fc1 as two keys
# each cut by TP on its own, and every routed expert under its own keys, with no expert axis:
#     decoder.layers.3.mlp.linear_fc1.weight_w                     [F, H]   gate (TP rank r: rows r*F/tp..)
#     decoder.layers.3.mlp.linear_fc1.weight_v                     [F, H]   up
#     decoder.layers.3.mlp.experts.experts.5.linear_fc1.weight_w   [F_moe, H]
#     decoder.layers.3.mlp.experts.experts.5.linear_fc2.weight     [H, F_moe]
# (SequentialMLP, GroupedMLP and TEGroupedMLP name them alike). Joined, they are the default
# layout's per-layer keys, which the reader already knows:
#     decoder.layers.3.mlp.linear_fc1.weight                       [2F, H]  = [w; v]
#     decoder.layers.3.mlp.experts.experts.linear_fc1.weight       [E, 2F_moe, H]
_GLU_HALF = re.compile(r"^(?P<base>.+\.linear_fc1\.(?:weight|bias))_(?P<half>[wv])$")
_ONE_EXPERT = re.compile(r"^(?P<head>.+\.experts\.experts)\.(?P<expert>\d+)\.(?P<tail>.+)$")


# Keys only the default layout has: layers stacked on an axis, experts stacked on an axis.
_STACKED_LAYERS = re.compile(r"(?:^|\.)layers\.(?!\d+\.)")
_EXPERT_AXIS = re.compile(r"\.experts\.experts\.(?!\d+\.)")
_UNSPLIT_FC1 = re.compile(r"\.linear_fc1\.(?:weight|bias)$")
_INDEX = re.compile(r"\.\d+\.")


def is_singleton_key(key: str) -> bool:
    """A Megatron-Core key only the singleton_local_shards layout has (a gated fc1's half, one
    routed expert's tensor)."""
    return bool(_GLU_HALF.match(key) or _ONE_EXPERT.match(key))


@dataclass(frozen=True)
class _Part:
    """A stored chunk of a checkpoint key, placed in a joined tensor."""
    tensor: DcpTensor
    chunk: DcpChunk
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


@dataclass(frozen=True)
class _Entry:
    """A tensor to read: a checkpoint key, or keys joined (`label` names them all)."""
    key: str            # Megatron-Core key
    label: str          # the checkpoint's name(s)
    dtype: str
    size: tuple[int, ...]
    parts: tuple[_Part, ...]


@dataclass(frozen=True)
class JoinedKeys:
    """The checkpoint's tensors with singleton keys joined: `tensors` by name (a checkpoint key,
    or a joined tensor's label such as `decoder.layers.0.mlp.linear_fc1.weight_{w,v}`), `keys`
    Megatron-Core key -> that name, `stored` the stored chunk behind every chunk of a joined
    tensor."""
    tensors: dict[str, DcpTensor]
    keys: dict[str, str]
    stored: dict[tuple[str, tuple[int, ...]], tuple[DcpTensor, DcpChunk]]

    def stored_chunk(self, tensor: DcpTensor, chunk: DcpChunk) -> tuple[DcpTensor, DcpChunk]:
        return self.stored.get((tensor.fqn, chunk.offsets), (tensor, chunk))


def _whole(key: str, tensor: DcpTensor) -> _Entry:
    return _Entry(key, tensor.fqn, tensor.dtype, tensor.size,
                  tuple(_Part(tensor, c, c.offsets, c.sizes) for c in tensor.chunks))


def _own(label: str, key: str, joined_key: str) -> str:
    """The checkpoint's name for a joined key: its own prefix (NeMo's `module.`) kept."""
    return (label[:len(label) - len(key)] if label.endswith(key) else "") + joined_key


def _default_layout_only(key: str, gated: bool) -> str | None:
    """Why a key is one the singleton_local_shards layout never has (None: it may); `gated`: the
    key's fc1, if it is one, is gated (saved as _w and _v in that layout)."""
    if _STACKED_LAYERS.search(key):
        return "its layers stacked on an axis"
    if _EXPERT_AXIS.search(key):
        return "its experts stacked on an axis"
    if gated and _UNSPLIT_FC1.search(key):
        return "a gated fc1 not split into _w and _v"
    return None


def join_singleton_keys(md: DcpMetadata, keys: dict[str, str], gated: bool = True,
                        content_metadata: dict | None = None) -> JoinedKeys:
    """The default layout's per-layer keys from singleton_local_shards keys (see above): each
    gated fc1 joined from its `_w` and `_v` halves along its first axis, then each routed
    expert's keys stacked on a leading expert axis. A checkpoint mixing the two layouts, or whose
    content_metadata names the other one, is a FormatError naming the .metadata file and the keys
    (`gated`: the model's fc1 is gated, so an unsplit one belongs to the default layout)."""
    where, common = os.path.join(md.directory, METADATA_FILE), os.path.join(md.directory, COMMON_FILE)
    singleton = [k for k in keys if is_singleton_key(k)]
    split = {_INDEX.sub(".*.", m["base"]) for m in map(_GLU_HALF.match, singleton) if m}
    recorded = None if content_metadata is None else content_metadata.get(SINGLETON_FLAG, False)
    if singleton and recorded is False:
        raise FormatError(f"{where}: '{keys[singleton[0]]}' is in Megatron-Core's {SINGLETON_FLAG} layout but {common} "
                          f"records {CONTENT_METADATA} with {SINGLETON_FLAG}=False")
    if singleton or recorded:
        for key in keys:
            why = _default_layout_only(key, gated or _INDEX.sub(".*.", key) in split)
            if why and singleton:
                raise FormatError(f"{where}: '{keys[singleton[0]]}' is in Megatron-Core's {SINGLETON_FLAG} layout but "
                                  f"'{keys[key]}' is not ({why}): a checkpoint mixing the two layouts cannot be read")
            if why:
                raise FormatError(f"{where}: '{keys[key]}' is not in Megatron-Core's {SINGLETON_FLAG} layout ({why}) "
                                  f"but {common} records {CONTENT_METADATA} with {SINGLETON_FLAG}=True")
    if not singleton:
        return JoinedKeys(md.tensors, keys, {})

    entries: dict[str, _Entry] = {}
    halves: dict[str, dict[str, str]] = {}
    for key, name in keys.items():
        m = _GLU_HALF.match(key)
        if m:
            halves.setdefault(m["base"], {})[m["half"]] = key
        else:
            entries[key] = _whole(key, md.tensors[name])
    for base, pair in halves.items():
        if set(pair) != {"w", "v"}:
            have, lack = next(iter(pair.values())), base + ("_v" if "w" in pair else "_w")
            raise FormatError(f"{where}: '{keys[have]}' has no '{_own(keys[have], have, lack)}' (Megatron-Core saves "
                              "a gated fc1 as both halves)")
        w, v = md.tensors[keys[pair["w"]]], md.tensors[keys[pair["v"]]]
        if (w.size, w.dtype) != (v.size, v.dtype):
            raise FormatError(f"{where}: '{w.fqn}' is {w.dtype} {list(w.size)} but '{v.fqn}' is {v.dtype} "
                              f"{list(v.size)}: the halves of a gated fc1 must match")
        rows = w.size[0]
        parts = tuple(_Part(w, c, c.offsets, c.sizes) for c in w.chunks) + tuple(
            _Part(v, c, (c.offsets[0] + rows,) + c.offsets[1:], c.sizes) for c in v.chunks)
        entries[base] = _Entry(base, w.fqn[:-2] + "_{w,v}", w.dtype, (2 * rows,) + w.size[1:], parts)

    experts: dict[tuple[str, str], dict[int, _Entry]] = {}
    for key in list(entries):
        m = _ONE_EXPERT.match(key)
        if m:
            experts.setdefault((m["head"], m["tail"]), {})[int(m["expert"])] = entries.pop(key)
    for (head, tail), group in experts.items():
        count, first = max(group) + 1, group[min(group)]
        missing = sorted(set(range(count)) - set(group))
        if missing:
            raise FormatError(f"{where}: no '{_own(first.label, first.key, f'{head}.{missing[0]}.{tail}')}' (experts "
                              f"{sorted(group)[:8]} of '{head}.N.{tail}' are there)")
        for e, entry in sorted(group.items()):
            if (entry.size, entry.dtype) != (first.size, first.dtype):
                raise FormatError(f"{where}: '{entry.label}' is {entry.dtype} {list(entry.size)} but '{first.label}' is "
                                  f"{first.dtype} {list(first.size)}: every expert's tensor must match")
        key = f"{head}.{tail}"
        label = _own(first.label, first.key, f"{head}.{{0..{count - 1}}}.{tail}")
        parts = tuple(_Part(p.tensor, p.chunk, (e,) + p.offsets, (1,) + p.sizes)
                      for e, entry in sorted(group.items()) for p in entry.parts)
        entries[key] = _Entry(key, label, first.dtype, (count,) + first.size, parts)

    tensors: dict[str, DcpTensor] = {}
    stored: dict[tuple[str, tuple[int, ...]], tuple[DcpTensor, DcpChunk]] = {}
    for entry in entries.values():
        if entry.key in keys and keys[entry.key] != entry.label:
            raise FormatError(f"{where}: '{keys[entry.key]}' and '{entry.label}' are both '{entry.key}': a checkpoint "
                              f"mixing Megatron-Core's {SINGLETON_FLAG} layout and the default one cannot be read")
        chunks = tuple(DcpChunk(p.offsets, p.sizes, p.chunk.location) for p in entry.parts)
        tensors[entry.label] = DcpTensor(entry.label, entry.dtype, entry.size, chunks)
        if entry.label not in md.tensors:  # joined: its chunks are other keys' chunks
            stored.update(((entry.label, p.offsets), (p.tensor, p.chunk)) for p in entry.parts)
    return JoinedKeys(tensors, {e.key: e.label for e in entries.values()}, stored)


def read_tensors(md: DcpMetadata, directory: str, fam: Family, dims: ModelDims, padded: int,
                 keys: dict[str, str], content_metadata: dict | None = None) -> dict[str, CanonicalTensor]:
    """The canonical tensors of a DCP checkpoint's model keys. `keys` maps each Megatron-Core
    key (`decoder.layers.mlp.linear_fc1.weight`) to the checkpoint's own name for it (the same,
    or NeMo's `module.`-prefixed one); every key in it must map. Keys of the singleton_local_shards
    layout are joined first (see join_singleton_keys); `content_metadata`, common.pt's record of
    the layout where there is one, must agree with the keys."""
    from pyconv.mcore.names import hf_names, hf_order, hf_shape, mtp_hf_copies
    from pyconv.mcore.parallel import shard_pieces, shard_shape

    gated = any(m.rule.gated for m in fam.mappings)
    joined = join_singleton_keys(md, keys, gated, content_metadata)
    keys = joined.keys
    blocks: dict[str, list[SourceBlock]] = {}
    dtypes: dict[str, str] = {}
    seen: set[str] = set()

    def read_key(mapping: TensorMapping, key: str, layer: int | None, pieces: dict, first: tuple) -> None:
        """The blocks one checkpoint key holds: the slices `pieces` places, by (layer, expert);
        `layer`: the key is that layer's own (no layer axis); `first`: a slice's index, for the shape."""
        seen.add(key)
        tensor = joined.tensors[keys[key]]
        canonical_rank = len(mapping.shape(dims))
        expected = (dims.num_experts,) * mapping.per_expert + shard_shape(pieces[first], canonical_rank)
        if mapping.where == LAYER and layer is None:
            expected = (dims.num_layers,) + expected
        if tensor.size != expected:
            raise FormatError(f"{directory}: '{tensor.fqn}' has size {list(tensor.size)}, expected "
                              f"{list(expected)} (layers {dims.num_layers}, hidden {dims.hidden}, heads "
                              f"{dims.heads}, groups {dims.groups}, head_dim {dims.head_dim}, ffn {dims.ffn}, "
                              f"padded vocab {padded}"
                              + (f", experts {dims.num_experts}, moe_ffn {dims.moe_ffn}" if dims.num_experts
                                 else "") + ")")
        for chunk in tensor.chunks:
            stored = locator.locate(*joined.stored_chunk(tensor, chunk))
            for name, block in _chunk_blocks(mapping, chunk, stored, pieces,
                                             mapping.transposed and canonical_rank == 2, layer):
                if name not in blocks:
                    blocks[name], dtypes[name] = [], tensor.dtype
                if dtypes[name] != tensor.dtype:
                    raise FormatError(f"{directory}: '{tensor.fqn}' is {tensor.dtype} but other keys holding "
                                      f"{name} are {dtypes[name]}")
                blocks[name].append(block)

    with ChunkLocator(md) as locator:
        for mapping in fam.mappings:
            if mapping.hf == ("lm_head.weight",) and dims.tied:
                seen.update(k for k in dist_key_candidates(mapping) if k in keys)  # a copy of the tied embedding
                continue
            # Optional: absent biases; never the untied output layer.
            optional = mapping.optional and mapping.hf != ("lm_head.weight",)
            sources = _mapping_sources(mapping, dims, keys, directory, optional)
            if not sources:
                continue  # absent biases; the output layer of a model that ties it to the embedding
            if mapping.where == LAYER and sources[0][1] is None:  # before anything per layer is built
                stacked = joined.tensors[keys[sources[0][0]]]
                if not stacked.size or stacked.size[0] != dims.num_layers:
                    raise FormatError(f"{directory}: '{stacked.fqn}' stacks {stacked.size[0] if stacked.size else 0} "
                                      f"layers, the model config says {dims.num_layers}")
            layers = [layer for _, layer in sources] if sources[0][1] is not None else None
            indices = stack_indices(mapping, dims, directory, layers=layers)
            pieces = {(layer, expert): shard_pieces(mapping, hf_names(mapping, layer, expert), dims, padded, 1, 0)
                      for layer, expert in indices}
            for key, layer in sources:
                read_key(mapping, key, layer, pieces, indices[0])
        for mapping, i, layer in mtp_keyed_mappings(fam, dims):
            key = next((k for k in dist_key_candidates(mapping, i) if k in keys), None)
            if key is None:
                if mapping.optional:
                    continue
                raise FormatError(f"{directory}: no '{dist_key(mapping, 'te', i)}' in {METADATA_FILE} (the "
                                  f"checkpoint has multi-token-prediction layer {i})")
            experts = range(dims.num_experts) if mapping.per_expert else [None]
            pieces = {(layer, e): shard_pieces(mapping, hf_names(mapping, layer, e), dims, padded, 1, 0)
                      for e in experts}
            read_key(mapping, key, layer, pieces, (layer, experts[0]))
    unknown = [keys[k] for k in keys if k not in seen]
    if unknown:
        raise FormatError(f"{directory}: tensor '{unknown[0]}' matches no {fam.name} mapping"
                          + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))

    tensors = {}
    for name in hf_order(fam, dims, list(blocks)):
        mapping, index, _, _ = fam.match_hf(name) or fam.match_mtp_hf(name)
        shape = hf_shape(mapping, index, dims)
        tensors[name] = CanonicalTensor.assembled(name, dtypes[name], shape, blocks[name], directory, "chunks")
    for name, source in mtp_hf_copies(fam, dims).items():  # HF keeps its own copies in each MTP layer
        tensors[name] = CanonicalTensor.assembled(name, dtypes[source], tensors[source].shape, blocks[source],
                                                  directory, "chunks")
    return tensors


def _mapping_sources(mapping: TensorMapping, dims: ModelDims, keys: dict[str, str], directory: str,
                     optional: bool) -> list[tuple[str, int | None]]:
    """The keys holding a mapping: [(stacked key, None)], or [(per-layer key, layer)] for every
    layer that has the tensor; [] when an optional mapping is absent."""
    stacked = next((k for k in dist_key_candidates(mapping) if k in keys), None)
    if stacked is not None or mapping.where != LAYER:
        if stacked is None:
            if optional:
                return []
            raise FormatError(f"{directory}: no '{dist_key(mapping)}' in {METADATA_FILE}")
        return [(stacked, None)]
    if dims.num_layers > len(keys):  # one key per layer: a config claiming more layers cannot be right
        raise FormatError(f"{directory}: the model config says {dims.num_layers} layers, but {METADATA_FILE} holds "
                          f"{len(keys)} model keys")
    sources, missing = [], []
    for layer in applicable_layers(mapping, dims):
        key = next((k for k in dist_key_candidates(mapping, layer) if k in keys), None)
        if key is None:
            missing.append(dist_key(mapping, "te", layer))
        else:
            sources.append((key, layer))
    if missing and (sources or not optional):
        raise FormatError(f"{directory}: no '{dist_key(mapping)}' in {METADATA_FILE}" if not sources else
                          f"{directory}: no '{missing[0]}' in {METADATA_FILE} (other layers have it)")
    return sources


def _chunk_blocks(mapping: TensorMapping, chunk, stored: StoredTensor, pieces: dict, transposed: bool,
                  layer: int | None = None):
    """(canonical name, SourceBlock) for every piece of every (layer, expert) the chunk touches;
    `layer`: the key is that layer's own (no layer axis).

    In Megatron's [out, in] view of one layer's (one expert's) tensor a chunk is rows
    [r0, r0 + nr) x cols [c0, c0 + nc) (a vector: cols [0, 1)); its bytes are such blocks back to
    back for each (layer, expert) it spans, row-major, seen here as one [n * nr, nc] stored tensor."""
    lead = leading_axes(mapping, per_layer=layer is not None)
    offsets, sizes = chunk.offsets[lead:], chunk.sizes[lead:]
    r0, nr = offsets[0], sizes[0]
    c0, nc = (offsets[1], sizes[1]) if len(offsets) > 1 else (0, 1)
    spans = [range(o, o + n) for o, n in zip(chunk.offsets[:lead], chunk.sizes[:lead])]
    count = 1
    for span in spans:
        count *= len(span)
    if count * nr * nc == 0:
        return
    # The chunk's own 2-D view is [count * nr, nc]; a vector chunk gains a unit column.
    grid = stored if len(offsets) > 1 else replace(stored, shape=stored.shape + (1,),
                                                   strides=None if stored.strides is None else stored.strides + (1,))
    for i, index in enumerate(itertools.product(*spans)):
        slice_layer = layer if layer is not None else (index[0] if mapping.where == LAYER else None)
        expert = index[-1] if mapping.per_expert else None
        for piece in pieces[(slice_layer, expert)]:
            if piece.repeat:
                continue  # vocab padding carries nothing back
            ra, rb = max(r0, piece.dst_row), min(r0 + nr, piece.dst_row + piece.rows)
            ca, cb = max(c0, piece.dst_col), min(c0 + nc, piece.dst_col + piece.cols)
            if ra >= rb or ca >= cb:
                continue
            src_row, src_col = i * nr + (ra - r0), ca - c0
            row, col = piece.row0 + (ra - piece.dst_row), piece.col0 + (ca - piece.dst_col)
            if transposed:
                yield piece.source, SourceBlock(grid, src_row, src_col, cb - ca, rb - ra, col, row, transpose=True)
            else:
                yield piece.source, SourceBlock(grid, src_row, src_col, rb - ra, cb - ca, row, col)


def extra_state_keys(family: Family, dims: ModelDims, per_layer: bool = False) -> list[str]:
    """The `_extra_state` keys Megatron-Core saves and asks for on load (ShardedObjects), for every
    linear layer of the table (linear_qkv, linear_proj, linear_fc1, linear_fc2, the shared
    expert's...) and TransformerEngine's core attention (the local spec does not ask for it; an
    unasked key is no error for Megatron-Core's loader). Stacked: `{module}._extra_state/
    shard_{l}_{L}` per layer, `shard_{l}.{e}_{L}.{E}` per layer and routed expert. Per-layer keys
    (heterogeneous layers): `decoder.layers.{l}.{module}._extra_state/shard_0_1`, routed experts
    `shard_{e}_{E}`."""
    layers, experts = dims.num_layers, dims.num_experts

    def linear_modules(named, core_attention: str, core_first: bool = False) -> dict[str, bool]:
        """{module: per routed expert} of the linear layers among (mapping, key): `linear_*` modules,
        and the MTP layers' eh_proj (a linear by its split rule); the core attention after them (or
        first, where the MTP layers have always listed it)."""
        modules: dict[str, bool] = {core_attention: False} if core_first else {}
        for m, name in named:
            module, leaf = name.rsplit(".", 1)
            if leaf == "weight" and (module.rsplit(".", 1)[-1].startswith("linear_")
                                     or (m.where == MTP and not m.rule.replicated)):
                modules.setdefault(module, m.per_expert)
        modules.setdefault(core_attention, False)
        return modules

    def own_keys(modules: dict[str, bool]) -> list[str]:
        """A module keyed on its own (one layer): shard_0_1, routed experts shard_{e}_{E}."""
        return [k for module, per_expert in modules.items()
                for k in ([f"{module}._extra_state/shard_{e}_{experts}" for e in range(experts)] if per_expert
                          else [f"{module}._extra_state/shard_0_1"])]

    keys = []
    for layer in range(layers):
        modules = linear_modules(((m, dist_key(m, "te", layer if per_layer else None)) for m in family.mappings
                                  if m.where == LAYER and m.applies_to(dims, layer)),
                                 f"decoder.layers.{layer}.self_attention.core_attention" if per_layer
                                 else "decoder.layers.self_attention.core_attention")
        if per_layer:
            keys += own_keys(modules)
            continue
        for module, per_expert in modules.items():
            if per_expert:
                keys += [f"{module}._extra_state/shard_{layer}.{e}_{layers}.{experts}" for e in range(experts)]
            else:
                keys.append(f"{module}._extra_state/shard_{layer}_{layers}")
    # Multi-token-prediction layers: keyed per MTP layer, as a per-layer decoder layer is.
    for i in range(dims.mtp_layers):
        keys += own_keys(linear_modules(((m, dist_key(m, "te", i)) for m in family.mtp_layer_mappings(dims)),
                                        f"mtp.layers.{i}.transformer_layer.self_attention.core_attention",
                                        core_first=True))
    return keys


DATA_FILE = "__0_{}.distcp"  # as rank 0's writer names its files


def plan_dcp(catalog: Catalog, target: TargetSpec, family: Family, dims: ModelDims, padded: int, directory: str,
             common, key_prefix: str = "") -> list[PlannedFile]:
    """The files of one Megatron-Core distributed checkpoint directory: data files, .metadata,
    common.pt (torch.save of `common`) and metadata.json, every key prefixed with `key_prefix`
    (NeMo 2 saves its model under 'module.')."""
    from pyconv.io.dcp import DcpChunk, ItemLocation, metadata_pickle
    from pyconv.io.torchsave import layout_torch_save
    from pyconv.mcore.config import check_naming, refuse_fp8_weights
    from pyconv.mcore.names import hf_names
    from pyconv.mcore.parallel import shard_pieces, shard_shape

    refuse_fp8_weights(catalog, target.dtype)
    check_naming(family, target.options.megatron_naming)
    config = catalog.config
    iteration_dir = directory

    tensors: list[DcpTensor] = []
    planned: list[list[PlannedTensor]] = [[]]
    literals: list[list[tuple[int, bytes]]] = [[]]
    sizes = [0]
    archive_layouts: dict = {}

    def place(slot: TensorSlot, name: str, shape: tuple[int, ...], copies: list) -> ItemLocation:
        """The chunk's torch.save archive at the end of the current data file (or a new one)."""
        if (slot.dtype, slot.shape) not in archive_layouts:
            archive_layouts[(slot.dtype, slot.shape)] = layout_torch_save(slot)[0]
        layout = archive_layouts[(slot.dtype, slot.shape)]
        if sizes[-1] and sizes[-1] + layout.size > target.options.max_shard_size:
            planned.append([])
            literals.append([])
            sizes.append(0)
        base = sizes[-1]
        literals[-1].extend((base + offset, data) for offset, data in layout.literals)
        planned[-1].append(PlannedTensor(name, slot.dtype, shape, base + layout.record_offsets[0], tuple(copies)))
        sizes[-1] += layout.size
        return ItemLocation(DATA_FILE.format(len(sizes) - 1), base, layout.size)

    def place_bytes(layout) -> ItemLocation:
        base = sizes[-1]
        literals[-1].extend((base + offset, data) for offset, data in layout.literals)
        sizes[-1] += layout.size
        return ItemLocation(DATA_FILE.format(len(sizes) - 1), base, layout.size)

    # Megatron-Core's model asks for the `_extra_state` of every linear layer (ShardedObjects, one
    # per layer): torch.save([value]) as bytes items. pyconv has no FP8 state to carry: [None],
    # what Megatron-Core saves for the local spec and what TransformerEngine's modules accept.
    none_layout, _ = layout_torch_save([None])
    byte_items: dict[str, ItemLocation] = {}
    per_layer = heterogeneous(family, dims)  # Megatron-Core's non-homogeneous layers: a key per layer
    for key in extra_state_keys(family, dims, per_layer):
        byte_items[key_prefix + key] = place_bytes(none_layout)

    def write_key(mapping: TensorMapping, key: str, group: list[tuple], lead: int, layer_axis: bool) -> None:
        """One key: a chunk per (layer, expert) slice of `group`, stacked on `lead` leading axes
        (layer_axis: the first is the layer axis, every layer in the key)."""
        key = key_prefix + key
        transposed = mapping.transposed and len(mapping.shape(dims)) == 2
        chunks, dtype, shape = [], None, None
        for index in group:
            names = hf_names(mapping, *index)
            pieces = shard_pieces(mapping, names, dims, padded, 1, 0)
            shape = shard_shape(pieces, len(mapping.shape(dims)))
            slice_dtype = output_dtype(catalog.tensors[names[0]], None if mapping.keep_dtype else target.dtype)
            if dtype not in (None, slice_dtype):
                raise LayoutError(f"{catalog.path}: '{names[0]}' is {slice_dtype} but earlier slices of {key} "
                                  f"are {dtype}; choose a dtype")
            dtype = slice_dtype
            copies = [c for piece in pieces for c in piece.copies(catalog.tensors[piece.source], transposed, dtype)]
            stacked = tuple(i for i in index if i is not None)[-lead:] if lead else ()
            offsets, chunk_sizes = stacked + (0,) * len(shape), (1,) * lead + shape
            label = key if not stacked else f"{key}[{','.join(map(str, stacked))}]"
            chunks.append(DcpChunk(offsets, chunk_sizes, place(TensorSlot(dtype, chunk_sizes), label, shape, copies)))
        size = ((dims.num_layers,) if mapping.where == LAYER and layer_axis else ()) + \
            (dims.num_experts,) * mapping.per_expert + shape
        tensors.append(DcpTensor(key, dtype, size, tuple(chunks)))

    for mapping in family.mappings:
        if mapping.hf == ("lm_head.weight",) and dims.tied:
            continue
        if mapping.where == LAYER and not applicable_layers(mapping, dims):
            continue  # a tensor no layer of this model has (e.g. no shared expert)
        layers = applicable_layers(mapping, dims) if per_layer and mapping.where == LAYER else None
        indices = stack_indices(mapping, dims, catalog.path, LayoutError, layers)
        present = [all(n in catalog.tensors for n in hf_names(mapping, *index)) for index in indices]
        if not all(present):
            if mapping.optional and not any(any(n in catalog.tensors for n in hf_names(mapping, *index))
                                            for index in indices):
                continue
            index = indices[present.index(False)]
            missing = next(n for n in hf_names(mapping, *index) if n not in catalog.tensors)
            raise LayoutError(f"{catalog.path}: tensor '{missing}' is missing")
        groups = [(layer, [i for i in indices if i[0] == layer]) for layer in layers] if layers is not None \
            else [(None, indices)]
        for layer, group in groups:
            write_key(mapping, dist_key(mapping, target.options.megatron_naming, layer, renames_norms(family)), group,
                      leading_axes(mapping, per_layer=layers is not None), layer_axis=layer is None)

    for mapping, i, layer in mtp_keyed_mappings(family, dims):  # keyed per MTP layer, experts on an axis
        group = [(layer, e) for e in (range(dims.num_experts) if mapping.per_expert else [None])]
        missing = [n for index in group for n in hf_names(mapping, *index) if n not in catalog.tensors]
        if missing and mapping.optional and all(n in missing for n in hf_names(mapping, *group[0])):
            continue
        if missing:
            raise LayoutError(f"{catalog.path}: tensor '{missing[0]}' is missing")
        write_key(mapping, dist_key(mapping, target.options.megatron_naming, i, renames_norms(family)), group,
                  int(mapping.per_expert), layer_axis=False)

    # Megatron-LM (checkpointing.py, load_checkpoint) and NeMo (MegatronStrategy.load_checkpoint)
    # build the sharded state dict they load with from the content_metadata in common.pt; a
    # checkpoint without one gets Megatron-Core's default, which is the layout written here.
    # Recorded all the same, as Megatron-LM records it, so that the layout stays named should a
    # loader's default change.
    common_layout, _ = layout_torch_save({**common, CONTENT_METADATA: {SINGLETON_FLAG: False}})
    # A save id that names the content, so the same conversion writes the same bytes.
    save_id = hashlib.sha1(json.dumps([[t.fqn, t.dtype, list(t.size), len(t.chunks)] for t in tensors]).encode()
                           + json.dumps(config, sort_keys=True).encode()).hexdigest()
    meta = metadata_pickle(tensors, byte_items, save_id)
    backend = {"sharded_backend": "torch_dist", "sharded_backend_version": 1, "common_backend": "torch",
               "common_backend_version": 1}
    files = [PlannedFile(f"{iteration_dir}/{DATA_FILE.format(i)}", size, tuple(ts), tuple(lits))
             for i, (ts, lits, size) in enumerate(zip(planned, literals, sizes))]
    files += [
        PlannedFile(f"{iteration_dir}/{COMMON_FILE}", common_layout.size, (), common_layout.literals, kind="metadata"),
        PlannedFile(f"{iteration_dir}/{METADATA_FILE}", len(meta), (), ((0, meta),), kind="metadata"),
        plan_text_file(f"{iteration_dir}/{BACKEND_FILE}", json.dumps(backend)),
    ]
    return files
