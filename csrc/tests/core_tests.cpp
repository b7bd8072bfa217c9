// Plain C++ test driver of the core library (no framework, no Python). Built only with
// -DPYCONV_BUILD_TESTS=ON; tests/test_sanitizers.py builds it with -DPYCONV_SANITIZE=ON
// and runs it under AddressSanitizer + UndefinedBehaviorSanitizer:
//
//   core_tests [PATH...]
//
// (a) every regular file under each PATH (directories are walked recursively) goes through
//     read_safetensors_prefix and, when that succeeds, parse_safetensors_header and
//     validate_safetensors with an empty entry list; a table of hand-written hostile entry lists goes through
//     validate_safetensors. Every call must succeed or throw FormatError / IoError.
// (b) execute_plan on small synthetic files: plain copies, casts, transposed copies,
//     stride-0 repeats, fp8 dequantization and quantization (checked against the scalar
//     codecs), and hostile plans (out-of-range ranges, overflowing sizes, overlapping copies
//     or file ranges) that must throw FormatError before any destination file is created;
//     OutputFile, the executor's destination file, on its own.
// (c) exhaustive cast round trips: bf16 / fp16 -> fp32 -> back is the identity for every
//     non-NaN pattern (scalar functions and cast_elements, aligned and unaligned), and the
//     same for all 256 e4m3fn patterns.
// Exits 0 when everything passed; otherwise prints each failure and exits 1.
#include <fcntl.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <string>
#include <vector>

#include "cast.h"
#include "dtype.h"
#include "errors.h"
#include "executor.h"
#include "fp8.h"
#include "output_file.h"
#include "safetensors.h"

using namespace pyconv;
namespace fs = std::filesystem;

