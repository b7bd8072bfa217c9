// Element-wise casts that reproduce torch 2.13's CPU Tensor.to() bit for bit.
//
// What torch does (measured on an AVX-512 machine, CPU capability "AVX512"; see
// tests/test_casts.py, which uses torch as the judge):
//   finite values, +-Inf, +-0: round to nearest, ties to even; subnormals are kept
//     (no flush to zero on input or output), overflow goes to +-Inf, for every
//     conversion, length, offset, thread count and layout.
//   NaNs differ by conversion (sign and payload being the fp32 ones):
//     fp32 -> bf16  0xFFFF for every NaN. This is the AVX-512 body's constant, and on
//                   contiguous tensors torch also runs its masked tail through it, so
//                   it holds for every length and offset. (Non-contiguous tensors
//                   take torch's scalar path and give 0x7FC0; we copy rows, which are
//                   contiguous.)
//     fp32 -> fp16  sign | 0x7E00 | payload >> 13: quieted, payload truncated
//                   (vcvtps2ph), everywhere.
//     bf16 -> fp32  the bits shifted left by 16: a signalling NaN stays signalling.
//     fp16 -> fp32  sign | 0x7FC00000 | payload << 13: quieted (vcvtph2ps). Torch
//                   converts contiguous fp16 in blocks of 8 and sends the last
//                   (count mod 8) elements of each thread's range through a scalar
//                   path that returns 0x7FFFFFFF for any NaN; so a NaN among the last
//                   < 8 elements of a tensor (or of a thread's share of one) comes
//                   out as 0x7FFFFFFF. We follow the block rule, which is what torch
//                   gives for every element of a tensor whose per-thread ranges are
//                   multiples of 8 (weights of any realistic shape) and cannot
//                   depend on how a plan cuts a tensor into rows.
//     bf16 -> fp16  as fp32 -> fp16 of the widened bits (quieted, payload kept).
//     fp16 -> bf16  0x7FC0 for every NaN (torch goes through its scalar c10::BFloat16).
//
// Speed: each conversion is one loop of branchless integer arithmetic that gcc and
// clang vectorise (selects become blends). The same loop is compiled for AVX2 and
// AVX-512BW and picked at run time, the portable build of the same source being the
// fallback; conversions to fp16 and fp16 -> fp32 use F16C where the CPU has it. Every
// variant gives the same bits (checked over all 2^32 fp32 inputs). Nothing depends on
// the floating-point environment (rounding mode, FTZ/DAZ) of the calling thread.
#include "cast.h"

#include <cstdlib>
#include <cstring>
#include <string>

#include "errors.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

#if defined(__GNUC__)
#define PYCONV_INLINE inline __attribute__((always_inline))
#else
#define PYCONV_INLINE inline
#endif

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define PYCONV_CAST_X86 1
#else
#define PYCONV_CAST_X86 0
#endif

