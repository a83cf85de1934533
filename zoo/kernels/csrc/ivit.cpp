// I-ViT's integer nonlinearities (zoo/quantizers/ivit.py) in one pass over each row, for inference on
// float32 CPU tensors: the modules' codes, integer function and output value, with the same int64
// arithmetic as the torch functions there (arithmetic shifts, floor divisions, clamps), so the outputs
// are identical bit for bit (tests/test_vit.py checks them against the torch functions):
//
//   codes   v = clamp(round(double(x) / s), -q, q), q = 2^(in_bits - 1) - 1 (round half to even)
//   int_exp p = x + (x >> 1) - (x >> 4), x0 = floor(-1 / s), p = max(p, n x0), k = floor(p / x0),
//           r = p - k x0, e = max(((r >> 1) - x0) << (n - k), 0)
//   ivit_softmax    shiftmax over the row, times 2^-(bits - 1) in float32
//   ivit_gelu       shift_gelu over the row, float(double(out) * (s 2^-(bits - 1)))
//   ivit_layernorm  i_layernorm over the row, float(double(y + b[c]) * sg[c]) + 0 (b: beta's integer
//                   offset, sg: the output scale times gamma, from the module)
//
// The straight-through term the modules add (``ste``: value + (f(x) - f(x))) is + 0 for finite x
// (-0 becomes +0, which the + 0.0f above keeps); a row with a non-finite x makes the kernel return an
// empty tensor, and the module then runs the torch functions (whose NaN/inf it reproduces that way).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int64_t INT32_MAX_ = 2147483647;

// floor(a / b) for a / b >= 0 and |a|, |b| < 2^53 (both uses here): the truncated double quotient, off by
// at most one, corrected -- branch-free and without std::floor, so the loops vectorise (an int64
// division per element was most of the time)
// (inv_b: 1 / b, for a divisor used many times: a multiply instead of a division, the same correction)
inline int64_t floor_div(int64_t a, int64_t b, double inv_b) {
  int64_t q = int64_t(double(a) * inv_b);
  const int64_t r = a - q * b;  // a - q b must lie in [0, b) for b > 0, (b, 0] for b < 0
  q += b > 0 ? (r >= b) - (r < 0) : (r <= b) - (r > 0);
  return q;
}

inline int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = int64_t(double(a) / double(b));
  const int64_t r = a - q * b;
  q += b > 0 ? (r >= b) - (r < 0) : (r <= b) - (r > 0);
  return q;
}

struct IntExp {
  int64_t x0, n;
  double inv;
  IntExp(double s, int64_t n_) : x0(int64_t(std::floor(-1.0 / s))), n(n_), inv(1.0 / double(x0)) {}
  int64_t operator()(int64_t x) const {
    int64_t p = x + (x >> 1) - (x >> 4);
    p = p < n * x0 ? n * x0 : p;
    const int64_t k = floor_div(p, x0, inv);
    const int64_t r = p - k * x0;
    const int64_t e = ((r >> 1) - x0) << (n - k);
    return e < 0 ? 0 : e;
  }
};

// Runs f(codes, out row, row length) over the rows of the last dim; false if any x is not finite.
template <typename F>
bool rows(const at::Tensor& x, double s, int64_t in_bits, at::Tensor& out, F&& f) {
  const int64_t len = x.size(-1), n = x.numel() / std::max<int64_t>(len, 1);
  const double q = double((int64_t(1) << (in_bits - 1)) - 1);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  std::atomic<bool> finite{true};
  at::parallel_for(0, n, 8, [&](int64_t begin, int64_t end) {
    const int64_t m = len;  // locals: the int64 stores below could alias the captured ones (no vectorising)
    const double sd = s, qd = q;
    std::vector<int64_t> codes(m);
    int64_t* __restrict__ v = codes.data();
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict__ xr = xp + r * m;
      int64_t bad = 0;
      for (int64_t i = 0; i < m; ++i) {
        bad |= int64_t(xr[i] - xr[i] != 0.0f);  // 1 for NaN and +-inf
        double c = std::nearbyint(double(xr[i]) / sd);
        c = c < -qd ? -qd : c > qd ? qd : c;
        v[i] = int64_t(c);
      }
      if (bad) {
        finite = false;
        return;
      }
      f(v, op + r * len, len);
    }
  });
  return finite;
}

at::Tensor checked(const at::Tensor& x_in, const char* name) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() >= 1, name, ": x must be float32");
  return x_in.contiguous();
}

at::Tensor ivit_softmax(const at::Tensor& x_in, double s, int64_t bits, int64_t in_bits) {
  const at::Tensor x = checked(x_in, "ivit_softmax");
  at::Tensor out = at::empty(x.sizes(), x.options());
  const IntExp ex(s, 15);
  const float unit = float(std::ldexp(1.0, -int(bits - 1)));
  const int shift = int(32 - bits);
  const bool ok = rows(x, s, in_bits, out, [&](int64_t* v, float* o, int64_t len) {
    int64_t m = v[0];
    for (int64_t i = 1; i < len; ++i) m = v[i] > m ? v[i] : m;
    int64_t total = 0;
    for (int64_t i = 0; i < len; ++i) {
      v[i] = ex(v[i] - m);
      total += v[i];
    }
    total = total < 1 ? 1 : total > INT32_MAX_ ? INT32_MAX_ : total;
    const int64_t f = INT32_MAX_ / total;
    for (int64_t i = 0; i < len; ++i) o[i] = float((v[i] * f) >> shift) * unit;
  });
  return ok ? out : at::empty({0}, x.options());
}

