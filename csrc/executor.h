// The block-copy executor: runs a plan of 2-D block copies from mapped source files
// into preallocated output files with positional writes on a thread pool.
//
// Every output tensor is viewed as a row-major 2-D array [rows, cols]. A BlockCopy
// fills the rectangle [dst_row, dst_row + rows) x [dst_col, dst_col + cols) of it from
// a source block whose first element lies at src_offset and whose rows are
// src_row_stride bytes apart (0 repeats one source row, as vocab padding does). A
// transposed copy reads a source block of cols x rows and writes its transpose (the
// HF Conv1D weights of GPT-2 are stored [in, out], Megatron's [out, in]).
// Work is cut into tasks of at most chunk_bytes of output, so resident memory is
// bounded by threads x chunk_bytes, whatever the model size.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "dtype.h"

namespace pyconv {

struct BlockCopy {
  uint32_t source;          // index into Plan::sources
  uint64_t src_offset;      // absolute byte offset of the block's first element
  uint64_t src_row_stride;  // bytes between consecutive block rows in the source
  DType src_dtype;
  uint64_t rows, cols;      // extent in elements
  uint64_t dst_row, dst_col;
  bool transpose = false;
};

struct OutputTensor {
  uint32_t dest;    // index into Plan::dests
  uint64_t offset;  // absolute byte offset in the destination file
  DType dtype;
  uint64_t rows, cols;
  std::vector<BlockCopy> copies;  // must tile [rows, cols] exactly
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
  uint64_t chunk_bytes = 32ull << 20;
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
// file sizes, exact tiling by area), creates and preallocates the destination
// files, runs the copies, fsyncs. Throws FormatError, IoError or Cancelled.
ExecStats execute_plan(const Plan& plan, const ExecOptions& options, const ProgressTick& tick);

}  // namespace pyconv
