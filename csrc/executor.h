// The block-copy executor: runs a plan of 2-D block copies from mapped source files
// into preallocated output files with positional writes on a thread pool.
//
// Every output tensor is viewed as a row-major 2-D array [rows, cols]. A BlockCopy
// fills the rectangle [dst_row, dst_row + rows) x [dst_col, dst_col + cols) of it from
// a source block whose first element lies at src_offset and whose rows are
// src_row_stride bytes apart (0 repeats one source row, as vocab padding does). A
// transposed copy reads a source block of cols x rows and writes its transpose (the
// HF Conv1D weights of GPT-2 are stored [in, out], Megatron's [out, in]).
// Work is cut into tasks of at most chunk_bytes of output where the bytes go file to file
// (copy_file_range), and of at most buffer_bytes where they pass through a buffer (casts,
// gathers): resident memory is bounded by threads x buffer_bytes, whatever the model size.
// Small buffers are also faster: a buffer still in the CPU caches is copied into the page
// cache several times faster than a 32 MiB one (measured: 2 GiB bf16 cast 3.1 s -> 0.8 s).
//
// fp8 with 128x128 block scales (DeepSeek-V3's F8_E4M3 weights and their float32
// `weight_scale_inv` grids, W[r][c] = q[r][c] * S[r/128][c/128]; see fp8.h):
// - a BlockCopy from an F8_E4M3 source that names its scale grid dequantizes into an
//   F32, BF16 or F16 tensor (in fp32, rounded once). The copy may start anywhere in the
//   weight (a TP cut inside a block): scale_row0/scale_col0 place it in the grid.
// - an OutputTensor with `quantize` set is F8_E4M3 and is written with its scale grid.
//   Its tasks are bands of 128 rows x a multiple of 128 columns, so each task sees whole
//   blocks: it gathers the band in fp32 512 columns at a time, takes each block's amax,
//   divides, and writes the fp8 rows and the band's run of the scale row. A task holds
//   its fp8 band, 128 x width bytes (width the largest multiple of 128 within chunk_bytes,
//   at least 128), plus a 256 KiB fp32 tile: per thread max(chunk_bytes, 16 KiB) + 256 KiB.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dtype.h"

