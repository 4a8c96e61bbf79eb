// pyqsim._C bindings of the float stages (docs/spec.md §15) and of float -> code quantization (§2).
// Checks and marshalling only: dtype, shape, contiguity, alignment and parameter ranges are checked
// before a kernel runs (with the GIL released); the values of a quantize input are checked by the kernel in
// the same pass (its result is dropped). Errors name the argument (§11).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "qsim.h"

namespace py = pybind11;

namespace {

bool is_dtype(const py::array& a, char kind, int size) {
  return a.dtype().kind() == kind && a.itemsize() == size && a.dtype().attr("isnative").cast<bool>();
}

// A C-contiguous, aligned native array of the given kind/size with at least min_ndim dimensions.
// obj as a NumPy array of the given dtype (TypeError otherwise)
py::array typed(py::handle obj, const std::string& name, char kind, int size, const char* dtype) {
  if (!py::isinstance<py::array>(obj))
    throw py::type_error(name + " must be a NumPy array, got " +
                         py::str(py::type::handle_of(obj).attr("__name__")).cast<std::string>());
  auto a = py::reinterpret_borrow<py::array>(obj);
  if (!is_dtype(a, kind, size))
    throw py::type_error(name + " must have dtype " + dtype + ", got " + py::str(a.dtype()).cast<std::string>());
  return a;
}

py::array checked(py::handle obj, const std::string& name, char kind, int size, const char* dtype, int min_ndim) {
  py::array a = typed(obj, name, kind, size, dtype);
  if (a.ndim() < min_ndim)
    throw py::value_error(name + " must have at least " + std::to_string(min_ndim) + " dimension(s), got ndim " +
                          std::to_string(a.ndim()));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(name + " must be C-contiguous (pass numpy.ascontiguousarray(" + name + "))");
  if (reinterpret_cast<uintptr_t>(a.data()) % static_cast<uintptr_t>(size) != 0)
    throw py::value_error(name + " must be aligned to its item size");
  return a;
}

// A 3-D array [outer, N, inner] whose outer slices are each C-contiguous, with a positive outer stride that is a
// multiple of the item size and at least one slice (slices do not overlap): a row view of a wider buffer.
py::array outer_strided(py::handle obj, const std::string& name, char kind, int size, const char* dtype) {
  py::array a = typed(obj, name, kind, size, dtype);
  if (a.ndim() != 3) throw py::value_error(name + " must be 3-D [outer, N, inner], got ndim " + std::to_string(a.ndim()));
  const int64_t outer = a.shape(0), n = a.shape(1), inner = a.shape(2), sz = size;
  if (outer * n * inner == 0) return a;  // nothing is read
  const bool slices = (inner <= 1 || a.strides(2) == sz) && (n <= 1 || a.strides(1) == inner * sz);
  const bool rows = outer <= 1 || (a.strides(0) % sz == 0 && a.strides(0) >= n * inner * sz);
  if (!slices || !rows)
    throw py::value_error(name + " must be C-contiguous (or a view of whole C-contiguous rows; pass "
                          "numpy.ascontiguousarray(" + name + "))");
  if (reinterpret_cast<uintptr_t>(a.data()) % static_cast<uintptr_t>(size) != 0)
    throw py::value_error(name + " must be aligned to its item size");
  return a;
}

// float32 [c] per-channel vector
const float* channel_vector(py::handle obj, const std::string& name, int64_t c) {
  py::array a = checked(obj, name, 'f', 4, "float32", 1);
  if (a.ndim() != 1 || a.shape(0) != c)
    throw py::value_error(name + " must have shape (" + std::to_string(c) + ",)");
  return static_cast<const float*>(a.data());
}

float checked_eps(double eps) {
  const float e = static_cast<float>(eps);
  if (!(std::isfinite(e) && e >= 0.0f)) throw py::value_error("eps must be finite and >= 0 as a float32");
  return e;
}

// y = a new float32 array shaped like x; kernel(x data, y data) runs without the GIL.
template <class F>
py::array run_like(const py::array& x, F kernel) {
  py::array_t<float> y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  const float* xp = static_cast<const float*>(x.data());
  float* yp = y.mutable_data();
  py::gil_scoped_release nogil;
  kernel(xp, yp);
  return y;
}

// §15.9 codes of a stage's result: None (float32 out), ("uniform", scale, zero_point, lo, hi) or
// ("log", delta, k, zero_code); checked like quantize / quantize_log.
std::optional<qsim::CodesOut> take_codes(py::handle obj) {
  if (obj.is_none()) return std::nullopt;
  const auto t = obj.cast<py::tuple>();
  qsim::CodesOut c;
  const std::string form = t.size() ? t[0].cast<std::string>() : "";
  if (form == "uniform" && t.size() == 5) {
    c.scale = t[1].cast<float>();
    c.zero_point = t[2].cast<int32_t>(), c.lo = t[3].cast<int32_t>(), c.hi = t[4].cast<int32_t>();
    if (!(std::isfinite(c.scale) && c.scale > 0.0f)) throw py::value_error("codes: scale must be finite and > 0");
    if (c.lo < 0 || c.hi > 255 || c.lo > c.hi || c.zero_point < c.lo || c.zero_point > c.hi)
      throw py::value_error("codes: need 0 <= lo <= zero_point <= hi <= 255");
  } else if (form == "log" && t.size() == 4) {
    c.log = true;
    c.delta = t[1].cast<float>(), c.k = t[2].cast<int>(), c.zero_code = t[3].cast<int>();
    if (!(std::isfinite(c.delta) && c.delta > 0.0f)) throw py::value_error("codes: delta must be finite and > 0");
    if ((c.k != 1 && c.k != 2) || c.zero_code < 3 || c.zero_code > 255)
      throw py::value_error("codes: k must be 1 or 2 and zero_code 2^bits - 1 for bits in [2, 8]");
  } else {
    throw py::value_error("codes must be None, ('uniform', scale, zero_point, lo, hi) or ('log', delta, k, zero_code)");
  }
  return c;
}

// y = a new array shaped like x: float32, or uint8 codes (§15.9); kernel(x data, y data, codes) runs without the GIL
// and returns false when the codes are undefined for some result.
template <class F>
py::array run_stage(const py::array& x, py::handle codes_, F kernel) {
  const std::optional<qsim::CodesOut> codes = take_codes(codes_);
  if (!codes) return run_like(x, [&](const float* xp, float* yp) { kernel(xp, yp, nullptr); });
  py::array_t<uint8_t> y(std::vector<py::ssize_t>(x.shape(), x.shape() + x.ndim()));
  const float* xp = static_cast<const float*>(x.data());
  uint8_t* yp = y.mutable_data();
  bool ok;
  {
    py::gil_scoped_release nogil;
    ok = kernel(xp, yp, &*codes);
  }
  if (!ok)
    throw py::value_error(codes->log ? "the stage's result must be finite and >= 0 to take log codes (spec §3)"
                                     : "the stage's result must be finite to quantize (spec §2)");
  return std::move(y);
}

py::array softmax(py::handle x_, py::handle codes) {
  py::array x = checked(x_, "x", 'f', 4, "float32", 1);
  const int64_t n = x.shape(x.ndim() - 1), rows = n ? x.size() / n : 0;
  return run_stage(x, codes, [&](const float* xp, void* yp, const qsim::CodesOut* c) {
    return qsim::softmax(xp, yp, rows, n, c);
  });
}

py::array layer_norm(py::handle x_, py::handle w_, py::handle b_, double eps, py::handle codes) {
  py::array x = checked(x_, "x", 'f', 4, "float32", 1);
  const int64_t n = x.shape(x.ndim() - 1), rows = n ? x.size() / n : 0;
  const float* w = channel_vector(w_, "weight", n);
  const float* b = channel_vector(b_, "bias", n);
  const float e = checked_eps(eps);
  return run_stage(x, codes, [&](const float* xp, void* yp, const qsim::CodesOut* c) {
    return qsim::layer_norm(xp, yp, rows, n, w, b, e, c);
  });
}

py::array group_norm(py::handle x_, int64_t groups, py::handle w_, py::handle b_, double eps, py::handle codes) {
  py::array x = checked(x_, "x", 'f', 4, "float32", 2);
  const int64_t batch = x.shape(0), c = x.shape(1);
  if (groups < 1 || (c > 0 && c % groups != 0) || (c == 0 && groups != 1))
    throw py::value_error("groups must be >= 1 and divide C=" + std::to_string(c) + ", got " + std::to_string(groups));
  int64_t spatial = 1;
  for (py::ssize_t i = 2; i < x.ndim(); ++i) spatial *= x.shape(i);
  const float* w = channel_vector(w_, "weight", c);
  const float* b = channel_vector(b_, "bias", c);
  const float e = checked_eps(eps);
  return run_stage(x, codes, [&](const float* xp, void* yp, const qsim::CodesOut* cd) {
    return qsim::group_norm(xp, yp, batch, c, spatial, groups, w, b, e, cd);
  });
}

py::array unary(py::handle x_, const std::string& op, py::handle codes) {
  qsim::UnaryOp u;
  if (op == "gelu") u = qsim::UnaryOp::GeluErf;
  else if (op == "gelu_tanh") u = qsim::UnaryOp::GeluTanh;
  else if (op == "silu") u = qsim::UnaryOp::Silu;
  else throw py::value_error("op must be 'gelu', 'gelu_tanh' or 'silu', got '" + op + "'");
  py::array x = checked(x_, "x", 'f', 4, "float32", 0);
  const int64_t n = x.size();
  return run_stage(x, codes, [&](const float* xp, void* yp, const qsim::CodesOut* c) {
    return qsim::unary(u, xp, yp, n, c);
  });
}

py::array add(py::handle a_, py::handle b_, int64_t m, int64_t inner) {
  py::array a = checked(a_, "a", 'f', 4, "float32", 0);
  py::array b = checked(b_, "b", 'f', 4, "float32", 0);
  const int64_t n = a.size();
  if (m < 1 || inner < 1 || b.size() != m || n % m != 0 || (n / m) % inner != 0)
    throw py::value_error("b must hold m values repeated over runs of inner values of a, with m * inner dividing a's " +
                          std::to_string(n) + " values (m >= 1, inner >= 1), got b.size=" + std::to_string(b.size()) +
                          ", m=" + std::to_string(m) + ", inner=" + std::to_string(inner));
  const float* bp = static_cast<const float*>(b.data());
  return run_like(a, [&](const float* ap, float* yp) { qsim::add(ap, bp, yp, n, m, inner); });
}

py::array quantize(py::handle x_, py::handle scale_, py::handle zp_, int64_t lo, int64_t hi, const std::string& dtype) {
  if (dtype != "int8" && dtype != "uint8") throw py::value_error("dtype must be 'int8' or 'uint8', got '" + dtype + "'");
  const int64_t cmin = dtype == "int8" ? -128 : 0, cmax = dtype == "int8" ? 127 : 255;
  if (lo < cmin || hi > cmax || lo > hi)
    throw py::value_error("code range [lo, hi] must lie in [" + std::to_string(cmin) + ", " + std::to_string(cmax) +
                          "] for " + dtype + ", got [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  py::array x = outer_strided(x_, "x", 'f', 4, "float32");
  const int64_t outer = x.shape(0), n = x.shape(1), inner = x.shape(2);
  const int64_t ldo = outer > 1 ? x.strides(0) / 4 : n * inner;
  const float* s = channel_vector(scale_, "scale", n);
  for (int64_t c = 0; c < n; ++c)
    if (!(std::isfinite(s[c]) && s[c] > 0.0f)) throw py::value_error("scale must be finite and > 0");
  py::array z = checked(zp_, "zero_point", 'i', 4, "int32", 1);
  if (z.ndim() != 1 || z.shape(0) != n) throw py::value_error("zero_point must have shape (" + std::to_string(n) + ",)");
  const int32_t* zp = static_cast<const int32_t*>(z.data());
  for (int64_t c = 0; c < n; ++c)
    if (zp[c] < lo || zp[c] > hi)
      throw py::value_error("zero_point must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
                            std::to_string(zp[c]));
  const float* xp = static_cast<const float*>(x.data());
  py::array y = dtype == "int8" ? py::array(py::array_t<int8_t>({outer, n, inner}))
                                : py::array(py::array_t<uint8_t>({outer, n, inner}));
  uint8_t* yp = static_cast<uint8_t*>(y.mutable_data());
  bool finite;
  {
    py::gil_scoped_release nogil;
    finite = qsim::quantize(xp, outer, ldo, n, inner, s, zp, static_cast<int32_t>(lo), static_cast<int32_t>(hi), yp);
  }
  if (!finite) throw py::value_error("x must be finite (no NaN or inf)");
  return y;
}

py::array quantize_log(py::handle p_, float delta, int k, int zero_code) {
  if (k != 1 && k != 2) throw py::value_error("k must be 1 (log2) or 2 (log-sqrt2), got " + std::to_string(k));
  if (zero_code < 3 || zero_code > 255)
    throw py::value_error("zero_code must be 2^bits - 1 for bits in [2, 8], got " + std::to_string(zero_code));
  if (!(std::isfinite(delta) && delta > 0.0f)) throw py::value_error("delta must be finite and > 0");
  py::array p = checked(p_, "p", 'f', 4, "float32", 0);
  const float* pp = static_cast<const float*>(p.data());
  const int64_t n = p.size();
  std::vector<py::ssize_t> shape(p.shape(), p.shape() + p.ndim());
  py::array_t<uint8_t> y(shape);
  uint8_t* yp = y.mutable_data();
  bool ok;
  {
    py::gil_scoped_release nogil;
    ok = qsim::quantize_log(pp, n, delta, k, zero_code, yp);
  }
  if (!ok) {  // name the first offending value: a negative one, or one that is not finite
    int64_t i = 0;
    while (i < n && pp[i] >= 0.0f && pp[i] <= std::numeric_limits<float>::max()) ++i;
    if (i < n && std::isfinite(pp[i]))
      throw py::value_error("p must be >= 0 (post-softmax probabilities), got " + std::to_string(pp[i]));
    throw py::value_error("p must be finite and >= 0 (post-softmax probabilities)");
  }
  return std::move(y);
}

}  // namespace

void register_float_ops(py::module_& m) {
  m.def("softmax", &softmax, py::arg("x"), py::arg("codes") = py::none(),
        "spec §15.5: softmax over the last axis (float32, or codes of it: §15.9)");
  m.def("layer_norm", &layer_norm, py::arg("x"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("codes") = py::none(), "spec §15.6: LayerNorm over the last axis (float32, or codes of it: §15.9)");
  m.def("group_norm", &group_norm, py::arg("x"), py::arg("groups"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        py::arg("codes") = py::none(), "spec §15.6: GroupNorm of x [N, C, *spatial] (float32, or codes of it: §15.9)");
  m.def("unary", &unary, py::arg("x"), py::arg("op"), py::arg("codes") = py::none(),
        "spec §15.4: 'gelu', 'gelu_tanh' or 'silu' (float32, or codes of it: §15.9)");
  m.def("add", &add, py::arg("a"), py::arg("b"), py::arg("m"), py::arg("inner"),
        "spec §15.8: a + b (float32), b[(i / inner) % m] added to a[i]");
  m.def("quantize", &quantize, py::arg("x"), py::arg("scale"), py::arg("zero_point"), py::arg("lo"), py::arg("hi"),
        py::arg("dtype"), "spec §2: codes of float32 x [outer, N, inner], per-channel scale and zero point along N");
  m.def("quantize_log", &quantize_log, py::arg("p"), py::arg("delta"), py::arg("k"), py::arg("zero_code"),
        "spec §3: log2 (k=1) / log-sqrt2 (k=2) codes of float32 p >= 0");
}
