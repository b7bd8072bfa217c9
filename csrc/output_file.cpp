#include "output_file.h"

#include <fcntl.h>
#include <linux/fs.h>  // RENAME_NOREPLACE
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "errors.h"
#include "safetensors.h"

namespace pyconv {

namespace {
std::string errno_text(int err) { return std::strerror(err); }
}  // namespace

OutputFile::OutputFile(const std::string& path, uint64_t size) : path_(path), size_(size) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) throw IoError(path + ": cannot create: " + errno_text(errno));
  if (size == 0) return;
  // Preallocated so that a full disk fails now, before any copying, with a clear error.
  if (::fallocate(fd_, 0, 0, static_cast<off_t>(size)) == 0) return;
  const int err = errno;
  if (err == ENOSPC || err == EDQUOT || err == EFBIG) {
    close_quietly();
    throw IoError(path + ": cannot allocate " + std::to_string(size) + " bytes: " + errno_text(err));
  }
  // Filesystems without fallocate: a sparse file of the final size.
  if (::ftruncate(fd_, static_cast<off_t>(size)) != 0) {
    const int truncate_err = errno;
    close_quietly();
    throw IoError(path + ": cannot size to " + std::to_string(size) + " bytes: " + errno_text(truncate_err));
  }
}

void OutputFile::write(uint64_t offset, const void* data, uint64_t length) const {
  uint64_t end;
  if (!checked_add(offset, length, &end) || end > size_)
    throw FormatError(path_ + ": write of " + std::to_string(length) + " bytes at " + std::to_string(offset) +
                      " runs past the file size " + std::to_string(size_));
  if (fd_ < 0) throw IoError(path_ + ": write after the file was closed");
  const unsigned char* p = static_cast<const unsigned char*>(data);
  while (length > 0) {
    const size_t step = static_cast<size_t>(std::min<uint64_t>(length, 1ull << 30));
    ssize_t n = ::pwrite(fd_, p, step, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw IoError(path_ + ": write failed: " + errno_text(n < 0 ? errno : EIO));
    p += n;
    length -= static_cast<uint64_t>(n);
    offset += static_cast<uint64_t>(n);
  }
}

void OutputFile::start_writeback(uint64_t offset, uint64_t length) const {
  if (fd_ >= 0) ::sync_file_range(fd_, static_cast<off_t>(offset), static_cast<off_t>(length), SYNC_FILE_RANGE_WRITE);
}

void OutputFile::sync() const {
  if (fd_ < 0) throw IoError(path_ + ": fsync after the file was closed");
  if (::fsync(fd_) != 0) throw IoError(path_ + ": fsync failed: " + errno_text(errno));
}

void OutputFile::close() {
  if (fd_ < 0) return;
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0) throw IoError(path_ + ": close failed: " + errno_text(errno));
}

void OutputFile::close_quietly() noexcept {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

int rename_no_replace(const std::string& from, const std::string& to) {
  if (::syscall(SYS_renameat2, AT_FDCWD, from.c_str(), AT_FDCWD, to.c_str(), RENAME_NOREPLACE) == 0) return 0;
  return errno;
}

}  // namespace pyconv
