// pyqsim._C: Python bindings of the native kernels (csrc/). Validation and marshalling only; no
// arithmetic on data happens here. Every argument is checked (type, dtype, shape, contiguity,
// alignment, value ranges of parameters) before any kernel touches memory; errors are TypeError /
// ValueError naming the argument (docs/spec.md §11). Kernels run with the GIL released.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "qsim.h"

namespace py = pybind11;
#if defined(PYQSIM_HAVE_CUDA)
void register_cuda(py::module_& parent);  // bindings/cuda.cpp
#endif
void register_float_ops(py::module_& m);  // bindings/floatops.cpp
void register_runtime(py::module_& m);    // bindings/runtime.cpp
using qsim::ActType;
using qsim::OutType;
using qsim::WFormat;

namespace {

constexpr int64_t kInt32Max = 2147483647LL;
constexpr int64_t kPtrdiffMax = static_cast<int64_t>(PTRDIFF_MAX);
// Bound of kernel_size, stride, padding and dilation (R3/R4): with H, W <= 2^40 every geometry term
// (d * (k - 1), h + 2 * p, ...) stays far below 2^63.
constexpr int64_t kGeomMax = int64_t(1) << 20;
// Bound of a reduction length K (GEMM k, C/groups*KH*KW): K + 1 and K rounded up to a multiple of 8 fit int64.
constexpr int64_t kKMax = int64_t(1) << 62;

// Overflow-checked size arithmetic: false when a * b (or a + b) does not fit int64.
bool mul_ok(int64_t a, int64_t b, int64_t& r) { return !__builtin_mul_overflow(a, b, &r); }
bool add_ok(int64_t a, int64_t b, int64_t& r) { return !__builtin_add_overflow(a, b, &r); }

std::string type_name(py::handle h) { return py::str(py::type::handle_of(h).attr("__name__")).cast<std::string>(); }

// ------------------------------------------------------------------------------------------ arrays
enum class DT { I8, U8, I32, I64, F32 };

const char* dt_name(DT d) {
  switch (d) {
    case DT::I8: return "int8";
    case DT::U8: return "uint8";
    case DT::I32: return "int32";
    case DT::I64: return "int64";
    default: return "float32";
  }
}

bool dtype_is(const py::dtype& dt, DT d) {
  const char kind = dt.kind();
  const auto size = dt.itemsize();
  if (!dt.attr("isnative").cast<bool>()) return false;
  switch (d) {
    case DT::I8: return kind == 'i' && size == 1;
    case DT::U8: return kind == 'u' && size == 1;
    case DT::I32: return kind == 'i' && size == 4;
    case DT::I64: return kind == 'i' && size == 8;
    default: return kind == 'f' && size == 4;
  }
}

py::array as_array(py::handle obj, const std::string& name) {
  if (py::isinstance<py::array>(obj)) return py::reinterpret_borrow<py::array>(obj);
  if (obj && PyObject_CheckBuffer(obj.ptr())) {
    py::array a = py::array::ensure(obj);  // a view, no copy
    if (a) return a;
    throw py::type_error(name + ": the buffer of this " + type_name(obj) + " cannot be read as an array");
  }
  throw py::type_error(name + " must be a NumPy array or expose the buffer protocol, got " + type_name(obj));
}

struct Arr {
  py::array a;
  const void* ptr = nullptr;
  std::vector<int64_t> shape;
  int64_t dim(int i) const { return shape[static_cast<size_t>(i)]; }
};

void check_dtype_in(const py::array& a, const std::string& name, std::initializer_list<DT> allowed) {
  bool ok = false;
  for (DT d : allowed) ok |= dtype_is(a.dtype(), d);
  if (!ok) {
    std::string names;
    for (DT d : allowed) names += (names.empty() ? "" : " or ") + std::string(dt_name(d));
    throw py::type_error(name + " must have dtype " + names + ", got " + py::str(a.dtype()).cast<std::string>());
  }
}

// dtype among `allowed`, ndim, C-contiguous, aligned.
Arr take(py::handle obj, const std::string& name, std::initializer_list<DT> allowed, int ndim, const char* layout) {
  Arr r;
  r.a = as_array(obj, name);
  check_dtype_in(r.a, name, allowed);
  if (r.a.ndim() != ndim)
    throw py::value_error(name + " must be " + std::to_string(ndim) + "-D " + layout + ", got ndim " +
                          std::to_string(r.a.ndim()));
  if (!(r.a.flags() & py::array::c_style))
    throw py::value_error(name + " must be C-contiguous (pass numpy.ascontiguousarray(" + name + "))");
  r.ptr = r.a.data();
  if (reinterpret_cast<uintptr_t>(r.ptr) % static_cast<uintptr_t>(r.a.itemsize()) != 0)
    throw py::value_error(name + " must be aligned to its item size");
  for (int i = 0; i < ndim; ++i) r.shape.push_back(static_cast<int64_t>(r.a.shape(i)));
  return r;
}

// An array of at least 2 dimensions: leading (batch) dimensions, then a matrix.
Arr take_batched(py::handle obj, const std::string& name, std::initializer_list<DT> allowed, const char* layout) {
  py::array a = as_array(obj, name);
  const int nd = static_cast<int>(a.ndim());
  if (nd < 2)
    throw py::value_error(name + " must be at least 2-D " + layout + ", got ndim " + std::to_string(nd));
  return take(a, name, allowed, nd, layout);
}

// The byte offset of each matrix [..., R, C] of a (leading indices in C order); all 0 when a is empty (nothing is
// read or written).
std::vector<int64_t> matrix_offsets(const py::array& a) {
  const int nd = static_cast<int>(a.ndim());
  int64_t batch = 1;
  for (int i = 0; i < nd - 2; ++i) batch *= a.shape(i);
  std::vector<int64_t> off(static_cast<size_t>(batch), 0);
  if (a.size() == 0) return off;
  for (int64_t b = 0; b < batch; ++b) {
    int64_t rest = b;
    for (int i = nd - 3; i >= 0; --i) {
      off[static_cast<size_t>(b)] += (rest % a.shape(i)) * static_cast<int64_t>(a.strides(i));
      rest /= a.shape(i);
    }
  }
  return off;
}

// A batched operand [..., R, C] of 1-byte codes whose rows are C-contiguous (a head of a fused qkv, a transposed
// view): the byte offset of each batch element's matrix and the row stride; other strides may be any value >= 0.
// An operand whose columns are contiguous instead (the transpose of such a view) is read through a C-contiguous
// copy made by qsim::transpose_batches.
struct Rows {
  Arr arr;
  std::vector<int64_t> off;
  int64_t ld = 0;
};

Rows take_rows(py::handle obj, const std::string& name, std::initializer_list<DT> allowed, const char* layout) {
  Rows r;
  r.arr.a = as_array(obj, name);
  const py::array& a = r.arr.a;
  check_dtype_in(a, name, allowed);  // 1-byte types only
  const int nd = static_cast<int>(a.ndim());
  if (nd < 2) throw py::value_error(name + " must be at least 2-D " + layout + ", got ndim " + std::to_string(nd));
  const bool empty = a.size() == 0;  // nothing is read: any strides
  for (int i = 0; i < nd; ++i) {
    r.arr.shape.push_back(static_cast<int64_t>(a.shape(i)));
    if (!empty && a.shape(i) > 1 && a.strides(i) < 0)
      throw py::value_error(name + " must not have negative strides (pass numpy.ascontiguousarray(" + name + "))");
  }
  r.arr.ptr = a.data();
  const int64_t rows = r.arr.shape[nd - 2], cols = r.arr.shape[nd - 1];
  r.off = matrix_offsets(a);
  if (!empty && cols > 1 && a.strides(nd - 1) != 1) {
    if (rows > 1 && a.strides(nd - 2) != 1)
      throw py::value_error(name + " must have C-contiguous rows or columns (pass numpy.ascontiguousarray(" + name +
                            "))");
    py::array copy(a.dtype(), std::vector<py::ssize_t>(a.shape(), a.shape() + nd));
    const qsim::RowBatch src{static_cast<const uint8_t*>(r.arr.ptr), r.off.data(),
                             static_cast<int64_t>(a.strides(nd - 1))};
    {
      py::gil_scoped_release nogil;
      qsim::transpose_batches(src, static_cast<int64_t>(r.off.size()), rows, cols,
                              static_cast<uint8_t*>(copy.mutable_data()));
    }
    r.arr.a = copy;
    r.arr.ptr = copy.data();
    r.off = matrix_offsets(copy);
    r.ld = cols;
    return r;
  }
  r.ld = rows > 1 && !empty ? static_cast<int64_t>(a.strides(nd - 2)) : cols;
  return r;
}

DT dtype_of(const Arr& a) {
  for (DT d : {DT::I8, DT::U8, DT::I32, DT::I64, DT::F32})
    if (dtype_is(a.a.dtype(), d)) return d;
  return DT::F32;
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "(";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + (s.size() == 1 ? ",)" : ")");
}

// int32 [n] vector with every value in [lo, hi]
const int32_t* int_vector(py::handle obj, const std::string& name, int64_t n, int64_t lo, int64_t hi) {
  Arr a = take(obj, name, {DT::I32}, 1, "[N]");
  if (a.dim(0) != n) throw py::value_error(name + " must have shape (" + std::to_string(n) + ",), got " + shape_str(a.shape));
  const int32_t* p = static_cast<const int32_t*>(a.ptr);
  for (int64_t i = 0; i < n; ++i)
    if (p[i] < lo || p[i] > hi)
      throw py::value_error(name + " values must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
                            std::to_string(p[i]));
  return p;
}

const float* scale_vector(py::handle obj, const std::string& name, int64_t n) {
  Arr a = take(obj, name, {DT::F32}, 1, "[N]");
  if (a.dim(0) != n) throw py::value_error(name + " must have shape (" + std::to_string(n) + ",), got " + shape_str(a.shape));
  const float* p = static_cast<const float*>(a.ptr);
  for (int64_t i = 0; i < n; ++i)
    if (!(std::isfinite(p[i]) && p[i] > 0.f)) throw py::value_error(name + " must be finite and > 0");
  return p;
}

// ------------------------------------------------------------------------------------------ types
struct Range {
  int64_t lo, hi;
};
Range act_range(ActType t) { return t == ActType::U8 ? Range{0, 255} : Range{-128, 127}; }
Range w_range(WFormat f) {
  switch (f) {
    case WFormat::S4: return {-8, 7};
    case WFormat::U4: return {0, 15};
    default: return {-128, 127};
  }
}

WFormat parse_format(const std::string& s, const std::string& name) {
  if (s == "int8") return WFormat::S8;
  if (s == "int4") return WFormat::S4;
  if (s == "uint4") return WFormat::U4;
  throw py::value_error(name + " must be one of 'int8', 'int4', 'uint4', got '" + s + "'");
}
const char* format_name(WFormat f) { return f == WFormat::S8 ? "int8" : (f == WFormat::S4 ? "int4" : "uint4"); }

OutType parse_out(const std::string& s, std::initializer_list<OutType> allowed) {
  static const std::pair<const char*, OutType> names[] = {
      {"int32", OutType::I32}, {"float32", OutType::F32}, {"int8", OutType::S8}, {"uint8", OutType::U8},
      {"int4", OutType::S4},   {"uint4", OutType::U4},    {"int64", OutType::I64}};
  std::string list;
  for (OutType t : allowed)
    for (auto& nm : names)
      if (nm.second == t) list += (list.empty() ? "'" : ", '") + std::string(nm.first) + "'";
  for (auto& nm : names)
    if (s == nm.first)
      for (OutType t : allowed)
        if (t == nm.second) return t;
  throw py::value_error("out_dtype must be one of " + list + ", got '" + s + "'");
}

Range out_range(OutType t) { return {qsim::out_qmin(t), qsim::out_qmax(t)}; }

int64_t check_zero_point(int64_t z, const std::string& name, Range r, const char* tname) {
  if (z < r.lo || z > r.hi)
    throw py::value_error(name + " must be in [" + std::to_string(r.lo) + ", " + std::to_string(r.hi) + "] for " + tname +
                          ", got " + std::to_string(z));
  return z;
}

ActType act_type_of(const Arr& x) { return dtype_of(x) == DT::U8 ? ActType::U8 : ActType::S8; }

// Canonical output stage (§6): the arrays a stage does not use may be None.
struct StageIn {
  qsim::OutStage st;
};
qsim::OutStage make_stage(const std::string& out_dtype, int64_t n, py::handle multiplier, py::handle shift,
                          int64_t zero_point, py::handle scale, std::initializer_list<OutType> allowed) {
  qsim::OutStage s;
  s.type = parse_out(out_dtype, allowed);
  if (qsim::is_requant(s.type)) {
    if (multiplier.is_none() || shift.is_none())
      throw py::value_error("multiplier and shift are required for out_dtype='" + out_dtype + "'");
    s.multiplier = int_vector(multiplier, "multiplier", n, 0, kInt32Max);
    s.shift = int_vector(shift, "shift", n, 1, 94);
    s.zero_point = static_cast<int32_t>(check_zero_point(zero_point, "out_zero_point", out_range(s.type), out_dtype.c_str()));
  } else if (s.type == OutType::F32) {
    if (scale.is_none()) throw py::value_error("out_scale is required for out_dtype='float32'");
    s.scale = scale_vector(scale, "out_scale", n);
  }
  return s;
}

int64_t out_itemsize(OutType t) {
  switch (t) {
    case OutType::I32:
    case OutType::F32: return 4;
    case OutType::I64: return 8;
    default: return 1;
  }
}

// Every output is allocated through here: its byte size is checked (overflow-free, <= PTRDIFF_MAX) before
// NumPy is asked for it; NumPy then raises MemoryError for what the system cannot give.
py::array alloc_out(OutType t, const std::vector<int64_t>& dims) {
  int64_t bytes = out_itemsize(t);
  bool ok = true;
  for (int64_t d : dims) ok = ok && mul_ok(bytes, d, bytes);
  if (!ok || bytes > kPtrdiffMax) {
    std::string s = "(";
    for (size_t i = 0; i < dims.size(); ++i) s += (i ? ", " : "") + std::to_string(dims[i]);
    throw py::value_error("the output of shape " + s + ") is too large: its size in bytes exceeds PTRDIFF_MAX");
  }
  const std::vector<py::ssize_t> shape(dims.begin(), dims.end());
  switch (t) {
    case OutType::I32: return py::array_t<int32_t>(shape);
    case OutType::F32: return py::array_t<float>(shape);
    case OutType::I64: return py::array_t<int64_t>(shape);
    case OutType::S8:
    case OutType::S4: return py::array_t<int8_t>(shape);
    default: return py::array_t<uint8_t>(shape);
  }
}

// The output allocated before a plain weight is packed (R1: packing a weight with huge N and K = 0 used to
// run before the output size was looked at). None when out_dtype does not parse: make_stage reports it.
py::object early_out(const std::string& out_dtype, std::initializer_list<OutType> allowed, const std::vector<int64_t>& dims) {
  static const std::pair<const char*, OutType> names[] = {
      {"int32", OutType::I32}, {"float32", OutType::F32}, {"int8", OutType::S8}, {"uint8", OutType::U8},
      {"int4", OutType::S4},   {"uint4", OutType::U4},    {"int64", OutType::I64}};
  for (auto& nm : names)
    if (out_dtype == nm.first)
      for (OutType t : allowed)
        if (t == nm.second) return alloc_out(t, dims);
  return py::none();
}

// The output [..., M, N] of a batched op whose first operand has shape [..., M, K]; batch is the product of the
// leading dimensions, or 0 when the output is empty (computed after the size check, so it cannot overflow).
py::array batched_out(OutType t, const std::vector<int64_t>& first, int64_t n, int64_t& batch) {
  std::vector<int64_t> dims(first.begin(), first.end() - 1);
  dims.push_back(n);
  py::array y = alloc_out(t, dims);
  batch = y.size() == 0 ? 0 : 1;
  for (size_t i = 0; i + 2 < first.size() && batch != 0; ++i) batch *= first[i];
  return y;
}

// The output [..., M, N] of a batched op as rows: a new C-contiguous array, or `out` (the expected dtype and shape,
// writeable, aligned, C-contiguous rows, no negative stride) with each batch element's byte offset and the row stride.
struct OutBatch {
  py::array y;
  std::vector<int64_t> off;
  int64_t ld = 0;
};

OutBatch batched_rows_out(py::handle out, OutType t, const std::vector<int64_t>& first, int64_t n, int64_t& batch) {
  OutBatch r;
  const size_t nd = first.size();
  const int64_t m = first[nd - 2], isz = out_itemsize(t);
  if (out.is_none()) {
    r.y = batched_out(t, first, n, batch);
    r.ld = n;
    r.off = matrix_offsets(r.y);
    return r;
  }
  r.y = as_array(out, "out");
  const py::array& y = r.y;
  const py::array like = alloc_out(t, {1});
  if (!y.dtype().equal(like.dtype()))
    throw py::type_error("out must have dtype " + py::str(like.dtype()).cast<std::string>() + ", got " +
                         py::str(y.dtype()).cast<std::string>());
  std::vector<int64_t> dims(first.begin(), first.end() - 1);
  dims.push_back(n);
  bool same = static_cast<size_t>(y.ndim()) == nd;
  for (size_t i = 0; same && i < nd; ++i) same = y.shape(static_cast<py::ssize_t>(i)) == dims[i];
  if (!same) throw py::value_error("out must have shape " + shape_str(dims));
  if (!y.writeable()) throw py::value_error("out must be writeable");
  if (reinterpret_cast<uintptr_t>(y.data()) % static_cast<uintptr_t>(isz) != 0)
    throw py::value_error("out must be aligned to its item size");
  batch = y.size() == 0 ? 0 : 1;
  for (size_t i = 0; i + 2 < nd && batch != 0; ++i) batch *= dims[i];
  if (batch == 0) return r;
  for (size_t i = 0; i < nd; ++i)
    if (dims[i] > 1 && (y.strides(static_cast<py::ssize_t>(i)) < 0 || y.strides(static_cast<py::ssize_t>(i)) % isz))
      throw py::value_error("out must have non-negative strides, multiples of its item size");
  if (n > 1 && y.strides(static_cast<py::ssize_t>(nd - 1)) != isz)
    throw py::value_error("out must have C-contiguous rows (its last axis)");
  r.ld = m > 1 ? y.strides(static_cast<py::ssize_t>(nd - 2)) / isz : n;
  r.off = matrix_offsets(y);
  return r;
}

py::array take_out(const py::object& early, OutType t, const std::vector<int64_t>& dims) {
  return early.is_none() ? alloc_out(t, dims) : py::reinterpret_borrow<py::array>(early);
}

// ------------------------------------------------------------------------------------------ weights
using PW = std::shared_ptr<qsim::PackedWeight>;

// int4 padding nibble (high nibble of each row's last byte for odd K) must be 0 (§1.1, §11)
void check_padding(const uint8_t* w, int64_t rows, int64_t k, const std::string& name) {
  if (k % 2 == 0) return;
  const int64_t rb = (k + 1) / 2;
  for (int64_t r = 0; r < rows; ++r)
    if (w[r * rb + rb - 1] >> 4)
      throw py::value_error(name + " padding nibble (high nibble of the last byte of each row, K odd) must be 0");
}

// The packed panels of `rows` output channels in `groups` matrices of kp codes each, plus the column sums,
// must have a size that fits PTRDIFF_MAX (an upper bound is checked; overflow-free).
void check_packed_size(int64_t rows, int64_t kp, int64_t groups, const std::string& name) {
  int64_t padded_rows = 0, per_row = 0, bytes = 0, slack = 0;
  const bool ok = mul_ok(groups, qsim::kNR, slack) && add_ok(rows, slack, padded_rows) && add_ok(kp, 4, per_row) &&
                  mul_ok(padded_rows, per_row, bytes) && bytes <= kPtrdiffMax;
  if (!ok)
    throw py::value_error(name + " is too large to pack: " + std::to_string(rows) + " rows of " + std::to_string(kp) +
                          " padded codes exceed PTRDIFF_MAX bytes");
}

PW pack_gemm(py::handle w, const std::string& fmt_s, int64_t k, const std::string& name) {
  const WFormat fmt = parse_format(fmt_s, "w_format");
  if (k < 0) throw py::value_error("k must be >= 0");
  if (k > kKMax) throw py::value_error("k must be <= 2^62, got " + std::to_string(k));
  const int64_t kp = (k + 7) / 8 * 8;  // the packer pads K to 4 (int8) or 8 (int4): bound by 8
  if (fmt == WFormat::S8) {
    Arr a = take(w, name, {DT::I8}, 2, "[N, K]");
    if (a.dim(1) != k)
      throw py::value_error(name + " must have K=" + std::to_string(k) + " columns, got shape " + shape_str(a.shape));
    check_packed_size(a.dim(0), kp, 1, name);
    py::gil_scoped_release nogil;
    return qsim::pack_gemm_weight(a.ptr, fmt, a.dim(0), k);
  }
  Arr a = take(w, name, {DT::U8}, 2, "[N, ceil(K/2)] packed");
  if (a.dim(1) != (k + 1) / 2)
    throw py::value_error(name + " (packed " + fmt_s + ") must have ceil(K/2)=" + std::to_string((k + 1) / 2) +
                          " bytes per row for K=" + std::to_string(k) + ", got shape " + shape_str(a.shape));
  check_padding(static_cast<const uint8_t*>(a.ptr), a.dim(0), k, name);
  check_packed_size(a.dim(0), kp, 1, name);
  py::gil_scoped_release nogil;
  return qsim::pack_gemm_weight(a.ptr, fmt, a.dim(0), k);
}

PW pack_conv(py::handle w, const std::string& fmt_s, int64_t cin_g, int64_t kh, int64_t kw, int64_t groups,
             const std::string& name) {
  const WFormat fmt = parse_format(fmt_s, "w_format");
  if (groups < 1) throw py::value_error("groups must be >= 1");
  if (kh < 1 || kw < 1) throw py::value_error("kernel_size must be >= 1");
  if (kh > kGeomMax || kw > kGeomMax)
    throw py::value_error("conv2d geometry is out of range: kernel_size must be <= 2^20, got (" + std::to_string(kh) + ", " +
                          std::to_string(kw) + ")");
  if (cin_g < 0) throw py::value_error("cin_per_group must be >= 0, got " + std::to_string(cin_g));
  // For C = 0 only groups = 1 means anything (R2): groups must be <= max(C, 1), C = cin_per_group * groups.
  if (cin_g == 0 && groups > 1)
    throw py::value_error("groups=" + std::to_string(groups) + " must be <= max(C, 1) = 1 for cin_per_group=0");
  int64_t taps = 0, kk_checked = 0, padded = 0;
  if (!mul_ok(kh, kw, taps) || !mul_ok(cin_g, taps, kk_checked) || kk_checked > kKMax)
    throw py::value_error("cin_per_group * KH * KW must be <= 2^62, got cin_per_group=" + std::to_string(cin_g) +
                          " with kernel (" + std::to_string(kh) + ", " + std::to_string(kw) + ")");
  // the packer's k length: KH*KW taps of C/groups channels padded to 4, the whole padded to 8 (bounded here)
  if (!mul_ok(taps, (cin_g + 3) / 4 * 4, padded) || !add_ok(padded, 7, padded))
    throw py::value_error("cin_per_group * KH * KW is out of range for cin_per_group=" + std::to_string(cin_g));
  const int64_t kp_bound = padded / 8 * 8;
  int64_t o;
  if (fmt == WFormat::S8) {
    Arr a = take(w, name, {DT::I8}, 4, "[O, C/groups, KH, KW]");
    if (a.dim(1) != cin_g || a.dim(2) != kh || a.dim(3) != kw)
      throw py::value_error(name + " must have shape [O, " + std::to_string(cin_g) + ", " + std::to_string(kh) + ", " +
                            std::to_string(kw) + "], got " + shape_str(a.shape));
    o = a.dim(0);
    if (o % groups) throw py::value_error("groups must divide the output channels of " + name);
    check_packed_size(o, kp_bound, groups, name);
    py::gil_scoped_release nogil;
    return qsim::pack_conv_weight(a.ptr, fmt, o, cin_g, kh, kw, groups);
  }
  const int64_t kk = kk_checked;
  Arr a = take(w, name, {DT::U8}, 2, "[O, ceil(C/groups*KH*KW/2)] packed");
  if (a.dim(1) != (kk + 1) / 2)
    throw py::value_error(name + " (packed " + fmt_s + ") must have ceil(" + std::to_string(kk) + "/2) bytes per row, got shape " +
                          shape_str(a.shape));
  o = a.dim(0);
  if (o % groups) throw py::value_error("groups must divide the output channels of " + name);
  check_padding(static_cast<const uint8_t*>(a.ptr), o, kk, name);
  check_packed_size(o, kp_bound, groups, name);
  py::gil_scoped_release nogil;
  return qsim::pack_conv_weight(a.ptr, fmt, o, cin_g, kh, kw, groups);
}

// Output channels of a weight, read without packing it (so that the output can be allocated first). The
// checks are those of pack_gemm / pack_conv, which repeat them.
int64_t weight_rows(py::handle w, const std::string& fmt_s, bool conv, const std::string& name) {
  if (py::isinstance<qsim::PackedWeight>(w)) return w.cast<PW>()->n;
  const WFormat fmt = parse_format(fmt_s, "w_format");
  if (fmt == WFormat::S8)
    return conv ? take(w, name, {DT::I8}, 4, "[O, C/groups, KH, KW]").dim(0) : take(w, name, {DT::I8}, 2, "[N, K]").dim(0);
  return conv ? take(w, name, {DT::U8}, 2, "[O, ceil(C/groups*KH*KW/2)] packed").dim(0)
              : take(w, name, {DT::U8}, 2, "[N, ceil(K/2)] packed").dim(0);
}

// A plain weight array is packed on the fly; a PackedWeight must match.
PW gemm_weight(py::handle w, const std::string& fmt, int64_t k, const std::string& name) {
  if (py::isinstance<qsim::PackedWeight>(w)) {
    PW pw = w.cast<PW>();
    if (pw->kind != qsim::PackedWeight::Gemm) throw py::value_error(name + " is a packed conv weight, expected a GEMM weight");
    if (parse_format(fmt, "w_format") != pw->format)
      throw py::value_error(name + " was packed as " + std::string(format_name(pw->format)) + ", but w_format='" + fmt + "'");
    if (pw->k != k)
      throw py::value_error(name + " was packed with K=" + std::to_string(pw->k) + ", activations have K=" + std::to_string(k));
    return pw;
  }
  return pack_gemm(w, fmt, k, name);
}

PW conv_weight(py::handle w, const std::string& fmt, int64_t cin_g, int64_t kh, int64_t kw, int64_t groups,
               const std::string& name) {
  if (py::isinstance<qsim::PackedWeight>(w)) {
    PW pw = w.cast<PW>();
    if (pw->kind != qsim::PackedWeight::Conv) throw py::value_error(name + " is a packed GEMM weight, expected a conv weight");
    if (parse_format(fmt, "w_format") != pw->format)
      throw py::value_error(name + " was packed as " + std::string(format_name(pw->format)) + ", but w_format='" + fmt + "'");
    if (pw->cin_g != cin_g || pw->kh != kh || pw->kw != kw || pw->groups != groups)
      throw py::value_error(name + " was packed for C/groups=" + std::to_string(pw->cin_g) + ", kernel (" +
                            std::to_string(pw->kh) + ", " + std::to_string(pw->kw) + "), groups=" +
                            std::to_string(pw->groups) + "; the call disagrees");
    return pw;
  }
  return pack_conv(w, fmt, cin_g, kh, kw, groups, name);
}

// §4.1 term K * A * B for one branch (exact, int64 suffices: K < 2^40 here)
int64_t overflow_term(int64_t k, ActType xt, int64_t zx, WFormat f, const int32_t* zw, int64_t n) {
  if (n == 0) return 0;
  const Range xr = act_range(xt), wr = w_range(f);
  const int64_t a = std::max(std::llabs(xr.lo - zx), std::llabs(xr.hi - zx));
  int64_t zmin = zw[0], zmax = zw[0];
  for (int64_t i = 1; i < n; ++i) {
    zmin = std::min<int64_t>(zmin, zw[i]);
    zmax = std::max<int64_t>(zmax, zw[i]);
  }
  // B = max_n max(|wmin - zw[n]|, |wmax - zw[n]|): the extremes are wmin - max(zw) and wmax - min(zw)
  const int64_t b = std::max(std::llabs(wr.lo - zmax), std::llabs(wr.hi - zmin));
  if (k > (int64_t(1) << 40)) return std::numeric_limits<int64_t>::max() / 4;
  return k * a * b;
}

int64_t bias_max(const int32_t* b, int64_t n) {
  int64_t m = 0;
  if (b)
    for (int64_t i = 0; i < n; ++i) m = std::max<int64_t>(m, std::llabs(static_cast<int64_t>(b[i])));
  return m;
}

void check_overflow(int64_t total, const std::string& op, const std::string& kdesc) {
  if (total > kInt32Max)
    throw py::value_error(op + ": worst-case accumulation " + std::to_string(total) +
                          " exceeds 2^31-1 (spec §4.1); reduce " + kdesc);
}

const int32_t* opt_bias(py::handle bias, int64_t n) {
  if (bias.is_none()) return nullptr;
  Arr b = take(bias, "bias", {DT::I32}, 1, "[N]");
  if (b.dim(0) != n) throw py::value_error("bias must have shape (" + std::to_string(n) + ",), got " + shape_str(b.shape));
  return static_cast<const int32_t*>(b.ptr);
}

// ------------------------------------------------------------------------------------------ ops
py::array int_gemm(py::handle x_, py::handle w_, const std::string& w_format, int64_t x_zero_point, py::handle w_zero_point,
                   py::handle bias_, const std::string& out_dtype, py::handle multiplier, py::handle shift,
                   int64_t out_zero_point, py::handle out_scale) {
  Arr x = take(x_, "x", {DT::I8, DT::U8}, 2, "[M, K]");
  const ActType xt = act_type_of(x);
  const int64_t m = x.dim(0), k = x.dim(1);
  const std::vector<int64_t> out_dims = {m, weight_rows(w_, w_format, false, "w")};
  const py::object early = early_out(out_dtype, {OutType::I32, OutType::F32, OutType::S8, OutType::U8, OutType::S4, OutType::U4},
                                     out_dims);
  PW w = gemm_weight(w_, w_format, k, "w");
  const int64_t n = w->n;
  const Range wr = w_range(w->format);
  check_zero_point(x_zero_point, "x_zero_point", act_range(xt), xt == ActType::U8 ? "uint8" : "int8");
  const int32_t* zw = int_vector(w_zero_point, "w_zero_point", n, wr.lo, wr.hi);
  const int32_t* bias = opt_bias(bias_, n);
  check_overflow(overflow_term(k, xt, x_zero_point, w->format, zw, n) + bias_max(bias, n), "int_gemm",
                 "K=" + std::to_string(k));
  const qsim::OutStage st = make_stage(out_dtype, n, multiplier, shift, out_zero_point, out_scale,
                                       {OutType::I32, OutType::F32, OutType::S8, OutType::U8, OutType::S4, OutType::U4});
  py::array y = take_out(early, st.type, out_dims);
  void* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    qsim::int_gemm(x.ptr, xt, m, static_cast<int32_t>(x_zero_point), *w, zw, bias, st, yp);
  }
  return y;
}

