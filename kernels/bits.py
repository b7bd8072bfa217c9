"""Float format conversions as integer bit operations, for use inside Triton kernels.

Every function takes and returns tl.uint32 tensors holding the bits of the value (16-bit
formats in the low half). They reproduce csrc/cast.cpp and csrc/fp8.cpp bit for bit, NaN
rules included, and they are exact both compiled for a GPU and under TRITON_INTERPRET=1,
whose own float-to-float casts truncate instead of rounding (see DESIGN.md). Every shift
amount is kept below 32: a wider shift is undefined on a GPU and defined under numpy.

Format codes (constexpr arguments of the kernels): F32 0, BF16 1, F16 2, F8_E4M3 3.
"""

import triton
import triton.language as tl

F32 = 0
BF16 = 1
F16 = 2
E4M3 = 3


@triton.jit
def bf16_from_f32(u):
    # Round to nearest even on the 16 dropped bits; every NaN becomes 0xFFFF (torch's
    # AVX-512 constant, see cast.cpp).
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0xFFFF, rounded & 0xFFFF).to(tl.uint32)


@triton.jit
def f32_from_bf16(h):
    return h << 16  # a signalling NaN stays signalling, as in torch


@triton.jit
def f16_from_f32(u):
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    # Normal result: rebias 127 -> 15, RNE on 13 bits (a carry into the exponent is right).
    rebased = a - 0x38000000
    normal = (rebased + 0xFFF + ((rebased >> 13) & 1)) >> 13
    # Subnormal result (a < 2^-14): units of 2^-24 are mant >> shift, rounded to even.
    exp = a >> 23
    mant = (a & 0x7FFFFF) | 0x800000
    shift = tl.maximum(tl.minimum(126 - tl.minimum(exp, 126), 31), 1)
    half = (shift - shift + 1) << (shift - 1)  # uint32 all through: no sign to spill
    subnormal = (mant + half - 1 + ((mant >> shift) & 1)) >> shift
    nan = 0x7E00 | ((a >> 13) & 0x3FF)  # quieted, payload truncated
    r = tl.where(a < 0x38800000, subnormal, normal)
    r = tl.where(a >= 0x477FF000, 0x7C00, r)  # rounds to >= 65520: Inf
    r = tl.where(a > 0x7F800000, nan, r)
    return (sign | r).to(tl.uint32)


@triton.jit
def _log2_small(a):
    # floor(log2(a)) for 1 <= a < 1024, branch free.
    return ((a >= 2).to(tl.uint32) + (a >= 4).to(tl.uint32) + (a >= 8).to(tl.uint32) + (a >= 16).to(tl.uint32)
            + (a >= 32).to(tl.uint32) + (a >= 64).to(tl.uint32) + (a >= 128).to(tl.uint32)
            + (a >= 256).to(tl.uint32) + (a >= 512).to(tl.uint32))


@triton.jit
def f32_from_f16(h):
    sign = (h & 0x8000) << 16
    a = h & 0x7FFF
    e = a & 0x7C00
    normal = (a << 13) + 0x38000000
    inf_nan = (a << 13) | 0x7F800000 | ((a > 0x7C00).to(tl.uint32) << 22)  # NaN quieted
    # Subnormal a * 2^-24 normalised with integers: exponent 103 + p, p the top bit of a.
    p = _log2_small(tl.maximum(a, 1))
    subnormal = ((103 + p) << 23) | (((a - (1 << p)) << (23 - p)) & 0x7FFFFF)
    subnormal = tl.where(a == 0, 0, subnormal)
    r = tl.where(e == 0, subnormal, normal)
    r = tl.where(e == 0x7C00, inf_nan, r)
    return (sign | r).to(tl.uint32)


@triton.jit
def bf16_from_f16(h):
    f = f32_from_f16(h)  # exact for every non-NaN
    rounded = (f + 0x7FFF + ((f >> 16) & 1)) >> 16
    return tl.where((h & 0x7FFF) > 0x7C00, 0x7FC0, rounded & 0xFFFF).to(tl.uint32)


