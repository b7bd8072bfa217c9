// The arithmetic of merging a low-rank update (LoRA) into one row of a weight, in fp32. Kept in
// its own file, compiled with -ffp-contract=off: every element is computed by the same sequence
// of roundings whatever the row's length or the compiler's vectorization, so a weight merged
// whole and the same weight merged shard by shard (tensor parallel) agree bit for bit.
#pragma once
#include <cstdint>

namespace pyconv {

// acc[j] = fma(left[k], right[k * n + j], acc[j]) for k < rank ascending, from 0; then
// row[j] = row[j] + acc[j] * scale, for j < n. acc is scratch of n floats.
void add_low_rank_row(const float* left, const float* right, uint64_t rank, uint64_t n, float scale, float* acc,
                      float* row);

}  // namespace pyconv
