#include "safetensors.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <memory>
#include <unordered_set>

#include "yyjson.h"

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
    // ASCII runs (most of a header) eight bytes at a time.
    uint64_t word;
    while (i + 8 <= n && (std::memcpy(&word, p + i, 8), (word & 0x8080808080808080ull) == 0)) i += 8;
    if (i >= n) break;
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

namespace {

// The values of one entry (the core's checks): a known dtype, non-negative dimensions whose
// product and byte size do not overflow, non-negative offsets spanning exactly those bytes.
struct CheckedEntry {
  DType dtype;
  uint64_t begin, end, nbytes;
};

CheckedEntry check_entry_values(const std::string& path, std::string_view name, std::string_view dtype_name_text,
                                const int64_t* dims, size_t ndim, int64_t begin_in, int64_t end_in) {
  auto where = [&] { return "tensor '" + std::string(name) + "': "; };
  auto dtype = dtype_from_name(dtype_name_text);
  if (!dtype) fail(path, where() + "unknown dtype '" + std::string(dtype_name_text) + "'");
  uint64_t numel = 1;
  for (size_t i = 0; i < ndim; ++i) {
    const int64_t d = dims[i];
    if (d < 0) fail(path, where() + "negative dimension " + std::to_string(d) + " in shape");
    if (!checked_mul(numel, static_cast<uint64_t>(d), &numel)) fail(path, where() + "shape has too many elements (overflow)");
  }
  uint64_t nbytes;
  if (!checked_mul(numel, dtype_itemsize(*dtype), &nbytes)) fail(path, where() + "byte size overflows");
  if (begin_in < 0 || end_in < 0) fail(path, where() + "negative data offset");
  const uint64_t begin = static_cast<uint64_t>(begin_in), end = static_cast<uint64_t>(end_in);
  if (end < begin) fail(path, where() + "data_offsets end " + std::to_string(end) + " is before begin " + std::to_string(begin));
  if (end - begin != nbytes)
    fail(path, where() + "data_offsets span " + std::to_string(end - begin) + " bytes but dtype " + std::string(dtype_name_text) +
                   " and shape need " + std::to_string(nbytes));
  return {*dtype, begin, end, nbytes};
}

void check_header_fits(const std::string& path, uint64_t header_len, uint64_t file_size) {
  // The caller passes what read_safetensors_prefix returned; refuse anything else rather than
  // let 8 + header_len or file_size - data_start wrap (offsets would land inside the prefix).
  if (file_size < 8 || header_len > kMaxSafetensorsHeader || header_len > file_size - 8)
    fail(path, "header length " + std::to_string(header_len) + " does not fit the file (" + std::to_string(file_size) + " bytes)");
}

// The offset table: sorted by (begin, end), the ranges start at 0, follow each other without
// gap or overlap and end exactly at the end of the file. Returns the file order.
template <class RangeOf, class NameOf>
std::vector<size_t> check_offset_table(const std::string& path, uint64_t header_len, uint64_t file_size, size_t n,
                                       RangeOf range_of, NameOf name_of) {
  std::vector<size_t> order(n);
  for (size_t i = 0; i < n; ++i) order[i] = i;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return range_of(a) < range_of(b); });
  uint64_t expected = 0;
  for (size_t i : order) {
    const auto [begin, end] = range_of(i);
    if (begin != expected) {
      const char* kind = begin < expected ? "overlaps the previous tensor" : "leaves a gap after the previous tensor";
      fail(path, "tensor '" + std::string(name_of(i)) + "': data starts at " + std::to_string(begin) + ", expected " +
                     std::to_string(expected) + " (" + kind + ")");
    }
    expected = end;
  }
  const uint64_t data_size = file_size - (8 + header_len);
  if (expected != data_size) {
    if (expected > data_size)
      fail(path, "tensor data needs " + std::to_string(expected) + " bytes but the file holds " + std::to_string(data_size) +
                     " after the header (truncated or offsets past end of file)");
    fail(path, "file has " + std::to_string(data_size - expected) + " bytes after the last tensor (data must end exactly at end of file)");
  }
  return order;
}

}  // namespace

