"""Pipeline stages: which layers each stage holds."""

from __future__ import annotations

import re

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
    for which, count in (("first", first), ("last", last)):
        if count is not None and count < 1:  # Megatron-Core's TransformerConfig refuses an empty end stage
            raise LayoutError(f"the {which} pipeline stage must hold at least one layer ({which}={count})")
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
        if rest == 0:
            raise LayoutError(f"no layers left for the {open_stages} other pipeline stage{'s' if open_stages > 1 else ''} "
                              f"(num_layers={num_layers}, pp={pp}, first={first}, last={last})")
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


# Megatron-Core's pipeline_model_parallel_layout: one string per model chunk, '|' between
# chunks (chunk k = v * pp + p), E the embedding, t a decoder layer, m an MTP layer, L the
# loss; "(...)*n" and "x*n" repeat, commas are cosmetic.
_LAYOUT_REPEAT = (re.compile(r"\(([^)]+)\)\*(\d+)"), re.compile(r"(.)\*(\d+)"))


def parse_pipeline_layout(text: str) -> list[str]:
    """The layer characters of each model chunk, as Megatron-Core's parse_str_to_list unrolls them."""
    text = text.replace(",", "")
    for pattern in _LAYOUT_REPEAT:
        text = pattern.sub(lambda m: m.group(1) * int(m.group(2)), text)
    chunks = text.split("|")
    bad = sorted({c for chunk in chunks for c in chunk} - set("EtmL"))
    if bad:
        raise LayoutError(f"pipeline layout {text!r}: unknown layer character(s) {', '.join(map(repr, bad))} "
                          f"(E embedding, t decoder layer, m MTP layer, L loss)")
    return chunks


def layout_stages(text: str, num_layers: int, pp: int) -> tuple[list[range], int]:
    """(decoder layers of each model chunk in chunk order, vpp) of a pipeline layout string."""
    chunks = parse_pipeline_layout(text)
    if len(chunks) % pp:
        raise LayoutError(f"pipeline layout {text!r} has {len(chunks)} stages, not a multiple of pp={pp}")
    flat = "".join(chunks)
    if flat.count("t") != num_layers:
        raise LayoutError(f"pipeline layout {text!r} places {flat.count('t')} decoder layers, the model has "
                          f"{num_layers}")
    if flat.count("E") != 1 or flat.count("L") != 1 or not chunks[0].startswith("E") or not chunks[-1].endswith("L"):
        raise LayoutError(f"pipeline layout {text!r}: the embedding (E) must open the first stage and the loss (L) "
                          f"close the last, once each")
    stages, start = [], 0
    for chunk in chunks:
        n = chunk.count("t")
        stages.append(range(start, start + n))
        start += n
    return stages, len(chunks) // pp


def layout_mtp_chunk(text: str) -> tuple[int | None, int]:
    """(index of the model chunk holding the multi-token-prediction layers, how many there are) of
    a pipeline layout: Megatron-Core builds them all in one chunk (get_mtp_num_layers_to_build)."""
    chunks = parse_pipeline_layout(text)
    holding = [k for k, chunk in enumerate(chunks) if "m" in chunk]
    if len(holding) > 1:
        raise LayoutError(f"pipeline layout {text!r} spreads MTP layers (m) over several stages; Megatron-Core "
                          f"builds them all in one")
    return (holding[0] if holding else None), sum(chunk.count("m") for chunk in chunks)


def slot_stages(num_layers: int, pp: int, vpp: int, embedding: bool, loss: bool) -> list[range]:
    """Model chunks when Megatron-Core counts the embedding and/or the loss as a layer of the
    pipeline split (account_for_embedding/loss_in_pipeline_split): num_layers + embedding + loss
    slots split evenly over the pp * vpp chunks in chunk order, the embedding taking the first
    slot and the loss the last."""
    slots = num_layers + int(embedding) + int(loss)
    if slots % (pp * vpp):
        raise LayoutError(f"{num_layers} layers + {int(embedding)} embedding + {int(loss)} loss slots do not split "
                          f"evenly over pp={pp} x vpp={vpp} model chunks")
    n = slots // (pp * vpp)
    first, end = int(embedding), int(embedding) + num_layers  # slots holding decoder layers
    return [range(max(k * n, first) - first, min((k + 1) * n, end) - first) for k in range(pp * vpp)]
