// The elementwise halves of a packed layer on the CPU, one pass each, for the cached path's float32
// inputs (zoo/kernels/cached.py): what torch computes there as five or six separate passes.
//
// affine_input (threshold_input for N2UQ's thresholds): the activation codes and the folded input of the integer sums,
//     v = clamp(round(float(x - shift[c]) / scale + offset), qmin, qmax),  u = (v - z) * m
// with float32 arithmetic in that order (round half to even, as torch.round), so v equals
// zoo.kernels.reference.quantize_act's codes bit for bit and u is exact (small (half-)integers).
// epilogue: y = float(double(acc) * scale[c] + double(bias[c])), the float64 multiply and add of
// zoo.kernels.cached._epilogue (its round() is a no-op on the exact integer sums this path produces).
// Built with -ffp-contract=off: no fused multiply-add may change a rounding.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

namespace {

// One run of elements of one channel (restrict pointers and plain loops, so the compiler vectorises them:
// vrndscaleps for the rounding on AVX-512).
void affine_run(const float* __restrict__ src, float* __restrict__ dst, int64_t n, bool has_shift, float sh,
                float s, float o, float lo, float hi, float z, float m) {
  for (int64_t i = 0; i < n; ++i) {
    float v = has_shift ? src[i] - sh : src[i];  // float32 subtraction, as x - shift in torch
    v = std::nearbyint(v / s + o);  // the default rounding mode: to nearest, ties to even
    v = v < lo ? lo : v;  // torch.clamp: max(min) order, NaN stays NaN
    v = v > hi ? hi : v;
    dst[i] = (v - z) * m;
  }
}

void threshold_run(const float* __restrict__ src, float* __restrict__ dst, int64_t n, bool has_shift, float sh,
                   const float* __restrict__ tp, int64_t nt, float z, float m) {
  constexpr int64_t CHUNK = 256;  // counts over a chunk, threshold by threshold: vectorises over elements
  float v[CHUNK], k[CHUNK];
  for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
    const int64_t nj = n - j0 < CHUNK ? n - j0 : CHUNK;
    for (int64_t j = 0; j < nj; ++j) {
      v[j] = has_shift ? src[j0 + j] - sh : src[j0 + j];
      k[j] = 0.0f;
    }
    for (int64_t t = 0; t < nt; ++t) {
      const float tt = tp[t];
      for (int64_t j = 0; j < nj; ++j) k[j] += tt < v[j] ? 1.0f : 0.0f;
    }
    for (int64_t j = 0; j < nj; ++j) dst[j0 + j] = ((v[j] != v[j] ? float(nt) : k[j]) - z) * m;  // NaN: all
  }
}

// Calls f(src, dst, n, channel) over runs of elements that share a channel: planes of the N x C x ...
// layout (channels on dim 1), or single elements of the channels-last layout.
template <typename F>
void for_channel_runs(int64_t total, int64_t c, int64_t inner, bool ch_last, F&& f) {
  if (ch_last) {
    at::parallel_for(0, total / c, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t k = 0; k < c; ++k) f(r * c + k, 1, k);
    });
  } else {
    at::parallel_for(0, total / inner, 1, [&](int64_t begin, int64_t end) {
      for (int64_t plane = begin; plane < end; ++plane) f(plane * inner, inner, plane % c);
    });
  }
}

// x: float32, channels on dim 1 (N x C x ...) when ch_last is false, on the last dim when true
// The shared frame of the input kernels: checks, the per-channel shift, one run per channel.
template <typename Run>
at::Tensor per_channel_input(const char* name, const at::Tensor& x_in, const c10::optional<at::Tensor>& shift_in,
                             bool ch_last, Run&& run) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() >= 2, name, ": x must be float32, 2-d or more");
  const at::Tensor x = x_in.contiguous();
  const int64_t c = ch_last ? x.size(-1) : x.size(1);
  const int64_t inner = ch_last ? 1 : x.numel() / (x.size(0) * c);  // elements per (sample, channel) plane
  const float* sp = nullptr;
  at::Tensor shift;
  if (shift_in.has_value() && shift_in->defined()) {
    shift = shift_in->contiguous().to(at::kFloat);
    TORCH_CHECK(shift.numel() == c, name, ": shift has ", shift.numel(), " values for ", c, " channels");
    sp = shift.data_ptr<float>();
  }
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for_channel_runs(x.numel(), c, inner, ch_last, [&](int64_t start, int64_t len, int64_t ch) {
    run(xp + start, op + start, len, sp != nullptr, sp ? sp[ch] : 0.0f);
  });
  return out;
}