std::vector<TensorRecord> validate_safetensors(const std::string& path, uint64_t header_len,
                                               uint64_t file_size,
                                               const std::vector<RawTensorEntry>& entries) {
  check_header_fits(path, header_len, file_size);
  std::vector<TensorRecord> records;
  records.reserve(entries.size());
  std::vector<std::pair<uint64_t, uint64_t>> ranges;  // (begin, end) per record
  for (const auto& e : entries) {
    const CheckedEntry c = check_entry_values(path, e.name, e.dtype, e.shape.data(), e.shape.size(), e.begin, e.end);
    records.push_back({e.name, c.dtype, std::vector<uint64_t>(e.shape.begin(), e.shape.end()), c.begin, c.nbytes});
    ranges.emplace_back(c.begin, c.end);
  }
  const auto order = check_offset_table(
      path, header_len, file_size, records.size(), [&](size_t i) { return ranges[i]; },
      [&](size_t i) -> const std::string& { return records[i].name; });
  std::vector<TensorRecord> sorted;
  sorted.reserve(records.size());
  for (size_t i : order) {
    records[i].offset += 8 + header_len;
    sorted.push_back(std::move(records[i]));
  }
  return sorted;
}

namespace {

// What a JSON value was, as far as the header's checks care.
enum class JsonKind : uint8_t { Null, Bool, Int, IntOutOfRange, Float, String, Array, Object };

// An element of a shape or data_offsets list as the header spelled it.
struct JsonItem {
  JsonKind kind;
  int64_t value;     // when kind is Int
  std::string text;  // how any other value reads in a message
};

// A tensor entry as the header spelled it, before any check.
struct RawEntry {
  bool is_object, has_dtype, has_shape, has_offsets;
  JsonKind dtype_kind, shape_kind, offsets_kind;
  std::string dtype;
  std::vector<JsonItem> shape, offsets;

  void reset(bool object) {
    is_object = object;
    has_dtype = has_shape = has_offsets = false;
    dtype.clear();
    shape.clear();
    offsets.clear();
  }
};

// `text` cut to at most `limit` bytes without splitting a UTF-8 sequence.
std::string utf8_prefix(std::string_view text, size_t limit) {
  if (text.size() <= limit) return std::string(text);
  size_t n = limit;
  while (n > 0 && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80) --n;
  return std::string(text.substr(0, n)) + "...";
}

// The parsed document -> the compact header. JSON errors (also duplicate keys at any depth and
// nesting past kMaxJsonDepth) are thrown at once; the header's own errors are kept, the first of
// each kind, and thrown in the order a reader of the parsed JSON meets them (see the header).
class HeaderWalker {
 public:
  explicit HeaderWalker(const std::string& path) : path_(path) {}

  void walk_top(yyjson_val* root) {
    if (!yyjson_is_obj(root)) fail(path_, "header is not a JSON object");
    const size_t n = yyjson_obj_size(root);
    key_spans_.reserve(n);
    tensors_.reserve(n);
    bool metadata_seen = false;
    size_t idx, max;
    yyjson_val *key, *val;
    yyjson_obj_foreach(root, idx, max, key, val) {
      const std::string_view k = text_of(key);
      if (k == "__metadata__") {
        if (metadata_seen) duplicate_key(k);
        metadata_seen = true;
        read_metadata(val);
        continue;
      }
      key_spans_.emplace_back(names_.size(), static_cast<uint32_t>(k.size()));
      names_ += k;
      read_entry(val);
    }
    check_unique_names();
  }

