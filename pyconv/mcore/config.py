"""Megatron args <-> the model's dims and HF config: the entry points every Megatron-style format
shares, and the check of an HF source against its family table before it is written."""

from __future__ import annotations

import re
from dataclasses import replace

from pyconv.catalog import Catalog
from pyconv.errors import FormatError, LayoutError
from pyconv.families import (
    Family,
    ModelDims,
    family_for_architecture,
    family_for_megatron_args,
)
from pyconv.fp8 import scale_names
from pyconv.mcore.names import hf_shape, mtp_hf_copies


def megatron_dims(args: dict, where: str) -> ModelDims:
    def need(key):
        if not isinstance(args.get(key), int):
            raise FormatError(f"{where}: Megatron args have no integer '{key}'")
        return args[key]

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    groups = args.get("num_query_groups") if args.get("group_query_attention") else heads
    vocab = args.get("vocab_size") or args.get("padded_vocab_size")
    if not isinstance(vocab, int):
        raise FormatError(f"{where}: Megatron args have neither 'vocab_size' nor 'padded_vocab_size'")
    return ModelDims(
        num_layers=need("num_layers"), hidden=hidden, heads=heads, groups=groups or heads,
        head_dim=args.get("kv_channels") or hidden // heads, ffn=args.get("ffn_hidden_size") or 4 * hidden,
        vocab=vocab, max_positions=args.get("max_position_embeddings") or 0,
        tied=not args.get("untie_embeddings_and_output_weights", False),
        num_experts=args.get("num_experts") or 0, moe_ffn=args.get("moe_ffn_hidden_size") or 0,
        mtp_layers=args.get("mtp_num_layers") or 0,
        index_heads=args.get("dsa_indexer_n_heads") or 0, index_head_dim=args.get("dsa_indexer_head_dim") or 0,
        shared_ffn=args.get("moe_shared_expert_intermediate_size") or 0,
        first_dense_layers=first_dense_layers(args, where),
        **(dict(q_lora_rank=args.get("q_lora_rank") or 0, kv_lora_rank=need("kv_lora_rank"),
                qk_nope_dim=need("qk_head_dim"), qk_rope_dim=need("qk_pos_emb_head_dim"),
                v_head_dim=need("v_head_dim")) if args.get("multi_latent_attention") else {}))


def first_dense_layers(args: dict, where: str) -> int:
    if not args.get("num_experts"):
        return 0
    from pyconv.families.deepseek_v3 import first_dense_from_freq

    return first_dense_from_freq(args.get("moe_layer_freq"), args.get("num_layers"), where)


def family_from_args(args: dict, where: str) -> Family:
    from pyconv.families.common import original_hf_config

    archs = original_hf_config(args).get("architectures")
    if isinstance(archs, list) and archs:
        return family_for_architecture(archs[0], where)
    return family_for_megatron_args(args, where)


HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def dropped_layers(catalog: Catalog, family: Family, dims: ModelDims) -> list[int]:
    """HF layers past num_hidden_layers (and its multi-token-prediction layers) that the family
    drops (DeepSeek-V3's MTP layers when the config does not count them), in order."""
    if not family.drops_extra_layers:
        return []
    found = {int(m.group(1)) for m in map(HF_LAYER.match, catalog.tensors) if m}
    return sorted(i for i in found if i >= dims.num_layers + dims.mtp_layers)


def check_shapes(catalog: Catalog, family: Family, dims: ModelDims) -> None:
    """Every tensor matches the family's table at the config's dims, and the config's layer and
    expert counts are those the tensors hold: a config claiming 10^7 layers is refused here,
    before anything proportional to them is planned."""
    dropped = set(dropped_layers(catalog, family, dims))
    scales = scale_names(catalog.tensors)
    copies = mtp_hf_copies(family, dims)
    layers_seen, experts_seen = set(), set()
    shapes: dict = {}    # (mapping, index) -> the HF shape the dims imply: the same in every layer
    belongs: dict = {}   # (mapping, layer) -> whether the mapping applies to that layer
    for name, tensor in catalog.tensors.items():
        extra = HF_LAYER.match(name)
        if (extra and int(extra.group(1)) in dropped) or name in scales:
            continue
        if name in copies:  # Megatron shares the model's; the copy must at least have its shape
            source = catalog.tensors.get(copies[name])
            if source is not None and tuple(tensor.shape) != tuple(source.shape):
                raise LayoutError(f"{catalog.path}: tensor '{name}' has shape {list(tensor.shape)}, "
                                  f"'{copies[name]}' {list(source.shape)}")
            continue
        match = family.match_hf(name, dims) or family.match_mtp_hf(name)
        if match is None:
            if family.is_ignored_hf(name):
                continue
            raise LayoutError(f"{catalog.path}: tensor '{name}' matches no {family.name} mapping")
        mapping, index, layer, expert = match
        layers_seen.add(layer)
        experts_seen.add(expert)
        if layer is not None and layer >= dims.num_layers + dims.mtp_layers:
            raise LayoutError(f"{catalog.path}: tensor '{name}' is layer {layer} of a {dims.num_layers}-layer model")
        applies = belongs.get((id(mapping), layer))
        if applies is None:
            applies = belongs[(id(mapping), layer)] = mapping.applies_to(dims, layer)
        if not applies:
            raise LayoutError(f"{catalog.path}: tensor '{name}' does not belong in "
                              + (f"layer {layer} ({dims.layer_kind(layer)} MLP)" if layer is not None else "this model")
                              + f" of this {family.name} config")
        if expert is not None and expert >= dims.num_experts:
            raise LayoutError(f"{catalog.path}: tensor '{name}' is expert {expert} of {dims.num_experts}")
        expected = shapes.get((id(mapping), index))
        if expected is None:
            expected = shapes[(id(mapping), index)] = hf_shape(mapping, index, dims)
        if tuple(tensor.shape) != expected:
            raise LayoutError(f"{catalog.path}: tensor '{name}' has shape {list(tensor.shape)}, the config implies "
                              f"{list(expected)}")
    layers_seen.discard(None)
    experts_seen.discard(None)
    if len(layers_seen) < dims.num_layers + dims.mtp_layers:
        raise LayoutError(f"{catalog.path}: the config says {dims.num_layers} layers"
                          + (f" and {dims.mtp_layers} MTP layers" if dims.mtp_layers else "")
                          + f", but the tensors hold {len(layers_seen)}")
    if dims.num_experts and len(experts_seen) < dims.num_experts:
        raise LayoutError(f"{catalog.path}: the config says {dims.num_experts} experts, but the tensors hold "
                          f"{len(experts_seen)}")


