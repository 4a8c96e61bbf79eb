// pyqsim._C bindings of the program runtime's support: the block cache (NumPy's allocation policy, PyDataMem_Handler,
// backed by qsim's cache of freed blocks for arrays of 1 MiB and more; set per context by pyqsim.runtime.memory while a
// program runs) and the layout stages (docs/spec.md §15.10: concatenation and nearest-neighbour resampling). Checks
// and marshalling only; every array and index is checked before a copy touches memory (§11).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define NPY_NO_DEPRECATED_API NPY_1_22_API_VERSION
#define NPY_TARGET_VERSION NPY_1_22_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL pyqsim_runtime_ARRAY_API
#include <numpy/arrayobject.h>

#include "qsim.h"

namespace py = pybind11;

// ------------------------------------------------------------------------------------------ block cache
namespace {

constexpr size_t kLarge = size_t(1) << 20;

void* h_malloc(void*, size_t n) { return n >= kLarge ? qsim::arena_alloc(n) : std::malloc(n ? n : 1); }

void* h_calloc(void*, size_t count, size_t size) {
  if (size != 0 && count > SIZE_MAX / size) return nullptr;
  const size_t n = count * size;
  if (n < kLarge) return std::calloc(count ? count : 1, size ? size : 1);
  void* p = qsim::arena_alloc(n);
  if (p != nullptr) std::memset(p, 0, n);
  return p;
}

void* h_realloc(void*, void* p, size_t n) {
  if (p == nullptr) return h_malloc(nullptr, n);
  const size_t cap = qsim::arena_capacity(p);
  if (cap == 0) return std::realloc(p, n ? n : 1);  // a C library block stays one
  void* q = h_malloc(nullptr, n);
  if (q == nullptr) return nullptr;
  std::memcpy(q, p, std::min(cap, n));
  qsim::arena_free(p);
  return q;
}

void h_free(void*, void* p, size_t) {
  if (p != nullptr && !qsim::arena_free(p)) std::free(p);
}

PyDataMem_Handler handler = {"pyqsim_block_cache", 1, {nullptr, h_malloc, h_calloc, h_realloc, h_free}};

bool numpy_api() {
  static const bool ok = [] {
    if (_import_array() < 0) {
      PyErr_Clear();
      return false;
    }
    return PyArray_GetNDArrayCFeatureVersion() >= NPY_1_22_API_VERSION;
  }();
  return ok;
}

}  // namespace

