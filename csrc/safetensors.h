// safetensors: the 8-byte length prefix, the JSON header and the offset table,
// validated as strictly as the reference implementation (huggingface/safetensors).
// The JSON is parsed by yyjson (RFC 8259, strict: no NaN, no comments, no trailing commas, no
// unpaired surrogate escapes), its document walked once; nothing calls into Python per key.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "dtype.h"

namespace pyconv {

constexpr uint64_t kMaxSafetensorsHeader = 100'000'000;

struct SafetensorsPrefix {
  uint64_t header_len;  // bytes of JSON after the 8-byte prefix
  uint64_t file_size;
  std::string header;   // the raw JSON bytes, UTF-8 checked
};

// Reads and checks the prefix: file >= 8 bytes, header length <= 100,000,000 and
// inside the file, header valid UTF-8 starting with '{'.
SafetensorsPrefix read_safetensors_prefix(const std::string& path);

// One entry of the header as JSON gave it (untrusted).
struct RawTensorEntry {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  int64_t begin;
  int64_t end;
};

// One validated tensor; offset is absolute in the file.
struct TensorRecord {
  std::string name;
  DType dtype;
  std::vector<uint64_t> shape;
  uint64_t offset;
  uint64_t nbytes;
};

// Checks dtypes, shapes (non-negative, overflow-checked products), byte sizes and
// the offset table (sorted, from 0, contiguous, ending exactly at end of file).
// Returns the tensors in file order. Throws FormatError naming the file and tensor.
std::vector<TensorRecord> validate_safetensors(const std::string& path, uint64_t header_len,
                                               uint64_t file_size,
                                               const std::vector<RawTensorEntry>& entries);

// A validated header, compact: every name in one buffer, every shape in one array, so a
// header of millions of tensors costs tens of bytes per tensor.
struct SafetensorsHeader {
  struct Tensor {
    uint64_t name_begin;  // into names
    uint64_t dims_begin;  // into dims
    uint64_t offset;      // absolute in the file
    uint64_t nbytes;
    uint32_t name_size;
    uint32_t ndim;
    DType dtype;
  };
  std::string names;
  std::vector<uint64_t> dims;
  std::vector<Tensor> tensors;  // in file order (by offset)
  std::vector<std::pair<std::string, std::string>> metadata;  // in header order

  std::string_view name(const Tensor& t) const { return std::string_view(names).substr(t.name_begin, t.name_size); }
};

// Parses and validates the JSON of a prefix read_safetensors_prefix returned. Errors, each a
// FormatError naming the file, come in the order a reader of the parsed JSON would meet them:
// JSON syntax (also duplicate keys at any depth, NaN/Infinity, unpaired surrogate escapes,
// control characters, nesting deeper than kMaxJsonDepth), then __metadata__ (strings to
// strings, or null), then the structure of each entry in order (an object with a string
// dtype, a list shape of integers, [begin, end] integer data_offsets, each within +-(2^63-1)),
// then the values of each entry and the offset table as validate_safetensors checks them.
SafetensorsHeader parse_safetensors_header(const std::string& path, const SafetensorsPrefix& prefix);

// read_safetensors_prefix then parse_safetensors_header, the raw JSON freed before returning.
SafetensorsHeader read_safetensors_header(const std::string& path);

constexpr int kMaxJsonDepth = 512;

// Overflow-checked helpers shared with the executor.
bool checked_mul(uint64_t a, uint64_t b, uint64_t* out);
bool checked_add(uint64_t a, uint64_t b, uint64_t* out);

}  // namespace pyconv
