// A destination file of a plan, as every executor writes it: created (truncated) and
// preallocated to its planned size when opened, so that a full disk fails then, before any
// copying; positional writes inside that size, from any number of threads; fsync and close
// whose failures are reported (some filesystems report a failed write only at close).
#pragma once
#include <cstdint>
#include <string>

namespace pyconv {

class OutputFile {
 public:
  // Throws IoError when the file cannot be created or its size allocated (ENOSPC, EDQUOT, EFBIG).
  OutputFile(const std::string& path, uint64_t size);
  ~OutputFile() { close_quietly(); }
  OutputFile(const OutputFile&) = delete;
  OutputFile& operator=(const OutputFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }
  int fd() const { return fd_; }  // for copy_file_range; -1 once closed

  // Writes all of [data, data + length) at offset, however many pwrite calls that takes.
  // Throws FormatError when the range runs past the planned size, IoError when the write fails.
  void write(uint64_t offset, const void* data, uint64_t length) const;
  // Starts writeback of a written range now, so that dirty pages do not pile up and the final
  // fsync is short.
  void start_writeback(uint64_t offset, uint64_t length) const;
  void sync() const;  // fsync; throws IoError
  // Closes the file; throws IoError on failure (the descriptor is gone either way). Closing a
  // closed file does nothing.
  void close();
  // Closes it without reporting a failure: for a file abandoned after an error, which is the
  // one to report.
  void close_quietly() noexcept;

 private:
  std::string path_;
  uint64_t size_;
  int fd_ = -1;
};

// Renames from to to unless to exists (renameat2 RENAME_NOREPLACE): the commit of an output
// that must never replace a destination another process created meanwhile. Returns 0, or the
// errno: EEXIST (or ENOTEMPTY) when to exists, EINVAL or ENOSYS where the filesystem or kernel
// cannot rename without replacing.
int rename_no_replace(const std::string& from, const std::string& to);

}  // namespace pyconv
