// Float stages of docs/spec.md §15, written once over a lane type so that the scalar kernels
// (float_scalar.cpp: one float per lane), the AVX2 kernels (float_avx2.cpp: eight) and the AVX-512 kernels
// (float_avx512.cpp: sixteen) perform the same IEEE binary32 operations in the same order and return the same bits.
//
// A lane-operations class O provides: V (the float lanes), I (int32 lanes), M (a lane mask), W (lanes per
// V); set, zero, load, store, load_fill(p, k, fill) / store_part(p, v, k) for the first k < W lanes;
// add, sub, mul, div, abs (each one correctly rounded IEEE operation, or exact); clamp(v, lo, hi) (hi if v > hi,
// v if v >= lo, else lo, NaN included; for bounds lo < hi that are not zero); gt, ge, unord (masks),
// mor, select, any; to_int (exact for integral values), iadd, isub, sra1, pow2 (2^k as float for k in
// [-126, 127]); keep(v, k) (lanes >= k set to +0), hmax_lanes (largest lane, NaN-free input), tree
// (the halving sum of §15.1 inside one V); set_int, load_int(p, k) and store_codes(p, i, k) (the low byte
// of each of the first k int32 lanes) for quantize.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace qsim {
namespace fmath {

constexpr int kLanes = 32;  // §15.1 accumulator lanes
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();  // bits 0x7FC00000 (§15)

// §15.2 exp
constexpr float kExpHi = 89.0f, kExpLo = -104.0f;
constexpr float kLog2e = 0x1.715476p+0f, kRounder = 0x1.8p+23f;
constexpr float kLn2Hi = 0x1.63p-1f, kLn2Lo = -0x1.bd0106p-13f;
constexpr float kExpPoly[8] = {0x1.a01a02p-13f, 0x1.6c16c2p-10f, 0x1.111112p-7f, 0x1.555556p-5f,
                               0x1.555556p-3f,  0x1.0p-1f,       1.0f,            1.0f};
// §15.3 erfc polynomial (scripts/fit_erfc.py), highest degree first
constexpr float kErfcPoly[11] = {-0x1.2f44f6p-3f, 0x1.04de88p-2f, -0x1.79a79p-10f, -0x1.2b2f2p-2f,
                                 0x1.b729d6p-4f,  0x1.20ee4p-2f,  -0x1.42d98p-3f,  -0x1.802b4p-2f,
                                 0x1.83d25ep-3f,  0x1.5864b2p+0f, -0x1.57f564p-1f};
constexpr float kInvSqrt2 = 0x1.6a09e6p-1f;
// §15.4 tanh form
constexpr float kGeluT = -0x1.988454p+0f, kGeluC = 0.044715f;

#define QSIM_INLINE [[gnu::always_inline]] inline

// N lane vectors of O per step, each with O's operations (so the same bits): N independent dependency chains in flight
// where one vector at a time leaves the polynomials of §15.2-§15.4 bound by the latency of their Horner steps. The
// subset of the lane operations that the elementwise stages use.
template <class O, int N>
struct Multi {
  template <class T>
  struct Of {
    T v[N];
  };
  using V = Of<typename O::V>;
  using I = Of<typename O::I>;
  using M = Of<typename O::M>;
  static constexpr int W = O::W * N;
#define QSIM_EACH(R, name, params, expr)    \
  QSIM_INLINE static R name params {        \
    R r;                                    \
    _Pragma("GCC unroll 8") for (int j = 0; j < N; ++j) r.v[j] = expr; \
    return r;                               \
  }
  QSIM_EACH(V, set, (float a), O::set(a))
  QSIM_EACH(V, zero, (), O::zero())
  QSIM_EACH(V, load, (const float* p), O::load(p + j * O::W))
  QSIM_EACH(V, add, (V a, V b), O::add(a.v[j], b.v[j]))
  QSIM_EACH(V, sub, (V a, V b), O::sub(a.v[j], b.v[j]))
  QSIM_EACH(V, mul, (V a, V b), O::mul(a.v[j], b.v[j]))
  QSIM_EACH(V, div, (V a, V b), O::div(a.v[j], b.v[j]))
  QSIM_EACH(V, abs, (V a), O::abs(a.v[j]))
  QSIM_EACH(V, clamp, (V a, V lo, V hi), O::clamp(a.v[j], lo.v[j], hi.v[j]))
  QSIM_EACH(M, gt, (V a, V b), O::gt(a.v[j], b.v[j]))
  QSIM_EACH(M, ge, (V a, V b), O::ge(a.v[j], b.v[j]))
  QSIM_EACH(M, unord, (V a, V b), O::unord(a.v[j], b.v[j]))
  QSIM_EACH(V, select, (M m, V a, V b), O::select(m.v[j], a.v[j], b.v[j]))
  QSIM_EACH(I, to_int, (V a), O::to_int(a.v[j]))
  QSIM_EACH(I, isub, (I a, I b), O::isub(a.v[j], b.v[j]))
  QSIM_EACH(I, sra1, (I a), O::sra1(a.v[j]))
  QSIM_EACH(V, pow2, (I a), O::pow2(a.v[j]))
#undef QSIM_EACH
  QSIM_INLINE static void store(float* p, V a) {
    _Pragma("GCC unroll 8") for (int j = 0; j < N; ++j) O::store(p + j * O::W, a.v[j]);
  }
};

// The lane type P of an elementwise function f(Tag<P>{}, v) (see map).
template <class P>
struct Tag {
  using type = P;
};

template <class O>
QSIM_INLINE typename O::V exp(typename O::V x) {
  using V = typename O::V;
  const V rounder = O::set(kRounder);
  const V c = O::clamp(x, O::set(kExpLo), O::set(kExpHi));  // NaN -> lo
  const V n = O::sub(O::add(O::mul(c, O::set(kLog2e)), rounder), rounder);
  const V r = O::sub(O::sub(c, O::mul(n, O::set(kLn2Hi))), O::mul(n, O::set(kLn2Lo)));
  V p = O::set(kExpPoly[0]);
  for (int i = 1; i < 8; ++i) p = O::add(O::mul(p, r), O::set(kExpPoly[i]));
  const typename O::I ni = O::to_int(n);
  const typename O::I n1 = O::sra1(ni);
  return O::mul(O::mul(p, O::pow2(n1)), O::pow2(O::isub(ni, n1)));
}

template <class O>
QSIM_INLINE typename O::V canon(typename O::V y) {
  return O::select(O::unord(y, y), O::set(kNaN), y);
}

// Phi(x) = erfc(-x / sqrt 2) / 2 (§15.3)
template <class O>
QSIM_INLINE typename O::V normal_cdf(typename O::V x) {
  using V = typename O::V;
  const V half = O::set(0.5f), one = O::set(1.0f);
  const V u = O::mul(O::abs(x), O::set(kInvSqrt2));
  const V t = O::div(one, O::add(one, O::mul(half, u)));
  const V v = O::sub(t, half);
  V p = O::set(kErfcPoly[0]);
  for (int i = 1; i < 11; ++i) p = O::add(O::mul(p, v), O::set(kErfcPoly[i]));
  const V h = O::mul(half, O::mul(t, exp<O>(O::sub(p, O::mul(O::mul(x, x), half)))));  // u^2 = x^2 / 2
  return O::select(O::ge(x, O::zero()), O::sub(one, h), h);
}

template <class O>
QSIM_INLINE typename O::V gelu_erf(typename O::V x) {
  return canon<O>(O::mul(x, normal_cdf<O>(x)));
}

template <class O>
QSIM_INLINE typename O::V gelu_tanh(typename O::V x) {
  using V = typename O::V;
  const V one = O::set(1.0f);
  const V w = O::mul(O::set(kGeluT), O::mul(x, O::add(one, O::mul(O::set(kGeluC), O::mul(x, x)))));
  return canon<O>(O::div(x, O::add(one, exp<O>(w))));
}

template <class O>
QSIM_INLINE typename O::V silu(typename O::V x) {
  return canon<O>(O::div(x, O::add(O::set(1.0f), exp<O>(O::sub(O::zero(), x)))));
}

// y[i] = f(x[i]) for i < n, f called as f(Tag<P>{}, v) on lanes P: eight vectors at a time (Multi), then one
template <class O, class F>
void map(const float* x, float* y, int64_t n, F f) {
  using Q = Multi<O, 8>;
  constexpr int W = O::W;
  int64_t i = 0;
  for (; i + Q::W <= n; i += Q::W) Q::store(y + i, f(Tag<Q>{}, Q::load(x + i)));
  for (; i + W <= n; i += W) O::store(y + i, f(Tag<O>{}, O::load(x + i)));
  if (i < n)
    O::store_part(y + i, f(Tag<O>{}, O::load_fill(x + i, static_cast<int>(n - i), 0.0f)), static_cast<int>(n - i));
}

// §15.8: y[i] = fl32(a[i] + b[i]), or fl32(a[i] + b) with a scalar b; NaN results canonical
template <class O>
void add_run(const float* a, const float* b, float* y, int64_t n) {
  constexpr int W = O::W;
  int64_t i = 0;
  for (; i + W <= n; i += W) O::store(y + i, canon<O>(O::add(O::load(a + i), O::load(b + i))));
  if (i < n) {
    const int k = static_cast<int>(n - i);
    O::store_part(y + i, canon<O>(O::add(O::load_fill(a + i, k, 0.0f), O::load_fill(b + i, k, 0.0f))), k);
  }
}

template <class O>
void add_scalar_run(const float* a, float b, float* y, int64_t n) {
  map<O>(a, y, n, [b](auto t, auto v) {
    using P = typename decltype(t)::type;
    return canon<P>(P::add(v, P::set(b)));
  });
}

// §15.1: sum of g(i) over i < n (g(i) = the V of elements [i, i + W), zero-filled past n) in 32 lanes,
// then the halving tree.
template <class O, class G>
float lane_sum(int64_t n, G g) {
  using V = typename O::V;
  constexpr int W = O::W, NA = kLanes / W;
  V acc[NA];
  for (int a = 0; a < NA; ++a) acc[a] = O::zero();
  for (int64_t i = 0; i < n; i += kLanes)
    for (int a = 0; a < NA; ++a) {
      const int64_t j = i + int64_t(a) * W;
      const int64_t k = n - j >= W ? W : (n - j > 0 ? n - j : 0);
      acc[a] = O::add(acc[a], k == W ? g(j, W) : (k > 0 ? O::keep(g(j, static_cast<int>(k)), static_cast<int>(k))
                                                        : O::zero()));
    }
  for (int h = NA / 2; h >= 1; h /= 2)
    for (int a = 0; a < h; ++a) acc[a] = O::add(acc[a], acc[a + h]);
  return O::tree(acc[0]);
}

template <class O>
typename O::V load_n(const float* p, int k) {
  return k == O::W ? O::load(p) : O::load_fill(p, k, 0.0f);
}

// §15.5 one row of length n >= 1.
template <class O>
void softmax_row(const float* x, float* y, int64_t n) {
  using V = typename O::V;
  constexpr int W = O::W;
  const float ninf = -std::numeric_limits<float>::infinity();
  V m = O::set(ninf);
  typename O::M nan = O::unord(m, m);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const V v = O::load(x + i);
    nan = O::mor(nan, O::unord(v, v));
    m = O::select(O::gt(v, m), v, m);
  }
  if (i < n) {
    const V v = O::load_fill(x + i, static_cast<int>(n - i), ninf);
    nan = O::mor(nan, O::unord(v, v));
    m = O::select(O::gt(v, m), v, m);
  }
  const float mx = O::hmax_lanes(m);
  if (O::any(nan) || mx == std::numeric_limits<float>::infinity() || mx == ninf) {
    const float fill = O::any(nan) || mx != ninf ? kNaN : 0.0f;
    for (int64_t j = 0; j < n; ++j) y[j] = fill;
    return;
  }
  map<O>(x, y, n, [mx](auto t, auto v) {
    using P = typename decltype(t)::type;
    return exp<P>(P::sub(v, P::set(mx)));
  });
  const float s = lane_sum<O>(n, [&](int64_t j, int k) { return load_n<O>(y + j, k); });
  map<O>(y, y, n, [s](auto t, auto v) {
    using P = typename decltype(t)::type;
    return P::div(v, P::set(s));
  });
}