namespace pyconv {

constexpr uint32_t kNoScale = UINT32_MAX;   // BlockCopy::scale_source of an unscaled copy

// A low-rank update merged into a copy (a LoRA adapter's scale * B @ A): the copy's element
// (i, j) becomes W[i][j] + scale * sum_k L[i][k] * R[k][j], in fp32, each term added in order
// (scale * (L @ R) rounded to fp32, then added, as PEFT's merge does), then rounded once to the
// output dtype. L[i][k] lies at left_offset + i * left_row_stride + k * left_k_stride of
// Plan::sources[left_source], R[k][j] at right_offset + k * right_k_stride + j * right_col_stride:
// (i, j) are the copy's own rows and columns, so a TP shard of a merged weight names the rows of
// B and the columns of A it covers. F32, BF16 or F16 factors; strides in bytes.
constexpr uint64_t kMaxLowRank = 16384;  // bounds the executor's per-thread fp32 tile of R

struct LowRankTerm {
  uint32_t left_source;
  uint64_t left_offset, left_row_stride, left_k_stride;
  DType left_dtype;
  uint32_t right_source;
  uint64_t right_offset, right_k_stride, right_col_stride;
  DType right_dtype;
  uint64_t rank;
  float scale;
};
constexpr uint64_t kQuantizeBlock = 128;    // block edge of the scales quantization writes

struct BlockCopy {
  uint32_t source;          // index into Plan::sources
  uint64_t src_offset;      // absolute byte offset of the block's first element
  uint64_t src_row_stride;  // bytes between consecutive block rows in the source
  DType src_dtype;
  uint64_t rows, cols;      // extent in elements
  uint64_t dst_row, dst_col;
  bool transpose = false;
  // Block-scaled F8_E4M3 source: its float32 scale grid. The scale of the copy's source
  // element (i, j) is at scale_offset + ((scale_row0 + i) / scale_block) * scale_row_stride
  // + ((scale_col0 + j) / scale_block) * 4 in Plan::sources[scale_source].
  uint32_t scale_source = kNoScale;
  uint64_t scale_offset = 0;      // absolute byte offset of the whole weight's S[0][0]
  uint64_t scale_row_stride = 0;  // bytes between grid rows
  uint64_t scale_row0 = 0;        // row, in the whole source weight, of the copy's first element
  uint64_t scale_col0 = 0;        // its column
  uint64_t scale_block = 128;
  // Merged low-rank updates (not with a transposed copy, block scales or a quantized tensor).
  std::vector<LowRankTerm> low_rank;
};

struct OutputTensor {
  uint32_t dest;    // index into Plan::dests
  uint64_t offset;  // absolute byte offset in the destination file
  DType dtype;
  uint64_t rows, cols;
  std::vector<BlockCopy> copies;  // must tile [rows, cols] exactly: inside it, disjoint, covering it
  // Quantize (dtype F8_E4M3): the float32 grid [ceil(rows/128), ceil(cols/128)] of
  // scales goes to scale_offset in the same file (no other tensor may cover it).
  bool quantize = false;
  uint64_t scale_offset = 0;
  // Compare mode only: the other side's copies, gathered like `copies` and compared with them.
  std::vector<BlockCopy> other_copies;
};

struct Literal {  // bytes the plan writes verbatim (headers, archive records)
  uint32_t dest;
  uint64_t offset;
  std::string bytes;
};

struct DestFile {
  std::string path;
  uint64_t size;
};

struct Plan {
  std::vector<std::string> sources;
  std::vector<DestFile> dests;
  std::vector<Literal> literals;
  std::vector<OutputTensor> tensors;
};

struct ExecOptions {
  unsigned threads = 4;
  uint64_t chunk_bytes = 32ull << 20;   // tasks copied file to file
  uint64_t buffer_bytes = 1ull << 20;   // tasks that go through a buffer
  bool fsync = true;
};

struct ExecStats {
  uint64_t bytes_written = 0;   // tensor and literal bytes
  uint64_t tasks = 0;
  uint64_t direct_tasks = 0;    // tasks copied file-to-file without a user buffer
  double seconds = 0;
};

// Called from the calling thread about every 100 ms with (bytes done, bytes total);
// returning false cancels the run (a Cancelled exception is thrown).
using ProgressTick = std::function<bool(uint64_t, uint64_t)>;

// Validates the whole plan (indices, dtypes, casts, every byte range against the
// file sizes, exact tiling of each tensor by disjoint copies, no two tensors, scale grids
// or literals of a file overlapping), creates and preallocates the destination files,
// runs the copies, fsyncs. Throws FormatError, IoError or Cancelled.
ExecStats execute_plan(const Plan& plan, const ExecOptions& options, const ProgressTick& tick);

// The same validation alone, for an executor that runs the copies itself (`--device cuda`):
// the sources are opened read-only to check their ranges; no destination is touched.
// Throws FormatError (or IoError when a source cannot be mapped).
void validate_plan(const Plan& plan);

// Compare mode (`pyconv verify`): nothing is written. Each tensor is gathered twice, from
// `copies` and from `other_copies`, task by task (so memory stays at 2 x chunk_bytes per
// thread), and the two are compared: bit for bit, or, with a tolerance, as numbers
// (|a - b| <= atol + rtol * |b|, NaN equal to NaN at the same place) — gather as F32 then.
struct CompareOptions {
  bool bitwise = true;
  double atol = 0, rtol = 0;
};

struct TensorComparison {
  uint64_t differing = 0;              // elements that differ
  double max_abs_diff = 0;             // over differing finite pairs (floats; 0 for integers)
  uint64_t first_index = UINT64_MAX;   // flat index of the first differing element
};

std::vector<TensorComparison> compare_plan(const Plan& plan, const ExecOptions& options, const CompareOptions& compare,
                                           const ProgressTick& tick);

}  // namespace pyconv
