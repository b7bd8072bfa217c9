// Python bindings: conversion of arguments and exceptions only; no logic lives here.
#include <pybind11/functional.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string_view>
#include <unordered_map>

#include "cast.h"
#include "dtype.h"
#include "errors.h"
#include "executor.h"
#include "fp8.h"
#include "mapped_file.h"
#include "output_file.h"
#include "safetensors.h"

namespace py = pybind11;
using namespace pyconv;

namespace {

DType parse_dtype(const std::string& name) {
  auto d = dtype_from_name(name);
  if (!d) throw FormatError("unknown dtype '" + name + "'");
  return *d;
}

// A low-rank term: (left_source, left_offset, left_row_stride, left_k_stride, left_dtype,
// right_source, right_offset, right_k_stride, right_col_stride, right_dtype, rank, scale).
LowRankTerm to_low_rank_term(py::handle h) {
  const auto f = h.cast<py::sequence>();
  if (f.size() != 12) throw FormatError("plan: a low-rank term has 12 fields; got " + std::to_string(f.size()));
  return {f[0].cast<uint32_t>(), f[1].cast<uint64_t>(), f[2].cast<uint64_t>(), f[3].cast<uint64_t>(),
          parse_dtype(f[4].cast<std::string>()), f[5].cast<uint32_t>(), f[6].cast<uint64_t>(), f[7].cast<uint64_t>(),
          f[8].cast<uint64_t>(), parse_dtype(f[9].cast<std::string>()), f[10].cast<uint64_t>(), f[11].cast<float>()};
}

// A block copy: (source, src_offset, src_row_stride, src_dtype, rows, cols, dst_row,
// dst_col, transpose), optionally followed by a block-scaled fp8 source's (scale_source,
// scale_offset, scale_row_stride, scale_row0, scale_col0, scale_block), then optionally by a
// list of low-rank terms (10 or 16 fields).
BlockCopy to_block_copy(py::handle h) {
  auto f = h.cast<py::sequence>();
  std::vector<LowRankTerm> low_rank;
  if (f.size() == 10 || f.size() == 16) {
    for (const auto& term : f[f.size() - 1].cast<py::sequence>()) low_rank.push_back(to_low_rank_term(term));
    f = f[py::slice(0, f.size() - 1, 1)];
  }
  if (f.size() != 9 && f.size() != 15)
    throw FormatError("plan: a block copy has 9 fields, or 15 with a block scale, each optionally followed by "
                      "low-rank terms; got " + std::to_string(f.size()));
  BlockCopy c{f[0].cast<uint32_t>(), f[1].cast<uint64_t>(), f[2].cast<uint64_t>(), parse_dtype(f[3].cast<std::string>()),
              f[4].cast<uint64_t>(), f[5].cast<uint64_t>(), f[6].cast<uint64_t>(), f[7].cast<uint64_t>(), f[8].cast<bool>()};
  if (f.size() == 15) {
    c.scale_source = f[9].cast<uint32_t>();
    c.scale_offset = f[10].cast<uint64_t>();
    c.scale_row_stride = f[11].cast<uint64_t>();
    c.scale_row0 = f[12].cast<uint64_t>();
    c.scale_col0 = f[13].cast<uint64_t>();
    c.scale_block = f[14].cast<uint64_t>();
  }
  c.low_rank = std::move(low_rank);
  return c;
}

// The progress tick the core calls from the calling thread: runs the Python callback, and
// stops the run on Ctrl-C or when the callback raises (the Python error is kept to re-raise).
ProgressTick python_tick(py::object progress, bool* python_error) {
  return [progress, python_error](uint64_t done, uint64_t total) {
    py::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) {  // Ctrl-C or a signal handler that raised
      *python_error = true;
      return false;
    }
    if (!progress.is_none()) {
      try {
        progress(done, total);
      } catch (py::error_already_set& e) {
        e.restore();
        *python_error = true;
        return false;
      }
    }
    return true;
  };
}

// An output tensor: (dest, offset, dtype, rows, cols, copies), optionally followed by the
// byte offset of its scale grid when it is quantized (None: not quantized).
OutputTensor to_output_tensor(py::handle h) {
  const auto f = h.cast<py::sequence>();
  if (f.size() != 6 && f.size() != 7)
    throw FormatError("plan: an output tensor has 6 fields, or 7 with a quantization scale offset; got " + std::to_string(f.size()));
  OutputTensor t{f[0].cast<uint32_t>(), f[1].cast<uint64_t>(), parse_dtype(f[2].cast<std::string>()), f[3].cast<uint64_t>(),
                 f[4].cast<uint64_t>(), {}};
  const auto copies = f[5].cast<py::sequence>();
  t.copies.reserve(copies.size());
  for (const auto& c : copies) t.copies.push_back(to_block_copy(c));
  if (f.size() == 7 && !f[6].is_none()) {
    t.quantize = true;
    t.scale_offset = f[6].cast<uint64_t>();
  }
  return t;
}

