#include "executor.h"
#include "low_rank.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <iterator>
#include <map>
#include <memory>
#include <mutex>
#include <thread>

#include "cast.h"
#include "errors.h"
#include "fp8.h"
#include "mapped_file.h"
#include "sigbus_guard.h"
#include "output_file.h"
#include "safetensors.h"

namespace pyconv {

namespace {

std::string errno_text(int err) { return std::strerror(err); }

// A rectangle of one output tensor, contiguous in the destination file: whole rows,
// or a column range of a single row. A quantized tensor's task is a band of up to 128
// rows x a column range at multiples of 128 (see executor.h), not always contiguous.
struct Task {
  uint32_t tensor;
  uint64_t row0, row1, col0, col1;
  // File to file (merge_direct_runs): the bytes of this task, and of the tasks merged into it
  // (small tensors back to back in the source and in the destination), copied with one system
  // call from run_source at run_src_offset. 0: the task goes through a buffer.
  uint64_t run_bytes = 0;
  uint32_t run_source = 0;
  uint64_t run_src_offset = 0;
};

struct Intersection {
  uint64_t row0, row1, col0, col1;
};

bool intersect(const BlockCopy& c, const Task& t, Intersection* out) {
  out->row0 = std::max(t.row0, c.dst_row);
  out->row1 = std::min(t.row1, c.dst_row + c.rows);
  out->col0 = std::max(t.col0, c.dst_col);
  out->col1 = std::min(t.col1, c.dst_col + c.cols);
  return out->row0 < out->row1 && out->col0 < out->col1;
}

uint64_t checked_area(uint64_t rows, uint64_t cols, uint64_t itemsize, const std::string& what) {
  uint64_t n, bytes;
  if (!checked_mul(rows, cols, &n) || !checked_mul(n, itemsize, &bytes)) throw FormatError(what + ": size overflows");
  return bytes;
}

bool is_float16ish(DType d) { return d == DType::F32 || d == DType::BF16 || d == DType::F16; }

// A copy whose source bytes are the output's bytes (no cast, transpose, scale or low-rank
// merge): it can go file to file.
bool copies_bytes_as_stored(const BlockCopy& c, DType dtype) {
  return c.src_dtype == dtype && !c.transpose && c.scale_source == kNoScale && c.low_rank.empty();
}

uint64_t ceil_div(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

// Bytes of a quantized tensor's float32 scale grid [ceil(rows/128), ceil(cols/128)].
uint64_t scale_grid_bytes(const OutputTensor& t) {
  return ceil_div(t.rows, kQuantizeBlock) * ceil_div(t.cols, kQuantizeBlock) * 4;
}

// Columns of a quantized band gathered in fp32 at a time: 128 x 512 x 4 = 256 KiB, which
// stays in L2 between the two passes over it.
constexpr uint64_t kQuantizeTileCols = 512;

// Per-worker buffers, grown on demand and kept for the next task.
struct Scratch {
  std::vector<unsigned char> bytes;
  std::vector<unsigned char> other;  // compare mode: the second side
  std::vector<float> f32;     // a tile of a quantized band, in fp32
  std::vector<float> scales;  // the band's scale row
};

class Runner {
 public:
  Runner(const Plan& plan, const ExecOptions& options, const CompareOptions* compare = nullptr)
      : plan_(plan), options_(options), compare_(compare) {
    install_sigbus_handler();
  }

  std::vector<TensorComparison> run_compare(const ProgressTick& tick) {
    open_sources();
    validate();
    comparisons_ = std::vector<TensorComparison>(plan_.tensors.size());
    comparison_locks_ = std::vector<std::mutex>(plan_.tensors.size());
    make_tasks();
    run_tasks(tick);
    return comparisons_;
  }

  void validate_only() {
    open_sources();
    validate();
  }

  ExecStats run(const ProgressTick& tick) {
    const auto start = std::chrono::steady_clock::now();
    open_sources();
    validate();
    open_dests();
    for (const auto& lit : plan_.literals) {
      dests_[lit.dest]->write(lit.offset, lit.bytes.data(), lit.bytes.size());
      stats_.bytes_written += lit.bytes.size();
    }
    make_tasks();
    run_tasks(tick);
    if (options_.fsync)
      for (const auto& d : dests_) d->sync();
    for (auto& d : dests_) d->close();
    stats_.bytes_written += done_bytes_.load();
    stats_.tasks = tasks_.size();
    stats_.direct_tasks = direct_tasks_.load();
    stats_.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return stats_;
  }

 private:
  void open_sources() {
    sources_.reserve(plan_.sources.size());
    for (const auto& path : plan_.sources) sources_.push_back(std::make_unique<MappedFile>(path));
  }

  // Every index, dtype pair and byte range is checked before a byte is written.
  void validate() {
    for (const auto& lit : plan_.literals) {
      if (lit.dest >= plan_.dests.size()) throw FormatError("plan: literal names destination " + std::to_string(lit.dest) + " of " + std::to_string(plan_.dests.size()));
      uint64_t end;
      if (!checked_add(lit.offset, lit.bytes.size(), &end) || end > plan_.dests[lit.dest].size)
        throw FormatError(plan_.dests[lit.dest].path + ": plan writes " + std::to_string(lit.bytes.size()) + " literal bytes at " +
                          std::to_string(lit.offset) + ", past the file size " + std::to_string(plan_.dests[lit.dest].size));
    }
    for (size_t ti = 0; ti < plan_.tensors.size(); ++ti) {
      const auto& t = plan_.tensors[ti];
      if (compare_) {
        const std::string where = "compared tensor #" + std::to_string(ti);
        checked_area(t.rows, t.cols, dtype_itemsize(t.dtype), where);
        if (t.quantize) throw FormatError(where + ": cannot quantize while comparing");
        validate_copies(t, t.copies, where + " (first side)");
        validate_copies(t, t.other_copies, where + " (second side)");
        continue;
      }
      if (t.dest >= plan_.dests.size()) throw FormatError("plan: tensor " + std::to_string(ti) + " names a missing destination");
      const auto& dest = plan_.dests[t.dest];
      const std::string where = dest.path + ": output tensor #" + std::to_string(ti);
      const uint64_t isz = dtype_itemsize(t.dtype);
      const uint64_t bytes = checked_area(t.rows, t.cols, isz, where);
      uint64_t end;
      if (!checked_add(t.offset, bytes, &end) || end > dest.size)
        throw FormatError(where + " at offset " + std::to_string(t.offset) + " (" + std::to_string(bytes) + " bytes) runs past the file size " + std::to_string(dest.size));
      if (t.quantize) {
        if (t.dtype != DType::F8_E4M3) throw FormatError(where + ": quantizes to " + dtype_name(t.dtype) + "; only F8_E4M3 is supported");
        const uint64_t grid = scale_grid_bytes(t);  // cannot overflow: rows * cols * 1 did not
        if (!checked_add(t.scale_offset, grid, &end) || end > dest.size)
          throw FormatError(where + ": its scale grid at offset " + std::to_string(t.scale_offset) + " (" + std::to_string(grid) +
                            " bytes) runs past the file size " + std::to_string(dest.size));
      }
      validate_copies(t, t.copies, where);
    }
    if (!compare_) check_dest_ranges();
  }

  // No byte of a destination file is written twice: its tensors, their scale grids and its
  // literals are sorted by offset and each compared with the furthest-reaching range before it.
  void check_dest_ranges() const {
    struct Range {
      uint64_t begin, end;
      int kind;  // 0 tensor, 1 its scale grid, 2 literal
      size_t index;
    };
    const auto describe = [&](const Range& r) {
      const std::string span = " [" + std::to_string(r.begin) + ", " + std::to_string(r.end) + ")";
      if (r.kind == 0) return "output tensor #" + std::to_string(r.index) + span;
      if (r.kind == 1) return "the scale grid of output tensor #" + std::to_string(r.index) + span;
      return "literal #" + std::to_string(r.index) + span;
    };
    std::vector<std::vector<Range>> by_dest(plan_.dests.size());
    for (size_t i = 0; i < plan_.literals.size(); ++i) {
      const auto& lit = plan_.literals[i];
      if (!lit.bytes.empty()) by_dest[lit.dest].push_back({lit.offset, lit.offset + lit.bytes.size(), 2, i});
    }
    for (size_t i = 0; i < plan_.tensors.size(); ++i) {  // every range was bounds-checked above
      const auto& t = plan_.tensors[i];
      const uint64_t bytes = t.rows * t.cols * dtype_itemsize(t.dtype);
      if (bytes) by_dest[t.dest].push_back({t.offset, t.offset + bytes, 0, i});
      if (t.quantize && bytes) by_dest[t.dest].push_back({t.scale_offset, t.scale_offset + scale_grid_bytes(t), 1, i});
    }
    for (size_t d = 0; d < by_dest.size(); ++d) {
      auto& ranges = by_dest[d];
      std::sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
        return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
      });
      size_t reach = 0;  // the range seen so far that ends last
      for (size_t i = 1; i < ranges.size(); ++i) {
        if (ranges[i].begin < ranges[reach].end)
          throw FormatError(plan_.dests[d].path + ": " + describe(ranges[i]) + " overlaps " + describe(ranges[reach]));
        if (ranges[i].end > ranges[reach].end) reach = i;
      }
    }
  }

