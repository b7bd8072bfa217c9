#include "cast.h"

#include <cstring>
#include <string>

#include "errors.h"

namespace pyconv {

uint16_t f32_to_bf16_bits(uint32_t u) {
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

uint32_t bf16_to_f32_bits(uint16_t h) { return static_cast<uint32_t>(h) << 16; }

uint16_t f32_to_f16_bits(uint32_t u) {
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t abs = u & 0x7FFFFFFFu;
  if (abs > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((abs >> 13) & 0x3FFu));  // NaN
  if (abs >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: Inf
  if (abs < 0x38800000u) {
    // Result is subnormal (or zero): value = abs * 2^24 in units of the f16 subnormal step.
    if (abs < 0x33000000u) return static_cast<uint16_t>(sign);  // below half the smallest subnormal
    const uint32_t exp = abs >> 23;
    const uint32_t mant = (abs & 0x7FFFFFu) | 0x800000u;
    const uint32_t shift = 126u - exp;  // 14..24 for exp in [102, 112]
    const uint32_t q = mant >> shift;
    const uint32_t rem = mant & ((1u << shift) - 1u);
    const uint32_t half = 1u << (shift - 1u);
    const uint32_t rounded = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
    return static_cast<uint16_t>(sign | rounded);
  }
  // Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits.
  const uint32_t rebased = abs - 0x38000000u;
  const uint32_t rounded = (rebased + 0xFFFu + ((rebased >> 13) & 1u)) >> 13;
  return static_cast<uint16_t>(sign | rounded);
}

uint32_t f16_to_f32_bits(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  if (exp == 0x1Fu) return sign | 0x7F800000u | (mant << 13);  // Inf / NaN keeps its payload
  if (exp != 0) return sign | ((exp + 112u) << 23) | (mant << 13);
  if (mant == 0) return sign;
  // Subnormal: normalise.
  uint32_t e = 113;
  while ((mant & 0x400u) == 0) {
    mant <<= 1;
    --e;
  }
  return sign | (e << 23) | ((mant & 0x3FFu) << 13);
}

namespace {

template <typename Src, typename Dst, typename Fn>
void convert_loop(const void* src, void* dst, size_t n, Fn fn) {
  const unsigned char* s = static_cast<const unsigned char*>(src);
  unsigned char* d = static_cast<unsigned char*>(dst);
  for (size_t i = 0; i < n; ++i) {
    Src in;
    std::memcpy(&in, s + i * sizeof(Src), sizeof(Src));
    const Dst out = fn(in);
    std::memcpy(d + i * sizeof(Dst), &out, sizeof(Dst));
  }
}

bool is_float16ish(DType d) { return d == DType::F32 || d == DType::BF16 || d == DType::F16; }

}  // namespace

bool cast_supported(DType src, DType dst) {
  return src == dst || (is_float16ish(src) && is_float16ish(dst));
}

void cast_elements(const void* src, DType src_dtype, void* dst, DType dst_dtype, size_t n) {
  if (src_dtype == dst_dtype) {
    std::memcpy(dst, src, n * dtype_itemsize(src_dtype));
    return;
  }
  using D = DType;
  if (src_dtype == D::F32 && dst_dtype == D::BF16) return convert_loop<uint32_t, uint16_t>(src, dst, n, f32_to_bf16_bits);
  if (src_dtype == D::F32 && dst_dtype == D::F16) return convert_loop<uint32_t, uint16_t>(src, dst, n, f32_to_f16_bits);
  if (src_dtype == D::BF16 && dst_dtype == D::F32) return convert_loop<uint16_t, uint32_t>(src, dst, n, bf16_to_f32_bits);
  if (src_dtype == D::F16 && dst_dtype == D::F32) return convert_loop<uint16_t, uint32_t>(src, dst, n, f16_to_f32_bits);
  if (src_dtype == D::BF16 && dst_dtype == D::F16)
    return convert_loop<uint16_t, uint16_t>(src, dst, n, [](uint16_t h) { return f32_to_f16_bits(bf16_to_f32_bits(h)); });
  if (src_dtype == D::F16 && dst_dtype == D::BF16)
    return convert_loop<uint16_t, uint16_t>(src, dst, n, [](uint16_t h) { return f32_to_bf16_bits(f16_to_f32_bits(h)); });
  throw FormatError(std::string("unsupported cast ") + dtype_name(src_dtype) + " -> " + dtype_name(dst_dtype));
}

}  // namespace pyconv
