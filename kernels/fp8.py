"""Triton kernels for fp8 e4m3fn with 128x128 block scales (DeepSeek-V3's weight_scale_inv):
dequantization into F32/BF16/F16 and quantization of an fp32 band, as csrc/fp8.cpp does.

The arithmetic that must be floating point is one IEEE fp32 product (dequantization) and
true fp32 divisions (tl.math.div_rn: round to nearest, not the approximate division `/`
may compile to); NaNs are decided with integers, because a GPU returns a canonical NaN
where the CPU keeps an operand's sign and payload."""

import triton
import triton.language as tl

from .bits import e4m3_from_f32, f32_from_e4m3, from_f32_bits, load_bits, store_bits


@triton.jit
def dequant_kernel(q, scales, dst, dst_offset, rows, cols, ld, nk, row_base, col_base,
                   DST: tl.constexpr, SCALE_BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """dst[dst_offset + i * ld + j] = cast(f32(q[i * cols + j]) * S) for the rows x cols
    block q, S = scales[((row_base + i) // SCALE_BLOCK) * nk + (col_base + j) // SCALE_BLOCK]
    (scales: float32 bits as int32, a grid nk wide)."""
    i = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    j = tl.program_id(1).to(tl.int64) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (i < rows)[:, None] & (j < cols)[None, :]
    b = load_bits(q + (i[:, None] * cols + j[None, :]), mask, 3)
    k = ((row_base + i) // SCALE_BLOCK)[:, None] * nk + ((col_base + j) // SCALE_BLOCK)[None, :]
    s = load_bits(scales + k, mask, 0)
    w = f32_from_e4m3(b)
    product = (w.to(tl.float32, bitcast=True) * s.to(tl.float32, bitcast=True)).to(tl.uint32, bitcast=True)
    # A NaN scale gives itself, quieted, whatever the element; a NaN element (0x7F/0xFF)
    # times a number gives the element's NaN (x86's rule; a GPU would canonicalise it).
    # 0 * Inf: x86's default NaN, negative (a GPU gives 0x7FFFFFFF).
    r = tl.where((product & 0x7FFFFFFF) > 0x7F800000, 0xFFC00000, product)
    r = tl.where((b & 0x7F) == 0x7F, w, r)
    r = tl.where((s & 0x7FFFFFFF) > 0x7F800000, s | 0x00400000, r)
    store_bits(dst + (dst_offset + i[:, None] * ld + j[None, :]), from_f32_bits(r, DST), mask, DST)


@triton.jit
def quantize_kernel(x, q, scales, rows, cols, nk, BLOCK: tl.constexpr, SUB_ROWS: tl.constexpr):
    """One BLOCK x BLOCK block of the fp32 rows x cols band x (float32 bits as int32) per
    program: scale = max(amax, 1e-4) / 448 (NaN if the block holds one), q = e4m3fn(x / scale)
    with saturation; scales[block row * nk + block col]. Two passes of SUB_ROWS rows at a time
    (the amax, then the quotients): a whole block held at once spills registers."""
    bi = tl.program_id(0).to(tl.int64)
    bj = tl.program_id(1).to(tl.int64)
    j = bj * BLOCK + tl.arange(0, BLOCK)
    cmask = j < cols
    # Integer order of |x| bits is float order, and every NaN lies above Inf.
    column_amax = tl.zeros([BLOCK], dtype=tl.uint32)
    for r0 in range(0, BLOCK, SUB_ROWS):
        i = bi * BLOCK + r0 + tl.arange(0, SUB_ROWS)
        mask = (i < rows)[:, None] & cmask[None, :]
        u = load_bits(x + (i[:, None] * cols + j[None, :]), mask, 0)
        column_amax = tl.maximum(column_amax, tl.max(u & 0x7FFFFFFF, axis=0))
    amax = tl.max(column_amax, axis=0)
    block_nan = amax > 0x7F800000
    amax_f = amax.to(tl.float32, bitcast=True)
    scale = tl.math.div_rn(tl.maximum(tl.where(block_nan, 0.0, amax_f), 1e-4), 448.0)
    scale_bits = tl.where(block_nan, 0x7FC00000, scale.to(tl.uint32, bitcast=True)).to(tl.uint32)
    for r0 in range(0, BLOCK, SUB_ROWS):
        i = bi * BLOCK + r0 + tl.arange(0, SUB_ROWS)
        mask = (i < rows)[:, None] & cmask[None, :]
        offs = i[:, None] * cols + j[None, :]
        u = load_bits(x + offs, mask, 0)
        quotient = tl.math.div_rn(u.to(tl.float32, bitcast=True), scale).to(tl.uint32, bitcast=True)
        # Division by the NaN scale: x86 gives x's own NaN if x is one, else the scale's (positive).
        x_nan = (u & 0x7FFFFFFF) > 0x7F800000
        # Inf / Inf (an Inf in the block makes the scale Inf): x86's default NaN, negative.
        quotient = tl.where((quotient & 0x7FFFFFFF) > 0x7F800000, 0xFFC00000, quotient)
        quotient = tl.where(block_nan, tl.where(x_nan, u | 0x00400000, 0x7FC00000), quotient)
        store_bits(q + offs, e4m3_from_f32(quotient), mask, 3)
    tl.store(scales + (bi * nk + bj), scale_bits.to(tl.int32, bitcast=True))