  // Every copy of one side of a tensor: indices, dtypes, byte ranges, exact tiling by area.
  void validate_copies(const OutputTensor& t, const std::vector<BlockCopy>& copies, const std::string& where) const {
    uint64_t covered = 0;
    for (const auto& c : copies) {
      if (c.source >= sources_.size()) throw FormatError(where + ": block copy names a missing source");
      check_copy_dtypes(c, t, where);
      uint64_t row_end, col_end;
      if (!checked_add(c.dst_row, c.rows, &row_end) || row_end > t.rows || !checked_add(c.dst_col, c.cols, &col_end) || col_end > t.cols)
        throw FormatError(where + ": block copy [" + std::to_string(c.dst_row) + "+" + std::to_string(c.rows) + ", " + std::to_string(c.dst_col) + "+" +
                          std::to_string(c.cols) + "] lies outside the tensor [" + std::to_string(t.rows) + ", " + std::to_string(t.cols) + "]");
      if (c.rows == 0 || c.cols == 0) continue;
      // Source block: rows x cols, or cols x rows read transposed.
      const uint64_t src_rows = c.transpose ? c.cols : c.rows, src_cols = c.transpose ? c.rows : c.cols;
      const uint64_t row_bytes = checked_area(1, src_cols, dtype_itemsize(c.src_dtype), where);
      uint64_t span, extent;
      if (!checked_mul(src_rows - 1, c.src_row_stride, &span) || !checked_add(span, row_bytes, &extent))
        throw FormatError(where + ": block copy source extent overflows");
      sources_[c.source]->check_range(c.src_offset, extent, "block copy source range");
      if (c.scale_source != kNoScale) check_scale_range(c, where);
      if (!c.low_rank.empty()) check_low_rank(c, t, where);
      covered += checked_area(c.rows, c.cols, 1, where);  // cannot overflow: the copies are disjoint (below)
    }
    check_disjoint(copies, where);
    if (covered != t.rows * t.cols)
      throw FormatError(where + ": block copies cover " + std::to_string(covered) + " of " + std::to_string(t.rows * t.cols) + " elements");
  }

