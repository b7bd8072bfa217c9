// Python bindings: conversion of arguments and exceptions only; no logic lives here.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cast.h"
#include "dtype.h"
#include "errors.h"
#include "executor.h"
#include "mapped_file.h"
#include "safetensors.h"

namespace py = pybind11;
using namespace pyconv;

namespace {

DType parse_dtype(const std::string& name) {
  auto d = dtype_from_name(name);
  if (!d) throw FormatError("unknown dtype '" + name + "'");
  return *d;
}

[[noreturn]] void raise_pyconv(const char* cls, const char* message) {
  py::object type = py::module_::import("pyconv.errors").attr(cls);
  PyErr_SetObject(type.ptr(), py::str(message).ptr());
  throw py::error_already_set();
}

}  // namespace

PYBIND11_MODULE(_core, m) {
  m.doc() = "pyconv's compiled core: safetensors validation, casts and the block-copy executor";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const FormatError& e) {
      raise_pyconv("FormatError", e.what());
    } catch (const IoError& e) {
      raise_pyconv("OutputError", e.what());
    } catch (const Cancelled& e) {
      raise_pyconv("Cancelled", e.what());
    }
  });

  m.def("read_safetensors_prefix", [](const std::string& path) {
    SafetensorsPrefix p;
    {
      py::gil_scoped_release release;
      p = read_safetensors_prefix(path);
    }
    return py::make_tuple(p.header_len, p.file_size, py::bytes(p.header));
  }, py::arg("path"), "Reads and checks the 8-byte prefix and the raw JSON header.");

  m.def("validate_safetensors",
        [](const std::string& path, uint64_t header_len, uint64_t file_size,
           const std::vector<std::tuple<std::string, std::string, std::vector<int64_t>, int64_t, int64_t>>& raw) {
          std::vector<RawTensorEntry> entries;
          entries.reserve(raw.size());
          for (const auto& [name, dtype, shape, begin, end] : raw) entries.push_back({name, dtype, shape, begin, end});
          auto records = validate_safetensors(path, header_len, file_size, entries);
          py::list out;
          for (const auto& r : records)
            out.append(py::make_tuple(r.name, dtype_name(r.dtype), py::tuple(py::cast(r.shape)), r.offset, r.nbytes));
          return out;
        },
        py::arg("path"), py::arg("header_len"), py::arg("file_size"), py::arg("entries"),
        "Validates (name, dtype, shape, begin, end) entries; returns (name, dtype, shape, offset, nbytes) in file order.");

  m.def("cast", [](py::buffer src, const std::string& src_dtype, const std::string& dst_dtype) {
    const DType s = parse_dtype(src_dtype), d = parse_dtype(dst_dtype);
    if (!cast_supported(s, d)) throw FormatError("cast: unsupported cast " + src_dtype + " -> " + dst_dtype);
    // Only C-contiguous buffers: the bytes are read as one run.
    Py_buffer view;
    if (PyObject_GetBuffer(src.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) throw py::error_already_set();
    const size_t nbytes = static_cast<size_t>(view.len);
    if (nbytes % dtype_itemsize(s) != 0) {
      PyBuffer_Release(&view);
      throw FormatError("cast: buffer size is not a multiple of the " + src_dtype + " item size");
    }
    const size_t n = nbytes / dtype_itemsize(s);
    std::string out(n * dtype_itemsize(d), '\0');
    {
      py::gil_scoped_release release;
      cast_elements(view.buf, s, out.data(), d, n);
    }
    PyBuffer_Release(&view);
    return py::bytes(out);
  }, py::arg("src"), py::arg("src_dtype"), py::arg("dst_dtype"));

  m.def("itemsize", [](const std::string& name) { return dtype_itemsize(parse_dtype(name)); });
  m.def("cast_isa", &cast_isa, "The instruction-set variant the casts run with (portable, avx2, avx512).");

  py::class_<MappedFile>(m, "MappedFile", py::buffer_protocol())
      .def(py::init<const std::string&>())
      .def_property_readonly("path", &MappedFile::path)
      .def_property_readonly("size", &MappedFile::size)
      .def_buffer([](MappedFile& f) {
        return py::buffer_info(const_cast<unsigned char*>(f.data()), 1, py::format_descriptor<unsigned char>::format(), 1,
                               {static_cast<py::ssize_t>(f.size())}, {1}, /*readonly=*/true);
      });

  using CopyTuple = std::tuple<uint32_t, uint64_t, uint64_t, std::string, uint64_t, uint64_t, uint64_t, uint64_t, bool>;
  using TensorTuple = std::tuple<uint32_t, uint64_t, std::string, uint64_t, uint64_t, std::vector<CopyTuple>>;
  m.def("execute",
        [](const std::vector<std::string>& sources, const std::vector<std::pair<std::string, uint64_t>>& dests,
           const std::vector<std::tuple<uint32_t, uint64_t, py::bytes>>& literals, const std::vector<TensorTuple>& tensors,
           unsigned threads, uint64_t chunk_bytes, bool fsync, py::object progress) {
          Plan plan;
          plan.sources = sources;
          for (const auto& [path, size] : dests) plan.dests.push_back({path, size});
          for (const auto& [dest, offset, bytes] : literals) plan.literals.push_back({dest, offset, std::string(bytes)});
          plan.tensors.reserve(tensors.size());
          for (const auto& [dest, offset, dtype, rows, cols, copies] : tensors) {
            OutputTensor t{dest, offset, parse_dtype(dtype), rows, cols, {}};
            t.copies.reserve(copies.size());
            for (const auto& [src, src_offset, stride, src_dtype, crows, ccols, drow, dcol, transpose] : copies)
              t.copies.push_back({src, src_offset, stride, parse_dtype(src_dtype), crows, ccols, drow, dcol, transpose});
            plan.tensors.push_back(std::move(t));
          }
          ExecOptions options;
          options.threads = threads;
          options.chunk_bytes = chunk_bytes;
          options.fsync = fsync;
          bool python_error = false;
          ProgressTick tick = [&](uint64_t done, uint64_t total) {
            py::gil_scoped_acquire gil;
            if (PyErr_CheckSignals() != 0) {  // Ctrl-C or a signal handler that raised
              python_error = true;
              return false;
            }
            if (!progress.is_none()) {
              try {
                progress(done, total);
              } catch (py::error_already_set& e) {
                e.restore();
                python_error = true;
                return false;
              }
            }
            return true;
          };
          ExecStats stats;
          try {
            py::gil_scoped_release release;
            stats = execute_plan(plan, options, tick);
          } catch (const Cancelled&) {
            if (python_error) throw py::error_already_set();
            throw;
          }
          py::dict out;
          out["bytes_written"] = stats.bytes_written;
          out["tasks"] = stats.tasks;
          out["direct_tasks"] = stats.direct_tasks;
          out["seconds"] = stats.seconds;
          return out;
        },
        py::arg("sources"), py::arg("dests"), py::arg("literals"), py::arg("tensors"), py::arg("threads") = 4,
        py::arg("chunk_bytes") = 32ull << 20, py::arg("fsync") = true, py::arg("progress") = py::none(),
        "Runs a plan of block copies. tensors: (dest, offset, dtype, rows, cols, copies); copies: "
        "(source, src_offset, src_row_stride, src_dtype, rows, cols, dst_row, dst_col, transpose).");
}