def family_and_dims(catalog: Catalog, with_mtp: bool = False) -> tuple[Family, ModelDims]:
    """The family table and model dims of a catalog about to be written in a Megatron format,
    with every tensor checked against them. Multi-token-prediction layers count only with_mtp
    (the formats that write them) and when the checkpoint holds them; else they are dropped."""
    if catalog.config is None:
        raise LayoutError(f"{catalog.path}: no config.json: cannot derive Megatron args")
    family = family_for_architecture(catalog.architecture, catalog.path)
    dims = family.dims_from_hf(catalog.config)
    if dims.mtp_layers and not (with_mtp and holds_layer(catalog, dims.num_layers)):
        dims = replace(dims, mtp_layers=0)
    check_shapes(catalog, family, dims)
    return family, dims


def holds_layer(catalog: Catalog, layer: int) -> bool:
    return any((m := HF_LAYER.match(n)) and int(m.group(1)) == layer for n in catalog.tensors)


def attention_notes(config: dict, args: dict | None = None) -> tuple[str, ...]:
    """What Megatron-LM's args do not carry of an HF model's attention: a sliding window (Mistral's
    sliding_window, Qwen2's with use_sliding_window). The weights are the same; Megatron-Core's
    attention is full causal unless run with --window-size, so it differs past the window. None
    where the family writes the window into the args (Gemma's window_size)."""
    if args is not None and args.get("window_size"):
        return ()
    window = config.get("sliding_window")
    if str(config.get("model_type", "")).startswith("qwen") and not config.get("use_sliding_window"):
        window = None
    limit = config.get("max_position_embeddings")
    if isinstance(window, int) and not isinstance(window, bool) and (not isinstance(limit, int) or window < limit):
        return (f"sliding_window {window} is not in the Megatron args: Megatron-Core attends over the whole causal "
                f"context unless run with --window-size, so sequences longer than {window} tokens differ from the "
                f"HF model there",)
    return ()


def check_tensor_parallel(dims: ModelDims, tp: int, family: Family | None = None) -> None:
    """Refuses a tensor-parallel size Megatron-Core cannot build the model at, as its
    TransformerConfig checks (0.16.1, transformer_config.py): the attention heads split over the
    ranks, and the query groups either split over them or each replicated on tp / groups ranks;
    and any tp > 1 for a family whose layers are the model at tp 1 only."""
    if tp < 1:
        raise LayoutError(f"tp must be >= 1, got {tp}")
    if tp > 1 and family is not None and family.single_tp:
        raise LayoutError(f"tp={tp}: {family.single_tp}; the {family.name} family is written at tp 1 only")
    if dims.heads % tp:
        raise LayoutError(f"tp={tp} does not divide num_attention_heads={dims.heads}: Megatron-Core splits the "
                          "attention heads over the tensor-parallel ranks")
    if dims.groups % tp and tp % dims.groups:
        raise LayoutError(f"tp={tp} neither divides num_query_groups={dims.groups} nor is a multiple of it, as "
                          "Megatron-Core requires")


def check_naming(family: Family, naming: str) -> None:
    """Refuses a Megatron naming the family's Megatron-Core layers are never built with."""
    if naming not in ("te", "local"):
        raise LayoutError(f"unknown Megatron naming '{naming}' (te or local)")
    if naming != "te" and family.te_names_only:
        raise LayoutError(f"megatron naming '{naming}': {family.te_names_only}; write it with the te naming")


def refuse_fp8_weights(catalog: Catalog, dtype: str | None) -> None:
    """Block-scaled fp8 weights have no place in a Megatron-style checkpoint (.pt, torch_dist,
    NeMo): a float dtype dequantizes them in the core; without one they are refused, and so is
    quantizing to fp8 (a torch checkpoint has no fp8 storage with scales)."""
    if dtype == "F8_E4M3":
        raise LayoutError(f"{catalog.path}: dtype fp8: a Megatron checkpoint cannot hold block-scaled fp8 weights "
                          f"(fp8 quantization is written to an hf target)")
    fp8 = [n for n, t in catalog.tensors.items() if t.dtype == "F8_E4M3"]
    if fp8 and dtype in (None, "F8_E4M3"):
        raise LayoutError(f"{catalog.path}: '{fp8[0]}' (and {len(fp8) - 1} more) is fp8 with block scales, which a "
                          f"Megatron checkpoint cannot hold: convert with dtype bf16 (or fp16, fp32) to dequantize")