  // No two copies write the same element; with every copy inside the tensor, disjoint copies
  // whose areas add up to the tensor's tile it exactly. A sweep down the rows keeps the column
  // intervals of the copies crossing the current row, disjoint, in a map by first column: a copy
  // entering need only be compared with its two neighbours there. O(n log n) for n copies.
  static void check_disjoint(const std::vector<BlockCopy>& copies, const std::string& where) {
    struct Event {
      uint64_t row;
      bool enter;
      size_t copy;
    };
    std::vector<Event> events;
    events.reserve(2 * copies.size());
    for (size_t i = 0; i < copies.size(); ++i) {
      const auto& c = copies[i];
      if (c.rows == 0 || c.cols == 0) continue;
      events.push_back({c.dst_row, true, i});
      events.push_back({c.dst_row + c.rows, false, i});
    }
    // Rows are half-open: at one row, copies ending leave before copies starting enter.
    std::sort(events.begin(), events.end(), [](const Event& a, const Event& b) {
      return a.row != b.row ? a.row < b.row : (a.enter != b.enter ? !a.enter : a.copy < b.copy);
    });
    std::map<uint64_t, size_t> active;  // dst_col -> copy
    const auto rect = [&](size_t i) {
      const auto& c = copies[i];
      return "#" + std::to_string(i) + " [" + std::to_string(c.dst_row) + "+" + std::to_string(c.rows) + ", " +
             std::to_string(c.dst_col) + "+" + std::to_string(c.cols) + "]";
    };
    const auto overlap = [&](size_t a, size_t b) {
      const auto& x = copies[std::min(a, b)];
      const auto& y = copies[std::max(a, b)];
      return FormatError(where + ": block copies " + rect(std::min(a, b)) + " and " + rect(std::max(a, b)) + " overlap in rows [" +
                         std::to_string(std::max(x.dst_row, y.dst_row)) + ", " + std::to_string(std::min(x.dst_row + x.rows, y.dst_row + y.rows)) +
                         "), columns [" + std::to_string(std::max(x.dst_col, y.dst_col)) + ", " +
                         std::to_string(std::min(x.dst_col + x.cols, y.dst_col + y.cols)) + ")");
    };
    for (const auto& e : events) {
      const auto& c = copies[e.copy];
      if (!e.enter) {
        active.erase(c.dst_col);
        continue;
      }
      const auto next = active.lower_bound(c.dst_col);
      if (next != active.end() && next->first < c.dst_col + c.cols) throw overlap(e.copy, next->second);
      if (next != active.begin()) {
        const size_t before = std::prev(next)->second;
        if (copies[before].dst_col + copies[before].cols > c.dst_col) throw overlap(e.copy, before);
      }
      active.emplace(c.dst_col, e.copy);
    }
  }

  // Which source dtype may feed which output, with or without block scales.
  void check_copy_dtypes(const BlockCopy& c, const OutputTensor& t, const std::string& where) const {
    const std::string from = dtype_name(c.src_dtype), to = dtype_name(t.dtype);
    if (c.scale_source != kNoScale) {
      if (c.scale_source >= sources_.size()) throw FormatError(where + ": block copy names a missing scale source");
      if (c.src_dtype != DType::F8_E4M3) throw FormatError(where + ": block scales given for a " + from + " source; only F8_E4M3 is block-scaled");
      if (c.scale_block == 0) throw FormatError(where + ": block copy has a scale block of 0");
      if (c.transpose) throw FormatError(where + ": a transposed copy of a block-scaled F8_E4M3 source is not supported");
      if (!t.quantize && !is_float16ish(t.dtype)) throw FormatError(where + ": cannot dequantize F8_E4M3 to " + to + " (F32, BF16 or F16)");
      return;
    }
    if (t.quantize) {
      if (!is_float16ish(c.src_dtype))
        throw FormatError(where + ": cannot quantize " + from + " to F8_E4M3 (F32, BF16, F16 or block-scaled F8_E4M3 sources)");
      return;
    }
    if (cast_supported(c.src_dtype, t.dtype)) return;
    if (c.src_dtype == DType::F8_E4M3 && is_float16ish(t.dtype))
      throw FormatError(where + ": cannot cast F8_E4M3 to " + to + " without its block scales");
    if (t.dtype == DType::F8_E4M3 && is_float16ish(c.src_dtype))
      throw FormatError(where + ": cannot cast " + from + " to F8_E4M3 unless the tensor is quantized with block scales");
    throw FormatError(where + ": cannot cast " + from + " to " + to);
  }

  // A copy's low-rank terms: float factors, a plain copy into a float tensor, every element of
  // L (rows x rank) and R (rank x cols) inside its source.
  void check_low_rank(const BlockCopy& c, const OutputTensor& t, const std::string& where) const {
    if (c.transpose || c.scale_source != kNoScale || t.quantize || compare_)
      throw FormatError(where + ": a low-rank update only merges into a plain, untransposed copy");
    if (!is_float16ish(c.src_dtype) || !is_float16ish(t.dtype))
      throw FormatError(where + ": a low-rank update merges into F32, BF16 or F16 weights, not " + dtype_name(c.src_dtype) +
                        " -> " + dtype_name(t.dtype));
    for (const auto& term : c.low_rank) {
      if (term.left_source >= sources_.size() || term.right_source >= sources_.size())
        throw FormatError(where + ": a low-rank term names a missing source");
      if (!is_float16ish(term.left_dtype) || !is_float16ish(term.right_dtype))
        throw FormatError(where + ": low-rank factors must be F32, BF16 or F16");
      if (term.rank == 0 || term.rank > kMaxLowRank)
        throw FormatError(where + ": a low-rank term of rank " + std::to_string(term.rank) + " (1 to " +
                          std::to_string(kMaxLowRank) + ")");
      check_strided(*sources_[term.left_source], term.left_offset, c.rows, term.left_row_stride, term.rank,
                    term.left_k_stride, dtype_itemsize(term.left_dtype), where + ": low-rank factor L");
      check_strided(*sources_[term.right_source], term.right_offset, term.rank, term.right_k_stride, c.cols,
                    term.right_col_stride, dtype_itemsize(term.right_dtype), where + ": low-rank factor R");
    }
  }

  // The elements offset + i * stride_i + k * stride_k (i < n_i, k < n_k) of a source, in range.
  static void check_strided(const MappedFile& src, uint64_t offset, uint64_t n_i, uint64_t stride_i, uint64_t n_k,
                            uint64_t stride_k, uint64_t isz, const std::string& what) {
    uint64_t a, b, span, extent;
    if (!checked_mul(n_i - 1, stride_i, &a) || !checked_mul(n_k - 1, stride_k, &b) || !checked_add(a, b, &span) ||
        !checked_add(span, isz, &extent))
      throw FormatError(what + ": extent overflows");
    src.check_range(offset, extent, what.c_str());
  }