qsim::SplitOutStage make_split_stage(const std::string& out_dtype, int64_t n, py::handle m1, py::handle m2,
                                     py::handle shift, int64_t zy, py::handle s1, py::handle s2) {
  qsim::SplitOutStage s;
  s.type = parse_out(out_dtype, {OutType::F32, OutType::S8, OutType::U8, OutType::S4, OutType::U4});
  if (s.type == OutType::F32) {
    if (s1.is_none() || s2.is_none()) throw py::value_error("out_scale1 and out_scale2 are required for out_dtype='float32'");
    s.scale1 = scale_vector(s1, "out_scale1", n);
    s.scale2 = scale_vector(s2, "out_scale2", n);
  } else {
    if (m1.is_none() || m2.is_none() || shift.is_none())
      throw py::value_error("multiplier1, multiplier2 and shift are required for out_dtype='" + out_dtype + "'");
    s.multiplier1 = int_vector(m1, "multiplier1", n, 0, kInt32Max);
    s.multiplier2 = int_vector(m2, "multiplier2", n, 0, kInt32Max);
    s.shift = int_vector(shift, "shift", n, 1, 94);
    s.zero_point = static_cast<int32_t>(check_zero_point(zy, "out_zero_point", out_range(s.type), out_dtype.c_str()));
  }
  return s;
}

