// fp8 e4m3fn and 128x128 block-scaled (de)quantization, bit-identical to torch 2.13 CPU.
//
// What torch does (measured with torch 2.13.0+cpu, CPU capability AVX512; tests/test_fp8.py
// keeps torch as the judge):
//   e4m3fn -> fp32  exact; 0x7F / 0xFF are the only NaNs and decode to 0x7FF00000 /
//                   0xFFF00000 (c10's bit formula); no infinities; 0x01 = 2^-9 is the
//                   smallest subnormal, 0x7E = 448 the largest finite value.
//   fp32 -> e4m3fn  round to nearest, ties to even, SATURATING: every finite value past
//                   448 (464 and beyond included, which plain RNE would send to NaN) and
//                   +-Inf give +-448 (0x7E / 0xFE); any NaN gives 0x7F with its sign
//                   (0xFF for a negative NaN); fp32 subnormals and values up to 2^-10 give
//                   +-0; e4m3fn subnormals (multiples of 2^-9 below 2^-6) are produced
//                   with RNE (2^-10 -> 0, 3 * 2^-10 -> 2^-8). bf16 and fp16 inputs convert
//                   as their exact fp32 widening does.
//   e4m3fn -> bf16  NaN gives 0x7FC0 whatever its sign (c10's scalar BFloat16); the values
//                   themselves are exact. e4m3fn -> fp16: exact, NaN 0x7F80 / 0xFF80.
//   w.float() * s   IEEE fp32 product (no FTZ); when s is NaN the result is s quieted even
//                   if w is NaN too (the vectorised mul returns its second operand's NaN).
//   amax            0x7FC00000 for a block holding any NaN; clamp(min=1e-4) keeps the NaN,
//                   and / 448 keeps it.
// Dequantization rounds the fp32 product once, through cast_elements (cast.cpp), so its
// fp32 -> bf16/fp16 NaN rules are torch's too.
//
// Speed: branchless integer loops that gcc vectorises, compiled for AVX2 and AVX-512 and
// picked at run time like cast.cpp's (PYCONV_CAST_ISA caps the choice here as well). The
// division in quantization is a true division (no reciprocal), as torch's x / s is.
#include "fp8.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cast.h"
#include "errors.h"

#if defined(__GNUC__)
#define PYCONV_FP8_INLINE inline __attribute__((always_inline))
#else
#define PYCONV_FP8_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PYCONV_FP8_X86 1
#else
#define PYCONV_FP8_X86 0
#endif

