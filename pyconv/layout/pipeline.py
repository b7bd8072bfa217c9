"""Pipeline stages: which layers each stage holds."""

from __future__ import annotations

from pyconv.errors import LayoutError


def layer_stages(num_layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[range]:
    """Global layer indices per pipeline stage. Even by default; Megatron's
    decoder_first/last_pipeline_num_layers give the first and/or last stage its own count
    and the remaining layers are split evenly over the middle stages."""
    if pp < 1:
        raise LayoutError(f"pipeline parallel size must be >= 1, got {pp}")
    if pp == 1:
        if first not in (None, num_layers) or last not in (None, num_layers):
            raise LayoutError(f"uneven first/last stage sizes need pp > 1 (num_layers={num_layers})")
        return [range(num_layers)]
    counts: list[int | None] = [None] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    fixed = sum(c for c in counts if c is not None)
    open_stages = counts.count(None)
    rest = num_layers - fixed
    if rest < 0 or (open_stages == 0 and rest != 0):
        raise LayoutError(f"num_layers={num_layers} does not match first/last stage sizes {first}/{last} over pp={pp}")
    if open_stages:
        if rest % open_stages:
            raise LayoutError(f"{rest} layers are not divisible over the {open_stages} remaining pipeline stages "
                              f"(num_layers={num_layers}, pp={pp}, first={first}, last={last})")
        counts = [c if c is not None else rest // open_stages for c in counts]
    if any(c < 0 for c in counts):
        raise LayoutError(f"negative stage size in {counts}")
    stages, start = [], 0
    for c in counts:
        stages.append(range(start, start + c))
        start += c
    return stages


def stage_of_layer(stages: list[range], layer: int) -> tuple[int, int]:
    """(stage, local index) of a global layer."""
    for stage, layers in enumerate(stages):
        if layer in layers:
            return stage, layer - layers.start
    raise LayoutError(f"layer {layer} is in no pipeline stage")


def virtual_stages(num_layers: int, pp: int, vpp: int = 1, first: int | None = None,
                   last: int | None = None) -> list[range]:
    """Global layer indices per model chunk of an interleaved (virtual) pipeline, in chunk order
    k = v * pp + p: chunk v of pipeline rank p. Each rank's layers (layer_stages) split evenly
    into vpp chunks, and chunk v of every rank comes before chunk v + 1 of any, as Megatron-Core's
    get_transformer_layer_offset places them (offset = v * num_layers / vpp + the layers of chunk
    v on the ranks before p). With vpp = 1 this is layer_stages."""
    if vpp < 1:
        raise LayoutError(f"virtual pipeline size must be >= 1, got {vpp}")
    per_rank = layer_stages(num_layers, pp, first, last)
    if vpp == 1:
        return per_rank
    if pp == 1:
        raise LayoutError(f"a virtual pipeline (vpp={vpp}) needs pp > 1")
    for p, layers in enumerate(per_rank):
        if len(layers) % vpp:
            raise LayoutError(f"pipeline rank {p} holds {len(layers)} layers, not divisible into vpp={vpp} chunks "
                              f"(num_layers={num_layers}, pp={pp}, first={first}, last={last})")
    chunks, start = [], 0
    for v in range(vpp):
        for layers in per_rank:
            n = len(layers) // vpp
            chunks.append(range(start, start + n))
            start += n
    return chunks