py::array split_gemm(py::handle x1_, py::handle w1_, const std::string& w1_format, py::handle x2_, py::handle w2_,
                     const std::string& w2_format, int64_t zx1, int64_t zx2, py::handle zw1_, py::handle zw2_,
                     py::handle bias_, const std::string& out_dtype, py::handle m1, py::handle m2, py::handle shift,
                     int64_t out_zero_point, py::handle s1, py::handle s2) {
  Arr x1 = take(x1_, "x1", {DT::I8, DT::U8}, 2, "[M, K1]");
  Arr x2 = take(x2_, "x2", {DT::I8, DT::U8}, 2, "[M, K2]");
  if (x1.dim(0) != x2.dim(0))
    throw py::value_error("x1 and x2 must have the same number of rows M, got " + std::to_string(x1.dim(0)) + " and " +
                          std::to_string(x2.dim(0)));
  const ActType t1 = act_type_of(x1), t2 = act_type_of(x2);
  const std::vector<int64_t> out_dims = {x1.dim(0), weight_rows(w1_, w1_format, false, "w1")};
  weight_rows(w2_, w2_format, false, "w2");
  const py::object early = early_out(out_dtype, {OutType::F32, OutType::S8, OutType::U8, OutType::S4, OutType::U4}, out_dims);
  PW w1 = gemm_weight(w1_, w1_format, x1.dim(1), "w1");
  PW w2 = gemm_weight(w2_, w2_format, x2.dim(1), "w2");
  const int64_t n = w1->n, m = x1.dim(0);
  if (w2->n != n) throw py::value_error("w2 must have " + std::to_string(n) + " rows, got " + std::to_string(w2->n));
  check_zero_point(zx1, "x1_zero_point", act_range(t1), t1 == ActType::U8 ? "uint8" : "int8");
  check_zero_point(zx2, "x2_zero_point", act_range(t2), t2 == ActType::U8 ? "uint8" : "int8");
  const Range r1 = w_range(w1->format), r2 = w_range(w2->format);
  const int32_t* zw1 = int_vector(zw1_, "w1_zero_point", n, r1.lo, r1.hi);
  const int32_t* zw2 = int_vector(zw2_, "w2_zero_point", n, r2.lo, r2.hi);
  const int32_t* bias = opt_bias(bias_, n);
  check_overflow(overflow_term(x1.dim(1), t1, zx1, w1->format, zw1, n) + overflow_term(x2.dim(1), t2, zx2, w2->format, zw2, n) +
                     bias_max(bias, n),
                 "split_gemm", "K1 + K2");
  const qsim::SplitOutStage st = make_split_stage(out_dtype, n, m1, m2, shift, out_zero_point, s1, s2);
  py::array y = take_out(early, st.type, out_dims);
  void* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    qsim::split_gemm(x1.ptr, t1, static_cast<int32_t>(zx1), *w1, zw1, x2.ptr, t2, static_cast<int32_t>(zx2), *w2, zw2, m,
                     bias, st, yp);
  }
  return y;
}