// §15.6 statistics of one row/segment of length n >= 1: mean and 1 / sqrt(var + eps).
template <class O>
void moments(const float* x, int64_t n, float eps, float& mean, float& rstd) {
  using V = typename O::V;
  const float nf = static_cast<float>(n);
  mean = lane_sum<O>(n, [&](int64_t j, int k) { return load_n<O>(x + j, k); }) / nf;
  const V mv = O::set(mean);
  const float var = lane_sum<O>(n, [&](int64_t j, int k) {
                      const V d = O::sub(load_n<O>(x + j, k), mv);
                      return O::mul(d, d);
                    }) / nf;
  rstd = 1.0f / std::sqrt(var + eps);  // IEEE square root, correctly rounded
}

// y = canon(((x - mean) * rstd) * w + b) over n elements sharing (w, b)
template <class O>
void normalize_run(const float* x, float* y, int64_t n, float mean, float rstd, float w, float b) {
  map<O>(x, y, n, [=](auto t, auto v) {
    using P = typename decltype(t)::type;
    return canon<P>(P::add(P::mul(P::mul(P::sub(v, P::set(mean)), P::set(rstd)), P::set(w)), P::set(b)));
  });
}

// LayerNorm row: per-element weight and bias vectors
template <class O>
void layer_norm_row(const float* x, float* y, int64_t n, const float* w, const float* b, float eps) {
  using V = typename O::V;
  constexpr int W = O::W;
  float mean, rstd;
  moments<O>(x, n, eps, mean, rstd);
  const V mv = O::set(mean), rv = O::set(rstd);
  int64_t i = 0;
  for (; i + W <= n; i += W)
    O::store(y + i, canon<O>(O::add(O::mul(O::mul(O::sub(O::load(x + i), mv), rv), O::load(w + i)), O::load(b + i))));
  if (i < n) {
    const int k = static_cast<int>(n - i);
    const V r = O::add(O::mul(O::mul(O::sub(O::load_fill(x + i, k, 0.0f), mv), rv), O::load_fill(w + i, k, 0.0f)),
                       O::load_fill(b + i, k, 0.0f));
    O::store_part(y + i, canon<O>(r), k);
  }
}