// ------------------------------------------------------------------------------------------ layout stages
namespace {

py::array contiguous_array(py::handle obj, const std::string& name) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(name + " must be a NumPy array, got " +
                         py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (a.dtype().attr("hasobject").cast<bool>())
    throw py::type_error(name + " must have a numeric dtype, got " + py::str(a.dtype()).cast<std::string>());
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(name + " must be C-contiguous (pass numpy.ascontiguousarray(" + name + "))");
  return a;
}

py::array concat(py::list xs, int64_t axis) {
  const size_t count = xs.size();
  if (count == 0) throw py::value_error("xs must hold at least one array");
  std::vector<py::array> as;
  for (size_t k = 0; k < count; ++k) as.push_back(contiguous_array(xs[k], "xs[" + std::to_string(k) + "]"));
  const py::array& a0 = as[0];
  const int64_t nd = a0.ndim();
  if (axis < 0 || axis >= nd)
    throw py::value_error("axis must be in [0, " + std::to_string(nd - 1) + "], got " + std::to_string(axis));
  std::vector<py::ssize_t> shape(a0.shape(), a0.shape() + nd);
  shape[axis] = 0;
  for (size_t k = 0; k < count; ++k) {
    const py::array& a = as[k];
    const std::string name = "xs[" + std::to_string(k) + "]";
    if (!a0.dtype().attr("__eq__")(a.dtype()).cast<bool>())
      throw py::type_error(name + " must have the dtype of xs[0] (" + py::str(a0.dtype()).cast<std::string>() +
                           "), got " + py::str(a.dtype()).cast<std::string>());
    if (a.ndim() != nd) throw py::value_error(name + " must have ndim " + std::to_string(nd) + " like xs[0]");
    for (int64_t i = 0; i < nd; ++i)
      if (i != axis && a.shape(i) != a0.shape(i))
        throw py::value_error(name + " must match xs[0] in every axis but " + std::to_string(axis));
    shape[axis] += a.shape(axis);
  }
  py::array y(a0.dtype(), shape);
  int64_t outer = 1;
  for (int64_t i = 0; i < axis; ++i) outer *= shape[i];
  std::vector<const uint8_t*> src;
  std::vector<int64_t> inner;
  for (const py::array& a : as) {
    int64_t b = a.itemsize();
    for (int64_t i = axis; i < nd; ++i) b *= a.shape(i);
    src.push_back(static_cast<const uint8_t*>(a.data()));
    inner.push_back(b);
  }
  uint8_t* yp = static_cast<uint8_t*>(y.mutable_data());
  {
    py::gil_scoped_release nogil;
    qsim::concat_bytes(src.data(), inner.data(), static_cast<int64_t>(count), outer, yp);
  }
  return y;
}

std::vector<int64_t> indices(py::handle obj, const std::string& name, int64_t bound) {
  auto a = contiguous_array(obj, name);
  if (a.ndim() != 1 || a.dtype().kind() != 'i' || a.itemsize() != 8 || !a.dtype().attr("isnative").cast<bool>())
    throw py::type_error(name + " must be a 1-D int64 array");
  const int64_t* p = static_cast<const int64_t*>(a.data());
  std::vector<int64_t> v(p, p + a.shape(0));
  for (int64_t i : v)
    if (i < 0 || i >= bound)
      throw py::value_error(name + " values must be in [0, " + std::to_string(bound - 1) + "], got " + std::to_string(i));
  return v;
}

py::array resample_nearest(py::handle x_, py::handle rows_, py::handle cols_) {
  py::array x = contiguous_array(x_, "x");
  const int64_t nd = x.ndim();
  if (nd < 2) throw py::value_error("x must have at least 2 dimensions, got ndim " + std::to_string(nd));
  const int64_t h = x.shape(nd - 2), w = x.shape(nd - 1);
  const std::vector<int64_t> rows = indices(rows_, "rows", h), cols = indices(cols_, "cols", w);
  std::vector<py::ssize_t> shape(x.shape(), x.shape() + nd);
  shape[nd - 2] = static_cast<py::ssize_t>(rows.size());
  shape[nd - 1] = static_cast<py::ssize_t>(cols.size());
  int64_t planes = 1;
  for (int64_t i = 0; i < nd - 2; ++i) planes *= shape[i];
  py::array y(x.dtype(), shape);
  const uint8_t* xp = static_cast<const uint8_t*>(x.data());
  uint8_t* yp = static_cast<uint8_t*>(y.mutable_data());
  const int64_t item = x.itemsize();
  {
    py::gil_scoped_release nogil;
    qsim::resample_bytes(xp, planes, h, w, item, rows.data(), static_cast<int64_t>(rows.size()), cols.data(),
                         static_cast<int64_t>(cols.size()), yp);
  }
  return y;
}

}  // namespace

void register_runtime(py::module_& m) {
  m.def("block_cache_enter", []() -> py::object {
    if (!numpy_api()) return py::none();
    py::object mine = py::reinterpret_steal<py::object>(PyCapsule_New(&handler, "mem_handler", nullptr));
    if (!mine) throw py::error_already_set();
    PyObject* prev = PyDataMem_SetHandler(mine.ptr());
    if (prev == nullptr) throw py::error_already_set();
    return py::reinterpret_steal<py::object>(prev);
  }, "Make NumPy arrays of >= 1 MiB allocated in this context come from the block cache; returns the previous "
     "policy (None where NumPy has no allocation policies)");
  m.def("block_cache_exit", [](py::object prev) {
    if (prev.is_none()) return;
    PyObject* mine = PyDataMem_SetHandler(prev.ptr());
    if (mine == nullptr) throw py::error_already_set();
    Py_DECREF(mine);
  }, py::arg("previous"), "Restore the allocation policy block_cache_enter returned");
  m.def("block_cache_release", &qsim::arena_release, "Free every cached block");
  m.def("block_cache_stats", [] {
    const qsim::ArenaStats s = qsim::arena_stats();
    py::dict d;
    d["in_use"] = s.in_use;
    d["cached"] = s.cached;
    d["peak"] = s.peak;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    return d;
  }, "Bytes in use, cached and at the peak; allocations served from the cache (hits) and the C library (misses)");

  m.def("concat", &concat, py::arg("xs"), py::arg("axis"), "Arrays of one dtype joined along axis (spec §15.10)");
  m.def("resample_nearest", &resample_nearest, py::arg("x"), py::arg("rows"), py::arg("cols"),
        "x[..., rows[i], cols[j]] over the last two axes (spec §15.10)");
}