std::pair<int64_t, int64_t> pair_of(py::handle v, const std::string& name, int64_t minimum) {
  std::vector<int64_t> t;
  try {
    t = v.cast<std::vector<int64_t>>();
  } catch (const py::cast_error&) {
    throw py::type_error(name + " must be a pair of ints, got " + type_name(v));
  }
  if (t.size() != 2) throw py::value_error(name + " must be a pair of ints");
  if (t[0] < minimum || t[1] < minimum) throw py::value_error(name + " must be >= " + std::to_string(minimum));
  if (t[0] > kGeomMax || t[1] > kGeomMax)
    throw py::value_error("conv2d geometry is out of range: " + name + " must be <= 2^20, got (" + std::to_string(t[0]) +
                          ", " + std::to_string(t[1]) + ")");
  return {t[0], t[1]};
}

qsim::ConvGeom geometry(const Arr& x, int64_t kh, int64_t kw, py::handle stride, py::handle padding, py::handle dilation) {
  qsim::ConvGeom g;
  g.batch = x.dim(0);
  g.cin = x.dim(1);
  g.h = x.dim(2);
  g.w = x.dim(3);
  std::tie(g.sh, g.sw) = pair_of(stride, "stride", 1);
  std::tie(g.ph, g.pw) = pair_of(padding, "padding", 0);
  std::tie(g.dh, g.dw) = pair_of(dilation, "dilation", 1);
  const int64_t big = int64_t(1) << 40;
  if (g.h > big || g.w > big)
    throw py::value_error("conv2d geometry is out of range: H and W of x must be <= 2^40, got (" + std::to_string(g.h) + ", " +
                          std::to_string(g.w) + ")");
  if (kh < 1 || kw < 1 || kh > kGeomMax || kw > kGeomMax)
    throw py::value_error("conv2d geometry is out of range: kernel_size must be in [1, 2^20], got (" + std::to_string(kh) +
                          ", " + std::to_string(kw) + ")");
  // With H, W <= 2^40 and kernel, padding, dilation <= 2^20 (pair_of) nothing below can overflow; checked anyway.
  auto extent = [](int64_t n, int64_t p, int64_t d, int64_t k, int64_t& r) {
    int64_t span = 0, pad2 = 0, sum = 0;
    return mul_ok(d, k - 1, span) && mul_ok(p, 2, pad2) && add_ok(n, pad2, sum) && !__builtin_sub_overflow(sum, span + 1, &r);
  };
  int64_t eh = 0, ew = 0;
  if (!extent(g.h, g.ph, g.dh, kh, eh) || !extent(g.w, g.pw, g.dw, kw, ew))
    throw py::value_error("conv2d geometry is out of range");
  if (eh < 0 || ew < 0)
    throw py::value_error("output size is not positive for input (" + std::to_string(g.h) + ", " + std::to_string(g.w) +
                          ") and this kernel/stride/padding/dilation");
  g.oh = eh / g.sh + 1;
  g.ow = ew / g.sw + 1;
  return g;
}