  // The grid entries a scaled copy reads: rows (scale_row0 .. + rows-1) / block, columns
  // (scale_col0 .. + cols-1) / block, as one byte range of the scale source.
  void check_scale_range(const BlockCopy& c, const std::string& where) const {
    const uint64_t b = c.scale_block;
    uint64_t last_row, last_col, first, lead, span, extent;
    if (!checked_add(c.scale_row0, c.rows - 1, &last_row) || !checked_add(c.scale_col0, c.cols - 1, &last_col))
      throw FormatError(where + ": block copy scale coordinates overflow");
    const uint64_t r0 = c.scale_row0 / b, r1 = last_row / b, k0 = c.scale_col0 / b, k1 = last_col / b;
    if (!checked_mul(r0, c.scale_row_stride, &lead) || !checked_add(c.scale_offset, lead, &first) || !checked_add(first, k0 * 4, &first) ||
        !checked_mul(r1 - r0, c.scale_row_stride, &span) || !checked_add(span, (k1 - k0 + 1) * 4, &extent))
      throw FormatError(where + ": block copy scale range overflows");
    sources_[c.scale_source]->check_range(first, extent, "block scale range");
  }

  void open_dests() {
    dests_.reserve(plan_.dests.size());
    for (const auto& d : plan_.dests) dests_.push_back(std::make_unique<OutputFile>(d.path, d.size));
  }

  // A tensor whose one copy covers it with its own dtype from contiguous rows goes file to
  // file in large tasks; anything cast, gathered or compared goes through small buffers.
  bool copies_file_to_file(const OutputTensor& t) const {
    if (compare_ || t.quantize) return false;
    for (const auto& c : t.copies)
      if (!copies_bytes_as_stored(c, t.dtype) || c.cols != t.cols ||
          (c.rows > 1 && c.src_row_stride != c.cols * dtype_itemsize(c.src_dtype)))
        return false;
    return true;
  }

  void make_tasks() {
    const uint64_t direct_chunk = std::max<uint64_t>(options_.chunk_bytes, 4096);
    const uint64_t buffer_chunk = std::max<uint64_t>(std::min(options_.buffer_bytes, direct_chunk), 4096);
    for (uint32_t ti = 0; ti < plan_.tensors.size(); ++ti) {
      const auto& t = plan_.tensors[ti];
      const uint64_t chunk = copies_file_to_file(t) ? direct_chunk : buffer_chunk;
      const uint64_t isz = dtype_itemsize(t.dtype);
      const uint64_t row_bytes = t.cols * isz;
      if (t.rows == 0 || row_bytes == 0) continue;
      total_bytes_ += t.rows * row_bytes;
      if (t.quantize) {
        // Bands of 128 rows x width columns: 128 x width fp8 bytes within the chunk.
        total_bytes_ += scale_grid_bytes(t);
        const uint64_t width = std::max<uint64_t>(1, chunk / (kQuantizeBlock * kQuantizeBlock)) * kQuantizeBlock;
        for (uint64_t r = 0; r < t.rows; r += kQuantizeBlock)
          for (uint64_t c = 0; c < t.cols; c += width)
            tasks_.push_back({ti, r, std::min(t.rows, r + kQuantizeBlock), c, std::min(t.cols, c + width)});
      } else if (row_bytes <= chunk) {
        const uint64_t step = std::max<uint64_t>(1, chunk / row_bytes);
        if (chunk == direct_chunk) {
          // File to file: tasks never straddle two copies, so each is one copy_file_range.
          for (const auto& c : t.copies)
            for (uint64_t r = c.dst_row; r < c.dst_row + c.rows; r += step)
              tasks_.push_back({ti, r, std::min(c.dst_row + c.rows, r + step), 0, t.cols});
        } else {
          for (uint64_t r = 0; r < t.rows; r += step) tasks_.push_back({ti, r, std::min(t.rows, r + step), 0, t.cols});
        }
      } else {
        const uint64_t step = std::max<uint64_t>(1, chunk / isz);
        for (uint64_t r = 0; r < t.rows; ++r)
          for (uint64_t c = 0; c < t.cols; c += step) tasks_.push_back({ti, r, r + 1, c, std::min(t.cols, c + step)});
      }
    }
    merge_direct_runs(direct_chunk);
    // Write each file front to back (the order sequential read-ahead and writeback like), and
    // interleave the files by how far into each a task lies, so that the threads, which take
    // tasks in this order, mostly write different files: writes to one file serialize on its
    // inode lock, and threads waiting there spin (perf: 8% of a Megatron relayout's samples).
    std::vector<uint64_t> dest_end;
    for (const auto& task : tasks_) {
      const auto& t = plan_.tensors[task.tensor];
      if (t.dest >= dest_end.size()) dest_end.resize(t.dest + 1, 1);
      dest_end[t.dest] = std::max(dest_end[t.dest], task_offset(task) + 1);
    }
    std::stable_sort(tasks_.begin(), tasks_.end(), [&](const Task& a, const Task& b) {
      const auto& ta = plan_.tensors[a.tensor];
      const auto& tb = plan_.tensors[b.tensor];
      if (ta.dest == tb.dest) return task_offset(a) < task_offset(b);
      // offset_a / end_a < offset_b / end_b, exactly.
      const unsigned __int128 fa = static_cast<unsigned __int128>(task_offset(a)) * dest_end[tb.dest];
      const unsigned __int128 fb = static_cast<unsigned __int128>(task_offset(b)) * dest_end[ta.dest];
      if (fa != fb) return fa < fb;
      return ta.dest < tb.dest;
    });
  }

