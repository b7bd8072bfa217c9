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


@dataclass(frozen=True)
class StoredTensor:
    """A contiguous row-major array at a byte offset of a file. A block-quantized F8_E4M3
    weight names its float32 scale grid (`weight_scale_inv`, W = q * S, 128 x 128 blocks)."""

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]
    scale: "StoredTensor | None" = None

    @property
    def nbytes(self) -> int:
        return nbytes(self.dtype, self.shape)


@dataclass(frozen=True)
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


@dataclass(frozen=True)
class CanonicalTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    blocks: tuple[SourceBlock, ...]

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

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
