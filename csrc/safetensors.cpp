#include "safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "errors.h"

namespace pyconv {

bool checked_mul(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_mul_overflow(a, b, out); }
bool checked_add(uint64_t a, uint64_t b, uint64_t* out) { return !__builtin_add_overflow(a, b, out); }

namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw FormatError(path + ": " + what);
}

bool valid_utf8(const std::string& s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0, n = s.size();
  while (i < n) {
    unsigned char c = p[i];
    size_t len;
    uint32_t cp;
    if (c < 0x80) { ++i; continue; }
    else if ((c & 0xE0) == 0xC0) { len = 2; cp = c & 0x1F; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; }
    else return false;
    if (i + len > n) return false;
    for (size_t k = 1; k < len; ++k) {
      if ((p[i + k] & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (p[i + k] & 0x3F);
    }
    // Reject overlong forms, surrogates and code points past U+10FFFF.
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        (cp >= 0xD800 && cp <= 0xDFFF) || cp > 0x10FFFF)
      return false;
    i += len;
  }
  return true;
}

std::string errno_text() { return std::strerror(errno); }

}  // namespace

SafetensorsPrefix read_safetensors_prefix(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);  // a FIFO must not block the open
  if (fd < 0) throw FormatError(path + ": cannot open: " + errno_text());
  struct Closer { int fd; ~Closer() { ::close(fd); } } closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) throw FormatError(path + ": cannot stat: " + errno_text());
  if (!S_ISREG(st.st_mode)) fail(path, "not a regular file");
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) fail(path, "file is " + std::to_string(file_size) + " bytes, too short for a safetensors header (8-byte length prefix)");
  unsigned char prefix[8];
  if (::pread(fd, prefix, 8, 0) != 8) throw IoError(path + ": cannot read the header length: " + errno_text());
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | prefix[i];  // little-endian
  if (header_len > kMaxSafetensorsHeader)
    fail(path, "header length " + std::to_string(header_len) + " exceeds the limit of " + std::to_string(kMaxSafetensorsHeader) + " bytes");
  if (header_len > file_size - 8)
    fail(path, "header length " + std::to_string(header_len) + " runs past the end of the file (" + std::to_string(file_size) + " bytes)");
  std::string header(header_len, '\0');
  size_t got = 0;
  while (got < header_len) {
    ssize_t r = ::pread(fd, header.data() + got, header_len - got, static_cast<off_t>(8 + got));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) throw IoError(path + ": cannot read the header: " + (r == 0 ? std::string("unexpected end of file") : errno_text()));
    got += static_cast<size_t>(r);
  }
  if (!valid_utf8(header)) fail(path, "header is not valid UTF-8");
  if (header.empty() || header[0] != '{') fail(path, "header does not start with '{' (not a JSON object)");
  return {header_len, file_size, std::move(header)};
}

std::vector<TensorRecord> validate_safetensors(const std::string& path, uint64_t header_len,
                                               uint64_t file_size,
                                               const std::vector<RawTensorEntry>& entries) {
  // The caller passes what read_safetensors_prefix returned; refuse anything else rather than
  // let 8 + header_len or file_size - data_start wrap (offsets would land inside the prefix).
  if (file_size < 8 || header_len > kMaxSafetensorsHeader || header_len > file_size - 8)
    fail(path, "header length " + std::to_string(header_len) + " does not fit the file (" + std::to_string(file_size) + " bytes)");
  std::vector<TensorRecord> records;
  records.reserve(entries.size());
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // (begin, end) per record
  for (const auto& e : entries) {
    const std::string where = "tensor '" + e.name + "': ";
    auto dtype = dtype_from_name(e.dtype);
    if (!dtype) fail(path, where + "unknown dtype '" + e.dtype + "'");
    uint64_t numel = 1;
    std::vector<uint64_t> shape;
    for (int64_t d : e.shape) {
      if (d < 0) fail(path, where + "negative dimension " + std::to_string(d) + " in shape");
      if (!checked_mul(numel, static_cast<uint64_t>(d), &numel))
        fail(path, where + "shape has too many elements (overflow)");
      shape.push_back(static_cast<uint64_t>(d));
    }
    uint64_t nbytes;
    if (!checked_mul(numel, dtype_itemsize(*dtype), &nbytes)) fail(path, where + "byte size overflows");
    if (e.begin < 0 || e.end < 0) fail(path, where + "negative data offset");
    const uint64_t begin = static_cast<uint64_t>(e.begin), end = static_cast<uint64_t>(e.end);
    if (end < begin) fail(path, where + "data_offsets end " + std::to_string(end) + " is before begin " + std::to_string(begin));
    if (end - begin != nbytes)
      fail(path, where + "data_offsets span " + std::to_string(end - begin) + " bytes but dtype " + e.dtype +
                     " and shape need " + std::to_string(nbytes));
    records.push_back({e.name, *dtype, std::move(shape), begin, nbytes});
    ranges.emplace_back(begin, end);
  }
  std::vector<size_t> order(records.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ranges[a] < ranges[b]; });
  uint64_t expected = 0;
  for (size_t i : order) {
    if (ranges[i].first != expected) {
      const char* kind = ranges[i].first < expected ? "overlaps the previous tensor" : "leaves a gap after the previous tensor";
      fail(path, "tensor '" + records[i].name + "': data starts at " + std::to_string(ranges[i].first) + ", expected " +
                     std::to_string(expected) + " (" + kind + ")");
    }
    expected = ranges[i].second;
  }
  const uint64_t data_start = 8 + header_len;
  const uint64_t data_size = file_size - data_start;
  if (expected != data_size) {
    if (expected > data_size)
      fail(path, "tensor data needs " + std::to_string(expected) + " bytes but the file holds " + std::to_string(data_size) +
                     " after the header (truncated or offsets past end of file)");
    fail(path, "file has " + std::to_string(data_size - expected) + " bytes after the last tensor (data must end exactly at end of file)");
  }
  std::vector<TensorRecord> sorted;
  sorted.reserve(records.size());
  for (size_t i : order) {
    records[i].offset += data_start;
    sorted.push_back(std::move(records[i]));
  }
  return sorted;
}

}  // namespace pyconv