// The plan records `execute` and `validate` take (see execute's docstring).
Plan to_plan(const std::vector<std::string>& sources, const std::vector<std::pair<std::string, uint64_t>>& dests,
             const std::vector<std::tuple<uint32_t, uint64_t, py::bytes>>& literals, const py::sequence& tensors) {
  Plan plan;
  plan.sources = sources;
  for (const auto& [path, size] : dests) plan.dests.push_back({path, size});
  for (const auto& [dest, offset, bytes] : literals) plan.literals.push_back({dest, offset, std::string(bytes)});
  plan.tensors.reserve(tensors.size());
  for (const auto& t : tensors) plan.tensors.push_back(to_output_tensor(t));
  return plan;
}

// A frozen slots dataclass built without calling its __init__ (1.7 us each from Python, most of
// reading a 100k-tensor header): each slot set through its member descriptor, which is what
// object.__setattr__ in dataclasses' own __init__ ends up calling.
class StoredTensorFactory {
 public:
  StoredTensorFactory(py::type cls, py::str path) : cls_(std::move(cls)), path_(std::move(path)) {
    const py::dict own = cls_.attr("__dict__");
    for (const char* field : {"path", "offset", "dtype", "shape", "scale", "strides"}) {
      if (!own.contains(field)) throw std::invalid_argument(std::string("stored_tensor has no slot '") + field + "'");
      py::object descr = own[field];
      if (!Py_TYPE(descr.ptr())->tp_descr_set) throw std::invalid_argument(std::string("'") + field + "' is not a slot");
      slots_.push_back(std::move(descr));
    }
  }

  py::object make(uint64_t offset, DType dtype, const uint64_t* dims, uint32_t ndim) {
    auto* type = reinterpret_cast<PyTypeObject*>(cls_.ptr());
    py::object obj = py::reinterpret_steal<py::object>(type->tp_alloc(type, 0));
    if (!obj) throw py::error_already_set();
    set(obj, 0, path_);
    set(obj, 1, py::int_(offset));
    set(obj, 2, dtype_str(dtype));
    set(obj, 3, shape(dims, ndim));
    set(obj, 4, py::none());
    set(obj, 5, py::none());
    return obj;
  }

 private:
  void set(const py::object& obj, size_t slot, const py::handle& value) {
    PyObject* descr = slots_[slot].ptr();
    if (Py_TYPE(descr)->tp_descr_set(descr, obj.ptr(), value.ptr()) != 0) throw py::error_already_set();
  }

  const py::object& dtype_str(DType dtype) {
    auto& s = dtype_strs_[static_cast<size_t>(dtype)];
    if (!s) s = py::str(dtype_name(dtype));
    return s;
  }

  // Tensors of one shape share one tuple (an MoE header repeats a few shapes thousands of times).
  const py::tuple& shape(const uint64_t* dims, uint32_t ndim) {
    std::string key(reinterpret_cast<const char*>(dims), ndim * sizeof(uint64_t));
    auto it = shapes_.find(key);
    if (it != shapes_.end()) return it->second;
    py::tuple t(ndim);
    for (uint32_t i = 0; i < ndim; ++i) t[i] = py::int_(dims[i]);
    return shapes_.emplace(std::move(key), std::move(t)).first->second;
  }

  py::type cls_;
  py::str path_;
  std::vector<py::object> slots_;
  py::object dtype_strs_[32];  // made on first use
  std::unordered_map<std::string, py::tuple> shapes_;
};

// The cyclic garbage collector paused while a million acyclic objects are made (it would walk
// them all, again and again, as they are allocated).
struct GcPaused {
  int was_enabled = PyGC_Disable();
  ~GcPaused() {
    if (was_enabled) PyGC_Enable();
  }
};

