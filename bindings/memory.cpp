// NumPy's allocation policy (PyDataMem_Handler) backed by qsim's block cache for arrays of 1 MiB and more; smaller
// ones go to the C library. Set per context by pyqsim.runtime.memory while a program runs.
#include <pybind11/pybind11.h>

#include <cstdlib>
#include <cstring>

#define NPY_NO_DEPRECATED_API NPY_1_22_API_VERSION
#define NPY_TARGET_VERSION NPY_1_22_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL pyqsim_memory_ARRAY_API
#include <numpy/arrayobject.h>

#include "qsim.h"

namespace py = pybind11;

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

void register_memory(py::module_& m) {
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
}