// Inline templates only, and no library templates (std::min, std::fill): this header is compiled with and
// without -mavx2 (and with AVX-512), and a shared out-of-line instantiation could carry AVX2 code into the scalar path.

// §2 uniform quantization: q = clamp(rint(x / s), lo - z, hi - z) + z, with the clamp applied first (equal, as
// the bounds are integers) so the rounding works on |t| <= 510 (a NaN t clamps to lo - z: defined, and reported).
template <class O>
typename O::I quantize_lanes(typename O::V x, typename O::V s, typename O::V lo, typename O::V hi, typename O::I z) {
  using V = typename O::V;
  const V t = O::div(x, s);
  const V c = O::select(O::gt(t, hi), hi, O::select(O::ge(t, lo), t, lo));
  const V rounder = O::set(kRounder);
  return O::iadd(O::to_int(O::sub(O::add(c, rounder), rounder)), z);
}

// lanes of x that are NaN or infinite
template <class O>
typename O::M nonfinite(typename O::V x) {
  return O::mor(O::unord(x, x), O::gt(O::abs(x), O::set(std::numeric_limits<float>::max())));
}

// Codes of a run of n floats (out: the low byte of each code); parameters per element (s, lo - z, hi - z, z) when
// stride == 1, else shared. Returns false when some x is not finite (the codes are then meaningless).
template <class O>
bool quantize_run(const float* x, int64_t n, const float* s, const float* lo, const float* hi, const int32_t* z,
                  int stride, uint8_t* out) {
  using V = typename O::V;
  constexpr int W = O::W;
  typename O::M bad = O::unord(O::zero(), O::zero());
  auto step = [&](int64_t i, int k, V sv, V lv, V hv, typename O::I zv) {
    const V xv = load_n<O>(x + i, k);
    bad = O::mor(bad, nonfinite<O>(xv));
    O::store_codes(out + i, quantize_lanes<O>(xv, sv, lv, hv, zv), k);
  };
  if (stride) {
    for (int64_t i = 0; i < n; i += W) {
      const int k = static_cast<int>(n - i < W ? n - i : W);
      step(i, k, O::load_fill(s + i, k, 1.0f), load_n<O>(lo + i, k), load_n<O>(hi + i, k), O::load_int(z + i, k));
    }
  } else {
    const V sv = O::set(s[0]), lv = O::set(lo[0]), hv = O::set(hi[0]);
    const typename O::I zv = O::set_int(z[0]);
    for (int64_t i = 0; i < n; i += W) step(i, static_cast<int>(n - i < W ? n - i : W), sv, lv, hv, zv);
  }
  return !O::any(bad);
}