at::Tensor ivit_gelu(const at::Tensor& x_in, double s, int64_t bits, int64_t in_bits) {
  const at::Tensor x = checked(x_in, "ivit_gelu");
  at::Tensor out = at::empty(x.sizes(), x.options());
  const IntExp ex(1.702 * s, 23);
  const double unit = s * std::ldexp(1.0, -int(bits - 1));
  const int shift = int(32 - bits);
  const int64_t q = (int64_t(1) << (in_bits - 1)) - 1;
  auto value = [&](int64_t v, int64_t m, int64_t b) {  // the output of code v in a row with clamped max m
    const int64_t a = ex(v - m), d = a + b < 1 ? 1 : a + b;
    const int64_t sig = (a * floor_div(INT32_MAX_, d)) >> shift;
    return float(double(v * sig) * unit);
  };
  if ((2 * q + 1) * (q + 1) > (int64_t(1) << 20)) {  // wide codes: every element computed
    const bool ok = rows(x, s, in_bits, out, [&](int64_t* v, float* o, int64_t len) {
      int64_t m = v[0];
      for (int64_t i = 1; i < len; ++i) m = v[i] > m ? v[i] : m;
      m = m < 0 ? 0 : m;
      const int64_t b = ex(-m);
      for (int64_t i = 0; i < len; ++i) o[i] = value(v[i], m, b);
    });
    return ok ? out : at::empty({0}, x.options());
  }
  // Narrow codes (8-bit: 255 codes, row maxima 0..127): a row's outputs depend only on (code, row max), so
  // each thread tabulates the 2q + 1 outputs of a row max the first time it meets it and looks them up.
  const int64_t width = 2 * q + 1, threads = at::get_num_threads();
  std::vector<std::vector<float>> tables(threads);
  std::vector<std::vector<char>> built(threads);
  const bool ok = rows(x, s, in_bits, out, [&](int64_t* v, float* o, int64_t len) {
    const int64_t tid = at::get_thread_num();
    int64_t m = v[0];
    for (int64_t i = 1; i < len; ++i) m = v[i] > m ? v[i] : m;
    m = m < 0 ? 0 : m;
    if (tid < 0 || tid >= threads) {  // (not one of this call's threads, e.g. nested in another parallel region)
      const int64_t b = ex(-m);
      for (int64_t i = 0; i < len; ++i) o[i] = value(v[i], m, b);
      return;
    }
    std::vector<float>& tab = tables[tid];
    std::vector<char>& done = built[tid];
    if (tab.empty()) tab.assign(width * (q + 1), 0.0f), done.assign(q + 1, 0);
    float* t = tab.data() + m * width;
    if (!done[m]) {
      const int64_t b = ex(-m);
      for (int64_t c = -q; c <= q; ++c) t[c + q] = value(c, m, b);
      done[m] = 1;
    }
    const float* __restrict__ tq = t + q;
    for (int64_t i = 0; i < len; ++i) o[i] = tq[v[i]];
  });
  return ok ? out : at::empty({0}, x.options());
}

at::Tensor ivit_layernorm(const at::Tensor& x_in, double s, int64_t in_bits, const at::Tensor& b_in,
                          const at::Tensor& sg_in) {
  const at::Tensor x = checked(x_in, "ivit_layernorm");
  const int64_t c = x.size(-1);
  const at::Tensor b = b_in.contiguous().to(at::kLong), sg = sg_in.contiguous().to(at::kDouble);
  TORCH_CHECK(b.numel() == c && sg.numel() == c, "ivit_layernorm: ", b.numel(), " offsets and ", sg.numel(),
              " scales for ", c, " channels");
  const int64_t* bp = b.data_ptr<int64_t>();
  const double* sp = sg.data_ptr<double>();
  at::Tensor out = at::empty(x.sizes(), x.options());
  const bool ok = rows(x, s, in_bits, out, [&](int64_t* v, float* o, int64_t len) {
    int64_t total = 0;
    for (int64_t i = 0; i < len; ++i) total += v[i];
    const int64_t mean = int64_t(std::nearbyint(double(total) / double(len)));  // torch: sum, then / len
    int64_t var = 0;
    for (int64_t i = 0; i < len; ++i) {
      v[i] -= mean;
      var += v[i] * v[i];
    }
    int64_t k = int64_t(1) << 16;  // Newton's integer square root, 10 steps (ivit.isqrt_newton)
    for (int it = 0; it < 10; ++it) {
      k = (k + var / k) >> 1;
      k = k < 1 ? 1 : k;
    }
    const int64_t f = INT32_MAX_ / k;
    for (int64_t i = 0; i < len; ++i) {
      const float y = float(double(((v[i] * f) >> 1) + bp[i]) * sp[i]);
      o[i] = y + 0.0f;  // the ste's + 0: -0 -> +0
    }
  });
  return ok ? out : at::empty({0}, x.options());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zoo_cpu, m) {
  m.def("ivit_softmax(Tensor x, float s, int bits, int in_bits) -> Tensor");
  m.def("ivit_gelu(Tensor x, float s, int bits, int in_bits) -> Tensor");
  m.def("ivit_layernorm(Tensor x, float s, int in_bits, Tensor b, Tensor sg) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) {
  m.impl("ivit_softmax", ivit_softmax);
  m.impl("ivit_gelu", ivit_gelu);
  m.impl("ivit_layernorm", ivit_layernorm);
}
