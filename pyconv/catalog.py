"""Canonical tensors and where their bytes lie.

A reader turns a checkpoint into a Catalog: canonical tensors (Hugging Face names,
full unsharded shapes) each assembled from rectangles of stored tensors. Every tensor
is seen as a row-major 2-D array (`view2d`), so a TP shard, a row of an expert stack or
a whole file is one `SourceBlock`. Nothing here reads tensor bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pyconv.dtypes import ITEMSIZE



def view2d(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view every block copy works in: [prod(shape[:-1]), shape[-1]] for rank >= 2,
    and [n, 1] for a vector, so that dim 0 is always rows (a bias splits like its weight)."""
    if not shape:
        return 1, 1
    if len(shape) == 1:
        return shape[0], 1
    return math.prod(shape[:-1]), shape[-1]


def nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * ITEMSIZE[dtype]


@dataclass(frozen=True, slots=True)
class StoredRegion:
    """Part of a read of a stored tensor's 2-D view that one block copy can take: rows x cols at
    (row, col) relative to the read's first element, starting at byte `offset`. Along rows, a
    row's elements are adjacent and rows lie `stride` bytes apart; otherwise a column's elements
    are adjacent and columns lie `stride` bytes apart (a transposed view, as Megatron GPT-2
    checkpoints written by transformers' script store their linear weights)."""

    row: int
    col: int
    rows: int
    cols: int
    offset: int
    stride: int
    along_rows: bool


@dataclass(frozen=True, slots=True)
class StoredTensor:
    """An array at a byte offset of a file: row-major and contiguous, or with the element
    `strides` torch.save kept (a transposed, permuted, stepped or expanded view). A
    block-quantized F8_E4M3 weight names its float32 scale grid (`weight_scale_inv`, W = q * S,
    128 x 128 blocks)."""

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]
    scale: "StoredTensor | None" = None
    strides: tuple[int, ...] | None = None  # in elements; None: row-major contiguous

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    def view(self, element_offset: int, shape: tuple[int, ...], strides: tuple[int, ...]) -> "StoredTensor":
        """Another view of the same bytes, as torch's as_strided makes one: its first element
        `element_offset` elements after this tensor's, its strides in elements."""
        return StoredTensor(self.path, self.offset + element_offset * ITEMSIZE[self.dtype], self.dtype, tuple(shape),
                            strides=tuple(strides))

    @property
    def element_strides(self) -> tuple[int, ...]:
        return self.strides if self.strides is not None else row_major_strides(self.shape)

    def row_major_at(self, row: int, col: int) -> tuple[int, int]:
        """A contiguous tensor's (byte offset of element (row, col) of its 2-D view, bytes per row)."""
        isz = ITEMSIZE[self.dtype]
        row_bytes = view2d(self.shape)[1] * isz
        return self.offset + row * row_bytes + col * isz, row_bytes

    def regions(self, row: int, col: int, rows: int, cols: int) -> list[StoredRegion]:
        """Rows [row, row + rows) x cols [col, col + cols) of the 2-D view as regions block copies
        can take: one for a contiguous tensor; for a strided one, one per run of rows whose
        addresses step by one stride, each split per row or per column when neither its rows nor
        its columns hold adjacent elements (a view sliced with a step in both)."""
        isz = ITEMSIZE[self.dtype]
        if self.strides is None:
            return [StoredRegion(0, 0, rows, cols, *self.row_major_at(row, col), True)]
        col_stride = self.strides[-1] if len(self.shape) >= 2 else 1
        run, run_stride, outer = _row_runs(self.shape, self.strides)
        out = []
        r = row
        while r < row + rows:
            q, within = divmod(r, run)
            n = min(run - within, row + rows - r)
            first = _unravel_offset(q, outer) + within * run_stride + col * col_stride
            out.extend(_split_region(r - row, n, cols, self.offset + first * isz, run_stride * isz, col_stride * isz,
                                     isz))
            r += n
        return out


