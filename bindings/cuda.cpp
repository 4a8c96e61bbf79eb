// pyqsim._C.cuda: bindings of the CUDA kernels (csrc/cuda/). Validation and marshalling only.
//
// Operands and outputs arrive as device addresses (ints) with their shapes, already canonicalized by
// pyqsim._checks and pyqsim.backends.cuda; per-channel parameters arrive as NumPy arrays. Before any
// kernel runs, every address is checked to be device memory of the current device (a null address
// only for an empty operand), every parameter vector for dtype, length and range; errors are
// TypeError / ValueError naming the argument. CUDA failures raise RuntimeError naming the op.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include "cuda/qsim_cuda.h"
#include "qsim.h"
#ifdef PYQSIM_SIMT
#include "cuda/simt/fault_probes.h"
#endif

namespace py = pybind11;
using qsim::ActType;
using qsim::OutType;
using qsim::WFormat;

namespace {

// ------------------------------------------------------------------------------------------ checks
ActType act_type(const std::string& s, const std::string& name) {
  if (s == "int8") return ActType::S8;
  if (s == "uint8") return ActType::U8;
  throw py::value_error(name + " must be 'int8' or 'uint8', got '" + s + "'");
}

WFormat weight_format(const std::string& s, const std::string& name) {
  if (s == "int8") return WFormat::S8;
  if (s == "int4") return WFormat::S4;
  if (s == "uint4") return WFormat::U4;
  throw py::value_error(name + " must be 'int8', 'int4' or 'uint4', got '" + s + "'");
}

OutType out_type(const std::string& s) {
  static const std::pair<const char*, OutType> names[] = {{"int32", OutType::I32}, {"float32", OutType::F32},
                                                          {"int8", OutType::S8},   {"uint8", OutType::U8},
                                                          {"int4", OutType::S4},   {"uint4", OutType::U4},
                                                          {"int64", OutType::I64}};
  for (const auto& p : names)
    if (s == p.first) return p.second;
  throw py::value_error("out_dtype '" + s + "' is not an output type of pyqsim");
}

void check_dims(std::initializer_list<std::pair<const char*, int64_t>> dims) {
  for (const auto& d : dims)
    if (d.second < 0) throw py::value_error(std::string(d.first) + " must be >= 0, got " + std::to_string(d.second));
}

// A device operand of `bytes` bytes: null only when empty, else device memory of the current device.
const void* dev_ptr(uintptr_t addr, int64_t bytes, const std::string& name) {
  const void* p = reinterpret_cast<const void*>(addr);
  if (bytes == 0) return p;
  if (!p) throw py::value_error(name + " is a null device address for a non-empty operand");
  const int dev = qsim::cuda::pointer_device(p);
  if (dev < 0) throw py::value_error(name + " is not CUDA device memory");
  const int cur = qsim::cuda::current_device();
  if (dev != cur)
    throw py::value_error(name + " lives on CUDA device " + std::to_string(dev) + ", but the current device is " +
                          std::to_string(cur));
  return p;
}

template <class T>
const T* host_vec(const py::array& a, const std::string& name, int64_t n, const char* dtype) {
  if (!py::isinstance<py::array_t<T>>(a) || !(a.flags() & py::array::c_style))
    throw py::type_error(name + " must be a C-contiguous " + dtype + " NumPy array");
  if (a.ndim() != 1 || a.shape(0) != n)
    throw py::value_error(name + " must have shape (" + std::to_string(n) + ",)");
  return static_cast<const T*>(a.data());
}

const int32_t* int_vec(const py::array& a, const std::string& name, int64_t n, int64_t lo, int64_t hi) {
  const int32_t* p = host_vec<int32_t>(a, name, n, "int32");
  for (int64_t i = 0; i < n; ++i)
    if (p[i] < lo || p[i] > hi)
      throw py::value_error(name + " values must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
                            std::to_string(p[i]));
  return p;
}

std::pair<int64_t, int64_t> wrange(WFormat f) {
  switch (f) {
    case WFormat::S8: return {-128, 127};
    case WFormat::S4: return {-8, 7};
    default: return {0, 15};
  }
}

void check_zx(ActType t, int64_t z, const std::string& name) {
  const int64_t lo = t == ActType::U8 ? 0 : -128, hi = t == ActType::U8 ? 255 : 127;
  if (z < lo || z > hi)
    throw py::value_error(name + " must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
                          std::to_string(z));
}

// §6 stage from NumPy vectors (ranges re-checked: these are the kernel's preconditions).
qsim::OutStage out_stage(const std::string& dtype, int64_t n, const py::array& mult, const py::array& shift,
                         int64_t zy, const py::array& scale, std::initializer_list<OutType> allowed) {
  qsim::OutStage st;
  st.type = out_type(dtype);
  bool ok = false;
  for (OutType t : allowed) ok |= t == st.type;
  if (!ok) throw py::value_error("out_dtype '" + dtype + "' is not allowed for this op");
  if (qsim::is_requant(st.type)) {
    st.multiplier = int_vec(mult, "multiplier", n, 0, 2147483647LL);
    st.shift = int_vec(shift, "shift", n, 1, 94);
    if (zy < qsim::out_qmin(st.type) || zy > qsim::out_qmax(st.type))
      throw py::value_error("out_zero_point " + std::to_string(zy) + " is outside the range of " + dtype);
    st.zero_point = static_cast<int32_t>(zy);
  } else if (st.type == OutType::F32) {
    st.scale = host_vec<float>(scale, "out_scale", n, "float32");
  }
  return st;
}

// §8 stage from NumPy vectors.
qsim::SplitOutStage split_stage(const std::string& dtype, int64_t n, const py::array& m1, const py::array& m2,
                                const py::array& shift, int64_t zy, const py::array& s1, const py::array& s2) {
  qsim::SplitOutStage st;
  st.type = out_type(dtype);
  if (st.type == OutType::F32) {
    st.scale1 = host_vec<float>(s1, "out_scale1", n, "float32");
    st.scale2 = host_vec<float>(s2, "out_scale2", n, "float32");
  } else if (qsim::is_requant(st.type)) {
    st.multiplier1 = int_vec(m1, "multiplier1", n, 0, 2147483647LL);
    st.multiplier2 = int_vec(m2, "multiplier2", n, 0, 2147483647LL);
    st.shift = int_vec(shift, "shift", n, 1, 94);
    if (zy < qsim::out_qmin(st.type) || zy > qsim::out_qmax(st.type))
      throw py::value_error("out_zero_point " + std::to_string(zy) + " is outside the range of " + dtype);
    st.zero_point = static_cast<int32_t>(zy);
  } else {
    throw py::value_error("out_dtype must be float32 or a requantized type for split ops, got '" + dtype + "'");
  }
  return st;
}

qsim::cuda::Operand operand(uintptr_t x, const std::string& xt, int64_t zx, uintptr_t w, const std::string& wf,
                            const py::array& zw, int64_t n, int64_t x_bytes, int64_t w_bytes, const std::string& sfx) {
  qsim::cuda::Operand a;
  a.xt = act_type(xt, "x" + sfx + "_type");
  check_zx(a.xt, zx, "x" + sfx + "_zero_point");
  a.zx = static_cast<int32_t>(zx);
  a.wf = weight_format(wf, "w" + sfx + "_format");
  const auto r = wrange(a.wf);
  a.zw = int_vec(zw, "w" + sfx + "_zero_point", n, r.first, r.second);
  a.x = dev_ptr(x, x_bytes, "x" + sfx);
  a.w = dev_ptr(w, w_bytes, "w" + sfx);
  return a;
}

int64_t wbytes(WFormat f, int64_t rows, int64_t k) { return rows * (f == WFormat::S8 ? k : (k + 1) / 2); }

int64_t out_bytes(OutType t) {
  switch (t) {
    case OutType::I32:
    case OutType::F32: return 4;
    case OutType::I64: return 8;
    default: return 1;
  }
}

std::pair<int64_t, int64_t> pair2(const py::tuple& t, const std::string& name) {
  if (t.size() != 2) throw py::value_error(name + " must be a pair");
  return {t[0].cast<int64_t>(), t[1].cast<int64_t>()};
}

// Kernel size (returned), stride, padding, dilation and output size of a conv, stored in g.
std::pair<int64_t, int64_t> conv_window(qsim::ConvGeom& g, const py::tuple& ksize, const py::tuple& stride,
                                        const py::tuple& padding, const py::tuple& dilation, const py::tuple& ohw) {
  const auto ks = pair2(ksize, "kernel_size"), st = pair2(stride, "stride"), pd = pair2(padding, "padding"),
             dl = pair2(dilation, "dilation"), oo = pair2(ohw, "out_hw");
  g.sh = st.first, g.sw = st.second, g.ph = pd.first, g.pw = pd.second, g.dh = dl.first, g.dw = dl.second;
  g.oh = oo.first, g.ow = oo.second;
  return ks;
}

void check_window(const qsim::ConvGeom& g, const std::pair<int64_t, int64_t>& ks) {
  if (ks.first < 1 || ks.second < 1 || g.sh < 1 || g.sw < 1 || g.dh < 1 || g.dw < 1 || g.ph < 0 || g.pw < 0)
    throw py::value_error("kernel_size, stride and dilation must be >= 1 and padding >= 0");
}

// ------------------------------------------------------------------------------------------ device buffer
// Stream-ordered device memory for NumPy operands and outputs; freed on the stream it was made on.
struct Buffer {
  void* p = nullptr;
  size_t n = 0;
  uintptr_t stream = 0;
  Buffer(size_t bytes, uintptr_t s) : n(bytes), stream(s) { p = qsim::cuda::device_alloc(bytes, s); }
  ~Buffer() { qsim::cuda::device_free(p, stream); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

void check_host_bytes(const py::array& a, size_t n, const char* what) {
  if (!(a.flags() & py::array::c_style)) throw py::value_error(std::string(what) + " must be C-contiguous");
  if (static_cast<size_t>(a.nbytes()) != n)
    throw py::value_error(std::string(what) + " has " + std::to_string(a.nbytes()) + " bytes, the buffer " +
                          std::to_string(n));
}

// The module's functions, defined on `m` (pyqsim._C.cuda, or pyqsim._cuda_simt for the host SIMT build).
void define_api(py::module_& m) {

  py::class_<Buffer>(m, "Buffer", "Stream-ordered device allocation (freed on its stream when collected)")
      .def(py::init([](int64_t bytes, uintptr_t stream) {
             if (bytes < 0) throw py::value_error("bytes must be >= 0");
             return new Buffer(static_cast<size_t>(bytes), stream);
           }),
           py::arg("bytes"), py::arg("stream") = 0)
      .def_property_readonly("ptr", [](const Buffer& b) { return reinterpret_cast<uintptr_t>(b.p); })
      .def_property_readonly("nbytes", [](const Buffer& b) { return b.n; })
      .def("upload",
           [](Buffer& b, const py::array& a) {
             check_host_bytes(a, b.n, "array");
             qsim::cuda::copy_to_device(b.p, a.data(), b.n, b.stream);
           },
           py::arg("array"), "Copy a C-contiguous host array of the same size into the buffer (stream-ordered)")
      .def("download",
           [](const Buffer& b, py::array& a) {
             check_host_bytes(a, b.n, "array");
             if (!a.writeable()) throw py::value_error("array must be writeable");
             void* dst = a.mutable_data();
             py::gil_scoped_release nogil;
             qsim::cuda::copy_to_host(dst, b.p, b.n, b.stream);
           },
           py::arg("array"), "Copy the buffer into a host array of the same size; synchronizes the stream");

  m.def("device_count", &qsim::cuda::device_count);
  m.def("device_name", &qsim::cuda::device_name, py::arg("ordinal"));
  m.def("device_capability", &qsim::cuda::device_capability, py::arg("ordinal"),
        "Compute capability as major * 10 + minor");
  m.def("current_device", &qsim::cuda::current_device);
  m.def("set_device", &qsim::cuda::set_device, py::arg("ordinal"));
  m.def("pointer_device", [](uintptr_t p) { return qsim::cuda::pointer_device(reinterpret_cast<const void*>(p)); },
        py::arg("ptr"), "CUDA device owning the address, -1 when it is not device memory");
  m.def("synchronize", [](uintptr_t s) {
    py::gil_scoped_release nogil;
    qsim::cuda::synchronize(s);
  }, py::arg("stream") = 0);
  m.def("download", [](uintptr_t src, int64_t nbytes, py::array& a, uintptr_t stream) {
    check_host_bytes(a, static_cast<size_t>(nbytes), "array");
    const void* p = dev_ptr(src, nbytes, "src");
    void* dst = a.mutable_data();
    py::gil_scoped_release nogil;
    qsim::cuda::copy_to_host(dst, p, static_cast<size_t>(nbytes), stream);
  }, py::arg("src"), py::arg("nbytes"), py::arg("array"), py::arg("stream") = 0,
        "Copy nbytes of device memory into a C-contiguous host array; synchronizes the stream");
  m.def("max_byte", [](uintptr_t p, int64_t n, uintptr_t stream) {
    check_dims({{"n", n}});
    const auto* d = static_cast<const uint8_t*>(dev_ptr(p, n, "codes"));
    py::gil_scoped_release nogil;
    return static_cast<int>(qsim::cuda::max_byte(d, n, stream));
  }, py::arg("ptr"), py::arg("n"), py::arg("stream") = 0, "Largest byte of a device buffer (synchronizes)");

  m.def("int_gemm",
        [](uintptr_t x, const std::string& xt, int64_t zx, uintptr_t w, const std::string& wf, const py::array& zw,
           int64_t mm, int64_t n, int64_t k, const py::array& bias, const std::string& out_dtype,
           const py::array& mult, const py::array& shift, int64_t zy, const py::array& scale, uintptr_t y,
           uintptr_t stream) {
          check_dims({{"M", mm}, {"N", n}, {"K", k}});
          auto a = operand(x, xt, zx, w, wf, zw, n, mm * k, 0, "");
          a.w = dev_ptr(w, wbytes(a.wf, n, k), "w");
          const int32_t* b = host_vec<int32_t>(bias, "bias", n, "int32");
          const auto st = out_stage(out_dtype, n, mult, shift, zy, scale,
                                    {OutType::I32, OutType::F32, OutType::S8, OutType::U8, OutType::S4, OutType::U4});
          void* yp = const_cast<void*>(dev_ptr(y, mm * n * out_bytes(st.type), "y"));
          py::gil_scoped_release nogil;
          qsim::cuda::int_gemm(a, mm, n, k, b, st, yp, stream);
        },
        py::arg("x"), py::arg("x_type"), py::arg("x_zero_point"), py::arg("w"), py::arg("w_format"),
        py::arg("w_zero_point"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("bias"), py::arg("out_dtype"),
        py::arg("multiplier"), py::arg("shift"), py::arg("out_zero_point"), py::arg("out_scale"), py::arg("y"),
        py::arg("stream"), "spec §4/§6 on device operands");

  m.def("int_conv2d",
        [](uintptr_t x, const std::string& xt, int64_t zx, uintptr_t w, const std::string& wf, const py::array& zw,
           const py::tuple& xshape, int64_t o, const py::tuple& ksize, const py::tuple& stride,
           const py::tuple& padding, const py::tuple& dilation, int64_t groups, const py::tuple& ohw,
           const py::array& bias, const std::string& out_dtype, const py::array& mult, const py::array& shift,
           int64_t zy, const py::array& scale, uintptr_t y, uintptr_t stream) {
          if (xshape.size() != 4) throw py::value_error("x_shape must be (B, C, H, W)");
          qsim::ConvGeom g;
          g.batch = xshape[0].cast<int64_t>();
          g.cin = xshape[1].cast<int64_t>();
          g.h = xshape[2].cast<int64_t>();
          g.w = xshape[3].cast<int64_t>();
          const auto ks = conv_window(g, ksize, stride, padding, dilation, ohw);
          check_dims({{"B", g.batch}, {"C", g.cin}, {"H", g.h}, {"W", g.w}, {"O", o}, {"OH", g.oh}, {"OW", g.ow}});
          if (groups < 1 || g.cin % groups || o % groups) throw py::value_error("groups must divide C and O");
          check_window(g, ks);
          const int64_t kk = g.cin / groups * ks.first * ks.second;
          auto a = operand(x, xt, zx, w, wf, zw, o, g.batch * g.cin * g.h * g.w, 0, "");
          a.w = dev_ptr(w, wbytes(a.wf, o, kk), "w");
          const int32_t* b = host_vec<int32_t>(bias, "bias", o, "int32");
          const auto os = out_stage(out_dtype, o, mult, shift, zy, scale,
                                    {OutType::I32, OutType::F32, OutType::S8, OutType::U8, OutType::S4, OutType::U4});
          void* yp = const_cast<void*>(dev_ptr(y, g.batch * o * g.oh * g.ow * out_bytes(os.type), "y"));
          py::gil_scoped_release nogil;
          qsim::cuda::int_conv2d(a, g, o, ks.first, ks.second, groups, b, os, yp, stream);
        },
        py::arg("x"), py::arg("x_type"), py::arg("x_zero_point"), py::arg("w"), py::arg("w_format"),
        py::arg("w_zero_point"), py::arg("x_shape"), py::arg("o"), py::arg("kernel_size"), py::arg("stride"),
        py::arg("padding"), py::arg("dilation"), py::arg("groups"), py::arg("out_hw"), py::arg("bias"),
        py::arg("out_dtype"), py::arg("multiplier"), py::arg("shift"), py::arg("out_zero_point"), py::arg("out_scale"),
        py::arg("y"), py::arg("stream"), "spec §5/§6 on device operands (NCHW)");

  // Split ops: two operands (x, w, zero points, K or C each) and the §8 stage.
  m.def("split_gemm",
        [](uintptr_t x1, const std::string& xt1, int64_t zx1, uintptr_t w1, const std::string& wf1,
           const py::array& zw1, int64_t k1, uintptr_t x2, const std::string& xt2, int64_t zx2, uintptr_t w2,
           const std::string& wf2, const py::array& zw2, int64_t k2, int64_t mm, int64_t n, const py::array& bias,
           const std::string& out_dtype, const py::array& m1, const py::array& m2, const py::array& shift, int64_t zy,
           const py::array& s1, const py::array& s2, uintptr_t y, uintptr_t stream) {
          check_dims({{"M", mm}, {"N", n}, {"K1", k1}, {"K2", k2}});
          auto a = operand(x1, xt1, zx1, w1, wf1, zw1, n, mm * k1, 0, "1");
          a.w = dev_ptr(w1, wbytes(a.wf, n, k1), "w1");
          auto b = operand(x2, xt2, zx2, w2, wf2, zw2, n, mm * k2, 0, "2");
          b.w = dev_ptr(w2, wbytes(b.wf, n, k2), "w2");
          const int32_t* bp = host_vec<int32_t>(bias, "bias", n, "int32");
          const auto st = split_stage(out_dtype, n, m1, m2, shift, zy, s1, s2);
          void* yp = const_cast<void*>(dev_ptr(y, mm * n * out_bytes(st.type), "y"));
          py::gil_scoped_release nogil;
          qsim::cuda::split_gemm(a, k1, b, k2, mm, n, bp, st, yp, stream);
        },
        py::arg("x1"), py::arg("x1_type"), py::arg("x1_zero_point"), py::arg("w1"), py::arg("w1_format"),
        py::arg("w1_zero_point"), py::arg("k1"), py::arg("x2"), py::arg("x2_type"), py::arg("x2_zero_point"),
        py::arg("w2"), py::arg("w2_format"), py::arg("w2_zero_point"), py::arg("k2"), py::arg("m"), py::arg("n"),
        py::arg("bias"), py::arg("out_dtype"), py::arg("multiplier1"), py::arg("multiplier2"), py::arg("shift"),
        py::arg("out_zero_point"), py::arg("out_scale1"), py::arg("out_scale2"), py::arg("y"), py::arg("stream"),
        "spec §8 on device operands");

  m.def("split_conv2d",
        [](uintptr_t x1, const std::string& xt1, int64_t zx1, uintptr_t w1, const std::string& wf1,
           const py::array& zw1, int64_t c1, uintptr_t x2, const std::string& xt2, int64_t zx2, uintptr_t w2,
           const std::string& wf2, const py::array& zw2, int64_t c2, const py::tuple& bhw, int64_t o,
           const py::tuple& ksize, const py::tuple& stride, const py::tuple& padding, const py::tuple& dilation,
           const py::tuple& ohw, const py::array& bias, const std::string& out_dtype, const py::array& m1,
           const py::array& m2, const py::array& shift, int64_t zy, const py::array& s1, const py::array& s2,
           uintptr_t y, uintptr_t stream) {
          if (bhw.size() != 3) throw py::value_error("bhw must be (B, H, W)");
          qsim::ConvGeom g;
          g.batch = bhw[0].cast<int64_t>();
          g.h = bhw[1].cast<int64_t>();
          g.w = bhw[2].cast<int64_t>();
          const auto ks = conv_window(g, ksize, stride, padding, dilation, ohw);
          check_dims({{"B", g.batch}, {"C1", c1}, {"C2", c2}, {"H", g.h}, {"W", g.w}, {"O", o}, {"OH", g.oh},
                      {"OW", g.ow}});
          check_window(g, ks);
          const int64_t khw = ks.first * ks.second, hw = g.h * g.w;
          auto a = operand(x1, xt1, zx1, w1, wf1, zw1, o, g.batch * c1 * hw, 0, "1");
          a.w = dev_ptr(w1, wbytes(a.wf, o, c1 * khw), "w1");
          auto b = operand(x2, xt2, zx2, w2, wf2, zw2, o, g.batch * c2 * hw, 0, "2");
          b.w = dev_ptr(w2, wbytes(b.wf, o, c2 * khw), "w2");
          const int32_t* bp = host_vec<int32_t>(bias, "bias", o, "int32");
          const auto st = split_stage(out_dtype, o, m1, m2, shift, zy, s1, s2);
          void* yp = const_cast<void*>(dev_ptr(y, g.batch * o * g.oh * g.ow * out_bytes(st.type), "y"));
          py::gil_scoped_release nogil;
          qsim::cuda::split_conv2d(a, c1, b, c2, g, o, ks.first, ks.second, bp, st, yp, stream);
        },
        py::arg("x1"), py::arg("x1_type"), py::arg("x1_zero_point"), py::arg("w1"), py::arg("w1_format"),
        py::arg("w1_zero_point"), py::arg("c1"), py::arg("x2"), py::arg("x2_type"), py::arg("x2_zero_point"),
        py::arg("w2"), py::arg("w2_format"), py::arg("w2_zero_point"), py::arg("c2"), py::arg("bhw"), py::arg("o"),
        py::arg("kernel_size"), py::arg("stride"), py::arg("padding"), py::arg("dilation"), py::arg("out_hw"),
        py::arg("bias"), py::arg("out_dtype"), py::arg("multiplier1"), py::arg("multiplier2"), py::arg("shift"),
        py::arg("out_zero_point"), py::arg("out_scale1"), py::arg("out_scale2"), py::arg("y"), py::arg("stream"),
        "spec §8 (conv) on device operands");

  m.def("requantize",
        [](uintptr_t acc, int64_t outer, int64_t n, int64_t inner, const std::string& out_dtype, const py::array& mult,
           const py::array& shift, int64_t zy, uintptr_t y, uintptr_t stream) {
          check_dims({{"outer", outer}, {"N", n}, {"inner", inner}});
          const py::array none = py::array_t<float>(0);
          const auto st = out_stage(out_dtype, n, mult, shift, zy, none,
                                    {OutType::S8, OutType::U8, OutType::S4, OutType::U4});
          const int64_t total = outer * n * inner;
          const auto* ap = static_cast<const int32_t*>(dev_ptr(acc, total * 4, "acc"));
          void* yp = const_cast<void*>(dev_ptr(y, total, "y"));
          py::gil_scoped_release nogil;
          qsim::cuda::requantize(ap, outer, n, inner, st, yp, stream);
        },
        py::arg("acc"), py::arg("outer"), py::arg("n"), py::arg("inner"), py::arg("out_dtype"), py::arg("multiplier"),
        py::arg("shift"), py::arg("out_zero_point"), py::arg("y"), py::arg("stream"), "spec §6 on a device int32 array");

  m.def("requantize_profile",
        [](uintptr_t acc, int64_t outer, int64_t n, int64_t inner, const std::string& numerics,
           const std::string& out_dtype, const std::optional<py::array>& mult, const std::optional<py::array>& shift,
           const std::optional<py::array>& scale, int64_t zy, uintptr_t y, uintptr_t stream) {
          check_dims({{"outer", outer}, {"N", n}, {"inner", inner}});
          qsim::Numerics p;
          if (!qsim::numerics::runtime_profile(numerics.c_str(), &p))
            throw py::value_error("numerics must be one of 'tflite', 'tflite-single', 'onnxruntime', 'fbgemm', got '" +
                                  numerics + "'");
          const bool fixed = p == qsim::Numerics::Tflite || p == qsim::Numerics::TfliteSingle;
          qsim::OutStage st;
          st.type = out_type(out_dtype);
          if (!qsim::is_requant(st.type)) throw py::value_error("out_dtype '" + out_dtype + "' is not a requantized type");
          if (zy < qsim::out_qmin(st.type) || zy > qsim::out_qmax(st.type))
            throw py::value_error("out_zero_point " + std::to_string(zy) + " is outside the range of " + out_dtype);
          st.zero_point = static_cast<int32_t>(zy);
          if (fixed) {
            if (!mult || !shift)
              throw py::value_error("multiplier and shift are required for numerics='" + numerics + "'");
            st.multiplier = int_vec(*mult, "multiplier", n, 0, 2147483647LL);
            st.shift = int_vec(*shift, "shift", n, 1, 62);
          } else {
            if (!scale) throw py::value_error("scale is required for numerics='" + numerics + "'");
            st.scale = host_vec<float>(*scale, "scale", n, "float32");
          }
          const int64_t total = outer * n * inner;
          const auto* ap = static_cast<const int32_t*>(dev_ptr(acc, total * 4, "acc"));
          void* yp = const_cast<void*>(dev_ptr(y, total, "y"));
          py::gil_scoped_release nogil;
          qsim::cuda::requantize_profile(ap, outer, n, inner, p, st, yp, stream);
        },
        py::arg("acc"), py::arg("outer"), py::arg("n"), py::arg("inner"), py::arg("numerics"), py::arg("out_dtype"),
        py::arg("multiplier"), py::arg("shift"), py::arg("scale"), py::arg("out_zero_point"), py::arg("y"),
        py::arg("stream"), "spec §14 (a runtime profile's output stage) on a device int32 array");

  m.def("log2_attn_matmul",
        [](uintptr_t codes, uintptr_t v, const std::string& vt, int64_t zv, int64_t mm, int64_t l, int64_t n,
           int bits, int k, int frac_bits, const std::string& out_dtype, const py::array& mult, const py::array& shift,
           int64_t zy, const py::array& scale, uintptr_t y, uintptr_t stream) {
          check_dims({{"M", mm}, {"L", l}, {"N", n}});
          const ActType t = act_type(vt, "v_type");
          check_zx(t, zv, "v_zero_point");
          if (bits < 2 || bits > 8) throw py::value_error("bits must be in [2, 8]");
          if (k != 1 && k != 2) throw py::value_error("k must be 1 (log2) or 2 (log-sqrt2)");
          if (frac_bits < 0 || frac_bits > 24) throw py::value_error("frac_bits must be in [0, 24]");
          const auto st = out_stage(out_dtype, n, mult, shift, zy, scale,
                                    {OutType::I64, OutType::F32, OutType::S8, OutType::U8, OutType::S4, OutType::U4});
          const auto* cp = static_cast<const uint8_t*>(dev_ptr(codes, mm * l, "codes"));
          const void* vp = dev_ptr(v, l * n, "v");
          void* yp = const_cast<void*>(dev_ptr(y, mm * n * out_bytes(st.type), "y"));
          py::gil_scoped_release nogil;
          qsim::cuda::log2_attn_matmul(cp, vp, t, mm, l, n, static_cast<int32_t>(zv), bits, k, frac_bits, st, yp,
                                       stream);
        },
        py::arg("codes"), py::arg("v"), py::arg("v_type"), py::arg("v_zero_point"), py::arg("m"), py::arg("l"),
        py::arg("n"), py::arg("bits"), py::arg("k"), py::arg("frac_bits"), py::arg("out_dtype"), py::arg("multiplier"),
        py::arg("shift"), py::arg("out_zero_point"), py::arg("out_scale"), py::arg("y"), py::arg("stream"),
        "spec §7 on device operands");
}

}  // namespace

#ifdef PYQSIM_SIMT
// The same kernels and checks, run by the host SIMT emulator (csrc/cuda/simt/, docs/spec.md §13, host SIMT emulation).
PYBIND11_MODULE(_cuda_simt, m) {
  m.doc() = "pyqsim CUDA kernel sources executed by the host SIMT emulator (a test tool, not a GPU)";
  define_api(m);
  m.def("fault_probe_names", &simt::fault_probe_names, "Names of the emulator's deliberately broken kernels");
  m.def("fault_probe", &simt::fault_probe, py::arg("name"),
        "Run one broken kernel: 'ok', 'wrong data', or the launch error it raised");
}
#else
void register_cuda(py::module_& parent) {
  py::module_ m = parent.def_submodule("cuda", "pyqsim CUDA kernels (docs/spec.md §13); use pyqsim.ops");
  define_api(m);
}
#endif