// §3 log codes: r = fl64(p) / fl64(delta) is zero or a normal float64 (2^-277 <= r <= 2^277 for float32 p > 0 and
// delta), so frexp is read from the bits: e = biased exponent - 1022 and, as m and each threshold share the
// exponent -1, m <= T compares their 52-bit fractions. r == 0 exactly when p == 0.
constexpr uint64_t kLogFrac = (uint64_t(1) << 52) - 1;
constexpr uint64_t kLogHalf = 0x6a09e667f3bccULL, kLogQuarter = 0xae89f995ad3adULL,
                   kLogThreeQuarters = 0x306fe0a31b715ULL;

// the code of one p (K = 1 or 2, Z = zero_code); a p that is not finite and >= 0 gives some code, without
// undefined behaviour
template <class O, int K>
uint8_t log_code(float p, double delta, int zero_code) {
  const double r = static_cast<double>(p) / delta;
  uint64_t bits;
  std::memcpy(&bits, &r, sizeof bits);
  const int64_t e = static_cast<int64_t>(bits >> 52) - 1022;  // p >= 0, so the sign bit is 0 (or r = -0.0)
  const uint64_t f = bits & kLogFrac;
  int64_t c = K == 1 ? -e + (f <= kLogHalf) : -2 * e + (f <= kLogQuarter) + (f <= kLogThreeQuarters);
  c = c < 0 ? 0 : c;
  return static_cast<uint8_t>(r == 0.0 || c >= zero_code ? zero_code : c);
}

// codes of n values one at a time; false when some p is not finite and >= 0 (-0.0 is accepted)
template <class O, int K>
bool log_codes_each(const float* p, int64_t n, double delta, int zero_code, uint8_t* out) {
  bool ok = true;
  for (int64_t i = 0; i < n; ++i) {
    ok &= p[i] >= 0.0f && p[i] <= std::numeric_limits<float>::max();
    out[i] = log_code<O, K>(p[i], delta, zero_code);
  }
  return ok;
}

}  // namespace fmath
}  // namespace qsim