at::Tensor affine_input(const at::Tensor& x, const c10::optional<at::Tensor>& shift, double scale, double offset,
                        double qmin, double qmax, double z, double m, bool ch_last) {
  const float s = float(scale), o = float(offset), lo = float(qmin), hi = float(qmax), zf = float(z), mf = float(m);
  return per_channel_input("affine_input", x, shift, ch_last,
                           [&](const float* src, float* dst, int64_t n, bool has_shift, float sh) {
                             affine_run(src, dst, n, has_shift, sh, s, o, lo, hi, zf, mf);
                           });
}

// N2UQ's threshold activations: v = the number of thresholds t_k < x - shift[c] (torch.bucketize's count,
// NaN counting all of them), u = (v - z) * m; thresholds sorted ascending, float32
at::Tensor threshold_input(const at::Tensor& x, const c10::optional<at::Tensor>& shift, const at::Tensor& th_in,
                           double z, double m, bool ch_last) {
  const at::Tensor th = th_in.contiguous().to(at::kFloat);
  const float* tp = th.data_ptr<float>();
  const int64_t nt = th.numel();
  const float zf = float(z), mf = float(m);
  return per_channel_input("threshold_input", x, shift, ch_last,
                           [&](const float* src, float* dst, int64_t n, bool has_shift, float sh) {
                             threshold_run(src, dst, n, has_shift, sh, tp, nt, zf, mf);
                           });
}

// acc: float32 or float64 integer sums, channels on dim 1 or the last dim; scale: float64 [C];
// bias: float32 [C] or none -> float32
at::Tensor epilogue(const at::Tensor& acc_in, const at::Tensor& scale_in, const c10::optional<at::Tensor>& bias_in,
                    bool ch_last) {
  TORCH_CHECK(acc_in.dim() >= 2, "epilogue: acc must be 2-d or more");
  const at::Tensor acc = acc_in.contiguous();
  const int64_t c = ch_last ? acc.size(-1) : acc.size(1);
  const int64_t inner = ch_last ? 1 : acc.numel() / (acc.size(0) * c);
  const at::Tensor scale = scale_in.contiguous().to(at::kDouble);
  TORCH_CHECK(scale.numel() == c, "epilogue: ", scale.numel(), " scales for ", c, " channels");
  at::Tensor bias;
  const double* bp = nullptr;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous().to(at::kDouble);
    TORCH_CHECK(bias.numel() == c, "epilogue: ", bias.numel(), " biases for ", c, " channels");
    bp = bias.data_ptr<double>();
  }
  at::Tensor out = at::empty(acc.sizes(), acc.options().dtype(at::kFloat));
  const double* sc = scale.data_ptr<double>();
  float* op = out.data_ptr<float>();
  const int64_t total = acc.numel();
  auto run = [&](auto* ap) {
    if (ch_last) {
      at::parallel_for(0, total / c, 256, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r)
          for (int64_t k = 0; k < c; ++k) {
            double v = double(ap[r * c + k]) * sc[k];
            op[r * c + k] = float(bp ? v + bp[k] : v);
          }
      });
    } else {
      at::parallel_for(0, total / inner, 1, [&](int64_t begin, int64_t end) {
        for (int64_t plane = begin; plane < end; ++plane) {
          const int64_t k = plane % c;
          const double s = sc[k];
          const auto* a = ap + plane * inner;
          float* o = op + plane * inner;
          if (bp) {
            const double b = bp[k];
            for (int64_t i = 0; i < inner; ++i) o[i] = float(double(a[i]) * s + b);
          } else {
            for (int64_t i = 0; i < inner; ++i) o[i] = float(double(a[i]) * s);
          }
        }
      });
    }
  };
  if (acc.scalar_type() == at::kFloat) run(acc.data_ptr<float>());
  else if (acc.scalar_type() == at::kDouble) run(acc.data_ptr<double>());
  else TORCH_CHECK(false, "epilogue: acc must be float32 or float64, got ", acc.scalar_type());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zoo_cpu, m) {
  m.def("affine_input(Tensor x, Tensor? shift, float scale, float offset, float qmin, float qmax, float z, float m, "
        "bool ch_last) -> Tensor");
  m.def("threshold_input(Tensor x, Tensor? shift, Tensor thresholds, float z, float m, bool ch_last) -> Tensor");
  m.def("epilogue(Tensor acc, Tensor scale, Tensor? bias, bool ch_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) {
  m.impl("affine_input", affine_input);
  m.impl("threshold_input", threshold_input);
  m.impl("epilogue", epilogue);
}
