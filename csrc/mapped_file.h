// A whole file mapped read-only. Mapping costs address space, not memory: pages become
// resident as they are touched and are released again with release().
#pragma once
#include <cstdint>
#include <string>

namespace pyconv {

class MappedFile {
 public:
  explicit MappedFile(const std::string& path);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const std::string& path() const { return path_; }
  uint64_t size() const { return size_; }
  int fd() const { return fd_; }
  const unsigned char* data() const { return data_; }

  // Throws FormatError unless [offset, offset + length) lies inside the file.
  void check_range(uint64_t offset, uint64_t length, const char* what) const;
  // Read-ahead hint for a range about to be consumed.
  void will_need(uint64_t offset, uint64_t length) const;
  // Drops this process's mapping of the pages of a consumed range (the page cache keeps them).
  void release(uint64_t offset, uint64_t length) const;

 private:
  std::string path_;
  int fd_ = -1;
  uint64_t size_ = 0;
  unsigned char* data_ = nullptr;
};

}  // namespace pyconv
