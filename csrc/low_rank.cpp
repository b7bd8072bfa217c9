#include "low_rank.h"

#include <cmath>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace pyconv {

namespace {

// fma is exact (one rounding) in hardware and in libm alike, so both versions give the same
// bits. Accumulating with fma in k order is what CPU sgemm kernels do: the product matches
// torch's B @ A (and PEFT's merge) bit for bit at the ranks tested.
void accumulate_portable(const float* left, const float* right, uint64_t rank, uint64_t n, float* acc) {
  for (uint64_t k = 0; k < rank; ++k) {
    const float* r = right + k * n;
    for (uint64_t j = 0; j < n; ++j) acc[j] = std::fma(left[k], r[j], acc[j]);
  }
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma"))) void accumulate_fma(const float* left, const float* right, uint64_t rank,
                                                         uint64_t n, float* acc) {
  for (uint64_t k = 0; k < rank; ++k) {
    const __m256 l = _mm256_set1_ps(left[k]);
    const float* r = right + k * n;
    uint64_t j = 0;
    for (; j + 8 <= n; j += 8)
      _mm256_storeu_ps(acc + j, _mm256_fmadd_ps(l, _mm256_loadu_ps(r + j), _mm256_loadu_ps(acc + j)));
    for (; j < n; ++j) acc[j] = std::fma(left[k], r[j], acc[j]);
  }
}

const bool kHasFma = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
void accumulate_fma(const float* left, const float* right, uint64_t rank, uint64_t n, float* acc) {
  accumulate_portable(left, right, rank, n, acc);
}
const bool kHasFma = false;
#endif

}  // namespace

void add_low_rank_row(const float* left, const float* right, uint64_t rank, uint64_t n, float scale, float* acc,
                      float* row) {
  for (uint64_t j = 0; j < n; ++j) acc[j] = 0.0f;
  if (kHasFma) accumulate_fma(left, right, rank, n, acc);
  else accumulate_portable(left, right, rank, n, acc);
  for (uint64_t j = 0; j < n; ++j) row[j] = row[j] + acc[j] * scale;
}

}  // namespace pyconv