  SafetensorsHeader finish(uint64_t header_len, uint64_t file_size) {
    if (metadata_bad_) fail(path_, "__metadata__ must map strings to strings");
    if (!structure_error_.empty()) fail(path_, structure_error_);
    if (!value_error_.empty()) throw FormatError(value_error_);
    SafetensorsHeader h;
    const auto order = check_offset_table(
        path_, header_len, file_size, tensors_.size(),
        [&](size_t i) { return std::make_pair(tensors_[i].offset, tensors_[i].offset + tensors_[i].nbytes); },
        [&](size_t i) { return std::string_view(names_).substr(tensors_[i].name_begin, tensors_[i].name_size); });
    h.tensors.reserve(order.size());
    for (size_t i : order) {
      h.tensors.push_back(tensors_[i]);
      h.tensors.back().offset += 8 + header_len;
    }
    h.names = std::move(names_);
    h.dims = std::move(dims_);
    h.metadata = std::move(metadata_);
    return h;
  }

 private:
  static std::string_view text_of(yyjson_val* s) { return {yyjson_get_str(s), yyjson_get_len(s)}; }

  [[noreturn]] void duplicate_key(std::string_view k) const {
    fail(path_, "header is not valid JSON: duplicate key '" + utf8_prefix(k, 200) + "'");
  }

  // Any value nobody reads still has to be JSON a strict reader accepts: no duplicate keys.
  void check_value(yyjson_val* v, int depth) {
    if (depth > kMaxJsonDepth)
      fail(path_, "header is not valid JSON: nesting deeper than " + std::to_string(kMaxJsonDepth) + " levels");
    size_t idx, max;
    if (yyjson_is_obj(v)) {
      std::vector<std::string_view> keys;
      keys.reserve(yyjson_obj_size(v));
      yyjson_val *key, *val;
      yyjson_obj_foreach(v, idx, max, key, val) {
        keys.push_back(text_of(key));
        check_value(val, depth + 1);
      }
      check_unique(keys);
    } else if (yyjson_is_arr(v)) {
      yyjson_val* item;
      yyjson_arr_foreach(v, idx, max, item) check_value(item, depth + 1);
    }
  }

  void check_unique(std::vector<std::string_view>& keys) const {
    if (keys.size() < 2) return;
    std::sort(keys.begin(), keys.end());
    for (size_t i = 1; i < keys.size(); ++i)
      if (keys[i] == keys[i - 1]) duplicate_key(keys[i]);
  }

  void check_unique_names() const {
    std::unordered_set<std::string_view> seen;
    seen.reserve(key_spans_.size());
    const std::string_view all(names_);
    for (const auto& [begin, size] : key_spans_)
      if (!seen.insert(all.substr(begin, size)).second) duplicate_key(all.substr(begin, size));
  }

  void read_metadata(yyjson_val* v) {
    check_value(v, 1);
    if (yyjson_is_null(v)) return;  // null: no metadata
    if (!yyjson_is_obj(v)) {
      metadata_bad_ = true;
      return;
    }
    size_t idx, max;
    yyjson_val *key, *val;
    yyjson_obj_foreach(v, idx, max, key, val) {
      if (!yyjson_is_str(val)) metadata_bad_ = true;
      else metadata_.emplace_back(std::string(text_of(key)), std::string(text_of(val)));
    }
  }

  // A value as an element of shape or data_offsets: an integer, or how it reads in a message.
  // Numbers come as their literal (YYJSON_READ_NUMBER_AS_RAW), already checked against JSON's grammar.
  static JsonItem item_of(yyjson_val* v) {
    switch (yyjson_get_type(v)) {
      case YYJSON_TYPE_RAW: {
        const std::string_view literal(yyjson_get_raw(v), yyjson_get_len(v));
        if (std::any_of(literal.begin(), literal.end(), [](char ch) { return ch == '.' || ch == 'e' || ch == 'E'; }))
          return {JsonKind::Float, 0, utf8_prefix(literal, 40)};
        // An integer: pyconv reads -(2^63 - 1) .. 2^63 - 1, as the Python reader it replaced did.
        const bool negative = literal[0] == '-';
        uint64_t magnitude = 0;
        bool in_range = true;
        for (char c : literal.substr(negative ? 1 : 0))
          in_range = in_range && checked_mul(magnitude, 10, &magnitude) && checked_add(magnitude, uint64_t(c - '0'), &magnitude);
        if (!in_range || magnitude > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()))
          return {JsonKind::IntOutOfRange, 0, utf8_prefix(literal, 60)};
        const int64_t value = static_cast<int64_t>(magnitude);
        return {JsonKind::Int, negative ? -value : value, {}};
      }
      case YYJSON_TYPE_STR: return {JsonKind::String, 0, "\"" + utf8_prefix(text_of(v), 38) + "\""};
      case YYJSON_TYPE_BOOL: return {JsonKind::Bool, 0, yyjson_get_bool(v) ? "true" : "false"};
      case YYJSON_TYPE_ARR: return {JsonKind::Array, 0, "[...]"};
      case YYJSON_TYPE_OBJ: return {JsonKind::Object, 0, "{...}"};
      default: return {JsonKind::Null, 0, "null"};
    }
  }