py::array int_conv2d(py::handle x_, py::handle w_, const std::string& w_format, py::handle kernel_size, py::handle stride,
                     py::handle padding, py::handle dilation, int64_t groups, int64_t x_zero_point,
                     py::handle w_zero_point, py::handle bias_, const std::string& out_dtype, py::handle multiplier,
                     py::handle shift, int64_t out_zero_point, py::handle out_scale) {
  Arr x = take(x_, "x", {DT::I8, DT::U8}, 4, "NCHW [B, C, H, W]");
  const ActType xt = act_type_of(x);
  if (groups < 1) throw py::value_error("groups must be >= 1, got " + std::to_string(groups));
  if (groups > std::max<int64_t>(x.dim(1), 1))
    throw py::value_error("groups=" + std::to_string(groups) + " must be <= max(C, 1) = " +
                          std::to_string(std::max<int64_t>(x.dim(1), 1)) + " (C = input channels)");
  if (x.dim(1) % groups)
    throw py::value_error("groups=" + std::to_string(groups) + " must divide the input channels C=" + std::to_string(x.dim(1)));
  const auto ks = pair_of(kernel_size, "kernel_size", 1);
  const int64_t cin_g = x.dim(1) / groups;
  const qsim::ConvGeom g = geometry(x, ks.first, ks.second, stride, padding, dilation);
  const std::vector<int64_t> out_dims = {g.batch, weight_rows(w_, w_format, true, "w"), g.oh, g.ow};
  const py::object early = early_out(out_dtype, {OutType::I32, OutType::F32, OutType::S8, OutType::U8, OutType::S4, OutType::U4},
                                     out_dims);
  PW w = conv_weight(w_, w_format, cin_g, ks.first, ks.second, groups, "w");
  const int64_t o = w->n;
  const Range wr = w_range(w->format);
  check_zero_point(x_zero_point, "x_zero_point", act_range(xt), xt == ActType::U8 ? "uint8" : "int8");
  const int32_t* zw = int_vector(w_zero_point, "w_zero_point", o, wr.lo, wr.hi);
  const int32_t* bias = opt_bias(bias_, o);
  check_overflow(overflow_term(w->k, xt, x_zero_point, w->format, zw, o) + bias_max(bias, o), "int_conv2d",
                 "C/groups*KH*KW=" + std::to_string(w->k));
  const qsim::OutStage st = make_stage(out_dtype, o, multiplier, shift, out_zero_point, out_scale,
                                       {OutType::I32, OutType::F32, OutType::S8, OutType::U8, OutType::S4, OutType::U4});
  py::array y = take_out(early, st.type, out_dims);
  void* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    qsim::int_conv2d(x.ptr, xt, static_cast<int32_t>(x_zero_point), g, *w, zw, bias, st, yp);
  }
  return y;
}

