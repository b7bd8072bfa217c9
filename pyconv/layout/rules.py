"""Shard rules as objects: how one canonical tensor (or the HF tensors fused into one) is split
over tensor-parallel ranks. A rule gives the Pieces of rank r's shard; the same Pieces read a
shard back (Piece.source_block) and write it (Piece.copies), so a rule owns both directions and
no adapter needs to know which rule it holds.

Shapes are logical [out, in] (a bias is [out, 1]); `dims` is the model's dimensions (heads,
query groups, head_dim...), read by the rules that need them.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyconv.layout.shard import (
    Piece, column_parallel, divide, gated_fc1, qkv_fused, replicated, row_parallel, vocab_parallel,
)


@dataclass(frozen=True)
class ShardRule:
    """One rule; the flags say what adapters with layouts of their own (MindFormers' interleaved
    fc1, legacy QKV orders) must know about the fused or padded tensor, never the rule's name."""

    name: str
    replicated: bool = False   # every rank holds the whole tensor: read from rank 0 only
    pads_vocab: bool = False   # rows padded to the vocabulary multiple by repeating the last row
    fuses_qkv: bool = False    # [q; k; v] fused per query group
    gated: bool = False        # [gate; up] fused per rank

    def pieces(self, names: list[str], shape: tuple[int, int], dims, padded_vocab: int, tp: int, rank: int,
               naming: str = "te") -> list[Piece]:
        raise NotImplementedError

    def part_shape(self, shape: tuple[int, ...], index: int, parts: int, dims) -> tuple[int, ...]:
        """The HF shape of part `index` of the `parts` HF tensors fused by this rule."""
        return tuple(shape)

    def whole_on_every_rank(self, naming: str) -> bool:
        return self.replicated

    def alternative_namings(self, naming: str) -> tuple[str, ...]:
        """Other namings whose split a reader should try when a shard's shape does not match."""
        return ()

    def __repr__(self) -> str:
        return self.name


class _Replicated(ShardRule):
    def pieces(self, names, shape, dims, padded_vocab, tp, rank, naming="te"):
        return replicated(names[0], shape)


class _Column(ShardRule):
    def pieces(self, names, shape, dims, padded_vocab, tp, rank, naming="te"):
        return column_parallel(names[0], shape, tp, rank)


class _Row(ShardRule):
    def pieces(self, names, shape, dims, padded_vocab, tp, rank, naming="te"):
        return row_parallel(names[0], shape, tp, rank)


class _Vocab(ShardRule):
    def pieces(self, names, shape, dims, padded_vocab, tp, rank, naming="te"):
        return vocab_parallel(names[0], shape, padded_vocab, tp, rank)


class _GatedFc1(ShardRule):
    """Two HF tensors (gate, up), or one holding [gate; up] stacked (Phi-3's gate_up_proj)."""

    def pieces(self, names, shape, dims, padded_vocab, tp, rank, naming="te"):
        if len(names) == 2:
            return gated_fc1(names[0], names[1], shape[0], shape[1], tp, rank)
        ffn = shape[0] // 2
        return gated_fc1(names[0], names[0], ffn, shape[1], tp, rank, up_row0=ffn)


class _Qkv(ShardRule):
    """Three HF tensors (q, k, v), or one holding [q; k; v] stacked (GPT-2's c_attn)."""

    def pieces(self, names, shape, dims, padded_vocab, tp, rank, naming="te"):
        if len(names) == 3:
            return qkv_fused(*names, shape[1], dims.heads, dims.groups, dims.head_dim, tp, rank)
        q_rows, kv_rows = dims.heads * dims.head_dim, dims.groups * dims.head_dim
        return qkv_fused(names[0], names[0], names[0], shape[1], dims.heads, dims.groups, dims.head_dim, tp, rank,
                         q_row0=0, k_row0=q_rows, v_row0=q_rows + kv_rows)

    def part_shape(self, shape, index, parts, dims):
        if parts == 3 and index > 0:  # k and v: one head per query group
            return (dims.groups * dims.head_dim,) + tuple(shape[1:])
        return tuple(shape)


class _LatentDown(ShardRule):
    """MLA's down projections: TransformerEngine's spec keeps them whole on every rank (TELinear,
    parallel_mode 'duplicated'); the local spec makes them ColumnParallelLinear (dim 0 split)."""

    def pieces(self, names, shape, dims, padded_vocab, tp, rank, naming="te"):
        return replicated(names[0], shape) if naming == "te" else column_parallel(names[0], shape, tp, rank)

    def whole_on_every_rank(self, naming):
        return naming == "te"

    def alternative_namings(self, naming):
        return ("local",) if naming == "te" else ()


REPLICATED = _Replicated("replicated", replicated=True)
COLUMN = _Column("column")
ROW = _Row("row")
VOCAB = _Vocab("vocab", pads_vocab=True)
QKV = _Qkv("qkv", fuses_qkv=True)
GATED_FC1 = _GatedFc1("gated_fc1", gated=True)
LATENT_DOWN = _LatentDown("latent_down")
RULES = (REPLICATED, COLUMN, ROW, VOCAB, QKV, GATED_FC1, LATENT_DOWN)


@dataclass(frozen=True)
class ExpertPartition:
    """Routed experts over expert-parallel ranks, as Megatron-Core and DeepSeek's convert.py
    both place them: contiguous ranges, expert e on rank e // (E / ranks) as its local expert
    e % (E / ranks). Inside an expert, the rules above split it over expert-TP ranks."""

    num_experts: int
    ranks: int

    @property
    def per_rank(self) -> int:
        return divide(self.num_experts, self.ranks, "num_experts", "ep") if self.num_experts else 0

    def experts_of(self, rank: int) -> list[tuple[int, int]]:
        """(global expert, local expert) of every expert rank `rank` holds."""
        n = self.per_rank
        return [(rank * n + j, j) for j in range(n)]

    def rank_of(self, expert: int) -> int:
        return expert // self.per_rank