  // Where a task's bytes come from when one copy covers it with the tensor's dtype and source
  // rows back to back, so that they can go file to file: (source index, source offset, length);
  // false otherwise.
  bool direct_span(const Task& task, uint32_t* source, uint64_t* src_offset, uint64_t* length) const {
    const auto& t = plan_.tensors[task.tensor];
    if (t.quantize) return false;
    const uint64_t isz = dtype_itemsize(t.dtype);
    Intersection hit;
    const BlockCopy* only = nullptr;
    for (const auto& c : t.copies)
      if (intersect(c, task, &hit)) {
        if (only) return false;
        only = &c;
      }
    if (!only || !copies_bytes_as_stored(*only, t.dtype)) return false;
    intersect(*only, task, &hit);
    if (hit.row0 != task.row0 || hit.row1 != task.row1 || hit.col0 != task.col0 || hit.col1 != task.col1) return false;
    if (task.row1 - task.row0 > 1 && only->src_row_stride != only->cols * isz) return false;
    *source = only->source;
    *src_offset = only->src_offset + (task.row0 - only->dst_row) * only->src_row_stride + (task.col0 - only->dst_col) * isz;
    *length = (task.row1 - task.row0) * (task.col1 - task.col0) * isz;
    return true;
  }

  // Tasks that copy file to file and lie back to back both in one source and in one destination
  // (the small tensors of an MoE checkpoint, say) become one task of up to chunk bytes: one
  // copy_file_range and one writeback per run instead of per tensor.
  void merge_direct_runs(uint64_t chunk) {
    if (compare_) return;
    std::vector<size_t> order(tasks_.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
      const uint32_t da = plan_.tensors[tasks_[a].tensor].dest, db = plan_.tensors[tasks_[b].tensor].dest;
      return da != db ? da < db : task_offset(tasks_[a]) < task_offset(tasks_[b]);
    });
    std::vector<Task> merged;
    merged.reserve(tasks_.size());
    uint32_t head_source = 0, source = 0;
    uint64_t head_src_end = 0, head_dst_end = 0, src_offset = 0, length = 0;
    bool head_direct = false;
    for (size_t i : order) {
      const Task& task = tasks_[i];
      const bool direct = direct_span(task, &source, &src_offset, &length);
      const uint64_t dst = task_offset(task);
      if (direct && head_direct && !merged.empty() &&
          plan_.tensors[merged.back().tensor].dest == plan_.tensors[task.tensor].dest && head_source == source &&
          head_src_end == src_offset && head_dst_end == dst && merged.back().run_bytes + length <= chunk) {
        merged.back().run_bytes += length;
        head_src_end += length;
        head_dst_end += length;
        continue;
      }
      merged.push_back(task);
      head_direct = direct;
      if (direct) {
        merged.back().run_bytes = length;
        merged.back().run_source = source;
        merged.back().run_src_offset = src_offset;
        head_source = source;
        head_src_end = src_offset + length;
        head_dst_end = dst + length;
      }
    }
    tasks_.swap(merged);
  }

  uint64_t task_offset(const Task& task) const {
    const auto& t = plan_.tensors[task.tensor];
    return t.offset + (task.row0 * t.cols + task.col0) * dtype_itemsize(t.dtype);
  }

  void run_tasks(const ProgressTick& tick) {
    const unsigned threads = std::max(1u, std::min<unsigned>(options_.threads, static_cast<unsigned>(std::max<size_t>(1, tasks_.size()))));
    std::vector<std::thread> pool;
    for (unsigned i = 0; i < threads; ++i) pool.emplace_back([this] { worker(); });
    {
      std::unique_lock<std::mutex> lock(mutex_);
      while (running_workers_done_ < threads) {
        cv_.wait_for(lock, std::chrono::milliseconds(100));
        if (stop_.load()) continue;
        lock.unlock();
        bool keep_going = true;
        try {
          keep_going = !tick || tick(done_bytes_.load(), total_bytes_);
        } catch (...) {
          record_error(std::current_exception());
        }
        if (!keep_going) {
          cancelled_ = true;
          stop_ = true;
        }
        lock.lock();
      }
    }
    for (auto& th : pool) th.join();
    if (error_) std::rethrow_exception(error_);
    if (cancelled_) throw Cancelled("cancelled");
    // A last report; the callback may still ask to stop (or have raised) after the final task.
    if (tick && !tick(done_bytes_.load(), total_bytes_)) throw Cancelled("cancelled");
  }

  void record_error(std::exception_ptr e) {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (!error_) error_ = e;
    stop_ = true;
  }

  void worker() {
    Scratch scratch;
    try {
      while (!stop_.load()) {
        const size_t i = next_task_.fetch_add(1);
        if (i >= tasks_.size()) break;
        run_task(tasks_[i], scratch);
      }
    } catch (...) {
      record_error(std::current_exception());
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      ++running_workers_done_;
    }
    cv_.notify_all();
  }

  void run_task(const Task& task, Scratch& scratch) {
    const auto& t = plan_.tensors[task.tensor];
    if (compare_) {
      run_compare_task(task, scratch);
      return;
    }
    if (t.quantize) {
      run_quantize_task(task, scratch);
      return;
    }
    std::vector<unsigned char>& buffer = scratch.bytes;
    const uint64_t isz = dtype_itemsize(t.dtype);
    const uint64_t width = task.col1 - task.col0;
    const uint64_t length = (task.row1 - task.row0) * width * isz;
    const uint64_t dst_offset = task_offset(task);
    const OutputFile& dest = *dests_[t.dest];

    if (task.run_bytes) {  // file to file, one copy or a merged run of them (merge_direct_runs)
      copy_direct(*sources_[task.run_source], task.run_src_offset, dest, dst_offset, task.run_bytes);
      direct_tasks_.fetch_add(1);
      finish(dest, dst_offset, task.run_bytes);
      return;
    }
    Intersection hit;
    if (buffer.size() < length) buffer.resize(length);
    for (const auto& c : t.copies) {
      if (!intersect(c, task, &hit)) continue;
      copy_into(c, hit, task, width, isz, t.dtype, buffer.data());
    }
    dest.write(dst_offset, buffer.data(), length);
    finish(dest, dst_offset, length);
  }