py::array split_conv2d(py::handle x1_, py::handle w1_, const std::string& w1_format, py::handle x2_, py::handle w2_,
                       const std::string& w2_format, py::handle kernel_size, py::handle stride, py::handle padding,
                       py::handle dilation, int64_t zx1, int64_t zx2, py::handle zw1_, py::handle zw2_, py::handle bias_,
                       const std::string& out_dtype, py::handle m1, py::handle m2, py::handle shift,
                       int64_t out_zero_point, py::handle s1, py::handle s2) {
  Arr x1 = take(x1_, "x1", {DT::I8, DT::U8}, 4, "NCHW [B, C1, H, W]");
  Arr x2 = take(x2_, "x2", {DT::I8, DT::U8}, 4, "NCHW [B, C2, H, W]");
  if (x1.dim(0) != x2.dim(0) || x1.dim(2) != x2.dim(2) || x1.dim(3) != x2.dim(3))
    throw py::value_error("x1 and x2 must share batch and spatial size, got " + shape_str(x1.shape) + " and " +
                          shape_str(x2.shape));
  const ActType t1 = act_type_of(x1), t2 = act_type_of(x2);
  const auto ks = pair_of(kernel_size, "kernel_size", 1);
  const qsim::ConvGeom g = geometry(x1, ks.first, ks.second, stride, padding, dilation);
  const std::vector<int64_t> out_dims = {g.batch, weight_rows(w1_, w1_format, true, "w1"), g.oh, g.ow};
  weight_rows(w2_, w2_format, true, "w2");
  const py::object early = early_out(out_dtype, {OutType::F32, OutType::S8, OutType::U8, OutType::S4, OutType::U4}, out_dims);
  PW w1 = conv_weight(w1_, w1_format, x1.dim(1), ks.first, ks.second, 1, "w1");
  PW w2 = conv_weight(w2_, w2_format, x2.dim(1), ks.first, ks.second, 1, "w2");
  const int64_t o = w1->n;
  if (w2->n != o) throw py::value_error("w1 and w2 must have the same output channels");
  check_zero_point(zx1, "x1_zero_point", act_range(t1), t1 == ActType::U8 ? "uint8" : "int8");
  check_zero_point(zx2, "x2_zero_point", act_range(t2), t2 == ActType::U8 ? "uint8" : "int8");
  const Range r1 = w_range(w1->format), r2 = w_range(w2->format);
  const int32_t* zw1 = int_vector(zw1_, "w1_zero_point", o, r1.lo, r1.hi);
  const int32_t* zw2 = int_vector(zw2_, "w2_zero_point", o, r2.lo, r2.hi);
  const int32_t* bias = opt_bias(bias_, o);
  check_overflow(overflow_term(w1->k, t1, zx1, w1->format, zw1, o) + overflow_term(w2->k, t2, zx2, w2->format, zw2, o) +
                     bias_max(bias, o),
                 "split_conv2d", "C1*KH*KW + C2*KH*KW");
  const qsim::SplitOutStage st = make_split_stage(out_dtype, o, m1, m2, shift, out_zero_point, s1, s2);
  py::array y = take_out(early, st.type, out_dims);
  void* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    qsim::split_conv2d(x1.ptr, t1, static_cast<int32_t>(zx1), x1.dim(1), *w1, zw1, x2.ptr, t2, static_cast<int32_t>(zx2),
                       x2.dim(1), *w2, zw2, g, bias, st, yp);
  }
  return y;
}

py::array requantize(py::handle acc_, py::handle multiplier, py::handle shift, int64_t zero_point,
                     const std::string& out_dtype) {
  Arr acc = take(acc_, "acc", {DT::I32}, 3, "[outer, N, inner]");
  const int64_t n = acc.dim(1);
  const qsim::OutStage st = make_stage(out_dtype, n, multiplier, shift, zero_point, py::none(),
                                       {OutType::S8, OutType::U8, OutType::S4, OutType::U4});
  py::array y = alloc_out(st.type, {acc.dim(0), n, acc.dim(2)});
  void* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    qsim::requantize(static_cast<const int32_t*>(acc.ptr), acc.dim(0), n, acc.dim(2), st, yp);
  }
  return y;
}

// §14: the runtime profile's stage on acc [outer, N, inner]; fixed-point profiles take multiplier/shift, float
// profiles a float32 scale (the unused arguments are None).
py::array requantize_profile(py::handle acc_, const std::string& numerics, py::handle multiplier, py::handle shift,
                             py::handle scale, int64_t zero_point, const std::string& out_dtype) {
  qsim::Numerics prof;
  if (!qsim::numerics::runtime_profile(numerics.c_str(), &prof))
    throw py::value_error("numerics must be one of 'tflite', 'tflite-single', 'onnxruntime', 'fbgemm', got '" + numerics + "'");
  Arr acc = take(acc_, "acc", {DT::I32}, 3, "[outer, N, inner]");
  const int64_t n = acc.dim(1);
  qsim::OutStage st;
  st.type = parse_out(out_dtype, {OutType::S8, OutType::U8, OutType::S4, OutType::U4});
  const bool fixed = prof == qsim::Numerics::Tflite || prof == qsim::Numerics::TfliteSingle;
  if (fixed) {
    if (multiplier.is_none() || shift.is_none())
      throw py::value_error("multiplier and shift are required for numerics='" + numerics + "'");
    st.multiplier = int_vector(multiplier, "multiplier", n, 0, kInt32Max);
    st.shift = int_vector(shift, "shift", n, 1, 62);
  } else {
    if (scale.is_none()) throw py::value_error("scale is required for numerics='" + numerics + "'");
    st.scale = scale_vector(scale, "scale", n);
  }
  st.zero_point = static_cast<int32_t>(check_zero_point(zero_point, "out_zero_point", out_range(st.type), out_dtype.c_str()));
  py::array y = alloc_out(st.type, {acc.dim(0), n, acc.dim(2)});
  void* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    qsim::requantize_profile(static_cast<const int32_t*>(acc.ptr), acc.dim(0), n, acc.dim(2), prof, st, yp);
  }
  return y;
}