namespace pyconv {

namespace {

PYCONV_FP8_INLINE uint32_t select32(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

PYCONV_FP8_INLINE uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

PYCONV_FP8_INLINE float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

PYCONV_FP8_INLINE uint32_t f32_from_e4m3(uint8_t b) {
  const uint32_t sign = static_cast<uint32_t>(b & 0x80u) << 24;
  const uint32_t a = b & 0x7Fu;
  // Normal (exponent field >= 1): rebias 7 -> 127, mantissa 3 -> 23 bits.
  const uint32_t normal = (a << 20) + (120u << 23);
  // Subnormal: a * 2^-9, computed exactly from an integer so that no FTZ/DAZ setting of
  // the calling thread can touch it.
  const uint32_t subnormal = bits_of(static_cast<float>(static_cast<int32_t>(a)) * 0.001953125f);
  uint32_t r = select32(a < 8u, subnormal, normal);
  r = select32(a == 0x7Fu, 0x7FF00000u, r);
  return sign | r;
}

PYCONV_FP8_INLINE uint8_t e4m3_from_f32(uint32_t u) {
  const uint32_t sign = (u >> 24) & 0x80u;
  uint32_t a = u & 0x7FFFFFFFu;
  const bool nan = a > 0x7F800000u;
  a = select32(a > 0x43E00000u, 0x43E00000u, a);  // saturate at 448 (Inf too)
  // Normal result (a >= 2^-6): rebias 127 -> 7, RNE on the 20 dropped bits; a carry into
  // the exponent is what RNE wants. a <= 448 cannot round up to the NaN pattern.
  const uint32_t rebased = a - (120u << 23);
  const uint32_t normal = (rebased + 0x7FFFFu + ((rebased >> 20) & 1u)) >> 20;
  // Subnormal result (a < 2^-6): adding 2^14, whose ulp is 2^-9, makes the FPU round a
  // to a multiple of 2^-9 (RNE) and leaves the count of them in the low mantissa bits.
  // c10 does the same; it needs the default rounding mode, as torch's and our x / s do,
  // and is right under DAZ too (an fp32 subnormal rounds to 0 either way). Unlike a
  // per-lane shift it vectorises without AVX2.
  const uint32_t subnormal = bits_of(float_of(a) + 16384.0f) - 0x46800000u;
  uint32_t r = select32(a < 0x3C800000u, subnormal, normal);
  r = select32(nan, 0x7Fu, r);
  return static_cast<uint8_t>(sign | r);
}

// dst[i] = f32(src[i]) * s for a scale s that is not NaN.
PYCONV_FP8_INLINE void decode_scaled_span(const unsigned char* __restrict src, float s, float* __restrict dst, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = float_of(f32_from_e4m3(src[i])) * s;
}

// The largest |x| as bits: for non-negative floats integer order is float order, and
// every NaN lies above Inf (0x7F800000).
PYCONV_FP8_INLINE uint32_t abs_max_span(const float* __restrict x, size_t n, uint32_t m) {
  for (size_t i = 0; i < n; ++i) {
    const uint32_t a = bits_of(x[i]) & 0x7FFFFFFFu;
    m = a > m ? a : m;
  }
  return m;
}

PYCONV_FP8_INLINE void encode_divided_span(const float* __restrict x, float s, unsigned char* __restrict q, size_t n) {
  for (size_t i = 0; i < n; ++i) q[i] = e4m3_from_f32(bits_of(x[i] / s));
}

// A row of n elements in blocks of `block` columns (the last may be partial). Blocks of
// 128 get loops of constant length: whole vectors, no remainder code.
PYCONV_FP8_INLINE void abs_max_row(const float* x, size_t n, size_t block, uint32_t* m) {
  size_t c = 0, k = 0;
  if (block == 128)
    for (; c + 128 <= n; c += 128, ++k) m[k] = abs_max_span(x + c, 128, m[k]);
  for (; c < n; c += block, ++k) m[k] = abs_max_span(x + c, std::min(block, n - c), m[k]);
}

PYCONV_FP8_INLINE void encode_row(const float* x, size_t n, size_t block, const float* scales, unsigned char* q) {
  size_t c = 0, k = 0;
  if (block == 128)
    for (; c + 128 <= n; c += 128, ++k) encode_divided_span(x + c, scales[k], q + c, 128);
  for (; c < n; c += block, ++k) encode_divided_span(x + c, scales[k], q + c, std::min(block, n - c));
}

using DecodeKernel = void (*)(const unsigned char*, float, float*, size_t);
using AbsMaxKernel = void (*)(const float*, size_t, size_t, uint32_t*);
using EncodeKernel = void (*)(const float*, size_t, size_t, const float*, unsigned char*);

struct Fp8Kernels {
  DecodeKernel decode;
  AbsMaxKernel abs_max;
  EncodeKernel encode;
};

// One copy of each loop per instruction set.
#define PYCONV_FP8_VARIANT(suffix, attributes)                                                                  \
  attributes void decode_##suffix(const unsigned char* s, float k, float* d, size_t n) {                       \
    decode_scaled_span(s, k, d, n);                                                                           \
  }                                                                                                           \
  attributes void abs_max_##suffix(const float* x, size_t n, size_t block, uint32_t* m) {                      \
    abs_max_row(x, n, block, m);                                                                              \
  }                                                                                                           \
  attributes void encode_##suffix(const float* x, size_t n, size_t block, const float* scales, unsigned char* q) { \
    encode_row(x, n, block, scales, q);                                                                       \
  }

PYCONV_FP8_VARIANT(portable, )
#if PYCONV_FP8_X86
PYCONV_FP8_VARIANT(avx2, __attribute__((target("avx2"))))
PYCONV_FP8_VARIANT(avx512, __attribute__((target("avx512f,avx512bw,avx512vl"))))
#endif

Fp8Kernels select_kernels() {
  const char* cap = std::getenv("PYCONV_CAST_ISA");
  const std::string limit = cap ? cap : "";
#if PYCONV_FP8_X86
  __builtin_cpu_init();
  const bool allow512 = limit.empty() || limit == "avx512";
  const bool allow2 = allow512 || limit == "avx2";
  if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    return {decode_avx512, abs_max_avx512, encode_avx512};
  if (allow2 && __builtin_cpu_supports("avx2")) return {decode_avx2, abs_max_avx2, encode_avx2};
#endif
  return {decode_portable, abs_max_portable, encode_portable};
}

const Fp8Kernels& kernels() {
  static const Fp8Kernels selected = select_kernels();
  return selected;
}

bool is_float16ish(DType d) { return d == DType::F32 || d == DType::BF16 || d == DType::F16; }

float load_f32(const unsigned char* p) {
  float f;
  std::memcpy(&f, p, sizeof(f));
  return f;
}

