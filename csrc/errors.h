// Exception types of the core. The bindings translate them to pyconv.FormatError
// (untrusted bytes that are wrong) and pyconv.PyconvError (I/O and plan errors).
#pragma once
#include <stdexcept>
#include <string>

namespace pyconv {

// The input bytes (a header, an offset table, a plan's byte range) are malformed.
struct FormatError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The operating system refused an operation (open, mmap, write, fsync, disk full...).
struct IoError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The run was cancelled (signal, or the progress callback asked to stop).
struct Cancelled : std::runtime_error {
  using std::runtime_error::runtime_error;
};

}  // namespace pyconv