  // Gathers the task from both sides and compares them; nothing is written.
  void run_compare_task(const Task& task, Scratch& scratch) {
    const auto& t = plan_.tensors[task.tensor];
    const uint64_t isz = dtype_itemsize(t.dtype);
    const uint64_t width = task.col1 - task.col0;
    const uint64_t count = (task.row1 - task.row0) * width;
    std::vector<unsigned char>& a = scratch.bytes;
    std::vector<unsigned char>& b = scratch.other;
    if (a.size() < count * isz) a.resize(count * isz);
    if (b.size() < count * isz) b.resize(count * isz);
    Intersection hit;
    for (const auto& c : t.copies)
      if (intersect(c, task, &hit)) copy_into(c, hit, task, width, isz, t.dtype, a.data());
    for (const auto& c : t.other_copies)
      if (intersect(c, task, &hit)) copy_into(c, hit, task, width, isz, t.dtype, b.data());
    TensorComparison found;
    if (compare_->bitwise && std::memcmp(a.data(), b.data(), count * isz) == 0) {
      done_bytes_.fetch_add(count * isz);
      return;
    }
    const bool is_f32 = t.dtype == DType::F32;
    for (uint64_t i = 0; i < count; ++i) {
      bool differs;
      double diff = 0;
      if (is_f32) {
        float x, y;
        std::memcpy(&x, a.data() + i * 4, 4);
        std::memcpy(&y, b.data() + i * 4, 4);
        if (compare_->bitwise) {
          differs = std::memcmp(a.data() + i * 4, b.data() + i * 4, 4) != 0;
        } else {
          const bool both_nan = std::isnan(x) && std::isnan(y);
          differs = !both_nan && !(std::fabs(double(x) - double(y)) <= compare_->atol + compare_->rtol * std::fabs(double(y)));
        }
        if (differs && std::isfinite(x) && std::isfinite(y)) diff = std::fabs(double(x) - double(y));
      } else {
        differs = std::memcmp(a.data() + i * isz, b.data() + i * isz, isz) != 0;
        if (differs && is_float16ish(t.dtype)) {
          float x, y;
          cast_elements(a.data() + i * isz, t.dtype, &x, DType::F32, 1);
          cast_elements(b.data() + i * isz, t.dtype, &y, DType::F32, 1);
          if (std::isfinite(x) && std::isfinite(y)) diff = std::fabs(double(x) - double(y));
        }
      }
      if (!differs) continue;
      ++found.differing;
      found.max_abs_diff = std::max(found.max_abs_diff, diff);
      const uint64_t flat = (task.row0 + i / width) * t.cols + task.col0 + i % width;
      found.first_index = std::min(found.first_index, flat);
    }
    if (found.differing) {
      std::lock_guard<std::mutex> lock(comparison_locks_[task.tensor]);
      auto& total = comparisons_[task.tensor];
      total.differing += found.differing;
      total.max_abs_diff = std::max(total.max_abs_diff, found.max_abs_diff);
      total.first_index = std::min(total.first_index, found.first_index);
    }
    done_bytes_.fetch_add(count * isz);
  }

  // The intersection of one copy with a task, converted to dtype (itemsize isz) into the
  // task's buffer of rows x width elements. advise: hint the source pages in and release
  // them after (a caller that reads the same pages again does that itself, once).
  void copy_into(const BlockCopy& c, const Intersection& hit, const Task& task, uint64_t width, uint64_t isz, DType dtype,
                 unsigned char* buffer, bool advise = true) {
    // The reads of the mappings, guarded: a source that shrinks meanwhile faults with SIGBUS.
    SigbusFrame frame;
    if (sigsetjmp(frame.env, 0) != 0) {
      leave_sigbus_frame(&frame);
      throw_source_changed(frame.address);
    }
    enter_sigbus_frame(&frame);
    try {
      copy_into_unguarded(c, hit, task, width, isz, dtype, buffer, advise);
    } catch (...) {
      leave_sigbus_frame(&frame);
      throw;
    }
    leave_sigbus_frame(&frame);
  }

  // A read faulted at address: name the source whose mapping holds it, and its size now.
  [[noreturn]] void throw_source_changed(const void* address) const {
    const auto* at = static_cast<const unsigned char*>(address);
    for (const auto& source : sources_) {
      if (source->size() && at >= source->data() && at < source->data() + source->size()) {
        struct stat st;
        const std::string now = ::fstat(source->fd(), &st) == 0 ? std::to_string(st.st_size) + " bytes" : "unknown";
        throw FormatError(source->path() + ": the file changed while it was read (it was " +
                          std::to_string(source->size()) + " bytes, it is " + now +
                          "): another process truncated or rewrote it");
      }
    }
    throw FormatError("a source file changed while it was read (a read faulted outside every mapping)");
  }

  void copy_into_unguarded(const BlockCopy& c, const Intersection& hit, const Task& task, uint64_t width, uint64_t isz,
                           DType dtype, unsigned char* buffer, bool advise) {
    if (c.transpose) {
      copy_transposed(c, hit, task, width, isz, dtype, buffer, advise);
      return;
    }
    if (!c.low_rank.empty()) {
      copy_merged(c, hit, task, width, isz, dtype, buffer);
      return;
    }
    const MappedFile& src = *sources_[c.source];
    const uint64_t src_isz = dtype_itemsize(c.src_dtype);
    const uint64_t n = hit.col1 - hit.col0;
    uint64_t first, span;
    source_span(c, hit, &first, &span);
    if (advise) src.will_need(first, span);
    unsigned char* out = buffer + ((hit.row0 - task.row0) * width + (hit.col0 - task.col0)) * isz;
    if (c.scale_source != kNoScale) {
      // Each row reads its band's scale row; col0 places the run in the grid's columns.
      const MappedFile& scales = *sources_[c.scale_source];
      const uint64_t col0 = c.scale_col0 + (hit.col0 - c.dst_col);
      for (uint64_t r = hit.row0; r < hit.row1; ++r) {
        const uint64_t band = (c.scale_row0 + (r - c.dst_row)) / c.scale_block;
        dequantize_e4m3_row(src.data() + first + (r - hit.row0) * c.src_row_stride,
                            scales.data() + c.scale_offset + band * c.scale_row_stride, col0, c.scale_block, out, dtype, n);
        out += width * isz;
      }
    } else if ((n == width && c.src_row_stride == n * src_isz) || hit.row1 - hit.row0 == 1) {
      cast_elements(src.data() + first, c.src_dtype, out, dtype, (hit.row1 - hit.row0) * n);
    } else {
      for (uint64_t r = hit.row0; r < hit.row1; ++r) {
        cast_elements(src.data() + first + (r - hit.row0) * c.src_row_stride, c.src_dtype, out, dtype, n);
        out += width * isz;
      }
    }
    if (advise) src.release(first, span);
  }

