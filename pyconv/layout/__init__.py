"""Layout maths: where each row of a tensor-parallel shard comes from, and which pipeline
stage holds which layer. Pure functions over shapes; no I/O, no process groups."""

from pyconv.layout.pipeline import (
    layer_stages, layout_mtp_chunk, layout_stages, parse_pipeline_layout, slot_stages, stage_of_layer,
    virtual_stages,
)
from pyconv.layout.shard import (
    Piece,
    column_parallel,
    divide,
    gated_fc1,
    padded_vocab_size,
    qkv_fused,
    replicated,
    row_parallel,
    vocab_parallel,
)

__all__ = [
    "Piece", "column_parallel", "divide", "gated_fc1", "layer_stages", "layout_mtp_chunk", "layout_stages",
    "padded_vocab_size",
    "parse_pipeline_layout", "qkv_fused", "slot_stages",
    "replicated", "row_parallel", "stage_of_layer", "virtual_stages", "vocab_parallel",
]