namespace {

int g_failures = 0;
int g_checks = 0;
std::string g_last_error;  // message of the last FormatError / IoError run_guarded caught

void failure(const std::string& what) {
  ++g_failures;
  std::fprintf(stderr, "FAIL: %s\n", what.c_str());
}

void check(bool ok, const std::string& what) {
  ++g_checks;
  if (!ok) failure(what);
}

enum class Outcome { Ok, Format, Io, Other };

// Runs fn; classifies what it threw. Anything but FormatError / IoError is a failure here.
Outcome run_guarded(const std::string& what, const std::function<void()>& fn) {
  ++g_checks;
  try {
    fn();
    return Outcome::Ok;
  } catch (const FormatError& e) {
    g_last_error = e.what();
    return Outcome::Format;
  } catch (const IoError& e) {
    g_last_error = e.what();
    return Outcome::Io;
  } catch (const std::exception& e) {
    failure(what + ": unexpected exception: " + e.what());
  } catch (...) {
    failure(what + ": unexpected non-std exception");
  }
  return Outcome::Other;
}

void expect_format_error(const std::string& what, const std::function<void()>& fn) {
  Outcome o = run_guarded(what, fn);
  if (o == Outcome::Ok) failure(what + ": expected FormatError, call succeeded");
  if (o == Outcome::Io) failure(what + ": expected FormatError, got IoError");
}

// ---------------------------------------------------------------------------------------------
// (a) safetensors prefix + validation

void scan_path(const fs::path& root, size_t* files) {
  std::vector<fs::path> paths;
  std::error_code ec;
  if (fs::is_directory(root, ec)) {
    for (auto it = fs::recursive_directory_iterator(root, ec); !ec && it != fs::recursive_directory_iterator(); it.increment(ec))
      if (it->is_regular_file(ec)) paths.push_back(it->path());
  } else {
    paths.push_back(root);
  }
  if (ec) failure(root.string() + ": cannot walk: " + ec.message());
  for (const auto& p : paths) {
    ++*files;
    const std::string path = p.string();
    SafetensorsPrefix prefix{};
    Outcome o = run_guarded(path + ": read_safetensors_prefix", [&] { prefix = read_safetensors_prefix(path); });
    if (o != Outcome::Ok) continue;
    check(prefix.header_len == prefix.header.size() && prefix.header_len + 8 <= prefix.file_size,
          path + ": prefix fields are inconsistent");
    // No entries: valid only when the file ends right after the header.
    std::vector<TensorRecord> recs;
    o = run_guarded(path + ": validate_safetensors({})",
                    [&] { recs = validate_safetensors(path, prefix.header_len, prefix.file_size, {}); });
    if (o == Outcome::Ok) check(prefix.file_size == prefix.header_len + 8, path + ": empty entry list accepted with trailing data");
    // The JSON itself: parsed and checked, or refused with FormatError; what it returns lies in the file.
    SafetensorsHeader header;
    o = run_guarded(path + ": parse_safetensors_header", [&] { header = parse_safetensors_header(path, prefix); });
    if (o == Outcome::Ok)
      for (const auto& t : header.tensors)
        check(t.offset >= 8 + prefix.header_len && t.offset + t.nbytes <= prefix.file_size &&
                  t.name_begin + t.name_size <= header.names.size() && t.dims_begin + t.ndim <= header.dims.size(),
              path + ": a parsed tensor lies outside the file or the header's tables");
    // One U8 entry spanning all the data is always valid.
    const int64_t data = static_cast<int64_t>(prefix.file_size - 8 - prefix.header_len);
    o = run_guarded(path + ": validate_safetensors(one U8 entry)", [&] {
      recs = validate_safetensors(path, prefix.header_len, prefix.file_size, {{"all", "U8", {data}, 0, data}});
    });
    check(o == Outcome::Ok && recs.size() == 1 && recs[0].offset == prefix.header_len + 8 &&
              recs[0].nbytes == static_cast<uint64_t>(data),
          path + ": a single U8 entry over all the data was not accepted");
  }
}

struct EntryCase {
  const char* name;
  uint64_t header_len, file_size;
  std::vector<RawTensorEntry> entries;
  bool valid;
};

void safetensors_entry_table() {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  constexpr int64_t kMin = std::numeric_limits<int64_t>::min();
  // header_len 16, so data starts at 24; file_size 24 + data bytes.
  const std::vector<EntryCase> cases = {
      {"valid two tensors", 16, 24 + 24, {{"a", "F32", {2, 2}, 0, 16}, {"b", "BF16", {4}, 16, 24}}, true},
      {"valid reversed order", 16, 24 + 24, {{"b", "BF16", {4}, 16, 24}, {"a", "F32", {2, 2}, 0, 16}}, true},
      {"valid scalar and empty", 16, 24 + 8, {{"s", "F64", {}, 0, 8}, {"e", "F32", {0, 5}, 8, 8}}, true},
      {"valid no data", 16, 24, {}, true},
      {"valid all dtypes", 0, 8 + 43,
       {{"a", "BOOL", {1}, 0, 1}, {"b", "U8", {1}, 1, 2}, {"c", "I8", {1}, 2, 3}, {"d", "I16", {1}, 3, 5},
        {"e", "U16", {1}, 5, 7}, {"f", "F16", {1}, 7, 9}, {"g", "BF16", {1}, 9, 11}, {"h", "I32", {1}, 11, 15},
        {"i", "U32", {1}, 15, 19}, {"j", "F32", {1}, 19, 23}, {"k", "F64", {1}, 23, 31}, {"l", "I64", {1}, 31, 39},
        {"m", "F8_E4M3", {1}, 39, 40}, {"n", "F8_E5M2", {1}, 40, 41}, {"o", "U64", {0}, 41, 41}, {"p", "U16", {1}, 41, 43}},
       true},
      {"unknown dtype", 16, 28, {{"a", "F31", {1}, 0, 4}}, false},
      {"lowercase dtype", 16, 28, {{"a", "f32", {1}, 0, 4}}, false},
      {"empty dtype", 16, 28, {{"a", "", {1}, 0, 4}}, false},
      {"dtype with NUL", 16, 28, {{"a", std::string("F32\0", 4), {1}, 0, 4}}, false},
      {"negative dim", 16, 28, {{"a", "F32", {-1}, 0, 4}}, false},
      {"int64 min dim", 16, 28, {{"a", "F32", {kMin}, 0, 4}}, false},
      {"negative dims cancel", 16, 28, {{"a", "F32", {-1, -1}, 0, 4}}, false},
      {"shape product overflows", 16, 28, {{"a", "U8", {kMax, kMax}, 0, 4}}, false},
      {"shape product overflows to zero", 16, 24, {{"a", "U8", {int64_t(1) << 32, int64_t(1) << 32}, 0, 0}}, false},
      {"shape wraps to small", 16, 28, {{"a", "U8", {int64_t(1) << 62, 4, 1}, 0, 0}}, false},
      {"byte size overflows", 16, 28, {{"a", "F64", {int64_t(1) << 61}, 0, 0}}, false},
      {"byte size overflows to 4", 16, 28, {{"a", "F32", {(int64_t(1) << 62) + 1}, 0, 4}}, false},
      {"zero dim after overflow", 16, 24, {{"a", "U8", {kMax, kMax, 0}, 0, 0}}, false},
      {"huge shape, huge offsets", 16, 24, {{"a", "U8", {kMax}, 0, kMax}}, false},
      {"negative begin", 16, 28, {{"a", "F32", {1}, -4, 0}}, false},
      {"negative end", 16, 28, {{"a", "F32", {1}, 0, -4}}, false},
      {"int64 min offsets", 16, 28, {{"a", "F32", {1}, kMin, kMin + 4}}, false},
      {"end before begin", 16, 28, {{"a", "F32", {1}, 4, 0}}, false},
      {"span mismatch", 16, 28, {{"a", "F32", {2}, 0, 4}}, false},
      {"not from zero", 16, 32, {{"a", "F32", {1}, 4, 8}}, false},
      {"gap", 16, 36, {{"a", "F32", {1}, 0, 4}, {"b", "F32", {1}, 8, 12}}, false},
      {"overlap", 16, 32, {{"a", "F32", {2}, 0, 8}, {"b", "F32", {1}, 4, 8}}, false},
      {"aliased", 16, 28, {{"a", "F32", {1}, 0, 4}, {"b", "F32", {1}, 0, 4}}, false},
      {"aliased empty", 16, 28, {{"a", "F32", {0}, 0, 0}, {"b", "F32", {0}, 0, 0}, {"c", "F32", {1}, 0, 4}}, true},
      {"past eof", 16, 28, {{"a", "F32", {2}, 0, 8}}, false},
      {"trailing bytes", 16, 32, {{"a", "F32", {1}, 0, 4}}, false},
      {"offsets near int64 max", 16, 28, {{"a", "U8", {4}, kMax - 4, kMax}}, false},
      {"offset chain past eof", 16, 28, {{"a", "U8", {kMax - 1}, 0, kMax - 1}, {"b", "U8", {1}, kMax - 1, kMax}}, false},
      {"many empty then gap", 16, 28, {{"a", "U8", {0}, 3, 3}, {"b", "U8", {4}, 0, 4}}, false},
      {"header_len wraps data start", UINT64_MAX, 11, {{"a", "U8", {4}, 0, 4}}, false},
      {"header_len past the file", 100, 50, {}, false},
      {"header_len over the limit", kMaxSafetensorsHeader + 1, kMaxSafetensorsHeader + 9, {}, false},
      {"file shorter than the prefix", 0, 4, {}, false},
      {"long name", 16, 28, {{std::string(100000, 'x'), "F32", {1}, 4, 8}}, false},
  };
  for (const auto& c : cases) {
    std::vector<TensorRecord> recs;
    Outcome o = run_guarded(std::string("validate_safetensors: ") + c.name,
                            [&] { recs = validate_safetensors("table.safetensors", c.header_len, c.file_size, c.entries); });
    if (o == Outcome::Other) continue;
    if (c.valid) {
      if (o != Outcome::Ok) {
        failure(std::string("validate_safetensors: ") + c.name + ": rejected a valid entry list");
        continue;
      }
      check(recs.size() == c.entries.size(), std::string(c.name) + ": record count");
      uint64_t prev = 0;
      for (const auto& r : recs) {
        check(r.offset >= prev && r.offset >= 8 + c.header_len && r.offset + r.nbytes <= c.file_size,
              std::string(c.name) + ": record '" + r.name + "' out of order or out of the file");
        prev = r.offset;
      }
    } else {
      check(o == Outcome::Format, std::string("validate_safetensors: ") + c.name + ": expected FormatError");
    }
  }
  // Many tensors (sorting, message building).
  std::vector<RawTensorEntry> many;
  for (int i = 999; i >= 0; --i) many.push_back({"t" + std::to_string(i), "U8", {2}, 2 * i, 2 * i + 2});
  Outcome o = run_guarded("validate_safetensors: 1000 entries",
                          [&] { validate_safetensors("many.safetensors", 2, 10 + 2000, many); });
  check(o == Outcome::Ok, "validate_safetensors: 1000 entries in reverse order rejected");
}

// ---------------------------------------------------------------------------------------------
// (b) executor

std::string g_tmp;

std::string tmp_path(const std::string& name) { return g_tmp + "/" + name; }

void write_file(const std::string& path, const std::vector<unsigned char>& bytes) {
  std::ofstream f(path, std::ios::binary | std::ios::trunc);
  f.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  if (!f) failure(path + ": cannot write the test fixture");
}

std::vector<unsigned char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::vector<unsigned char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

bool exists(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0;
}

template <typename T>
void put(std::vector<unsigned char>* buf, size_t offset, T v) {
  if (buf->size() < offset + sizeof(T)) buf->resize(offset + sizeof(T));
  std::memcpy(buf->data() + offset, &v, sizeof(T));
}

template <typename T>
T get(const std::vector<unsigned char>& buf, size_t offset) {
  T v;
  std::memcpy(&v, buf.data() + offset, sizeof(T));
  return v;
}

uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

const std::vector<ExecOptions>& option_sets() {
  static const std::vector<ExecOptions> sets = [] {
    ExecOptions a;  // defaults: few big tasks
    a.fsync = false;
    ExecOptions b;  // tiny tasks on several threads
    b.threads = 3;
    b.chunk_bytes = 16;
    b.buffer_bytes = 16;
    b.fsync = false;
    ExecOptions c;  // single thread, odd sizes
    c.threads = 1;
    c.chunk_bytes = 7;
    c.buffer_bytes = 5;
    c.fsync = true;
    return std::vector<ExecOptions>{a, b, c};
  }();
  return sets;
}

// Runs the plan under every option set; returns the destination files' bytes of the last run.
std::vector<std::vector<unsigned char>> run_plan(const std::string& what, const Plan& plan) {
  std::vector<std::vector<unsigned char>> out;
  for (size_t k = 0; k < option_sets().size(); ++k) {
    for (const auto& d : plan.dests) ::unlink(d.path.c_str());
    Outcome o = run_guarded(what + " (options " + std::to_string(k) + ")", [&] { execute_plan(plan, option_sets()[k], {}); });
    if (o != Outcome::Ok) {
      if (o != Outcome::Other) failure(what + " (options " + std::to_string(k) + "): valid plan threw: " + g_last_error);
      return {};
    }
    std::vector<std::vector<unsigned char>> files;
    for (const auto& d : plan.dests) files.push_back(read_file(d.path));
    if (k > 0 && files != out) failure(what + ": output differs between option sets 0 and " + std::to_string(k));
    out = files;
  }
  return out;
}

// Source file: 4096 bytes of a fixed pattern with a few floats in it.
const size_t kSrcSize = 4096;
std::vector<unsigned char> g_src;
std::string g_src_path;

void make_source() {
  g_src.assign(kSrcSize, 0);
  uint32_t x = 12345;
  for (size_t i = 0; i < kSrcSize; ++i) {
    x = x * 1103515245u + 12345u;
    g_src[i] = static_cast<unsigned char>(x >> 16);
  }
  // Finite floats at [0, 1024): f32 values i * 0.37 - 50.
  for (size_t i = 0; i < 256; ++i) put<float>(&g_src, 4 * i, static_cast<float>(i) * 0.37f - 50.0f);
  g_src_path = tmp_path("src.bin");
  write_file(g_src_path, g_src);
}

BlockCopy copy_of(uint64_t src_offset, uint64_t stride, DType dt, uint64_t rows, uint64_t cols, uint64_t dr = 0, uint64_t dc = 0) {
  BlockCopy c{};
  c.source = 0;
  c.src_offset = src_offset;
  c.src_row_stride = stride;
  c.src_dtype = dt;
  c.rows = rows;
  c.cols = cols;
  c.dst_row = dr;
  c.dst_col = dc;
  return c;
}

Plan one_tensor_plan(DType dtype, uint64_t rows, uint64_t cols, std::vector<BlockCopy> copies, uint64_t dest_size,
                     uint64_t offset = 0) {
  Plan p;
  p.sources = {g_src_path};
  p.dests = {{tmp_path("out.bin"), dest_size}};
  OutputTensor t{};
  t.dest = 0;
  t.offset = offset;
  t.dtype = dtype;
  t.rows = rows;
  t.cols = cols;
  t.copies = std::move(copies);
  p.tensors.push_back(std::move(t));
  return p;
}

void executor_valid_plans() {
  // Plain copy of a [5, 7] F32 block whose rows are 40 bytes apart, in two pieces, plus a literal.
  {
    Plan p = one_tensor_plan(DType::F32, 5, 7, {copy_of(8, 40, DType::F32, 5, 3), copy_of(8 + 12, 40, DType::F32, 5, 4, 0, 3)}, 16 + 140, 16);
    p.literals.push_back({0, 0, "0123456789abcdef"});
    auto out = run_plan("plain copy", p);
    if (!out.empty()) {
      const auto& o = out[0];
      check(o.size() == 156 && std::memcmp(o.data(), "0123456789abcdef", 16) == 0, "plain copy: literal or size");
      bool ok = true;
      for (size_t r = 0; r < 5; ++r)
        for (size_t c = 0; c < 7; ++c) ok &= std::memcmp(&o[16 + (r * 7 + c) * 4], &g_src[8 + r * 40 + c * 4], 4) == 0;
      check(ok, "plain copy: data");
    }
  }
  // Byte copy of the random region (integer dtype, larger, several tasks).
  {
    Plan p = one_tensor_plan(DType::U8, 30, 100, {copy_of(1024, 100, DType::U8, 30, 100)}, 3000);
    auto out = run_plan("byte copy", p);
    if (!out.empty()) check(std::memcmp(out[0].data(), &g_src[1024], 3000) == 0, "byte copy: data");
  }
  // Casts F32 -> BF16 / F16 and BF16 -> F32 / F16 / BF16.
  for (DType to : {DType::BF16, DType::F16, DType::F32}) {
    Plan p = one_tensor_plan(to, 8, 32, {copy_of(0, 128, DType::F32, 8, 32)}, 8 * 32 * dtype_itemsize(to));
    auto out = run_plan(std::string("cast F32->") + dtype_name(to), p);
    if (out.empty()) continue;
    bool ok = true;
    for (size_t i = 0; i < 256; ++i) {
      uint32_t f = get<uint32_t>(g_src, 4 * i);
      if (to == DType::BF16) ok &= get<uint16_t>(out[0], 2 * i) == f32_to_bf16_bits(f);
      if (to == DType::F16) ok &= get<uint16_t>(out[0], 2 * i) == f32_to_f16_bits(f);
      if (to == DType::F32) ok &= get<uint32_t>(out[0], 4 * i) == f;
    }
    check(ok, std::string("cast F32->") + dtype_name(to) + ": data");
  }
  for (DType to : {DType::F32, DType::F16, DType::BF16}) {
    // The random region read as BF16 (NaNs included).
    Plan p = one_tensor_plan(to, 16, 33, {copy_of(2048, 66, DType::BF16, 16, 33)}, 16 * 33 * dtype_itemsize(to));
    auto out = run_plan(std::string("cast BF16->") + dtype_name(to), p);
    if (out.empty()) continue;
    bool ok = true;
    for (size_t i = 0; i < 16 * 33; ++i) {
      uint16_t b = get<uint16_t>(g_src, 2048 + 2 * i);
      if (to == DType::F32) ok &= get<uint32_t>(out[0], 4 * i) == bf16_to_f32_bits(b);
      if (to == DType::F16) ok &= get<uint16_t>(out[0], 2 * i) == bf16_to_f16_bits(b);
      if (to == DType::BF16) ok &= get<uint16_t>(out[0], 2 * i) == b;
    }
    check(ok, std::string("cast BF16->") + dtype_name(to) + ": data");
  }
  // Transposed copy: the source block is [cols=6, rows=9] F32 (rows 24 bytes apart), written as its
  // transpose [9, 6] into F32 and, with a cast, into BF16.
  for (DType to : {DType::F32, DType::BF16}) {
    BlockCopy c = copy_of(0, 24, DType::F32, 9, 6);
    c.transpose = true;
    Plan p = one_tensor_plan(to, 9, 6, {c}, 54 * dtype_itemsize(to));
    auto out = run_plan(std::string("transposed copy to ") + dtype_name(to), p);
    if (out.empty()) continue;
    bool ok = true;
    for (size_t r = 0; r < 9; ++r)
      for (size_t col = 0; col < 6; ++col) {
        uint32_t f = get<uint32_t>(g_src, col * 24 + r * 4);
        if (to == DType::F32) ok &= get<uint32_t>(out[0], (r * 6 + col) * 4) == f;
        else ok &= get<uint16_t>(out[0], (r * 6 + col) * 2) == f32_to_bf16_bits(f);
      }
    check(ok, std::string("transposed copy to ") + dtype_name(to) + ": data");
  }
  // Stride-0 repeat: one source row repeated 7 times, below two real rows (vocab padding).
  for (DType to : {DType::F32, DType::F16}) {
    Plan p = one_tensor_plan(to, 9, 5, {copy_of(0, 20, DType::F32, 2, 5), copy_of(100, 0, DType::F32, 7, 5, 2, 0)},
                             45 * dtype_itemsize(to));
    auto out = run_plan(std::string("stride-0 repeat to ") + dtype_name(to), p);
    if (out.empty()) continue;
    bool ok = true;
    for (size_t r = 0; r < 9; ++r)
      for (size_t col = 0; col < 5; ++col) {
        uint32_t f = get<uint32_t>(g_src, r < 2 ? r * 20 + col * 4 : 100 + col * 4);
        if (to == DType::F32) ok &= get<uint32_t>(out[0], (r * 5 + col) * 4) == f;
        else ok &= get<uint16_t>(out[0], (r * 5 + col) * 2) == f32_to_f16_bits(f);
      }
    check(ok, std::string("stride-0 repeat to ") + dtype_name(to) + ": data");
  }
  // fp8 dequantization: q [5, 9] F8_E4M3 (no NaN patterns) with a [3, 5] grid of block 2 (and a copy
  // starting inside the grid: rows 1.., cols 3..).
  {
    std::vector<unsigned char> fp8(48 + 60);
    for (size_t i = 0; i < 45; ++i) {
      unsigned char q = static_cast<unsigned char>((i * 37 + 11) & 0xFF);
      if ((q & 0x7F) == 0x7F) q ^= 1;
      fp8[i] = q;
    }
    const size_t scale_at = 48;  // unaligned grid would also be fine; keep a gap
    for (size_t k = 0; k < 15; ++k) put<float>(&fp8, scale_at + 4 * k, 0.25f * static_cast<float>(k + 1));
    const std::string path = tmp_path("fp8.bin");
    write_file(path, fp8);
    for (DType to : {DType::F32, DType::BF16, DType::F16}) {
      for (int partial = 0; partial < 2; ++partial) {
        const uint64_t r0 = partial ? 1 : 0, c0 = partial ? 3 : 0, rows = 5 - r0, cols = 9 - c0;
        BlockCopy c = copy_of(r0 * 9 + c0, 9, DType::F8_E4M3, rows, cols);
        c.source = 1;
        c.scale_source = 1;
        c.scale_offset = scale_at;
        c.scale_row_stride = 20;
        c.scale_row0 = r0;
        c.scale_col0 = c0;
        c.scale_block = 2;
        Plan p = one_tensor_plan(to, rows, cols, {c}, rows * cols * dtype_itemsize(to));
        p.sources.push_back(path);
        const std::string what = std::string("fp8 dequant to ") + dtype_name(to) + (partial ? " (partial)" : "");
        auto out = run_plan(what, p);
        if (out.empty()) continue;
        bool ok = true;
        for (size_t r = 0; r < rows; ++r)
          for (size_t col = 0; col < cols; ++col) {
            const size_t R = r + r0, C = col + c0;
            float v = bits_f32(e4m3fn_to_f32_bits(fp8[R * 9 + C])) * get<float>(fp8, scale_at + 4 * ((R / 2) * 5 + C / 2));
            uint32_t f = f32_bits(v);
            const size_t i = r * cols + col;
            if (to == DType::F32) ok &= get<uint32_t>(out[0], 4 * i) == f;
            if (to == DType::BF16) ok &= get<uint16_t>(out[0], 2 * i) == f32_to_bf16_bits(f);
            if (to == DType::F16) ok &= get<uint16_t>(out[0], 2 * i) == f32_to_f16_bits(f);
          }
        check(ok, what + ": data");
      }
    }
  }
  // fp8 quantization: an F32 [130, 200] source (2 bands, partial blocks) -> F8_E4M3 + scale grid [2, 2].
  {
    const size_t R = 130, C = 200;
    std::vector<unsigned char> x(R * C * 4);
    for (size_t i = 0; i < R * C; ++i)
      put<float>(&x, 4 * i, std::sin(static_cast<float>(i) * 0.001f) * static_cast<float>(1 + (i % 977)));
    for (size_t i = 0; i < 128; ++i) put<float>(&x, 4 * (i * C + 150), 0.0f);  // nothing special; keep values finite
    const std::string path = tmp_path("x.bin");
    write_file(path, x);
    Plan p;
    p.sources = {path};
    const uint64_t grid_at = R * C;  // scales right after the fp8 bytes
    p.dests = {{tmp_path("q.bin"), R * C + 16}};
    OutputTensor t{};
    t.dest = 0;
    t.offset = 0;
    t.dtype = DType::F8_E4M3;
    t.rows = R;
    t.cols = C;
    t.quantize = true;
    t.scale_offset = grid_at;
    t.copies = {copy_of(0, C * 4, DType::F32, 70, C), copy_of(70 * C * 4, C * 4, DType::F32, 60, C, 70, 0)};
    p.tensors.push_back(t);
    auto out = run_plan("fp8 quantize", p);
    if (!out.empty()) {
      bool ok = true;
      for (size_t br = 0; br < 2; ++br)
        for (size_t bc = 0; bc < 2; ++bc) {
          float amax = 0;
          for (size_t r = br * 128; r < std::min(R, br * 128 + 128); ++r)
            for (size_t c = bc * 128; c < std::min(C, bc * 128 + 128); ++c) amax = std::max(amax, std::fabs(get<float>(x, 4 * (r * C + c))));
          const float s = e4m3_block_scale(amax);
          ok &= get<uint32_t>(out[0], grid_at + 4 * (br * 2 + bc)) == f32_bits(s);
          for (size_t r = br * 128; r < std::min(R, br * 128 + 128); ++r)
            for (size_t c = bc * 128; c < std::min(C, bc * 128 + 128); ++c)
              ok &= out[0][r * C + c] == f32_to_e4m3fn_bits(f32_bits(get<float>(x, 4 * (r * C + c)) / s));
        }
      check(ok, "fp8 quantize: data or scales");
    }
  }
  // Empty tensor and zero-extent copies.
  {
    Plan p = one_tensor_plan(DType::F32, 0, 5, {copy_of(kSrcSize, 0, DType::F32, 0, 5)}, 4);
    run_plan("empty tensor", p);
  }
}

void expect_plan_rejected(const std::string& what, const Plan& plan) {
  for (const auto& d : plan.dests) ::unlink(d.path.c_str());
  expect_format_error("hostile plan: " + what, [&] { execute_plan(plan, option_sets()[1], {}); });
  for (const auto& d : plan.dests) check(!exists(d.path), "hostile plan: " + what + ": destination was created before the plan was refused");
}

void executor_hostile_plans() {
  constexpr uint64_t M = std::numeric_limits<uint64_t>::max();
  auto base = [] { return one_tensor_plan(DType::F32, 4, 4, {copy_of(0, 16, DType::F32, 4, 4)}, 64); };
  {
    Plan p = base();
    auto out = run_plan("hostile baseline", p);  // the base plan itself is fine
    check(!out.empty(), "hostile baseline plan failed");
  }
  auto mutate = [&](const std::string& what, const std::function<void(Plan&)>& edit) {
    Plan p = base();
    edit(p);
    expect_plan_rejected(what, p);
  };
  auto C0 = [](Plan& p) -> BlockCopy& { return p.tensors[0].copies[0]; };
  mutate("source range past EOF", [&](Plan& p) { C0(p).src_offset = kSrcSize - 60; });
  mutate("source offset at UINT64_MAX", [&](Plan& p) { C0(p).src_offset = M - 3; });
  mutate("source row stride overflows", [&](Plan& p) { C0(p).src_row_stride = M / 2; });
  mutate("source row stride huge", [&](Plan& p) { C0(p).src_row_stride = uint64_t(1) << 40; });
  mutate("source index missing", [&](Plan& p) { C0(p).source = 1; });
  mutate("source index UINT32_MAX-1", [&](Plan& p) { C0(p).source = UINT32_MAX - 1; });
  mutate("destination index missing", [&](Plan& p) { p.tensors[0].dest = 1; });
  mutate("tensor past dest size", [&](Plan& p) { p.tensors[0].offset = 8; });
  mutate("tensor offset overflows", [&](Plan& p) { p.tensors[0].offset = M - 8; });
  mutate("tensor area overflows", [&](Plan& p) {
    p.tensors[0].rows = uint64_t(1) << 32;
    p.tensors[0].cols = uint64_t(1) << 32;
  });
  mutate("tensor bytes overflow", [&](Plan& p) {
    p.tensors[0].rows = uint64_t(1) << 31;
    p.tensors[0].cols = uint64_t(1) << 31;
  });
  mutate("tensor area overflow wraps to 16", [&](Plan& p) {
    p.tensors[0].rows = (uint64_t(1) << 32) + 1;
    p.tensors[0].cols = (uint64_t(1) << 32) - 1;  // product 2^64 - 1
  });
  mutate("copy outside tensor", [&](Plan& p) { C0(p).dst_row = 1; });
  mutate("copy dst_row overflows", [&](Plan& p) { C0(p).dst_row = M; });
  mutate("copy dst_col overflows", [&](Plan& p) { C0(p).dst_col = M - 2; });
  mutate("copy rows overflow", [&](Plan& p) {
    C0(p).rows = M;
    C0(p).dst_row = 5;
  });
  mutate("copy area overflows", [&](Plan& p) {
    C0(p).rows = uint64_t(1) << 33;
    C0(p).cols = uint64_t(1) << 33;
  });
  mutate("copy cols overflow source row", [&](Plan& p) { C0(p).cols = M / 2; });
  mutate("copies do not tile", [&](Plan& p) { C0(p).rows = 3; });
  mutate("copies overcount", [&](Plan& p) { p.tensors[0].copies.push_back(copy_of(0, 16, DType::F32, 1, 1)); });
  mutate("no copies", [&](Plan& p) { p.tensors[0].copies.clear(); });
  mutate("literal past end", [&](Plan& p) { p.literals.push_back({0, 60, "12345"}); });
  mutate("literal offset overflows", [&](Plan& p) { p.literals.push_back({0, M - 1, "12345"}); });
  mutate("literal names missing dest", [&](Plan& p) { p.literals.push_back({3, 0, "x"}); });
  mutate("unsupported cast I32->F32", [&](Plan& p) { C0(p).src_dtype = DType::I32; });
  mutate("fp8 cast without scales", [&](Plan& p) { C0(p).src_dtype = DType::F8_E4M3; });
  mutate("cast to fp8 without quantize", [&](Plan& p) {
    p.tensors[0].dtype = DType::F8_E4M3;
    p.dests[0].size = 16;
  });
  mutate("quantize to BF16", [&](Plan& p) {
    p.tensors[0].quantize = true;
    p.tensors[0].dtype = DType::BF16;
  });
  mutate("quantize scale grid past end", [&](Plan& p) {
    p.tensors[0].quantize = true;
    p.tensors[0].dtype = DType::F8_E4M3;
    p.tensors[0].scale_offset = 62;
  });
  mutate("quantize scale offset overflows", [&](Plan& p) {
    p.tensors[0].quantize = true;
    p.tensors[0].dtype = DType::F8_E4M3;
    p.tensors[0].scale_offset = M - 1;
  });
  mutate("quantize an I8 source", [&](Plan& p) {
    p.tensors[0].quantize = true;
    p.tensors[0].dtype = DType::F8_E4M3;
    C0(p).src_dtype = DType::I8;
  });
  auto scaled = [&](Plan& p) {
    C0(p).src_dtype = DType::F8_E4M3;
    C0(p).src_row_stride = 4;
    C0(p).scale_source = 0;
    C0(p).scale_offset = 1024;
    C0(p).scale_row_stride = 4;
    C0(p).scale_block = 2;
  };
  {
    Plan p = base();
    scaled(p);
    // The random bytes as fp8 may hold NaN patterns: fine, only that the plan runs is checked.
    run_plan("hostile baseline (scaled)", p);
  }
  mutate("scale source missing", [&](Plan& p) {
    scaled(p);
    C0(p).scale_source = 5;
  });
  mutate("scale block 0", [&](Plan& p) {
    scaled(p);
    C0(p).scale_block = 0;
  });
  mutate("scale range past EOF", [&](Plan& p) {
    scaled(p);
    C0(p).scale_offset = kSrcSize - 4;
  });
  mutate("scale offset overflows", [&](Plan& p) {
    scaled(p);
    C0(p).scale_offset = M - 2;
  });
  mutate("scale row stride overflows", [&](Plan& p) {
    scaled(p);
    C0(p).scale_row_stride = M / 2 + 1;
  });
  mutate("scale row0 overflows", [&](Plan& p) {
    scaled(p);
    C0(p).scale_row0 = M - 1;
  });
  mutate("scale col0 huge", [&](Plan& p) {
    scaled(p);
    C0(p).scale_col0 = M / 2;
  });
  mutate("scale col0 overflows", [&](Plan& p) {
    scaled(p);
    C0(p).scale_col0 = M - 1;
  });
  mutate("scaled copy of a BF16 source", [&](Plan& p) {
    scaled(p);
    C0(p).src_dtype = DType::BF16;
  });
  mutate("scaled transposed copy", [&](Plan& p) {
    scaled(p);
    C0(p).transpose = true;
  });
  mutate("dequantize to I32", [&](Plan& p) {
    scaled(p);
    p.tensors[0].dtype = DType::I32;
  });
  // A missing source file: FormatError from the mapping (nothing created).
  mutate("source file missing", [&](Plan& p) { p.sources[0] = tmp_path("does-not-exist"); });
}

// Overlapping writes: the area of the copies adds up but two of them overlap (and leave a hole),
// or two ranges of one destination file overlap. Each must be refused, naming the numbers.
void expect_plan_message(const std::string& what, const Plan& plan, const std::string& message) {
  expect_plan_rejected(what, plan);
  check(g_last_error.find(message) != std::string::npos,
        "hostile plan: " + what + ": message '" + g_last_error + "' lacks '" + message + "'");
}

void executor_overlap_plans() {
  // [4, 4] F32 as four [2, 2] quadrants; variants move one quadrant onto another.
  auto quadrants = [] {
    return one_tensor_plan(DType::F32, 4, 4,
                           {copy_of(0, 16, DType::F32, 2, 2, 0, 0), copy_of(8, 16, DType::F32, 2, 2, 0, 2),
                            copy_of(32, 16, DType::F32, 2, 2, 2, 0), copy_of(40, 16, DType::F32, 2, 2, 2, 2)},
                           64);
  };
  check(!run_plan("overlap baseline (quadrants)", quadrants()).empty(), "overlap baseline plan failed");
  {
    Plan p = quadrants();
    p.tensors[0].copies[3].dst_row = 1;  // [1+2, 2+2] over #1 [0+2, 2+2]; rows 3, cols 2..4 left a hole
    expect_plan_message("copies overlap, area adds up", p,
                        "out.bin: output tensor #0: block copies #1 [0+2, 2+2] and #3 [1+2, 2+2] overlap in rows [1, 2), columns [2, 4)");
  }
  {
    Plan p = quadrants();
    p.tensors[0].copies[2].dst_col = 1;  // #2 [2+2, 1+2] reaches into #3's column 2
    expect_plan_message("copies overlap, neighbour to the right", p, "block copies #2 [2+2, 1+2] and #3 [2+2, 2+2] overlap in rows [2, 4), columns [2, 3)");
  }
  {
    Plan p = quadrants();
    p.tensors[0].copies[1].dst_col = 1;  // #1 [0+2, 1+2] entered after #0: found as #0's neighbour to the left
    std::swap(p.tensors[0].copies[0], p.tensors[0].copies[1]);
    expect_plan_message("copies overlap, neighbour to the left", p, "block copies #0 [0+2, 1+2] and #1 [0+2, 0+2] overlap in rows [0, 2), columns [1, 2)");
  }
  {
    Plan p = quadrants();
    p.tensors[0].copies[0] = p.tensors[0].copies[3];  // the same rectangle twice
    expect_plan_message("copies identical", p, "overlap in rows [2, 4), columns [2, 4)");
  }
  {
    // A 1 x 1 copy inside a long one that started rows earlier (still active in the sweep).
    Plan p = one_tensor_plan(DType::F32, 4, 4, {copy_of(0, 4, DType::F32, 4, 1, 0, 0), copy_of(0, 16, DType::F32, 4, 3, 0, 1)}, 64);
    check(!run_plan("overlap baseline (columns)", p).empty(), "overlap baseline (columns) failed");
    p.tensors[0].copies[1].cols = 2;
    p.tensors[0].copies.push_back(copy_of(0, 4, DType::F32, 1, 1, 3, 0));
    p.tensors[0].copies.push_back(copy_of(0, 4, DType::F32, 3, 1, 0, 3));
    expect_plan_message("copy inside a longer one", p, "block copies #0 [0+4, 0+1] and #2 [3+1, 0+1] overlap in rows [3, 4), columns [0, 1)");
  }
  {
    // Copies that only touch (end row == start row, end column == start column) are fine; empty
    // copies at any place are ignored.
    Plan p = one_tensor_plan(DType::F32, 3, 4, {copy_of(0, 16, DType::F32, 1, 4, 0, 0), copy_of(16, 16, DType::F32, 2, 1, 1, 0),
                                                copy_of(20, 16, DType::F32, 2, 3, 1, 1), copy_of(0, 16, DType::F32, 0, 4, 1, 0)},
                             48);
    check(!run_plan("touching copies", p).empty(), "touching copies were refused");
  }
  {
    // A tensor of 4096 rows x 64 one-row copies (a sweep, not n^2 pairs), then one moved onto another.
    const uint64_t R = 4096;
    std::vector<BlockCopy> rows;
    for (uint64_t r = 0; r < R; ++r) rows.push_back(copy_of(0, 0, DType::U8, 1, 64, R - 1 - r, 0));
    Plan p = one_tensor_plan(DType::U8, R, 64, rows, R * 64);
    check(!run_plan("4096 row copies", p).empty(), "4096 disjoint row copies were refused");
    p.tensors[0].copies[100].dst_row = 7;
    expect_plan_message("4096 row copies, one doubled", p, "block copies #100 [7+1, 0+64] and #4088 [7+1, 0+64] overlap");
  }

  // Ranges of one destination file.
  auto two_tensors = [] {
    Plan p = one_tensor_plan(DType::F32, 2, 4, {copy_of(0, 16, DType::F32, 2, 4)}, 8 + 32 + 32);
    p.tensors.push_back(p.tensors[0]);
    p.tensors[0].offset = 8;
    p.tensors[1].offset = 40;
    p.literals.push_back({0, 0, "HEADER!!"});
    return p;
  };
  check(!run_plan("dest ranges baseline", two_tensors()).empty(), "dest ranges baseline failed");
  {
    Plan p = two_tensors();
    p.tensors[1].offset = 36;
    expect_plan_message("tensors overlap", p, "out.bin: output tensor #1 [36, 68) overlaps output tensor #0 [8, 40)");
  }
  {
    Plan p = two_tensors();
    p.literals.push_back({0, 60, "xyz"});
    expect_plan_message("literal inside a tensor", p, "out.bin: literal #1 [60, 63) overlaps output tensor #1 [40, 72)");
  }
  {
    Plan p = two_tensors();
    p.literals[0].bytes = "HEADER!!!";
    expect_plan_message("literal runs into a tensor", p, "output tensor #0 [8, 40) overlaps literal #0 [0, 9)");
  }
  {
    // A tensor far past a long range is compared with that range, not with its immediate predecessor.
    Plan p = two_tensors();
    p.literals[0] = {0, 0, std::string(72, 'L')};
    p.literals.push_back({0, 0, ""});  // empty: never overlaps
    expect_plan_message("literal over both tensors", p, "output tensor #0 [8, 40) overlaps literal #0 [0, 72)");
    p.literals[0].bytes = "HEADER!!";
    p.tensors[0].copies[0].rows = 1;
    p.tensors[0].rows = 1;
    p.literals.push_back({0, 24, "gap filler"});  // [24, 34) lies in the gap after tensor #0 [8, 24)
    check(!run_plan("gap literal", p).empty(), "a literal in the gap between tensors was refused");
  }
  {
    // Quantized: the scale grid [1 x 1 float] must not overlap the fp8 bytes or another tensor.
    Plan p = one_tensor_plan(DType::F8_E4M3, 4, 4, {copy_of(0, 16, DType::F32, 4, 4)}, 16 + 4);
    p.tensors[0].quantize = true;
    p.tensors[0].scale_offset = 16;
    check(!run_plan("quantized, grid after the bytes", p).empty(), "quantized baseline failed");
    p.tensors[0].scale_offset = 12;
    expect_plan_message("scale grid over its own bytes", p, "the scale grid of output tensor #0 [12, 16) overlaps output tensor #0 [0, 16)");
    p.tensors[0].scale_offset = 16;
    p.literals.push_back({0, 18, "ab"});
    expect_plan_message("literal over a scale grid", p, "literal #0 [18, 20) overlaps the scale grid of output tensor #0 [16, 20)");
  }
  {
    // Two destination files: the same offsets in different files do not overlap.
    Plan p = two_tensors();
    p.dests.push_back({tmp_path("out2.bin"), 72});
    p.tensors[1].dest = 1;
    p.tensors[1].offset = 8;
    check(!run_plan("same offsets, two files", p).empty(), "tensors at the same offset of two files were refused");
  }
}

// ---------------------------------------------------------------------------------------------
// (c) cast round trips

// OutputFile, as execute_plan and --device cuda write through it: preallocated when opened,
// written at offsets, a write past the planned size refused, errors as IoError naming the file.
void output_file() {
  const std::string path = tmp_path("output_file.bin");
  Outcome o = run_guarded("OutputFile", [&] {
    OutputFile f(path, 16);
    check(read_file(path).size() == 16, "OutputFile: not sized to 16 bytes when opened");
    f.write(8, "89abcdef", 8);
    f.write(0, "01234567", 8);
    expect_format_error("OutputFile: a write past the planned size", [&] { f.write(12, "xxxxx", 5); });
    check(g_last_error == path + ": write of 5 bytes at 12 runs past the file size 16", "OutputFile: message '" + g_last_error + "'");
    expect_format_error("OutputFile: an overflowing write", [&] { f.write(std::numeric_limits<uint64_t>::max(), "x", 1); });
    f.sync();
    f.close();
    f.close();  // a second close does nothing
    check(run_guarded("OutputFile: write after close", [&] { f.write(0, "x", 1); }) == Outcome::Io, "OutputFile: write after close not an IoError");
  });
  check(o == Outcome::Ok, "OutputFile: " + g_last_error);
  const auto bytes = read_file(path);
  check(std::string(bytes.begin(), bytes.end()) == "0123456789abcdef", "OutputFile: bytes written");
  o = run_guarded("OutputFile in a missing directory", [&] { OutputFile f(tmp_path("missing/x.bin"), 4); });
  check(o == Outcome::Io && g_last_error.find(tmp_path("missing/x.bin") + ": cannot create") == 0, "OutputFile: missing directory: " + g_last_error);
  // Too large for any filesystem: refused when opened (fallocate, or ftruncate where there is none).
  o = run_guarded("OutputFile of 2^62 bytes", [&] { OutputFile f(tmp_path("huge.bin"), 1ull << 62); });
  check(o == Outcome::Io && g_last_error.find(tmp_path("huge.bin") + ": cannot ") == 0, "OutputFile: 2^62 bytes: " + g_last_error);
  ::unlink(tmp_path("huge.bin").c_str());
}

bool bf16_is_nan(uint16_t b) { return (b & 0x7F80) == 0x7F80 && (b & 0x7F); }
bool f16_is_nan(uint16_t h) { return (h & 0x7C00) == 0x7C00 && (h & 0x3FF); }

void cast_round_trips() {
  int bad_bf16 = 0, bad_f16 = 0;
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint16_t b = static_cast<uint16_t>(i);
    if (!bf16_is_nan(b) && f32_to_bf16_bits(bf16_to_f32_bits(b)) != b) ++bad_bf16;
    if (!f16_is_nan(b) && f32_to_f16_bits(f16_to_f32_bits(b)) != b) ++bad_f16;
    // NaN stays NaN.
    if (bf16_is_nan(b)) check(bf16_is_nan(f32_to_bf16_bits(bf16_to_f32_bits(b))), "bf16 NaN round trip is not NaN");
    if (f16_is_nan(b)) check(f16_is_nan(f32_to_f16_bits(f16_to_f32_bits(b))), "f16 NaN round trip is not NaN");
  }
  check(bad_bf16 == 0, "scalar bf16 -> f32 -> bf16 differs for " + std::to_string(bad_bf16) + " patterns");
  check(bad_f16 == 0, "scalar f16 -> f32 -> f16 differs for " + std::to_string(bad_f16) + " patterns");