namespace pyconv {

namespace {

// cond ? a : b as mask arithmetic: a chain of ?: can reach the vectoriser as branches.
PYCONV_INLINE uint32_t select(bool cond, uint32_t a, uint32_t b) {
  const uint32_t mask = 0u - static_cast<uint32_t>(cond);
  return (a & mask) | (b & ~mask);
}

PYCONV_INLINE uint16_t bf16_from_f32(uint32_t u) {
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;  // RNE on the 16 dropped bits
  return static_cast<uint16_t>(select((u & 0x7FFFFFFFu) > 0x7F800000u, 0xFFFFu, rounded));
}

PYCONV_INLINE uint32_t f32_from_bf16(uint16_t h) { return static_cast<uint32_t>(h) << 16; }

PYCONV_INLINE uint16_t f16_from_f32(uint32_t u) {
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7FFFFFFFu;
  // Normal result (a in [2^-14, 65520)): rebias the exponent 127 -> 15, RNE on 13 bits.
  // The rounding may carry into the exponent, which is what RNE wants.
  const uint32_t rebased = a - 0x38000000u;
  const uint32_t normal = (rebased + 0xFFFu + ((rebased >> 13) & 1u)) >> 13;
  // Subnormal result (a < 2^-14): the value in units of 2^-24 is mant >> shift, with
  // the same RNE formula on the dropped bits. shift >= 25 gives 0 (below half the
  // smallest subnormal); clamping to 31 keeps the shift defined for tiny exponents.
  const uint32_t exp = a >> 23;
  const uint32_t mant = (a & 0x7FFFFFu) | 0x800000u;
  uint32_t shift = 126u - exp;  // only used when exp <= 112, so shift >= 14
  shift = select(shift > 31u, 31u, shift);
  const uint32_t subnormal = (mant + ((1u << shift) >> 1) - 1u + ((mant >> shift) & 1u)) >> shift;
  const uint32_t nan = 0x7E00u | ((a >> 13) & 0x3FFu);  // quiet, payload truncated
  uint32_t r = select(a < 0x38800000u, subnormal, normal);
  r = select(a >= 0x477FF000u, 0x7C00u, r);  // rounds to >= 65520: Inf (also Inf itself)
  r = select(a > 0x7F800000u, nan, r);
  return static_cast<uint16_t>(sign | r);
}

PYCONV_INLINE uint32_t f32_from_f16(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t a = h & 0x7FFFu;
  const uint32_t e = a & 0x7C00u;
  const uint32_t normal = (a << 13) + 0x38000000u;  // rebias 15 -> 127
  const uint32_t inf_nan = (a << 13) | 0x7F800000u | (static_cast<uint32_t>(a > 0x7C00u) << 22);  // NaN quieted
  // Subnormal: a * 2^-24, a normal fp32 for a >= 1. Integer -> float and the scaling by
  // a power of two are exact, so the rounding mode and FTZ/DAZ cannot change the bits.
  const float sub_value = static_cast<float>(static_cast<int32_t>(a)) * 5.9604644775390625e-8f;  // 2^-24
  uint32_t subnormal;
  std::memcpy(&subnormal, &sub_value, sizeof(subnormal));
  uint32_t r = select(e == 0, subnormal, normal);
  r = select(e == 0x7C00u, inf_nan, r);
  return sign | r;
}

PYCONV_INLINE uint16_t f16_from_bf16(uint16_t h) { return f16_from_f32(f32_from_bf16(h)); }

PYCONV_INLINE uint16_t bf16_from_f16(uint16_t h) {
  const uint32_t f = f32_from_f16(h);  // exact for non-NaN
  const uint32_t rounded = (f + 0x7FFFu + ((f >> 16) & 1u)) >> 16;
  return static_cast<uint16_t>(select((h & 0x7FFFu) > 0x7C00u, 0x7FC0u, rounded));
}

// One element at a time through memcpy, so unaligned buffers are fine; the compiler
// turns the loop into unaligned vector loads and stores.
template <typename Src, typename Dst, Dst (*Convert)(Src)>
PYCONV_INLINE void convert_span(const void* src, void* dst, size_t n) {
  const unsigned char* __restrict s = static_cast<const unsigned char*>(src);
  unsigned char* __restrict d = static_cast<unsigned char*>(dst);
  for (size_t i = 0; i < n; ++i) {
    Src in;
    std::memcpy(&in, s + i * sizeof(Src), sizeof(Src));
    const Dst out = Convert(in);
    std::memcpy(d + i * sizeof(Dst), &out, sizeof(Dst));
  }
}

using Kernel = void (*)(const void*, void*, size_t);

template <typename Src, typename Dst, Dst (*Convert)(Src)>
void convert_portable(const void* src, void* dst, size_t n) {
  convert_span<Src, Dst, Convert>(src, dst, n);
}

#if PYCONV_CAST_X86
template <typename Src, typename Dst, Dst (*Convert)(Src)>
__attribute__((target("avx2"))) void convert_avx2(const void* src, void* dst, size_t n) {
  convert_span<Src, Dst, Convert>(src, dst, n);
}

template <typename Src, typename Dst, Dst (*Convert)(Src)>
__attribute__((target("avx512f,avx512bw,avx512vl"))) void convert_avx512(const void* src, void* dst, size_t n) {
  convert_span<Src, Dst, Convert>(src, dst, n);
}

// To fp16 with vcvtps2ph, the instruction torch itself uses: 2-4x the speed of the
// integer loop. Rounding comes from the immediate (not MXCSR), NaNs are quieted with
// their payload truncated, fp16 subnormals are produced (FTZ does not apply) and fp32
// subnormal inputs give +-0 with or without DAZ: the same bits as f16_from_f32, checked
// over all 2^32 inputs. The remainder goes through the integer loop.
__attribute__((target("avx2,f16c"))) void f32_to_f16_f16c(const void* src, void* dst, size_t n) {
  const unsigned char* s = static_cast<const unsigned char*>(src);
  unsigned char* d = static_cast<unsigned char*>(dst);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(reinterpret_cast<const float*>(s + 4 * i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
  convert_span<uint32_t, uint16_t, f16_from_f32>(s + 4 * i, d + 2 * i, n - i);
}

__attribute__((target("avx2,f16c"))) void bf16_to_f16_f16c(const void* src, void* dst, size_t n) {
  const unsigned char* s = static_cast<const unsigned char*>(src);
  unsigned char* d = static_cast<unsigned char*>(dst);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 2 * i));
    const __m256 x = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + 2 * i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
  }
  convert_span<uint16_t, uint16_t, f16_from_bf16>(s + 2 * i, d + 2 * i, n - i);
}

// fp16 -> fp32 with vcvtph2ps (what torch's block path runs): NaNs quieted with sign and
// payload kept, subnormals widened exactly whatever DAZ says; same bits as f32_from_f16.
__attribute__((target("avx2,f16c"))) void f16_to_f32_f16c(const void* src, void* dst, size_t n) {
  const unsigned char* s = static_cast<const unsigned char*>(src);
  unsigned char* d = static_cast<unsigned char*>(dst);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + 2 * i));
    _mm256_storeu_ps(reinterpret_cast<float*>(d + 4 * i), _mm256_cvtph_ps(h));
  }
  convert_span<uint16_t, uint32_t, f32_from_f16>(s + 2 * i, d + 4 * i, n - i);
}
#endif

