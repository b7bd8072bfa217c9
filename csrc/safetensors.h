// safetensors: the 8-byte length prefix, the JSON header and the offset table,
// validated as strictly as the reference implementation (huggingface/safetensors).
// JSON itself is parsed by the caller with a standard parser; this validates what it says.
#pragma once
#include <cstdint>
#include <string>
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

// Overflow-checked helpers shared with the executor.
bool checked_mul(uint64_t a, uint64_t b, uint64_t* out);
bool checked_add(uint64_t a, uint64_t b, uint64_t* out);

}  // namespace pyconv