py::tuple header_to_python(const SafetensorsHeader& h, const py::str& path, const py::type& stored_tensor) {
  StoredTensorFactory factory(stored_tensor, path);
  GcPaused paused;
  py::dict tensors;
  for (const auto& t : h.tensors) {
    const std::string_view name = h.name(t);
    py::object key = py::reinterpret_steal<py::object>(PyUnicode_DecodeUTF8(name.data(), static_cast<Py_ssize_t>(name.size()), "strict"));
    if (!key) throw py::error_already_set();
    py::object value = factory.make(t.offset, t.dtype, h.dims.data() + t.dims_begin, t.ndim);
    if (PyDict_SetItem(tensors.ptr(), key.ptr(), value.ptr()) != 0) throw py::error_already_set();
  }
  py::dict metadata;
  for (const auto& [k, v] : h.metadata) metadata[py::str(k)] = py::str(v);
  return py::make_tuple(tensors, metadata);
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

  m.def("read_safetensors_header", [](py::str path, py::type stored_tensor) {
    const std::string p = path;
    SafetensorsHeader h;
    {
      py::gil_scoped_release release;
      h = read_safetensors_header(p);
    }
    return header_to_python(h, path, stored_tensor);
  }, py::arg("path"), py::arg("stored_tensor"),
  "Reads and validates a safetensors header: ({name: stored_tensor(path, offset, dtype, shape)} in file order,\n"
  "{metadata key: value}). stored_tensor is pyconv.catalog.StoredTensor (built here without its __init__).");

  m.def("read_safetensors_prefix", [](const std::string& path) {
    SafetensorsPrefix p;
    {
      py::gil_scoped_release release;
      p = read_safetensors_prefix(path);
    }
    return py::make_tuple(p.header_len, p.file_size, py::bytes(p.header));
  }, py::arg("path"), "Reads and checks the 8-byte prefix and the raw JSON header (tests: the reference reader).");

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
    const bool fp8 = fp8_cast_supported(s, d);  // unscaled fp8 <-> F32/BF16/F16, for tests
    if (!fp8 && !cast_supported(s, d)) throw FormatError("cast: unsupported cast " + src_dtype + " -> " + dst_dtype);
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
      if (fp8)
        fp8_cast_elements(view.buf, s, out.data(), d, n);
      else
        cast_elements(view.buf, s, out.data(), d, n);
    }
    PyBuffer_Release(&view);
    return py::bytes(out);
  }, py::arg("src"), py::arg("src_dtype"), py::arg("dst_dtype"));

  m.def("rename_no_replace", &rename_no_replace,
        "Renames from to to unless to exists; 0 or the errno (EEXIST/ENOTEMPTY: it exists; EINVAL/ENOSYS: unsupported).");
  m.def("itemsize", [](const std::string& name) { return dtype_itemsize(parse_dtype(name)); });
  m.def("cast_isa", &cast_isa, "The instruction-set variant the casts run with (portable, avx2, avx512).");

  py::class_<MappedFile>(m, "MappedFile", py::buffer_protocol())
      .def(py::init<const std::string&>())
      .def_property_readonly("path", &MappedFile::path)
      .def_property_readonly("size", &MappedFile::size)
      .def_property_readonly("fd", &MappedFile::fd)
      .def_buffer([](MappedFile& f) {
        return py::buffer_info(const_cast<unsigned char*>(f.data()), 1, py::format_descriptor<unsigned char>::format(), 1,
                               {static_cast<py::ssize_t>(f.size())}, {1}, /*readonly=*/true);
      });

  py::class_<OutputFile>(m, "OutputFile", "A destination file created and preallocated to its planned size, as execute writes its files.")
      .def(py::init<const std::string&, uint64_t>(), py::arg("path"), py::arg("size"))
      .def_property_readonly("path", &OutputFile::path)
      .def_property_readonly("size", &OutputFile::size)
      .def("write",
           [](const OutputFile& f, uint64_t offset, py::buffer data) {
             Py_buffer view;
             if (PyObject_GetBuffer(data.ptr(), &view, PyBUF_C_CONTIGUOUS) != 0) throw py::error_already_set();
             const std::unique_ptr<Py_buffer, decltype(&PyBuffer_Release)> held(&view, &PyBuffer_Release);
             py::gil_scoped_release release;
             f.write(offset, view.buf, static_cast<uint64_t>(view.len));
           },
           py::arg("offset"), py::arg("data"), "Writes all of a C-contiguous buffer at offset (inside the planned size).")
      .def("sync", &OutputFile::sync, py::call_guard<py::gil_scoped_release>())
      .def("close", &OutputFile::close, py::call_guard<py::gil_scoped_release>())
      .def("__enter__", [](OutputFile& f) -> OutputFile& { return f; }, py::return_value_policy::reference)
      .def("__exit__",
           [](OutputFile& f, py::handle type, py::handle, py::handle) {
             if (type.is_none())
               f.close();
             else
               f.close_quietly();
           },
           "Closes the file; after an exception, without reporting a failure to close.");

  m.def("execute",
        [](const std::vector<std::string>& sources, const std::vector<std::pair<std::string, uint64_t>>& dests,
           const std::vector<std::tuple<uint32_t, uint64_t, py::bytes>>& literals, const py::sequence& tensors,
           unsigned threads, uint64_t chunk_bytes, uint64_t buffer_bytes, bool fsync, py::object progress) {
          const Plan plan = to_plan(sources, dests, literals, tensors);
          ExecOptions options;
          options.threads = threads;
          options.chunk_bytes = chunk_bytes;
          options.buffer_bytes = buffer_bytes;
          options.fsync = fsync;
          bool python_error = false;
          const ProgressTick tick = python_tick(progress, &python_error);
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
        py::arg("chunk_bytes") = 32ull << 20, py::arg("buffer_bytes") = 1ull << 20, py::arg("fsync") = true,
        py::arg("progress") = py::none(),
        "Runs a plan of block copies. tensors: (dest, offset, dtype, rows, cols, copies[, scale_offset]), "
        "scale_offset (not None) quantizing to F8_E4M3 with 128x128 block scales written there; copies: "
        "(source, src_offset, src_row_stride, src_dtype, rows, cols, dst_row, dst_col, transpose[, scale_source, "
        "scale_offset, scale_row_stride, scale_row0, scale_col0, scale_block]) where the scale fields dequantize "
        "a block-scaled F8_E4M3 source.");

  m.def("validate",
        [](const std::vector<std::string>& sources, const std::vector<std::pair<std::string, uint64_t>>& dests,
           const std::vector<std::tuple<uint32_t, uint64_t, py::bytes>>& literals, const py::sequence& tensors) {
          const Plan plan = to_plan(sources, dests, literals, tensors);
          py::gil_scoped_release release;
          validate_plan(plan);
        },
        py::arg("sources"), py::arg("dests"), py::arg("literals"), py::arg("tensors"),
        "Checks a plan as execute does before writing (records as execute takes them) and raises FormatError "
        "where it would; the sources are opened read-only, no destination is touched.");

  m.def("compare",
        [](const std::vector<std::string>& sources, const py::sequence& tensors, unsigned threads, uint64_t chunk_bytes,
           bool bitwise, double atol, double rtol, py::object progress) {
          Plan plan;
          plan.sources = sources;
          plan.tensors.reserve(tensors.size());
          for (const auto& h : tensors) {
            const auto f = h.cast<py::sequence>();
            if (f.size() != 5) throw FormatError("compare: a tensor has 5 fields (dtype, rows, cols, copies, other_copies)");
            OutputTensor t{0, 0, parse_dtype(f[0].cast<std::string>()), f[1].cast<uint64_t>(), f[2].cast<uint64_t>(), {}};
            for (const auto& c : f[3].cast<py::sequence>()) t.copies.push_back(to_block_copy(c));
            for (const auto& c : f[4].cast<py::sequence>()) t.other_copies.push_back(to_block_copy(c));
            plan.tensors.push_back(std::move(t));
          }
          ExecOptions options;
          options.threads = threads;
          options.chunk_bytes = chunk_bytes;
          options.buffer_bytes = chunk_bytes;
          CompareOptions compare{bitwise, atol, rtol};
          bool python_error = false;
          const ProgressTick tick = python_tick(progress, &python_error);
          std::vector<TensorComparison> results;
          try {
            py::gil_scoped_release release;
            results = compare_plan(plan, options, compare, tick);
          } catch (const Cancelled&) {
            if (python_error) throw py::error_already_set();
            throw;
          }
          py::list out;
          for (const auto& r : results)
            out.append(py::make_tuple(r.differing, r.max_abs_diff,
                                      r.first_index == UINT64_MAX ? py::object(py::none()) : py::int_(r.first_index)));
          return out;
        },
        py::arg("sources"), py::arg("tensors"), py::arg("threads") = 4, py::arg("chunk_bytes") = 1ull << 20,
        py::arg("bitwise") = true, py::arg("atol") = 0.0, py::arg("rtol") = 0.0, py::arg("progress") = py::none(),
        "Compares tensors gathered from two sets of block copies, chunk by chunk; nothing is written. tensors: "
        "(dtype, rows, cols, copies, other_copies). Returns (differing elements, max |a-b|, first differing flat "
        "index or None) per tensor.");
}