@triton.jit
def f32_from_e4m3(b):
    sign = (b & 0x80) << 24
    a = b & 0x7F
    normal = (a << 20) + (120 << 23)  # rebias 7 -> 127, mantissa 3 -> 23 bits
    # Subnormal a * 2^-9 (a < 8): exponent 118 + p, p the top bit of a.
    p = (a >= 2).to(tl.uint32) + (a >= 4).to(tl.uint32)
    subnormal = ((118 + p) << 23) | (((a - (1 << p)) << (23 - p)) & 0x7FFFFF)
    subnormal = tl.where(a == 0, 0, subnormal)
    r = tl.where(a < 8, subnormal, normal)
    r = tl.where(a == 0x7F, 0x7FF00000, r)  # the NaN, as c10 decodes it
    return (sign | r).to(tl.uint32)


@triton.jit
def e4m3_from_f32(u):
    # Round to nearest even, saturating at +-448 (Inf too); NaN -> 0x7F with its sign.
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    nan = a > 0x7F800000
    a = tl.minimum(a, 0x43E00000)
    rebased = a - (120 << 23)
    normal = (rebased + 0x7FFFF + ((rebased >> 20) & 1)) >> 20
    # Subnormal result (a < 2^-6): units of 2^-9 are mant >> (141 - exp), rounded to even.
    exp = a >> 23
    mant = (a & 0x7FFFFF) | 0x800000
    shift = tl.maximum(tl.minimum(141 - tl.minimum(exp, 141), 31), 1)
    half = (shift - shift + 1) << (shift - 1)
    subnormal = (mant + half - 1 + ((mant >> shift) & 1)) >> shift
    r = tl.where(a < 0x3C800000, subnormal, normal)
    r = tl.where(nan, 0x7F, r)
    return (sign | r).to(tl.uint32)


@triton.jit
def to_f32_bits(x, SRC: tl.constexpr):
    if SRC == 0:
        return x
    elif SRC == 1:
        return f32_from_bf16(x)
    elif SRC == 2:
        return f32_from_f16(x)
    else:
        return f32_from_e4m3(x)


@triton.jit
def from_f32_bits(u, DST: tl.constexpr):
    if DST == 0:
        return u
    elif DST == 1:
        return bf16_from_f32(u)
    elif DST == 2:
        return f16_from_f32(u)
    else:
        return e4m3_from_f32(u)


@triton.jit
def convert(x, SRC: tl.constexpr, DST: tl.constexpr):
    """Bits of format SRC -> bits of format DST (F32, BF16, F16, and unscaled F8_E4M3 to or
    from those), as csrc/cast.cpp and csrc/fp8.cpp (fp8_cast_elements) do."""
    if SRC == DST:
        return x
    elif SRC == 2 and DST == 1:
        return bf16_from_f16(x)  # torch's scalar path: every NaN 0x7FC0
    elif SRC == 3 and DST == 1:
        f = f32_from_e4m3(x)  # exact in bf16; c10's scalar BFloat16 makes every NaN 0x7FC0
        return tl.where((x & 0x7F) == 0x7F, 0x7FC0, f >> 16).to(tl.uint32)
    else:
        return from_f32_bits(to_f32_bits(x, SRC), DST)


@triton.jit
def load_bits(ptr, mask, FMT: tl.constexpr):
    """Loads elements of format FMT (from int32 / int16 / uint8 tensors) as tl.uint32 bits."""
    if FMT == 0:
        return tl.load(ptr, mask=mask, other=0).to(tl.uint32, bitcast=True)
    elif FMT == 3:
        return tl.load(ptr, mask=mask, other=0).to(tl.uint32)
    else:
        return tl.load(ptr, mask=mask, other=0).to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def store_bits(ptr, bits, mask, FMT: tl.constexpr):
    if FMT == 0:
        tl.store(ptr, bits.to(tl.int32, bitcast=True), mask=mask)
    elif FMT == 3:
        tl.store(ptr, bits.to(tl.uint8), mask=mask)
    else:
        tl.store(ptr, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