def row_major_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _row_runs(shape: tuple[int, ...], strides: tuple[int, ...]):
    """The rows of a strided tensor's 2-D view as runs: (rows per run, element stride between rows
    of a run, [(size, stride)] of the outer dimensions that place each run, outermost first). The
    innermost leading dimensions merge into one run while each stride is its inner neighbour's
    stride times its size, as torch's view() merges dimensions."""
    lead = [(n, s) for n, s in zip(shape[:-1], strides[:-1])] if len(shape) >= 2 else list(zip(shape, strides))
    lead = [(n, s) for n, s in lead if n != 1]
    if not lead:
        return 1, 0, []
    run, run_stride = lead[-1]
    k = len(lead) - 1
    while k > 0 and lead[k - 1][1] == run_stride * run:
        run *= lead[k - 1][0]
        k -= 1
    return run, run_stride, lead[:k]


def _unravel_offset(index: int, outer: list[tuple[int, int]]) -> int:
    offset = 0
    for size, stride in reversed(outer):
        index, i = divmod(index, size)
        offset += i * stride
    return offset


def _split_region(row: int, rows: int, cols: int, offset: int, row_stride: int, col_stride: int,
                  isz: int) -> list[StoredRegion]:
    if cols == 1 or col_stride == isz:
        return [StoredRegion(row, 0, rows, cols, offset, row_stride, True)]
    if rows == 1 or row_stride == isz:
        return [StoredRegion(row, 0, rows, cols, offset, col_stride, False)]
    if rows <= cols:  # neither adjacent: one region per row or per column, whichever is fewer
        return [StoredRegion(row + i, 0, 1, cols, offset + i * row_stride, col_stride, False) for i in range(rows)]
    return [StoredRegion(row, j, rows, 1, offset + j * col_stride, row_stride, True) for j in range(cols)]


@dataclass(frozen=True, slots=True)
class SourceBlock:
    """Rows x cols of a canonical tensor's 2-D view at (dst_row, dst_col), taken from the stored
    tensor's block at (src_row, src_col): rows x cols, or cols x rows read transposed."""

    stored: StoredTensor
    src_row: int
    src_col: int
    rows: int
    cols: int
    dst_row: int
    dst_col: int
    transpose: bool = False


@dataclass(frozen=True, slots=True)
class LowRankDelta:
    """W += scale * L @ R over the tensor's 2-D view (a LoRA adapter's B @ A, merged while writing):
    L is `left` [rows, rank], or its transpose stored [rank, rows]; R is `right` [rank, cols], or
    its transpose stored [cols, rank] (PEFT's embedding and fan_in_fan_out deltas, (B @ A)^T)."""

    left: StoredTensor
    right: StoredTensor
    left_transposed: bool
    right_transposed: bool
    scale: float
    adapter: str  # where it came from, for messages


@dataclass(frozen=True, slots=True)
class CanonicalTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    blocks: tuple[SourceBlock, ...]
    deltas: tuple[LowRankDelta, ...] = ()  # merged in order, after the blocks are read

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)

    @classmethod
    def assembled(cls, name: str, dtype: str, shape: tuple[int, ...], blocks, where: str,
                  parts: str = "shards") -> "CanonicalTensor":
        """A tensor gathered from the shards of a parallel checkpoint; FormatError naming `where`
        when they do not add up to it (a shard missing, or two overlapping)."""
        from pyconv.errors import FormatError

        tensor = cls(name, dtype, tuple(shape), tuple(blocks))
        rows, cols = view2d(tensor.shape)
        covered = sum(b.rows * b.cols for b in tensor.blocks)
        if covered != rows * cols:
            raise FormatError(f"{where}: {parts} cover {covered} of the {rows * cols} elements of {name}")
        return tensor

    @classmethod
    def whole(cls, name: str, stored: StoredTensor) -> "CanonicalTensor":
        rows, cols = view2d(stored.shape)
        return cls(name, stored.dtype, stored.shape, (SourceBlock(stored, 0, 0, rows, cols, 0, 0),))


@dataclass
class Catalog:
    """What a reader found: canonical tensors in source order, the config, files to carry over."""

    format: str
    path: str
    tensors: dict[str, CanonicalTensor]
    config: dict | None = None
    architecture: str | None = None
    extra_files: tuple[tuple[str, int], ...] = ()  # (absolute path, size) of tokenizer/generation files to copy
    metadata: dict[str, str] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # format-specific facts for `inspect` (tp, pp, iteration...)
    notes: tuple[str, ...] = ()  # what the reader left out and why (optimizer state...), for the plan

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