  // A copy with low-rank terms: each row in fp32, plus every term, rounded once to the output
  // dtype. Columns go in tiles, so that R's slice (rank x tile, in fp32) stays small whatever the
  // task's width: memory per thread is rank x kLowRankTile x 4 bytes per term.
  static constexpr uint64_t kLowRankTile = 2048;

  void copy_merged(const BlockCopy& c, const Intersection& hit, const Task& task, uint64_t width, uint64_t isz, DType dtype,
                   unsigned char* buffer) {
    const MappedFile& src = *sources_[c.source];
    const uint64_t src_isz = dtype_itemsize(c.src_dtype);
    uint64_t max_rank = 0;
    for (const auto& term : c.low_rank) max_rank = std::max(max_rank, term.rank);
    std::vector<std::vector<float>> rights(c.low_rank.size());
    std::vector<float> row, acc, left(max_rank);
    for (uint64_t col0 = hit.col0; col0 < hit.col1; col0 += kLowRankTile) {
      const uint64_t n = std::min(kLowRankTile, hit.col1 - col0), j0 = col0 - c.dst_col;
      for (size_t ti = 0; ti < c.low_rank.size(); ++ti) {
        const auto& term = c.low_rank[ti];
        const MappedFile& right = *sources_[term.right_source];
        const uint64_t risz = dtype_itemsize(term.right_dtype);
        rights[ti].resize(term.rank * n);
        for (uint64_t k = 0; k < term.rank; ++k) {
          const unsigned char* base = right.data() + term.right_offset + k * term.right_k_stride + j0 * term.right_col_stride;
          if (term.right_col_stride == risz) {
            cast_elements(base, term.right_dtype, rights[ti].data() + k * n, DType::F32, n);
          } else {
            for (uint64_t j = 0; j < n; ++j)
              cast_elements(base + j * term.right_col_stride, term.right_dtype, rights[ti].data() + k * n + j, DType::F32, 1);
          }
        }
      }
      row.resize(n);
      acc.resize(n);
      unsigned char* out = buffer + ((hit.row0 - task.row0) * width + (col0 - task.col0)) * isz;
      for (uint64_t r = hit.row0; r < hit.row1; ++r) {
        const uint64_t i = r - c.dst_row;
        cast_elements(src.data() + c.src_offset + i * c.src_row_stride + j0 * src_isz, c.src_dtype, row.data(), DType::F32, n);
        for (size_t ti = 0; ti < c.low_rank.size(); ++ti) {
          const auto& term = c.low_rank[ti];
          const MappedFile& lsrc = *sources_[term.left_source];
          for (uint64_t k = 0; k < term.rank; ++k)
            cast_elements(lsrc.data() + term.left_offset + i * term.left_row_stride + k * term.left_k_stride, term.left_dtype,
                          left.data() + k, DType::F32, 1);
          add_low_rank_row(left.data(), rights[ti].data(), term.rank, n, term.scale, acc.data(), row.data());
        }
        cast_elements(row.data(), DType::F32, out, dtype, n);
        out += width * isz;
      }
    }
  }

  // The source bytes [first, first + span) a copy reads for an intersection.
  void source_span(const BlockCopy& c, const Intersection& hit, uint64_t* first, uint64_t* span) const {
    const uint64_t src_isz = dtype_itemsize(c.src_dtype);
    if (c.transpose) {
      *first = c.src_offset + (hit.col0 - c.dst_col) * c.src_row_stride + (hit.row0 - c.dst_row) * src_isz;
      *span = (hit.col1 - hit.col0 - 1) * c.src_row_stride + (hit.row1 - hit.row0) * src_isz;
    } else {
      *first = c.src_offset + (hit.row0 - c.dst_row) * c.src_row_stride + (hit.col0 - c.dst_col) * src_isz;
      *span = (hit.row1 - hit.row0 - 1) * c.src_row_stride + (hit.col1 - hit.col0) * src_isz;
    }
  }

  // One band of a quantized tensor: gathered in fp32 one tile of whole blocks at a time
  // (a tile stays in cache between the amax and the division passes), quantized into the
  // band's fp8 rows; then the rows and the band's run of the scale grid are written.
  void run_quantize_task(const Task& task, Scratch& scratch) {
    const auto& t = plan_.tensors[task.tensor];
    const OutputFile& dest = *dests_[t.dest];
    const uint64_t rows = task.row1 - task.row0, width = task.col1 - task.col0;
    const uint64_t blocks = ceil_div(width, kQuantizeBlock);
    const uint64_t tile_cols = std::min<uint64_t>(width, kQuantizeTileCols);
    if (scratch.f32.size() < rows * tile_cols) scratch.f32.resize(rows * tile_cols);
    if (scratch.bytes.size() < rows * width) scratch.bytes.resize(rows * width);
    if (scratch.scales.size() < blocks) scratch.scales.resize(blocks);
    // The tiles of a band read their rows' pages in turn: hint and release them once.
    Intersection hit;
    uint64_t first, span;
    for (const auto& c : t.copies)
      if (intersect(c, task, &hit)) {
        source_span(c, hit, &first, &span);
        sources_[c.source]->will_need(first, span);
      }
    for (uint64_t c0 = task.col0; c0 < task.col1; c0 += tile_cols) {
      const Task tile{task.tensor, task.row0, task.row1, c0, std::min(task.col1, c0 + tile_cols)};
      const uint64_t n = tile.col1 - tile.col0;
      for (const auto& c : t.copies)
        if (intersect(c, tile, &hit))
          copy_into(c, hit, tile, n, 4, DType::F32, reinterpret_cast<unsigned char*>(scratch.f32.data()), /*advise=*/false);
      quantize_e4m3_band(scratch.f32.data(), n, rows, n, kQuantizeBlock, scratch.bytes.data() + (c0 - task.col0), width,
                         scratch.scales.data() + (c0 - task.col0) / kQuantizeBlock);
    }
    for (const auto& c : t.copies)
      if (intersect(c, task, &hit)) {
        source_span(c, hit, &first, &span);
        sources_[c.source]->release(first, span);
      }

    const uint64_t at = task_offset(task);
    if (width == t.cols) {
      dest.write(at, scratch.bytes.data(), rows * width);
    } else {
      for (uint64_t i = 0; i < rows; ++i) dest.write(at + i * t.cols, scratch.bytes.data() + i * width, width);
    }
    start_writeback(dest, at, (rows - 1) * t.cols + width);
    const uint64_t grid_at = t.scale_offset + ((task.row0 / kQuantizeBlock) * ceil_div(t.cols, kQuantizeBlock) + task.col0 / kQuantizeBlock) * 4;
    dest.write(grid_at, scratch.scales.data(), blocks * 4);
    start_writeback(dest, grid_at, blocks * 4);
    done_bytes_.fetch_add(rows * width + blocks * 4);
  }