struct CastKernels {
  const char* isa;
  Kernel f32_bf16, f32_f16, bf16_f32, f16_f32, bf16_f16, f16_bf16;
};

#define PYCONV_CAST_KERNELS(isa_name, variant)                                                     \
  CastKernels {                                                                                   \
    isa_name, &variant<uint32_t, uint16_t, bf16_from_f32>, &variant<uint32_t, uint16_t, f16_from_f32>, \
        &variant<uint16_t, uint32_t, f32_from_bf16>, &variant<uint16_t, uint32_t, f32_from_f16>,  \
        &variant<uint16_t, uint16_t, f16_from_bf16>, &variant<uint16_t, uint16_t, bf16_from_f16>  \
  }

#if PYCONV_CAST_X86
void use_f16c_if_present(CastKernels& k) {
  if (!__builtin_cpu_supports("f16c")) return;
  k.f32_f16 = f32_to_f16_f16c;
  k.bf16_f16 = bf16_to_f16_f16c;
  k.f16_f32 = f16_to_f32_f16c;
}
#endif

// The widest variant the CPU (and OS) supports. PYCONV_CAST_ISA=portable|avx2|avx512
// caps it, so tests can check that every variant gives the same bits.
CastKernels select_kernels() {
  const char* cap = std::getenv("PYCONV_CAST_ISA");
  const std::string limit = cap ? cap : "";
#if PYCONV_CAST_X86
  __builtin_cpu_init();
  const bool allow512 = limit.empty() || limit == "avx512";
  const bool allow2 = allow512 || limit == "avx2";
  if (allow512 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl")) {
    CastKernels k = PYCONV_CAST_KERNELS("avx512", convert_avx512);
    use_f16c_if_present(k);  // 256 bits wide is enough to reach memory bandwidth
    return k;
  }
  if (allow2 && __builtin_cpu_supports("avx2")) {
    CastKernels k = PYCONV_CAST_KERNELS("avx2", convert_avx2);
    use_f16c_if_present(k);
    return k;
  }
#endif
  return PYCONV_CAST_KERNELS("portable", convert_portable);
}

const CastKernels& kernels() {
  static const CastKernels selected = select_kernels();
  return selected;
}

bool is_float16ish(DType d) { return d == DType::F32 || d == DType::BF16 || d == DType::F16; }

}  // namespace

uint16_t f32_to_bf16_bits(uint32_t u) { return bf16_from_f32(u); }
uint16_t f32_to_f16_bits(uint32_t u) { return f16_from_f32(u); }
uint32_t bf16_to_f32_bits(uint16_t h) { return f32_from_bf16(h); }
uint32_t f16_to_f32_bits(uint16_t h) { return f32_from_f16(h); }
uint16_t bf16_to_f16_bits(uint16_t h) { return f16_from_bf16(h); }
uint16_t f16_to_bf16_bits(uint16_t h) { return bf16_from_f16(h); }

const char* cast_isa() { return kernels().isa; }

bool cast_supported(DType src, DType dst) {
  return src == dst || (is_float16ish(src) && is_float16ish(dst));
}

void cast_elements(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t n) {
  if (src_dtype == dst_dtype) {
    if (n != 0) std::memcpy(dst, src, n * dtype_itemsize(src_dtype));
    return;
  }
  const CastKernels& k = kernels();
  Kernel kernel = nullptr;
  using D = DType;
  if (src_dtype == D::F32 && dst_dtype == D::BF16) kernel = k.f32_bf16;
  else if (src_dtype == D::F32 && dst_dtype == D::F16) kernel = k.f32_f16;
  else if (src_dtype == D::BF16 && dst_dtype == D::F32) kernel = k.bf16_f32;
  else if (src_dtype == D::F16 && dst_dtype == D::F32) kernel = k.f16_f32;
  else if (src_dtype == D::BF16 && dst_dtype == D::F16) kernel = k.bf16_f16;
  else if (src_dtype == D::F16 && dst_dtype == D::BF16) kernel = k.f16_bf16;
  else throw FormatError(std::string("unsupported cast ") + dtype_name(src_dtype) + " -> " + dtype_name(dst_dtype));
  kernel(src, dst, n);
}

}  // namespace pyconv