  static JsonKind kind_of(yyjson_val* v) {
    switch (yyjson_get_type(v)) {
      case YYJSON_TYPE_STR: return JsonKind::String;
      case YYJSON_TYPE_ARR: return JsonKind::Array;
      case YYJSON_TYPE_OBJ: return JsonKind::Object;
      default: return JsonKind::Null;  // any other scalar: not what a field needs
    }
  }

  void read_list(yyjson_val* v, std::vector<JsonItem>* items) {
    size_t idx, max;
    yyjson_val* item;
    yyjson_arr_foreach(v, idx, max, item) {
      check_value(item, 3);
      items->push_back(item_of(item));
    }
  }

  void read_entry(yyjson_val* v) {
    RawEntry& e = entry_;
    e.reset(yyjson_is_obj(v));
    if (!e.is_object) {
      check_value(v, 1);
    } else {
      std::vector<std::string_view>& others = other_keys_;
      others.clear();
      size_t idx, max;
      yyjson_val *key, *val;
      yyjson_obj_foreach(v, idx, max, key, val) {
        const std::string_view k = text_of(key);
        if (k == "dtype" || k == "shape" || k == "data_offsets") {
          bool& has = k == "dtype" ? e.has_dtype : k == "shape" ? e.has_shape : e.has_offsets;
          if (has) duplicate_key(k);
          has = true;
          const JsonKind kind = kind_of(val);
          if (k == "dtype") {
            e.dtype_kind = kind;
            if (kind == JsonKind::String) e.dtype.assign(text_of(val));
            else check_value(val, 2);
          } else {
            (k == "shape" ? e.shape_kind : e.offsets_kind) = kind;
            if (kind == JsonKind::Array) read_list(val, k == "shape" ? &e.shape : &e.offsets);
            else check_value(val, 2);
          }
        } else {
          others.push_back(k);
          check_value(val, 2);
        }
      }
      check_unique(others);
    }
    finish_entry();
  }

  std::string entry_name() const {
    const auto& [begin, size] = key_spans_.back();
    return std::string(std::string_view(names_).substr(begin, size));
  }

  // What a reader of the parsed JSON checks first: the entry's structure and integer types.
  std::string structure_problem() const {
    const std::string where = "tensor '" + entry_name() + "': ";
    const RawEntry& e = entry_;
    if (!e.is_object) return where + "entry is not a JSON object";
    std::string missing;
    for (auto [has, key] : {std::pair{e.has_dtype, "dtype"}, {e.has_shape, "shape"}, {e.has_offsets, "data_offsets"}})
      if (!has) missing += (missing.empty() ? "" : ", ") + std::string(key);
    if (!missing.empty()) return where + "missing " + missing;
    if (e.dtype_kind != JsonKind::String) return where + "dtype must be a string";
    if (e.shape_kind != JsonKind::Array) return where + "shape must be a list";
    if (e.offsets_kind != JsonKind::Array || e.offsets.size() != 2) return where + "data_offsets must be a list [begin, end]";
    auto integer = [&](const JsonItem& item, const char* what) -> std::string {
      if (item.kind == JsonKind::IntOutOfRange) return where + what + " " + item.text + " is out of range";
      if (item.kind != JsonKind::Int) return where + what + " must be an integer, got " + item.text;
      return {};
    };
    for (const auto& d : e.shape)
      if (auto p = integer(d, "shape entry"); !p.empty()) return p;
    for (const auto& o : e.offsets)
      if (auto p = integer(o, "data offset"); !p.empty()) return p;
    return {};
  }