  // dst[r][c] = src[c][r] over the intersection, in tiles of kTile destination rows so each
  // source row is read as one contiguous run.
  void copy_transposed(const BlockCopy& c, const Intersection& hit, const Task& task, uint64_t width, uint64_t isz,
                       DType dtype, unsigned char* buffer, bool advise = true) {
    constexpr uint64_t kTile = 64;
    const MappedFile& src = *sources_[c.source];
    const uint64_t src_isz = dtype_itemsize(c.src_dtype);
    const uint64_t first = c.src_offset + (hit.col0 - c.dst_col) * c.src_row_stride + (hit.row0 - c.dst_row) * src_isz;
    const uint64_t span = (hit.col1 - hit.col0 - 1) * c.src_row_stride + (hit.row1 - hit.row0) * src_isz;
    if (advise) src.will_need(first, span);
    unsigned char run[kTile * 8];
    for (uint64_t r = hit.row0; r < hit.row1; r += kTile) {
      const uint64_t n = std::min(kTile, hit.row1 - r);
      for (uint64_t col = hit.col0; col < hit.col1; ++col) {
        const unsigned char* in = src.data() + c.src_offset + (col - c.dst_col) * c.src_row_stride + (r - c.dst_row) * src_isz;
        cast_elements(in, c.src_dtype, run, dtype, n);
        unsigned char* out = buffer + ((r - task.row0) * width + (col - task.col0)) * isz;
        for (uint64_t i = 0; i < n; ++i) std::memcpy(out + i * width * isz, run + i * isz, isz);
      }
    }
    if (advise) src.release(first, span);
  }

  // copy_file_range keeps the bytes in the kernel; where the filesystem cannot, the
  // mapping is written directly and its pages released after.
  void copy_direct(const MappedFile& src, uint64_t src_offset, const OutputFile& dest, uint64_t dst_offset, uint64_t length) {
    loff_t in = static_cast<loff_t>(src_offset), out = static_cast<loff_t>(dst_offset);
    uint64_t left = length;
    while (left > 0 && use_copy_file_range_.load()) {
      ssize_t n = ::copy_file_range(src.fd(), &in, dest.fd(), &out, static_cast<size_t>(std::min<uint64_t>(left, 1ull << 30)), 0);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EXDEV || errno == EINVAL || errno == ENOSYS || errno == EOPNOTSUPP || errno == EBADF)) {
        use_copy_file_range_ = false;
        break;
      }
      if (n < 0) throw IoError(dest.path() + ": copy from " + src.path() + " failed: " + errno_text(errno));
      if (n == 0) throw IoError(src.path() + ": unexpected end of file while copying");
      left -= static_cast<uint64_t>(n);
    }
    if (left == 0) return;
    const uint64_t done = length - left;
    src.will_need(src_offset + done, left);
    dest.write(dst_offset + done, src.data() + src_offset + done, left);
    src.release(src_offset + done, left);
  }

  void finish(const OutputFile& dest, uint64_t offset, uint64_t length) {
    start_writeback(dest, offset, length);
    done_bytes_.fetch_add(length);
  }

  void start_writeback(const OutputFile& dest, uint64_t offset, uint64_t length) {
    if (options_.fsync) dest.start_writeback(offset, length);  // it shortens the final fsync; without one, no need
  }

  const Plan& plan_;
  const ExecOptions& options_;
  const CompareOptions* compare_;  // null: execute; else compare the two sides
  std::vector<TensorComparison> comparisons_;
  std::vector<std::mutex> comparison_locks_;
  std::vector<std::unique_ptr<MappedFile>> sources_;
  std::vector<std::unique_ptr<OutputFile>> dests_;
  std::vector<Task> tasks_;
  uint64_t total_bytes_ = 0;
  ExecStats stats_;

  std::atomic<size_t> next_task_{0};
  std::atomic<uint64_t> done_bytes_{0};
  std::atomic<uint64_t> direct_tasks_{0};
  std::atomic<bool> stop_{false};
  std::atomic<bool> use_copy_file_range_{true};
  bool cancelled_ = false;
  std::mutex mutex_;
  std::condition_variable cv_;
  unsigned running_workers_done_ = 0;
  std::mutex error_mutex_;
  std::exception_ptr error_;
};

}  // namespace

std::vector<TensorComparison> compare_plan(const Plan& plan, const ExecOptions& options, const CompareOptions& compare,
                                           const ProgressTick& tick) {
  Runner runner(plan, options, &compare);
  return runner.run_compare(tick);
}

ExecStats execute_plan(const Plan& plan, const ExecOptions& options, const ProgressTick& tick) {
  Runner runner(plan, options);
  return runner.run(tick);
}

void validate_plan(const Plan& plan) {
  const ExecOptions options;
  Runner runner(plan, options);
  runner.validate_only();
}

}  // namespace pyconv
