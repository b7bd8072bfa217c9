"""Triton kernels that move elements with a dtype cast: contiguous, by a table of rows
(row permutations such as the fused QKV layout, row stacking, column placement), and
transposed. The cast itself is bits.convert (integer arithmetic, bit-exact)."""

import triton
import triton.language as tl

from .bits import convert, load_bits, store_bits


@triton.jit
def cast_contiguous_kernel(src, dst, n, SRC: tl.constexpr, DST: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    store_bits(dst + offs, convert(load_bits(src + offs, mask, SRC), SRC, DST), mask, DST)


@triton.jit
def gather_rows_cast_kernel(src, src_start, dst, dst_start, n_rows, cols,
                            SRC: tl.constexpr, DST: tl.constexpr, ALIGN: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dst[dst_start[r] + c] = cast(src[src_start[r] + c]) for r < n_rows, c < cols.

    Starts are element offsets; ALIGN (a power of two) divides every start and cols, which
    lets the compiler use vector loads and stores."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    rmask = r < n_rows
    s0 = tl.multiple_of(tl.load(src_start + r, mask=rmask, other=0), ALIGN)
    d0 = tl.multiple_of(tl.load(dst_start + r, mask=rmask, other=0), ALIGN)
    mask = rmask[:, None] & (c < cols)[None, :]
    x = load_bits(src + (s0[:, None] + c[None, :]), mask, SRC)
    store_bits(dst + (d0[:, None] + c[None, :]), convert(x, SRC, DST), mask, DST)


@triton.jit
def transpose_cast_kernel(src, dst, dst_offset, rows, cols, ld,
                          SRC: tl.constexpr, DST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dst[dst_offset + i * ld + j] = cast(src[j * rows + i]): src is cols x rows, contiguous."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (i < rows)[:, None] & (j < cols)[None, :]
    x = load_bits(src + (j[None, :] * rows + i[:, None]), mask, SRC)
    store_bits(dst + (dst_offset + i[:, None] * ld + j[None, :]), convert(x, SRC, DST), mask, DST)