  void finish_entry() {
    if (!structure_error_.empty()) return;  // refused already; only a JSON error could still come first
    if (auto problem = structure_problem(); !problem.empty()) {
      structure_error_ = std::move(problem);
      return;
    }
    if (!value_error_.empty()) return;
    dims_scratch_.clear();
    for (const auto& d : entry_.shape) dims_scratch_.push_back(d.value);
    const auto& [name_begin, name_size] = key_spans_.back();
    try {
      const CheckedEntry c = check_entry_values(path_, std::string_view(names_).substr(name_begin, name_size), entry_.dtype,
                                                dims_scratch_.data(), dims_scratch_.size(), entry_.offsets[0].value,
                                                entry_.offsets[1].value);
      tensors_.push_back({name_begin, dims_.size(), c.begin, c.nbytes, name_size,
                          static_cast<uint32_t>(dims_scratch_.size()), c.dtype});
      dims_.insert(dims_.end(), dims_scratch_.begin(), dims_scratch_.end());
    } catch (const FormatError& e) {
      value_error_ = e.what();
    }
  }

  const std::string& path_;
  RawEntry entry_;
  std::vector<std::string_view> other_keys_;
  std::vector<int64_t> dims_scratch_;
  bool metadata_bad_ = false;
  std::string structure_error_, value_error_;
  std::string names_;  // every top-level key but __metadata__, also of entries refused
  std::vector<std::pair<uint64_t, uint32_t>> key_spans_;
  std::vector<uint64_t> dims_;
  std::vector<SafetensorsHeader::Tensor> tensors_;  // offsets relative to the data section
  std::vector<std::pair<std::string, std::string>> metadata_;
};

// yyjson's message and position; NaN and Infinity (which Python's json would read) and unpaired
// surrogate escapes ("\ud800" alone, which Python would decode to a str UTF-8 cannot hold) by name.
std::string json_error_text(std::string_view text, const yyjson_read_err& err) {
  const size_t at = std::min<size_t>(err.pos, text.size());
  if (std::string_view(err.msg).find("surrogate") != std::string_view::npos)
    return "unpaired surrogate escape (" + std::string(err.msg) + ") at byte " + std::to_string(err.pos) + " of the header";
  for (std::string_view constant : {"-Infinity", "Infinity", "NaN"})
    for (size_t start : {at, at > 0 ? at - 1 : at})
      if (text.substr(start, constant.size()) == constant)
        return "non-standard JSON constant " + std::string(constant) + " at byte " + std::to_string(start) + " of the header";
  return std::string(err.msg) + " at byte " + std::to_string(err.pos) + " of the header";
}

}  // namespace

SafetensorsHeader parse_safetensors_header(const std::string& path, const SafetensorsPrefix& prefix) {
  check_header_fits(path, prefix.header_len, prefix.file_size);
  if (prefix.header.size() != prefix.header_len) fail(path, "header length does not match the header read");
  yyjson_read_err err;
  // Numbers come back as their literal: checked by the grammar, read (or named in a message) as written.
  std::unique_ptr<yyjson_doc, void (*)(yyjson_doc*)> doc(
      yyjson_read_opts(const_cast<char*>(prefix.header.data()), prefix.header.size(), YYJSON_READ_NUMBER_AS_RAW, nullptr, &err),
      yyjson_doc_free);
  if (!doc) fail(path, "header is not valid JSON: " + json_error_text(prefix.header, err));
  HeaderWalker walker(path);
  walker.walk_top(yyjson_doc_get_root(doc.get()));
  doc.reset();
  return walker.finish(prefix.header_len, prefix.file_size);
}

SafetensorsHeader read_safetensors_header(const std::string& path) {
  SafetensorsPrefix prefix = read_safetensors_prefix(path);
  return parse_safetensors_header(path, prefix);
}

}  // namespace pyconv