py::array log2_attn_matmul(py::handle codes_, py::handle v_, int64_t v_zero_point, int bits, int k, int frac_bits,
                           const std::string& out_dtype, py::handle multiplier, py::handle shift, int64_t out_zero_point,
                           py::handle out_scale, py::handle out) {
  Arr codes = take_batched(codes_, "codes", {DT::U8}, "[..., M, L]");
  Rows vr = take_rows(v_, "v", {DT::I8, DT::U8}, "[..., L, N]");
  const Arr& v = vr.arr;
  const size_t nd = codes.shape.size();
  if (v.shape.size() != nd || !std::equal(codes.shape.begin(), codes.shape.end() - 2, v.shape.begin()))
    throw py::value_error("v must have the leading dimensions of codes " + shape_str(codes.shape) + ", got shape " +
                          shape_str(v.shape));
  const ActType vt = act_type_of(v);
  const int64_t m = codes.shape[nd - 2], l = codes.shape[nd - 1], n = v.shape[nd - 1];
  if (v.shape[nd - 2] != l)
    throw py::value_error("v must have L=" + std::to_string(l) + " rows to match codes, got shape " + shape_str(v.shape));
  if (bits < 2 || bits > 8) throw py::value_error("bits must be in [2, 8], got " + std::to_string(bits));
  if (k != 1 && k != 2) throw py::value_error("mode k must be 1 (log2) or 2 (log-sqrt2), got " + std::to_string(k));
  if (frac_bits < 0 || frac_bits > 24) throw py::value_error("frac_bits must be in [0, 24], got " + std::to_string(frac_bits));
  check_zero_point(v_zero_point, "v_zero_point", act_range(vt), vt == ActType::U8 ? "uint8" : "int8");
  // §7 width precondition: L * 255 * 2^F * (2^16 + 92682) < 2^63, i.e. L <= (2^63 - 1) / (255 * 158218 * 2^F),
  // in exact integers (the divisor is below 2^50 for F <= 24)
  const uint64_t per_row = uint64_t(255) * (65536 + 92682) << frac_bits;
  const uint64_t l_max = ((uint64_t(1) << 63) - 1) / per_row;
  if (static_cast<uint64_t>(l) > l_max)
    throw py::value_error("L=" + std::to_string(l) + " is too long for frac_bits=" + std::to_string(frac_bits) +
                          ": the int64 accumulator could overflow (spec §7)");
  const int zero_code = (1 << bits) - 1;
  const uint8_t* cp = static_cast<const uint8_t*>(codes.ptr);
  const qsim::OutStage st = make_stage(out_dtype, n, multiplier, shift, out_zero_point, out_scale,
                                       {OutType::I64, OutType::F32, OutType::S8, OutType::U8, OutType::S4, OutType::U4});
  int64_t batch = 0;
  OutBatch y = batched_rows_out(out, st.type, codes.shape, n, batch);
  const qsim::OutRows yr{batch ? y.y.mutable_data() : nullptr, y.off.data(), y.ld};
  const int64_t count = static_cast<int64_t>(codes.a.size());
  bool valid = false;
  if (batch == 0) {  // an empty result: the codes' range alone
    valid = !qsim::bytes_exceed(cp, count, static_cast<uint8_t>(zero_code));
  } else {  // the kernel checks the codes' range as it reads them
    py::gil_scoped_release nogil;
    const qsim::RowBatch vb{static_cast<const uint8_t*>(v.ptr), vr.off.data(), vr.ld};
    valid = qsim::log2_attn_matmul(cp, vb, vt, batch, m, l, n, static_cast<int32_t>(v_zero_point), bits, k, frac_bits,
                                   st, yr);
  }
  if (!valid) {  // the largest code for the message
    uint8_t top = 0;
    for (int64_t i = 0; i < count; ++i) top = std::max(top, cp[i]);
    throw py::value_error("codes must be in [0, " + std::to_string(zero_code) + "] for bits=" + std::to_string(bits) +
                          ", got " + std::to_string(top));
  }
  return y.y;
}

py::array int_bmm(py::handle a_, py::handle b_, int64_t a_zero_point, int64_t b_zero_point, const std::string& out_dtype,
                  py::handle multiplier, py::handle shift, int64_t out_zero_point, py::handle out_scale) {
  Rows ar_ = take_rows(a_, "a", {DT::I8, DT::U8}, "[..., M, K]");
  Rows br_ = take_rows(b_, "b", {DT::I8, DT::U8}, "[..., N, K]");
  const Arr &a = ar_.arr, &b = br_.arr;
  const size_t nd = a.shape.size();
  if (b.shape.size() != nd || !std::equal(a.shape.begin(), a.shape.end() - 2, b.shape.begin()))
    throw py::value_error("b must have the leading dimensions of a " + shape_str(a.shape) + ", got shape " +
                          shape_str(b.shape));
  const int64_t m = a.shape[nd - 2], k = a.shape[nd - 1], n = b.shape[nd - 2];
  if (b.shape[nd - 1] != k)
    throw py::value_error("b must have K=" + std::to_string(k) + " columns to match a, got shape " + shape_str(b.shape));
  const ActType at = act_type_of(a), bt = act_type_of(b);
  check_zero_point(a_zero_point, "a_zero_point", act_range(at), at == ActType::U8 ? "uint8" : "int8");
  check_zero_point(b_zero_point, "b_zero_point", act_range(bt), bt == ActType::U8 ? "uint8" : "int8");
  // §4.1 with b in the weight's place: K * A * B <= 2^31 - 1
  const Range ar = act_range(at), br = act_range(bt);
  const int64_t amax = std::max(std::llabs(ar.lo - a_zero_point), std::llabs(ar.hi - a_zero_point));
  const int64_t bmax = std::max(std::llabs(br.lo - b_zero_point), std::llabs(br.hi - b_zero_point));
  check_overflow(k > (int64_t(1) << 40) ? std::numeric_limits<int64_t>::max() / 4 : k * amax * bmax, "int_bmm",
                 "K=" + std::to_string(k));
  const qsim::OutStage st = make_stage(out_dtype, n, multiplier, shift, out_zero_point, out_scale,
                                       {OutType::I32, OutType::F32, OutType::S8, OutType::U8, OutType::S4, OutType::U4});
  int64_t batch = 0;
  py::array y = batched_out(st.type, a.shape, n, batch);
  void* yp = y.mutable_data();
  {
    py::gil_scoped_release nogil;
    const qsim::RowBatch ab{static_cast<const uint8_t*>(a.ptr), ar_.off.data(), ar_.ld};
    const qsim::RowBatch bb{static_cast<const uint8_t*>(b.ptr), br_.off.data(), br_.ld};
    qsim::int_bmm(ab, at, static_cast<int32_t>(a_zero_point), bb, bt, static_cast<int32_t>(b_zero_point), batch, m, n, k,
                  st, yp);
  }
  return y;
}

