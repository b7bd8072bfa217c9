"""Assembling canonical tensors from the rank shards of a per-rank (.pt) checkpoint: every shard
tensor is turned back into blocks of canonical tensors with its shard rule's pieces."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pyconv.catalog import CanonicalTensor, Catalog, SourceBlock
from pyconv.dtypes import FLOAT_DTYPES, TORCH_NAME
from pyconv.errors import FormatError, LayoutError
from pyconv.mcore.checkpoint import ARGS_SUMMARY, TRACKER
from pyconv.mcore.names import fill_indices, hf_names, hf_order, hf_shape, mtp_hf_copies
from pyconv.mcore.parallel import MegatronLayout, shard_shape


@dataclass
class Assembly:
    """Canonical tensors gathered while reading rank files: their blocks, dtype and order."""

    blocks: dict[str, list[SourceBlock]]
    dtypes: dict[str, str]
    order: list[str]


def read_rank(file: str, obj: dict, layout: MegatronLayout, t: int, p: int, e: int, assembly: Assembly,
               etp_rank: int | None = None, dense_replica: bool | None = None, chunk: str = "model",
               stage: int | None = None) -> None:
    """Adds the canonical blocks one model chunk of a rank file holds (obj[chunk], model chunk
    `stage`, default p); every tensor in it must be accounted for. Dense tensors are taken from
    the first file of each TP rank (dense_replica: this file's are copies); routed experts from
    every file, as expert-TP rank etp_rank of EP rank e."""
    from pyconv.io.torchzip import TensorRef

    fam, dims, padded, tp = layout.family, layout.dims, layout.padded_vocab, layout.tp
    if dense_replica is None:
        dense_replica = e > 0
    blocks, dtypes, order = assembly.blocks, assembly.dtypes, assembly.order
    model = obj[chunk]
    if chunk != "model":
        file = f"{file} [{chunk}]"
    if not isinstance(model, dict):
        raise FormatError(f"{file}: '{chunk}' is not a state dict")
    seen = set()
    for entry in layout.entries(p if stage is None else stage, e):
        mapping, layer, local = entry.mapping, entry.layer, entry.local_layer
        candidates = list(dict.fromkeys(fill_indices(n, local, entry.local_expert) for n in mapping.megatron_names()))
        key = next((c for c in candidates if c in model), None)
        names = hf_names(mapping, layer, entry.expert)
        if key is None:
            if mapping.optional:
                continue
            raise FormatError(f"{file}: missing tensor '{candidates[0]}'")
        seen.add(key)
        if entry.copy:
            continue
        if mapping.hf == ("lm_head.weight",) and dims.tied:
            continue  # the last stage's copy of the tied embedding
        ref = model[key]
        if not isinstance(ref, TensorRef):
            raise FormatError(f"{file}: '{key}' is not a tensor")
        pieces = layout.pieces(mapping, names, t, etp_rank)
        expected = shard_shape(pieces, len(mapping.shape(dims)))
        whole = mapping.rule.whole_on_every_rank(layout.naming)
        for naming in mapping.rule.alternative_namings(layout.naming):
            if tuple(ref.shape) == expected:
                break
            # MLA's down projections: whole under TransformerEngine's spec, column-parallel under the local one
            try:
                other = layout.pieces(mapping, names, t, naming=naming)
            except LayoutError:
                continue
            if tuple(ref.shape) == shard_shape(other, 2):
                pieces, expected, whole = other, shard_shape(other, 2), mapping.rule.whole_on_every_rank(naming)
        if tuple(ref.shape) != expected:
            raise FormatError(f"{file}: tensor '{key}' has shape {list(ref.shape)}, expected {list(expected)} "
                              f"for tp={tp} (hidden {dims.hidden}, heads {dims.heads}, groups {dims.groups}, "
                              f"head_dim {dims.head_dim}, ffn {dims.ffn}, padded vocab {padded})")
        if (whole and t > 0) or (dense_replica and not mapping.per_expert):
            continue  # replicas: taken from the first tensor- and expert-parallel rank
        stored = ref.stored()
        transposed = mapping.transposed and len(mapping.shape(dims)) == 2
        for piece in pieces:
            block = piece.source_block(stored, transposed)
            if block is None:
                continue
            if piece.source not in blocks:
                blocks[piece.source], dtypes[piece.source] = [], ref.dtype
                order.append(piece.source)
            if dtypes[piece.source] != ref.dtype:
                raise FormatError(f"{file}: '{key}' is {ref.dtype} but other shards of "
                                  f"{piece.source} are {dtypes[piece.source]}")
            blocks[piece.source].append(block)
    unknown = [k for k in model if k not in seen and not str(k).endswith("_extra_state")]
    if unknown:
        raise FormatError(f"{file}: tensor '{unknown[0]}' matches no {fam.name} mapping for pipeline stage {p}"
                          + (f", model chunk {chunk[5:]}" if chunk != "model" else "")
                          + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))


def assembled_catalog(root: str, directory: str, iteration: str, layout: MegatronLayout, args: dict,
             assembly: Assembly) -> Catalog:
    fam, dims, blocks, dtypes, order = layout.family, layout.dims, assembly.blocks, assembly.dtypes, assembly.order
    tensors = {}
    for name in hf_order(fam, dims, order):
        mapping, index, _, _ = fam.match_hf(name) or fam.match_mtp_hf(name)
        shape = hf_shape(mapping, index, dims)
        tensors[name] = CanonicalTensor.assembled(name, dtypes[name], shape, blocks[name], directory)
    for name, source in mtp_hf_copies(fam, dims).items():  # HF keeps its own copies in each MTP layer
        tensors[name] = CanonicalTensor.assembled(name, dtypes[source], tensors[source].shape, blocks[source],
                                                  directory)
    config = fam.hf_config_from_megatron(args)
    dtype = next(iter(dtypes.values()), None)
    if dtype in FLOAT_DTYPES:
        config["dtype"] = TORCH_NAME[dtype]
    extra = tuple((os.path.join(root, n), os.path.getsize(os.path.join(root, n))) for n in sorted(os.listdir(root))
                  if n != TRACKER and not n.startswith(".") and os.path.isfile(os.path.join(root, n))) \
        if os.path.isdir(root) else ()  # a rank file alone carries nothing else
    details = {"family": fam.name, "tp": layout.tp, "pp": layout.pp, **({"vpp": layout.vpp} if layout.vpp > 1 else {}),
               "ep": layout.ep,
               **({"etp": layout.expert_tp} if dims.num_experts else {}), "iteration": iteration,
               "padded_vocab_size": layout.padded_vocab,
               "args": {k: args[k] for k in sorted(args) if k in ARGS_SUMMARY}}
    return Catalog("megatron", root, tensors, config, fam.architectures[0], extra, details=details)