  // cast_elements (the vectorized paths), at offsets 0..3 bytes from alignment, all 65536 patterns.
  for (DType half : {DType::BF16, DType::F16}) {
    for (size_t misalign = 0; misalign < 4; ++misalign) {
      std::vector<unsigned char> src(65536 * 2 + 8), mid(65536 * 4 + 8), back(65536 * 2 + 8);
      for (uint32_t i = 0; i < 65536; ++i) {
        uint16_t v = static_cast<uint16_t>(i);
        std::memcpy(&src[misalign + 2 * i], &v, 2);
      }
      Outcome o = run_guarded("cast_elements round trip", [&] {
        cast_elements(&src[misalign], half, &mid[misalign], DType::F32, 65536);
        cast_elements(&mid[misalign], DType::F32, &back[(misalign * 3) % 4], half, 65536);
      });
      if (o != Outcome::Ok) {
        failure(std::string("cast_elements ") + dtype_name(half) + " <-> F32 refused");
        continue;
      }
      int bad = 0, bad_mid = 0;
      for (uint32_t i = 0; i < 65536; ++i) {
        uint16_t v = static_cast<uint16_t>(i), r;
        uint32_t m;
        std::memcpy(&r, &back[(misalign * 3) % 4 + 2 * i], 2);
        std::memcpy(&m, &mid[misalign + 4 * i], 4);
        const bool nan = half == DType::BF16 ? bf16_is_nan(v) : f16_is_nan(v);
        if (m != (half == DType::BF16 ? bf16_to_f32_bits(v) : f16_to_f32_bits(v))) ++bad_mid;
        if (nan ? !(half == DType::BF16 ? bf16_is_nan(r) : f16_is_nan(r)) : r != v) ++bad;
      }
      check(bad == 0, std::string("cast_elements ") + dtype_name(half) + " -> F32 -> back differs for " + std::to_string(bad) +
                          " patterns (misalign " + std::to_string(misalign) + ")");
      check(bad_mid == 0, std::string("cast_elements ") + dtype_name(half) + " -> F32 differs from the scalar function for " +
                              std::to_string(bad_mid) + " patterns");
    }
  }
  // bf16 <-> f16 through cast_elements equals the scalar functions for every pattern.
  {
    std::vector<uint16_t> src(65536), a(65536), b(65536);
    for (uint32_t i = 0; i < 65536; ++i) src[i] = static_cast<uint16_t>(i);
    run_guarded("cast_elements bf16<->f16", [&] {
      cast_elements(src.data(), DType::BF16, a.data(), DType::F16, 65536);
      cast_elements(src.data(), DType::F16, b.data(), DType::BF16, 65536);
    });
    int bad = 0;
    for (uint32_t i = 0; i < 65536; ++i) bad += (a[i] != bf16_to_f16_bits(src[i])) + (b[i] != f16_to_bf16_bits(src[i]));
    check(bad == 0, "cast_elements bf16 <-> f16 differs from the scalar functions for " + std::to_string(bad) + " patterns");
  }
  // e4m3fn: all 256 patterns round trip through f32 (NaN stays NaN).
  {
    int bad = 0;
    for (uint32_t i = 0; i < 256; ++i) {
      const uint8_t q = static_cast<uint8_t>(i);
      const uint8_t r = f32_to_e4m3fn_bits(e4m3fn_to_f32_bits(q));
      if ((q & 0x7F) == 0x7F) bad += (r & 0x7F) != 0x7F;
      else bad += r != q;
    }
    check(bad == 0, "e4m3fn -> f32 -> e4m3fn differs for " + std::to_string(bad) + " patterns");
    for (DType to : {DType::F32, DType::BF16, DType::F16}) {
      if (!fp8_cast_supported(DType::F8_E4M3, to) || !fp8_cast_supported(to, DType::F8_E4M3)) {
        failure(std::string("fp8_cast_supported F8_E4M3 <-> ") + dtype_name(to) + " is false");
        continue;
      }
      std::vector<unsigned char> q(256), mid(256 * 4), back(256);
      for (size_t i = 0; i < 256; ++i) q[i] = static_cast<unsigned char>(i);
      run_guarded("fp8_cast_elements", [&] {
        fp8_cast_elements(q.data(), DType::F8_E4M3, mid.data(), to, 256);
        fp8_cast_elements(mid.data(), to, back.data(), DType::F8_E4M3, 256);
      });
      int badc = 0;
      for (size_t i = 0; i < 256; ++i) badc += ((i & 0x7F) == 0x7F) ? (back[i] & 0x7F) != 0x7F : back[i] != q[i];
      check(badc == 0, std::string("fp8_cast_elements F8_E4M3 -> ") + dtype_name(to) + " -> back differs for " + std::to_string(badc) + " patterns");
    }
  }
  // Unsupported pairs throw FormatError.
  {
    unsigned char a[16] = {}, b[16] = {};
    expect_format_error("cast_elements I32 -> F32", [&] { cast_elements(a, DType::I32, b, DType::F32, 2); });
  }
}

}  // namespace

int main(int argc, char** argv) {
  char tmpl[] = "/tmp/pyconv_core_tests.XXXXXX";
  if (!::mkdtemp(tmpl)) {
    std::perror("mkdtemp");
    return 2;
  }
  g_tmp = tmpl;

  size_t files = 0;
  for (int i = 1; i < argc; ++i) scan_path(argv[i], &files);
  safetensors_entry_table();
  make_source();
  executor_valid_plans();
  executor_hostile_plans();
  executor_overlap_plans();
  output_file();
  cast_round_trips();

  std::error_code ec;
  fs::remove_all(g_tmp, ec);
  std::printf("core_tests: %zu corpus files, %d checks, %d failures (cast ISA %s)\n", files, g_checks, g_failures, cast_isa());
  if (g_failures) {
    std::fprintf(stderr, "core_tests: FAILED\n");
    return 1;
  }
  std::printf("core_tests: OK\n");
  return 0;
}