constexpr size_t kPiece = 1024;  // fp32 staging, on the stack
static_assert(kPiece == 8 * 128, "fp8_cast_elements' table of unit scales");

}  // namespace

uint32_t e4m3fn_to_f32_bits(uint8_t b) { return f32_from_e4m3(b); }
uint8_t f32_to_e4m3fn_bits(uint32_t u) { return e4m3_from_f32(u); }

bool fp8_cast_supported(DType src, DType dst) {
  return (src == DType::F8_E4M3 && is_float16ish(dst)) || (is_float16ish(src) && dst == DType::F8_E4M3);
}

void fp8_cast_elements(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t n) {
  if (!fp8_cast_supported(src_dtype, dst_dtype))
    throw FormatError(std::string("unsupported cast ") + dtype_name(src_dtype) + " -> " + dtype_name(dst_dtype));
  const unsigned char* s = static_cast<const unsigned char*>(src);
  unsigned char* d = static_cast<unsigned char*>(dst);
  float tmp[kPiece];
  const size_t src_isz = dtype_itemsize(src_dtype), dst_isz = dtype_itemsize(dst_dtype);
  for (size_t i = 0; i < n; i += kPiece) {
    const size_t m = std::min(kPiece, n - i);
    if (src_dtype == DType::F8_E4M3) {
      kernels().decode(s + i, 1.0f, tmp, m);  // x * 1 is x, NaNs included
      if (dst_dtype == DType::BF16) {
        // Every e4m3fn value is exact in bf16; torch's scalar path makes every NaN 0x7FC0.
        for (size_t k = 0; k < m; ++k) {
          const uint32_t u = bits_of(tmp[k]);
          const uint16_t h = static_cast<uint16_t>((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : u >> 16);
          std::memcpy(d + (i + k) * 2, &h, 2);
        }
      } else {
        cast_elements(tmp, DType::F32, d + i * dst_isz, dst_dtype, m);
      }
    } else {
      cast_elements(s + i * src_isz, src_dtype, tmp, DType::F32, m);  // exact widening (NaNs stay NaNs, sign kept)
      // x / 1 is x: the quantizer's own loop (128-column blocks of scale 1), so the codec
      // tests reach it.
      static const float ones[kPiece / 128] = {1, 1, 1, 1, 1, 1, 1, 1};
      kernels().encode(tmp, m, 128, ones, d + i);
    }
  }
}

void dequantize_e4m3_row(const unsigned char* src, const unsigned char* scale_row, uint64_t col0, uint64_t block,
                         void* dst, DType dst_dtype, size_t n) {
  if (!is_float16ish(dst_dtype)) throw FormatError(std::string("cannot dequantize F8_E4M3 to ") + dtype_name(dst_dtype));
  const DecodeKernel decode = kernels().decode;
  unsigned char* out = static_cast<unsigned char*>(dst);
  const size_t isz = dtype_itemsize(dst_dtype);
  float tmp[kPiece];
  for (size_t i = 0; i < n; i += kPiece) {
    const size_t m = std::min(kPiece, n - i);
    for (size_t k = 0; k < m;) {
      const uint64_t col = col0 + i + k;
      const uint64_t b = col / block;
      const size_t seg = static_cast<size_t>(std::min<uint64_t>(m - k, (b + 1) * block - col));
      const float s = load_f32(scale_row + b * 4);
      if (s != s) {
        std::fill(tmp + k, tmp + k + seg, float_of(bits_of(s) | 0x00400000u));
      } else {
        decode(src + i + k, s, tmp + k, seg);
      }
      k += seg;
    }
    cast_elements(tmp, DType::F32, out + i * isz, dst_dtype, m);
  }
}

float e4m3_block_scale(float amax) {
  if (amax != amax) return float_of(0x7FC00000u);
  return std::max(amax, kE4M3MinAmax) / kE4M3Max;
}

void quantize_e4m3_band(const float* x, size_t ld_x, size_t rows, size_t cols, size_t block, unsigned char* q,
                        size_t ld_q, float* scales) {
  if (block == 0 || cols == 0) return;
  const Fp8Kernels& k = kernels();
  const size_t blocks = (cols + block - 1) / block;
  std::vector<uint32_t> amax(blocks, 0);
  for (size_t r = 0; r < rows; ++r) k.abs_max(x + r * ld_x, cols, block, amax.data());
  for (size_t b = 0; b < blocks; ++b) scales[b] = e4m3_block_scale(float_of(amax[b]));
  for (size_t r = 0; r < rows; ++r) k.encode(x + r * ld_x, cols, block, scales, q + r * ld_q);
}

}  // namespace pyconv
