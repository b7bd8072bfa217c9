"""Tensor names between a family table's patterns and concrete tensors: '*' the layer, '#' the
expert; the canonical (HF) shapes and order of the tensors a Megatron-style checkpoint assembles."""

from __future__ import annotations

from pyconv.families import Family, ModelDims, TensorMapping
from pyconv.mcore.parallel import stage_entries


def fill_indices(pattern: str, layer: int | None, expert: int | None) -> str:
    if layer is not None:
        pattern = pattern.replace("*", str(layer))
    return pattern.replace("#", str(expert)) if expert is not None else pattern


def megatron_tensor_name(mapping: TensorMapping, naming: str, local_layer: int | None,
                         local_expert: int | None = None) -> str:
    return fill_indices(mapping.megatron_name(naming), local_layer, local_expert)


def hf_names(mapping: TensorMapping, layer: int | None, expert: int | None = None) -> list[str]:
    return [fill_indices(n, layer, expert) for n in mapping.hf]


def mtp_hf_copies(family: Family, dims: ModelDims) -> dict[str, str]:
    """{HF name of an MTP layer's copy: the HF name of the model tensor it copies}."""
    out = {}
    for i in range(dims.mtp_layers):
        for leaf, source in family.mtp_hf_copies.items():
            if source == "lm_head.weight" and dims.tied:
                source = family.word_embedding.hf[0]
            out[f"model.layers.{dims.num_layers + i}.{leaf}"] = source
    return out


def hf_shape(mapping: TensorMapping, index: int, dims: ModelDims) -> tuple[int, ...]:
    return mapping.rule.part_shape(mapping.shape(dims), index, len(mapping.hf), dims)


def hf_order(family: Family, dims: ModelDims, names: list[str]) -> list[str]:
    """Canonical tensors in the HF order: embeddings, layer by layer (experts in order), final
    norm, head."""
    present = set(names)
    stages = [range(dims.num_layers)]
    ordered = []
    for entry in stage_entries(family, dims, 0, stages, 0, 1):
        ordered.extend(n for n in hf_names(entry.mapping, entry.layer, entry.expert) if n in present)
    return list(dict.fromkeys(ordered))