py::dict build_info() {
  py::dict d;
  d["version"] = PYQSIM_VERSION;
  py::list simd;
  simd.append("scalar");
  if (qsim::avx2_compiled()) simd.append("avx2");
  if (qsim::avx512vnni_compiled()) simd.append("avx512vnni");
  if (qsim::amx_compiled()) simd.append("amx");
  d["simd_compiled"] = simd;
  d["simd_level"] = qsim::amx_compiled()          ? "amx"
                     : qsim::avx512vnni_compiled() ? "avx512vnni"
                     : qsim::avx2_compiled()       ? "avx2"
                                                   : "scalar";
  d["cpu_has_avx2"] = qsim::cpu_has_avx2();
  d["cpu_has_avx512vnni"] = qsim::cpu_has_avx512vnni();
  d["cpu_has_amx"] = qsim::cpu_has_amx();
  try {
    d["isa"] = qsim::isa_name(qsim::resolve_isa());
    d["isa_error"] = py::none();
  } catch (const std::exception& e) {
    d["isa"] = py::none();
    d["isa_error"] = e.what();
  }
  const std::string ov = qsim::isa_override();
  d["isa_override"] = ov.empty() ? py::object(py::none()) : py::object(py::str(ov));
  d["threads"] = qsim::get_num_threads();
  d["threading"] = "std::thread pool";
  const qsim::CudaInfo ci = qsim::cuda_info();
  py::dict cu;
  cu["compiled"] = ci.compiled;
  cu["runtime_version"] = ci.runtime_version;
  cu["driver_version"] = ci.driver_version;
  cu["devices"] = ci.device_count;
  cu["archs"] = ci.archs;
  cu["error"] = ci.error.empty() ? py::object(py::none()) : py::object(py::str(ci.error));
  d["cuda_compiled"] = ci.compiled;
  d["cuda"] = cu;
#if defined(__clang__)
  d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  d["compiler"] = std::string("gcc ") + __VERSION__;
#else
  d["compiler"] = "unknown";
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "pyqsim native CPU kernels (docs/spec.md); use pyqsim.ops, not this module directly";
  m.attr("__version__") = PYQSIM_VERSION;

  py::class_<qsim::PackedWeight, PW>(m, "PackedWeight",
                                     "Opaque prepacked weight (micro-kernel panels); create with pack_gemm_weight / pack_conv_weight")
      .def_property_readonly("kind", [](const qsim::PackedWeight& p) { return p.kind == qsim::PackedWeight::Gemm ? "gemm" : "conv"; })
      .def_property_readonly("w_format", [](const qsim::PackedWeight& p) { return format_name(p.format); })
      .def_property_readonly("n", [](const qsim::PackedWeight& p) { return p.n; })
      .def_property_readonly("k", [](const qsim::PackedWeight& p) { return p.k; })
      .def_property_readonly("groups", [](const qsim::PackedWeight& p) { return p.groups; })
      .def_property_readonly("kernel_size", [](const qsim::PackedWeight& p) { return py::make_tuple(p.kh, p.kw); })
      .def_property_readonly("cin_per_group", [](const qsim::PackedWeight& p) { return p.cin_g; })
      .def_property_readonly("has_min_code", [](const qsim::PackedWeight& p) {
        bool h = false;
        for (auto& mm : p.mats) h |= mm.has_min;
        return h;
      })
      .def_property_readonly("nbytes", [](const qsim::PackedWeight& p) {
        int64_t b = 0;
        for (auto& mm : p.mats) b += mm.panels * mm.panel_bytes + static_cast<int64_t>(mm.colsum.size()) * 4;
        return b;
      })
      .def("__repr__", [](const qsim::PackedWeight& p) {
        return "<pyqsim._C.PackedWeight " + std::string(p.kind == qsim::PackedWeight::Gemm ? "gemm" : "conv") + " " +
               format_name(p.format) + " n=" + std::to_string(p.n) + " k=" + std::to_string(p.k) + ">";
      });

  m.def("pack_gemm_weight", [](py::handle w, const std::string& w_format, int64_t k) { return pack_gemm(w, w_format, k, "w"); },
        py::arg("w"), py::arg("w_format"), py::arg("k"),
        "Prepack a GEMM weight: int8 [N, K] or packed int4/uint4 [N, ceil(K/2)]");
  m.def("pack_conv_weight",
        [](py::handle w, const std::string& w_format, int64_t cin_per_group, py::handle kernel_size, int64_t groups) {
          const auto ks = pair_of(kernel_size, "kernel_size", 1);
          return pack_conv(w, w_format, cin_per_group, ks.first, ks.second, groups, "w");
        },
        py::arg("w"), py::arg("w_format"), py::arg("cin_per_group"), py::arg("kernel_size"), py::arg("groups") = 1,
        "Prepack a conv weight: int8 [O, C/g, KH, KW] or packed int4/uint4 [O, ceil(C/g*KH*KW/2)]");

  m.def("int_gemm", &int_gemm, py::arg("x"), py::arg("w"), py::arg("w_format"), py::arg("x_zero_point"),
        py::arg("w_zero_point"), py::arg("bias"), py::arg("out_dtype"), py::arg("multiplier"), py::arg("shift"),
        py::arg("out_zero_point"), py::arg("out_scale"), "spec §4/§6 (canonical arguments, see pyqsim._checks.GemmArgs)");
  m.def("split_gemm", &split_gemm, py::arg("x1"), py::arg("w1"), py::arg("w1_format"), py::arg("x2"), py::arg("w2"),
        py::arg("w2_format"), py::arg("x1_zero_point"), py::arg("x2_zero_point"), py::arg("w1_zero_point"),
        py::arg("w2_zero_point"), py::arg("bias"), py::arg("out_dtype"), py::arg("multiplier1"), py::arg("multiplier2"),
        py::arg("shift"), py::arg("out_zero_point"), py::arg("out_scale1"), py::arg("out_scale2"), "spec §8");
  m.def("int_conv2d", &int_conv2d, py::arg("x"), py::arg("w"), py::arg("w_format"), py::arg("kernel_size"),
        py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("x_zero_point"),
        py::arg("w_zero_point"), py::arg("bias"), py::arg("out_dtype"), py::arg("multiplier"), py::arg("shift"),
        py::arg("out_zero_point"), py::arg("out_scale"), "spec §5/§6");
  m.def("split_conv2d", &split_conv2d, py::arg("x1"), py::arg("w1"), py::arg("w1_format"), py::arg("x2"), py::arg("w2"),
        py::arg("w2_format"), py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"),
        py::arg("x1_zero_point"), py::arg("x2_zero_point"), py::arg("w1_zero_point"), py::arg("w2_zero_point"),
        py::arg("bias"), py::arg("out_dtype"), py::arg("multiplier1"), py::arg("multiplier2"), py::arg("shift"),
        py::arg("out_zero_point"), py::arg("out_scale1"), py::arg("out_scale2"), "spec §8 (conv)");
  m.def("requantize", &requantize, py::arg("acc"), py::arg("multiplier"), py::arg("shift"), py::arg("zero_point"),
        py::arg("out_dtype"), "spec §6 on int32 acc [outer, N, inner]");
  m.def("requantize_profile", &requantize_profile, py::arg("acc"), py::arg("numerics"), py::arg("multiplier"),
        py::arg("shift"), py::arg("scale"), py::arg("zero_point"), py::arg("out_dtype"),
        "Requantize int32 acc [outer, N, inner] under a runtime numerics profile (spec §14)");
  m.def("int_bmm", &int_bmm, py::arg("a"), py::arg("b"), py::arg("a_zero_point"), py::arg("b_zero_point"),
        py::arg("out_dtype"), py::arg("multiplier"), py::arg("shift"), py::arg("out_zero_point"), py::arg("out_scale"),
        "spec §4.3: batched a @ b^T of two activation tensors, one output stage");
  m.def("log2_attn_matmul", &log2_attn_matmul, py::arg("codes"), py::arg("v"), py::arg("v_zero_point"), py::arg("bits"),
        py::arg("k"), py::arg("frac_bits"), py::arg("out_dtype"), py::arg("multiplier"), py::arg("shift"),
        py::arg("out_zero_point"), py::arg("out_scale"), py::arg("out") = py::none(),
        "spec §7 (the result written into `out` when given)");
  register_float_ops(m);
  register_runtime(m);

  m.def("build_info", &build_info, "Compiled SIMD level, runtime-detected ISA, threads, CUDA");
  m.def("set_num_threads", &qsim::set_num_threads, py::arg("n"), "Threads used by the kernels (>= 1)");
  m.def("get_num_threads", &qsim::get_num_threads);
  m.def("set_cpu_isa",
        [](py::object name) {
          if (!name.is_none() && !py::isinstance<py::str>(name)) throw py::type_error("name must be a str or None");
          qsim::set_isa_override(name.is_none() ? std::string() : name.cast<std::string>());
        },
        py::arg("name"),
        "Force 'scalar', 'avx2', 'avx512vnni', 'amx' or 'auto' for later calls; None clears it (PYQSIM_CPU_ISA then decides)");
  m.def("get_cpu_isa", [] { return std::string(qsim::isa_name(qsim::resolve_isa())); },
        "The ISA the next kernel call will use");
  m.def("cuda_selftest", [] {
    py::gil_scoped_release nogil;
    return qsim::cuda_selftest();
  }, "Launch the CUDA probe kernel on device 0; '' on success");
#if defined(PYQSIM_HAVE_CUDA)
  register_cuda(m);
#endif
  m.def("_peak_int8_gops", [](int64_t iterations) {
    if (!qsim::avx2_compiled() || !qsim::cpu_has_avx2()) throw std::runtime_error("AVX2 is not available");
    py::gil_scoped_release nogil;
    return qsim::avx2_peak_gops(iterations);
  }, py::arg("iterations") = 20000000,
        "Single-thread register-only GOPS: [vpmaddubsw, maddubs+maddwd+add unit, sign unit] and, where the CPU has "
        "AVX-512 VNNI, [vpdpbusd zmm]");
}
