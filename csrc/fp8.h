// fp8 e4m3fn ("F8_E4M3") and the 128x128 block scales of DeepSeek-V3 checkpoints,
// bit-identical to torch 2.13's CPU arithmetic.
//
// A block-scaled weight W [M, N] is stored as q (F8_E4M3, [M, N]) and a float32 grid
// S [ceil(M/B), ceil(N/B)] (`weight_scale_inv`, B = 128): W[r][c] = f32(q[r][c]) * S[r/B][c/B].
// What torch does, and so what these functions do, is set out at the top of fp8.cpp.
#pragma once
#include <cstddef>
#include <cstdint>

#include "dtype.h"

namespace pyconv {

// The largest finite e4m3fn value; quantization maps a block's amax onto it.
constexpr float kE4M3Max = 448.0f;
// The floor on a block's amax before it becomes a scale (an all-zero block gets this).
constexpr float kE4M3MinAmax = 1e-4f;

// Scalar codec: exact decode of all 256 patterns; encode with round-to-nearest-even,
// saturating at +-448 (Inf included), NaN -> 0x7F with the sign kept.
uint32_t e4m3fn_to_f32_bits(uint8_t e4m3fn_bits);
uint8_t f32_to_e4m3fn_bits(uint32_t f32_bits);

// Unscaled element casts between F8_E4M3 and F32/BF16/F16 (either direction), as
// torch's Tensor.to() gives them; for _core.cast and tests. The executor never casts
// fp8 without a scale.
bool fp8_cast_supported(DType src, DType dst);
void fp8_cast_elements(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t n);

// Dequantizes n consecutive elements of one row of a block-scaled weight:
//   dst[j] = cast<dst_dtype>(f32(src[j]) * scale_row[(col0 + j) / block])
// computed in fp32 and rounded once (RNE) to dst_dtype (F32, BF16 or F16). col0 is the
// column, in the whole weight, of src[0]; scale_row points at the float32 scales of the
// row's band (unaligned bytes are fine). A NaN scale gives that NaN (quieted) whatever
// the element, as torch's w * s does.
void dequantize_e4m3_row(const unsigned char* src, const unsigned char* scale_row, uint64_t col0, uint64_t block,
                         void* dst, DType dst_dtype, size_t n);

// The scale of a block whose largest magnitude is amax: max(amax, 1e-4) / 448 in fp32;
// NaN (0x7FC00000) if the block holds a NaN, as torch's amax and clamp give.
float e4m3_block_scale(float amax);

// Quantizes one band of rows (at most `block` of them, as the scale grid has one row
// per band) held in fp32: x is rows x cols with rows ld_x floats apart. For every
// `block`-column block k (the last may be partial): scales[k] = e4m3_block_scale(amax
// of the block), q[r][c] = e4m3fn(x[r][c] / scales[k]) (a true fp32 division, then RNE
// with saturation). q's rows are ld_q bytes apart; scales has ceil(cols / block) entries.
void quantize_e4m3_band(const float* x, size_t ld_x, size_t rows, size_t cols, size_t block, unsigned char* q,
                        size_t ld_q, float* scales);

}  // namespace pyconv
