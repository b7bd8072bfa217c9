"""Shard rules: each returns the Pieces of one tensor-parallel rank's shard.

Shapes are logical [out, in] (a bias is [out, 1]): dim 0 is what column-parallel layers
split, dim 1 what row-parallel layers split. A Piece says which rectangle of which canonical
tensor lands where in the shard; the same pieces read a shard back (the inverse direction),
so one function serves both HF -> Megatron and Megatron -> HF.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pyconv.catalog import CanonicalTensor, SourceBlock, StoredTensor
from pyconv.errors import LayoutError
from pyconv.plan import BlockCopy, copies_for_region


@dataclass(frozen=True)
class Piece:
    """Rows [row0, row0+rows) x cols [col0, col0+cols) of canonical tensor `source`,
    placed at (dst_row, dst_col) of the shard. `repeat` means the single source row
    row0 fills `rows` shard rows (vocab padding); such rows carry no information back."""

    source: str
    row0: int
    col0: int
    rows: int
    cols: int
    dst_row: int
    dst_col: int = 0
    repeat: bool = False

    def source_block(self, stored: StoredTensor, transposed: bool, at: tuple[int, int] | None = None):
        """Reading: the block of the canonical tensor this piece of a stored shard holds (None for
        vocab padding, which carries nothing back). `at`: the piece's (row, col) in `stored` where
        that differs from (dst_row, dst_col) (legacy QKV orders)."""
        if self.repeat:
            return None
        row, col = at or (self.dst_row, self.dst_col)
        if transposed:  # the shard is [in, out] (Conv1D): the piece's rows are the shard's columns
            return SourceBlock(stored, row, col, self.cols, self.rows, self.col0, self.row0, transpose=True)
        return SourceBlock(stored, row, col, self.rows, self.cols, self.row0, self.col0)

    def copies(self, tensor: CanonicalTensor, transposed: bool, dtype: str | None = None) -> list[BlockCopy]:
        """Writing: the block copies that fill this piece of a shard from the canonical tensor;
        written as `dtype`, a block-scaled fp8 source is dequantized."""
        if self.repeat:  # vocab padding: the last real row, repeated (row stride 0)
            one_row = copies_for_region(tensor, self.row0, self.col0, 1, self.cols, self.dst_row, self.dst_col,
                                        dtype=dtype)
            if any(c.scale_source for c in one_row):
                raise LayoutError(f"tensor {tensor.name}: a block-scaled fp8 row cannot be repeated as vocab padding")
            if any(c.transpose for c in one_row):  # a row of a transposed view: its elements are not adjacent
                return [replace(c, dst_row=self.dst_row + i) for i in range(self.rows) for c in one_row]
            return [BlockCopy(c.source, c.src_offset, 0, c.src_dtype, self.rows, c.cols, c.dst_row, c.dst_col,
                              low_rank=tuple(replace(t, left_row_stride=0) for t in c.low_rank))
                    for c in one_row]
        if transposed:
            return copies_for_region(tensor, self.col0, self.row0, self.cols, self.rows, self.dst_row, self.dst_col,
                                     transpose=True, dtype=dtype)
        return copies_for_region(tensor, self.row0, self.col0, self.rows, self.cols, self.dst_row, self.dst_col,
                                 dtype=dtype)


def divide(n: int, parts: int, quantity: str, over: str) -> int:
    """n / parts, or a LayoutError naming both numbers: 'ffn_hidden_size = 112 is not divisible by tp = 3'."""
    if parts <= 0 or n % parts:
        raise LayoutError(f"{quantity} = {n} is not divisible by {over} = {parts}")
    return n // parts


def replicated(name: str, shape: tuple[int, int]) -> list[Piece]:
    return [Piece(name, 0, 0, shape[0], shape[1], 0)]


def column_parallel(name: str, shape: tuple[int, int], tp: int, rank: int) -> list[Piece]:
    rows = divide(shape[0], tp, f"{name}: dim 0", "tp")
    return [Piece(name, rank * rows, 0, rows, shape[1], 0)]


def row_parallel(name: str, shape: tuple[int, int], tp: int, rank: int) -> list[Piece]:
    cols = divide(shape[1], tp, f"{name}: dim 1", "tp")
    return [Piece(name, 0, rank * cols, shape[0], cols, 0)]


def padded_vocab_size(vocab: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of make_vocab_size_divisible_by * tp."""
    multiple = divisible_by * tp
    return -(-vocab // multiple) * multiple


def vocab_parallel(name: str, shape: tuple[int, int], padded_vocab: int, tp: int, rank: int) -> list[Piece]:
    """A dim-0 split of the embedding padded to padded_vocab rows by repeating the last row,
    as Megatron's converters pad it."""
    vocab, hidden = shape
    if padded_vocab < vocab:
        raise LayoutError(f"{name}: padded vocab {padded_vocab} is smaller than the vocab {vocab}")
    rows = divide(padded_vocab, tp, f"{name}: padded vocab", "tp")
    start, stop = rank * rows, (rank + 1) * rows
    pieces = []
    real_stop = min(stop, vocab)
    if real_stop > start:
        pieces.append(Piece(name, start, 0, real_stop - start, hidden, 0))
    pad_start = max(start, vocab)
    if stop > pad_start:
        pieces.append(Piece(name, vocab - 1, 0, stop - pad_start, hidden, pad_start - start, repeat=True))
    return pieces


def _take_rows(segments: list[tuple[str, int, int]], cols: int, start: int, stop: int) -> list[Piece]:
    """Rows [start, stop) of a fused tensor laid out as consecutive (source, row0, rows) segments."""
    pieces, position = [], 0
    for source, row0, rows in segments:
        lo, hi = max(start, position), min(stop, position + rows)
        if lo < hi:
            pieces.append(Piece(source, row0 + (lo - position), 0, hi - lo, cols, lo - start))
        position += rows
    return pieces


def qkv_fused(q: str, k: str, v: str, cols: int, num_heads: int, num_groups: int, head_dim: int,
              tp: int, rank: int, q_row0: int = 0, k_row0: int = 0, v_row0: int = 0) -> list[Piece]:
    """Megatron-Core's fused linear_qkv: per query group g the rows

        [q heads g*h .. g*h+h-1 | k_g | v_g]     (h = num_heads / num_groups, each head_dim rows)

    and rank r holds rows [r*N/tp, (r+1)*N/tp) of the N fused rows: num_groups/tp whole groups
    when tp divides num_groups, else an even split by raw row count. cols is 1 for the bias.
    q_row0/k_row0/v_row0 locate q, k and v inside their sources when one tensor holds all three
    stacked (GPT-2's c_attn)."""
    heads_per_group = divide(num_heads, num_groups, "num_attention_heads", "num_query_groups")
    segments = []
    for g in range(num_groups):
        segments.append((q, q_row0 + g * heads_per_group * head_dim, heads_per_group * head_dim))
        segments.append((k, k_row0 + g * head_dim, head_dim))
        segments.append((v, v_row0 + g * head_dim, head_dim))
    total = (num_heads + 2 * num_groups) * head_dim
    rows = divide(total, tp, f"fused qkv rows (heads {num_heads} + 2 * groups {num_groups}) * head_dim {head_dim}", "tp")
    return _take_rows(segments, cols, rank * rows, (rank + 1) * rows)


def gated_fc1(gate: str, up: str, ffn: int, cols: int, tp: int, rank: int, up_row0: int = 0) -> list[Piece]:
    """SwiGLU linear_fc1 on rank r: [gate_r; up_r], each the rank's dim-0 slice of its projection.
    up_row0 locates up inside its source when one tensor holds [gate; up] (Phi-3's gate_up_proj)."""
    rows = divide(ffn, tp, "ffn_hidden_size", "tp")
    return [Piece(gate, rank * rows, 0, rows, cols, 0), Piece(up, up_row0 + rank * rows, 0, rows, cols, rows)]
