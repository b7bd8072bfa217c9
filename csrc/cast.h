// Element-wise dtype conversion, bit-identical to torch's Tensor.to() on CPU:
// fp32 <-> bf16 <-> fp16 with round-to-nearest-even; NaN, Inf and subnormals handled.
// Which NaN bits each conversion produces (torch's, which differ per pair) is set out
// at the top of cast.cpp.
#pragma once
#include <cstddef>
#include <cstdint>

#include "dtype.h"

namespace pyconv {

// True when cast_elements supports src -> dst (identity casts always are).
bool cast_supported(DType src, DType dst);

// Convert n elements from src (of src_dtype) into dst (of dst_dtype). The buffers
// must not overlap; neither needs to be aligned. Throws FormatError when the pair
// is not supported.
void cast_elements(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t n);

// Scalar conversions, exposed for tests and for the planner's golden values; the
// same bits as cast_elements.
uint16_t f32_to_bf16_bits(uint32_t f32_bits);
uint16_t f32_to_f16_bits(uint32_t f32_bits);
uint32_t bf16_to_f32_bits(uint16_t bf16_bits);
uint32_t f16_to_f32_bits(uint16_t f16_bits);
uint16_t bf16_to_f16_bits(uint16_t bf16_bits);
uint16_t f16_to_bf16_bits(uint16_t f16_bits);

// The instruction-set variant cast_elements runs ("avx512", "avx2" or "portable"),
// chosen once from the CPU; the environment variable PYCONV_CAST_ISA caps it.
const char* cast_isa();

}  // namespace pyconv
