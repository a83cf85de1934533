// The elementwise halves of a packed layer on the CPU, one pass each, for the cached path's float32
// inputs (zoo/kernels/cached.py): what torch computes there as five or six separate passes.
//
// affine_input (threshold_input for N2UQ's thresholds): the activation codes and the folded input of the integer sums,
//     v = clamp(round(float(x - shift[c]) / scale + offset), qmin, qmax),  u = (v - z) * m
// with float32 arithmetic in that order (round half to even, as torch.round), so v equals
// zoo.kernels.reference.quantize_act's codes bit for bit and u is exact (small (half-)integers).
// With u8 set, u is written as uint8 (the caller makes it a code in [0, 255]: z = qmin; a NaN gives 0):
// the input of the int8 convolutions and matmuls (zoo/kernels/onednn.py).
// epilogue: y = float(double(acc) * scale[c] + double(bias[c])), the float64 multiply and add of
// zoo.kernels.cached._epilogue (its round() is a no-op on the exact integer sums this path produces).
// 4-d channels-last inputs are read in place, without a copy, and give channels-last results -- or,
// with nchw set (the epilogues of the int8 convolutions, which return channels-last sums), contiguous
// N x C x H x W ones: a layer's output keeps its input's layout, as in the reference, so the float
// layers after it compute exactly what they compute there. Built with -ffp-contract=off: no fused multiply-add may change a rounding.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

// One run of elements of one channel (restrict pointers and plain loops, so the compiler vectorises them:
// vrndscaleps for the rounding on AVX-512).
inline float store(float u, float*) { return u; }
inline uint8_t store(float u, uint8_t*) { return u == u ? uint8_t(u) : uint8_t(0); }  // u in [0, 255] or NaN

// Shift: 0 none, 1 one value for the run (a plane of one channel), 2 one per element (a channels-last row)
template <int Shift, typename T>
void affine_run(const float* __restrict__ src, T* __restrict__ dst, int64_t n, const float* __restrict__ sh,
                float s, float o, float lo, float hi, float z, float m) {
  const float s0 = Shift == 1 ? sh[0] : 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    float v = Shift == 0 ? src[i] : src[i] - (Shift == 1 ? s0 : sh[i]);  // float32, as x - shift in torch
    v = std::nearbyint(v / s + o);  // the default rounding mode: to nearest, ties to even
    v = v < lo ? lo : v;  // torch.clamp: max(min) order, NaN stays NaN
    v = v > hi ? hi : v;
    dst[i] = store((v - z) * m, dst);
  }
}

template <int Shift, typename T>
void threshold_run(const float* __restrict__ src, T* __restrict__ dst, int64_t n, const float* __restrict__ sh,
                   const float* __restrict__ tp, int64_t nt, float z, float m) {
  constexpr int64_t CHUNK = 256;  // counts over a chunk, threshold by threshold: vectorises over elements
  float v[CHUNK], k[CHUNK];
  for (int64_t j0 = 0; j0 < n; j0 += CHUNK) {
    const int64_t nj = n - j0 < CHUNK ? n - j0 : CHUNK;
    for (int64_t j = 0; j < nj; ++j) {
      v[j] = Shift == 0 ? src[j0 + j] : src[j0 + j] - (Shift == 1 ? sh[0] : sh[j0 + j]);
      k[j] = 0.0f;
    }
    for (int64_t t = 0; t < nt; ++t) {
      const float tt = tp[t];
      for (int64_t j = 0; j < nj; ++j) k[j] += tt < v[j] ? 1.0f : 0.0f;
    }
    const float all = float(nt);
    for (int64_t j = 0; j < nj; ++j) {  // (a select the compiler vectorises: the v != v ? : form it did not)
      const float c = v[j] == v[j] ? k[j] : all;  // NaN: above every threshold
      dst[j0 + j] = store((c - z) * m, dst);
    }
  }
}

// 4-d channels-last and not also contiguous (a dense N x C x H x W tensor stored as N x H x W x C)
bool nhwc(const at::Tensor& x) {
  return x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// The source rows of the epilogues: row r (= img * hw + p, output pixel p of image img) holds the C'
// values acc[r * C' + k] of a channels-last acc -- or (sub) of a sub-pixel convolution's sums
// (zoo/kernels/onednn.py, ConvTranspose): acc is N x (sh sw C') x hi x wi stored channels-last, and
// the transposed conv's output pixel (y, x) of an ho x wo image is phase (y % sh, x % sw)'s C' values at
// acc pixel (y / sh + oh, x / sw + ow).
template <typename A>
struct Rows {
  const A* ap;
  int64_t ca;
  bool sub = false;
  int64_t sh = 1, sw = 1, oh = 0, ow = 0, ho = 1, wo = 1, hi = 1, wi = 1;
  const A* operator()(int64_t r) const {
    if (!sub) return ap + r * ca;
    const int64_t hw = ho * wo, n = r / hw, p = r - n * hw, y = p / wo, x = p - y * wo;
    return ap + ((n * hi + y / sh + oh) * wi + x / sw + ow) * (sh * sw * ca) + ((y % sh) * sw + x % sw) * ca;
  }
};

// Rows of acc (channels-last, C' = ca values per row) and the output's N x C x H x W shape: with
// subpixel = [sh, sw, oh, ow, ho, wo], acc holds sh sw groups of ca channels and the output is ho x wo.
template <typename A>
Rows<A> make_rows(const at::Tensor& acc, int64_t ca, at::OptionalIntArrayRef subpixel, std::vector<int64_t>& hw_out) {
  Rows<A> rows{acc.data_ptr<A>(), ca};
  hw_out = {acc.size(2), acc.size(3)};
  if (subpixel.has_value()) {
    const auto sp = *subpixel;
    TORCH_CHECK(sp.size() == 6 && acc.dim() == 4 && acc.size(1) == sp[0] * sp[1] * ca,
                "subpixel: [sh, sw, oh, ow, ho, wo] for sums with sh sw groups of channels");
    rows.sub = true;
    rows.sh = sp[0], rows.sw = sp[1], rows.oh = sp[2], rows.ow = sp[3], rows.ho = sp[4], rows.wo = sp[5];
    rows.hi = acc.size(2), rows.wi = acc.size(3);
    TORCH_CHECK((rows.ho - 1) / rows.sh + rows.oh < rows.hi && (rows.wo - 1) / rows.sw + rows.ow < rows.wi,
                "subpixel: the output needs sums outside acc");
    hw_out = {rows.ho, rows.wo};
  }
  return rows;
}

// Writes out[img, k, p] = f(row(r), p, k) for every row r = img * hw + p and channel k (a transpose to
// N x C x H x W), a tile of 64 pixels at a time: the tile's values are computed row by row into a
// buffer (channels innermost, so the compiler vectorises f over k) and then stored plane by plane, so
// every channel's stores run contiguously (one store per row and channel, hw floats apart, would
// touch a new cache line each time: 10-17x slower at 64 x 64 pixels).
template <typename Row, typename F>
void write_nchw(float* op, int64_t rows, int64_t c, int64_t hw, Row&& row, F&& f) {
  constexpr int64_t T = 64;
  const int64_t tiles = (hw + T - 1) / T;
  at::parallel_for(0, (rows / hw) * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile(T * c);
    float* buf = tile.data();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t img = t / tiles, p0 = (t % tiles) * T, np = std::min(T, hw - p0), r0 = img * hw + p0;
      for (int64_t j = 0; j < np; ++j) f(buf + j * c, row(r0 + j), p0 + j);
      for (int64_t k = 0; k < c; ++k) {
        float* o = op + (img * c + k) * hw + p0;
        for (int64_t j = 0; j < np; ++j) o[j] = buf[j * c + k];
      }
    }
  });
}

// Writes out[r * c .. r * c + c) = f(row(r), p) (channels-last output rows).
template <typename Row, typename F>
void write_rows(float* op, int64_t rows, int64_t c, int64_t hw, Row&& row, F&& f) {
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(op + r * c, row(r), r % hw);
  });
}

// The shared frame of the input kernels: checks, the layout, the per-channel shift, then
// run.template operator()<Shift>(src, dst, n, shift pointer) over runs of elements:
// no shift: any runs of the flat storage; channels on dim 1: planes of one channel (Shift 1);
// channels last (ch_last: the last dim; or a 4-d channels-last tensor): rows of C elements (Shift 2).
// With cl_out, a 4-d N x C x H x W input gives a channels-last result (the int8 convolutions' input
// layout, which oneDNN would otherwise make with a copy): a tile of 64 pixels is gathered into a buffer
// as rows of C floats and computed from there.
template <typename T, typename Run>
at::Tensor input_kernel(const char* name, const at::Tensor& x_in, const c10::optional<at::Tensor>& shift_in,
                        bool ch_last, at::ScalarType out_type, Run&& run, bool cl_out = false) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() >= 2, name, ": x must be float32, 2-d or more");
  const bool cl = !ch_last && nhwc(x_in);
  const at::Tensor x = cl ? x_in : x_in.contiguous();
  const int64_t c = ch_last ? x.size(-1) : x.size(1);
  const int64_t total = x.numel();
  const bool has_shift = shift_in.has_value() && shift_in->defined();
  at::Tensor shift;
  if (has_shift) {
    shift = shift_in->contiguous().to(at::kFloat);
    TORCH_CHECK(shift.numel() == c, name, ": shift has ", shift.numel(), " values for ", c, " channels");
  }
  const float* xp = x.data_ptr<float>();
  if (cl_out && !cl && !ch_last && x.dim() == 4) {  // N x C x H x W planes -> channels-last rows
    at::Tensor out = at::empty(x.sizes(), x.options().dtype(out_type).memory_format(at::MemoryFormat::ChannelsLast));
    T* op = out.data_ptr<T>();
    const float* sp = has_shift ? shift.data_ptr<float>() : nullptr;
    constexpr int64_t TILE = 64;
    const int64_t hw = x.size(2) * x.size(3), tiles = (hw + TILE - 1) / TILE;
    std::vector<float> tiled(sp ? TILE * c : 0);  // the shifts repeated for a tile's rows: one long run
    for (int64_t j = 0; sp && j < TILE; ++j) std::copy(sp, sp + c, tiled.begin() + j * c);
    const float* tp = tiled.data();
    at::parallel_for(0, x.size(0) * tiles, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> buf(c * TILE);
      float* __restrict__ b = buf.data();
      for (int64_t t = begin; t < end; ++t) {
        const int64_t img = t / tiles, p0 = (t % tiles) * TILE, np = std::min(TILE, hw - p0);
        const float* __restrict__ src = xp + img * c * hw + p0;
        for (int64_t j = 0; j < np; ++j)  // the tile's inputs as rows of C floats
          for (int64_t k = 0; k < c; ++k) b[j * c + k] = src[k * hw + j];
        T* o = op + (img * hw + p0) * c;
        if (sp) {
          run.template operator()<2>(b, o, np * c, tp);
        } else {
          run.template operator()<0>(b, o, np * c, nullptr);
        }
      }
    });
    return out;
  }
  at::Tensor out = at::empty_like(x, x.options().dtype(out_type));  // keeps a channels-last layout
  T* op = out.data_ptr<T>();
  if (!has_shift) {
    at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
      run.template operator()<0>(xp + begin, op + begin, end - begin, nullptr);
    });
    return out;
  }
  const float* sp = shift.data_ptr<float>();
  if (ch_last || cl) {  // rows of C: runs of `per` rows at once against the shifts repeated `per` times, so
    // the loop is long enough to vectorise well when C is small (a 30-channel row alone is mostly remainder)
    const int64_t rows = total / c, per = std::max<int64_t>(1, 1024 / c);
    std::vector<float> tiled(per * c);
    for (int64_t j = 0; j < per; ++j) std::copy(sp, sp + c, tiled.begin() + j * c);
    const float* tp = tiled.data();
    const int64_t runs = (rows + per - 1) / per;
    at::parallel_for(0, runs, std::max<int64_t>(1, 4096 / (per * c)), [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t r0 = b * per, nr = std::min(per, rows - r0);
        run.template operator()<2>(xp + r0 * c, op + r0 * c, nr * c, tp);
      }
    });
  } else {
    const int64_t inner = total / (x.size(0) * c);  // elements per (sample, channel) plane
    at::parallel_for(0, total / inner, 1, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) run.template operator()<1>(xp + p * inner, op + p * inner, inner, sp + p % c);
    });
  }
  return out;
}

at::Tensor affine_input(const at::Tensor& x, const c10::optional<at::Tensor>& shift, double scale, double offset,
                        double qmin, double qmax, double z, double m, bool ch_last, bool u8, bool cl_out) {
  const float s = float(scale), o = float(offset), lo = float(qmin), hi = float(qmax), zf = float(z), mf = float(m);
  auto go = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return input_kernel<T>("affine_input", x, shift, ch_last, u8 ? at::kByte : at::kFloat,
                           [&]<int Shift>(const float* src, T* dst, int64_t n, const float* sh) {
                             affine_run<Shift>(src, dst, n, sh, s, o, lo, hi, zf, mf);
                           }, cl_out);
  };
  return u8 ? go((uint8_t*)nullptr) : go((float*)nullptr);
}

// N2UQ's threshold activations: v = the number of thresholds t_k < x - shift[c] (torch.bucketize's count,
// NaN counting all of them), u = (v - z) * m; thresholds sorted ascending, float32
at::Tensor threshold_input(const at::Tensor& x, const c10::optional<at::Tensor>& shift, const at::Tensor& th_in,
                           double z, double m, bool ch_last, bool u8, bool cl_out) {
  const at::Tensor th = th_in.contiguous().to(at::kFloat);
  const float* tp = th.data_ptr<float>();
  const int64_t nt = th.numel();
  const float zf = float(z), mf = float(m);
  auto go = [&](auto* tag) {
    using T = std::remove_pointer_t<decltype(tag)>;
    return input_kernel<T>("threshold_input", x, shift, ch_last, u8 ? at::kByte : at::kFloat,
                           [&]<int Shift>(const float* src, T* dst, int64_t n, const float* sh) {
                             threshold_run<Shift>(src, dst, n, sh, tp, nt, zf, mf);
                           }, cl_out);
  };
  return u8 ? go((uint8_t*)nullptr) : go((float*)nullptr);
}

// The float64 bias of an epilogue (nullptr without one), kept alive in ``holder``; C values or an error.
const double* bias_ptr(const c10::optional<at::Tensor>& bias_in, int64_t c, const char* name, at::Tensor& holder) {
  if (!(bias_in.has_value() && bias_in->defined())) return nullptr;
  holder = bias_in->contiguous().to(at::kDouble);
  TORCH_CHECK(holder.numel() == c, name, ": ", holder.numel(), " biases for ", c, " channels");
  return holder.data_ptr<double>();
}

// The result of a channels-last epilogue with c channels: acc's shape with c channels, channels-last
// for a 4-d acc unless nchw (then contiguous), contiguous otherwise.
at::Tensor rows_out(const at::Tensor& acc, bool cl, int64_t c, bool nchw) {
  std::vector<int64_t> shape(acc.sizes().begin(), acc.sizes().end());
  shape[cl ? 1 : shape.size() - 1] = c;
  return cl && !nchw ? at::empty(shape, acc.options().memory_format(at::MemoryFormat::ChannelsLast))
                     : at::empty(shape, acc.options());
}

// acc: float32 or float64 integer sums, channels on dim 1 or the last dim; scale: float64 [C];
// bias: float32 [C] or none -> float32. subpixel: acc is a sub-pixel convolution's float32 sums (Rows).
at::Tensor epilogue(const at::Tensor& acc_in, const at::Tensor& scale_in, const c10::optional<at::Tensor>& bias_in,
                    bool ch_last, bool nchw, at::OptionalIntArrayRef subpixel) {
  TORCH_CHECK(acc_in.dim() >= 2, "epilogue: acc must be 2-d or more");
  const bool sub = subpixel.has_value();
  TORCH_CHECK(!sub || (acc_in.dim() == 4 && !ch_last && acc_in.scalar_type() == at::kFloat),
              "epilogue: subpixel sums must be 4-d float32");
  const bool cl = sub || (!ch_last && nhwc(acc_in));
  const at::Tensor acc = sub ? acc_in.contiguous(at::MemoryFormat::ChannelsLast) : cl ? acc_in : acc_in.contiguous();
  const int64_t c = sub ? acc.size(1) / ((*subpixel)[0] * (*subpixel)[1]) : ch_last ? acc.size(-1) : acc.size(1);
  ch_last = ch_last || cl;
  const at::Tensor scale = scale_in.contiguous().to(at::kDouble);
  TORCH_CHECK(scale.numel() == c, "epilogue: ", scale.numel(), " scales for ", c, " channels");
  at::Tensor bias;
  const double* bp = bias_ptr(bias_in, c, "epilogue", bias);
  const double* sc = scale.data_ptr<double>();
  if (cl) {  // rows of C channels: a channels-last result, or (nchw) a contiguous one
    std::vector<int64_t> hw2;
    auto run = [&](auto rows) {
      const int64_t hw = hw2[0] * hw2[1], n = acc.size(0);
      at::Tensor out = at::empty({n, c, hw2[0], hw2[1]}, nchw ? acc.options().dtype(at::kFloat)
          : acc.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
      auto f = [&](float* __restrict__ o, auto a, int64_t) {
        if (bp) {
          for (int64_t k = 0; k < c; ++k) o[k] = float(double(a[k]) * sc[k] + bp[k]);
        } else {
          for (int64_t k = 0; k < c; ++k) o[k] = float(double(a[k]) * sc[k]);
        }
      };
      if (nchw) write_nchw(out.data_ptr<float>(), n * hw, c, hw, rows, f);
      else write_rows(out.data_ptr<float>(), n * hw, c, hw, rows, f);
      return out;
    };
    if (acc.scalar_type() == at::kFloat) return run(make_rows<float>(acc, c, subpixel, hw2));
    TORCH_CHECK(acc.scalar_type() == at::kDouble, "epilogue: acc must be float32 or float64, got ", acc.scalar_type());
    return run(make_rows<double>(acc, c, subpixel, hw2));
  }
  const int64_t inner = ch_last ? 1 : acc.numel() / (acc.size(0) * c);
  at::Tensor out = at::empty_like(acc, acc.options().dtype(at::kFloat));
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

// epilogue_sum: the epilogue of int8 sums whose weights were shifted per channel to fit int8
// (zoo/kernels/cached.py): acc holds C + 1 channels, channels last (the last dim; dim 1 of a 4-d
// tensor, read as channels-last), the sums a[c] with the shifted weights and, last, s = the sum of the inputs
// with all-one weights; y[c] = float((double(a[c]) + d[c] * double(s)) * scale[c] + double(bias[c])).
// The bracket is the exact integer sum (integers below 2^53), so y is the epilogue's.
at::Tensor epilogue_sum(const at::Tensor& acc_in, const at::Tensor& d_in, const at::Tensor& scale_in,
                        const c10::optional<at::Tensor>& bias_in, bool nchw) {
  TORCH_CHECK(acc_in.scalar_type() == at::kFloat && acc_in.dim() >= 2, "epilogue_sum: acc must be float32, 2-d or more");
  const bool cl = acc_in.dim() == 4;  // N x (C + 1) x H x W, stored channels-last
  const at::Tensor acc = acc_in.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const int64_t ca = cl ? acc.size(1) : acc.size(-1), c = ca - 1;
  const at::Tensor scale = scale_in.contiguous().to(at::kDouble), d = d_in.contiguous().to(at::kDouble);
  TORCH_CHECK(scale.numel() == c && d.numel() == c, "epilogue_sum: ", scale.numel(), " scales and ", d.numel(),
              " shifts for ", c, " channels");
  at::Tensor bias;
  const double* bp = bias_ptr(bias_in, c, "epilogue_sum", bias);
  const bool t = cl && nchw;  // write N x C x H x W planes
  const int64_t hw = cl ? acc.size(2) * acc.size(3) : 1;
  at::Tensor out = rows_out(acc, cl, c, nchw);
  const double *sc = scale.data_ptr<double>(), *dp = d.data_ptr<double>();
  const Rows<float> rows{acc.data_ptr<float>(), ca};
  auto value = [&](float* __restrict__ o, const float* __restrict__ a, int64_t) {
    const double s = a[c];
    if (bp) {
      for (int64_t k = 0; k < c; ++k) o[k] = float((double(a[k]) + dp[k] * s) * sc[k] + bp[k]);
    } else {
      for (int64_t k = 0; k < c; ++k) o[k] = float((double(a[k]) + dp[k] * s) * sc[k]);
    }
  };
  if (t) write_nchw(out.data_ptr<float>(), acc.numel() / ca, c, hw, rows, value);
  else write_rows(out.data_ptr<float>(), acc.numel() / ca, c, hw, rows, value);
  return out;
}

// epilogue_split: the epilogue of int8 sums whose weights were split as W' = m H + L (float64-sum
// layers, zoo/kernels/cached.py): acc holds 2 C channels, channels last (the last dim, or dim 1 of a
// 4-d tensor, read as channels-last), the sums with H and then those with L;
// y[c] = float((double(a[c]) * m + double(a[C + c])) * scale[c] + double(bias[c])), the bracket being the
// exact integer sum (below 2^53): the epilogue of the float64 sums.
at::Tensor epilogue_split(const at::Tensor& acc_in, int64_t m, const at::Tensor& scale_in,
                          const c10::optional<at::Tensor>& bias_in, bool nchw) {
  TORCH_CHECK(acc_in.scalar_type() == at::kFloat && acc_in.dim() >= 2, "epilogue_split: acc must be float32, 2-d or more");
  const bool cl = acc_in.dim() == 4;
  const at::Tensor acc = acc_in.contiguous(cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous);
  const int64_t ca = cl ? acc.size(1) : acc.size(-1), c = ca / 2;
  const at::Tensor scale = scale_in.contiguous().to(at::kDouble);
  TORCH_CHECK(ca == 2 * c && scale.numel() == c, "epilogue_split: ", scale.numel(), " scales for ", ca, " sums");
  at::Tensor bias;
  const double* bp = bias_ptr(bias_in, c, "epilogue_split", bias);
  const int64_t hw = cl ? acc.size(2) * acc.size(3) : 1;
  at::Tensor out = rows_out(acc, cl, c, nchw);
  const double* sc = scale.data_ptr<double>();
  const double md = double(m);
  const Rows<float> rows{acc.data_ptr<float>(), ca};
  auto value = [&](float* __restrict__ o, const float* __restrict__ a, int64_t) {
    if (bp) {
      for (int64_t k = 0; k < c; ++k) o[k] = float((double(a[k]) * md + double(a[c + k])) * sc[k] + bp[k]);
    } else {
      for (int64_t k = 0; k < c; ++k) o[k] = float((double(a[k]) * md + double(a[c + k])) * sc[k]);
    }
  };
  if (cl && nchw) write_nchw(out.data_ptr<float>(), acc.numel() / ca, c, hw, rows, value);
  else write_rows(out.data_ptr<float>(), acc.numel() / ca, c, hw, rows, value);
  return out;
}

// expanded_epilogue: the expanded form's epilogue (muL2Q's real zero points, zoo.kernels.cached._expanded)
// for int8 convolution sums: acc is N x (C + 1) x H x W stored channels-last, sum v q per channel and,
// last, sum v (or, with subpixel, a sub-pixel convolution's sums: Rows); c_q (1 x C x H x W) and c_1 (H x W)
// the border terms of the output's H x W, used when z_a != 0;
//   y = float(((a - z_w[c] s) - z_a (c_q - z_w[c] c_1)) * scale[c] + bias[c])
// in float64 in _expanded's order (its round() calls are no-ops on these exact integer sums); the
// result is contiguous (nchw) or channels-last.
at::Tensor expanded_epilogue(const at::Tensor& acc_in, const c10::optional<at::Tensor>& cq_in,
                             const c10::optional<at::Tensor>& c1_in, const at::Tensor& zw_in, double za,
                             const at::Tensor& scale_in, const c10::optional<at::Tensor>& bias_in, bool nchw,
                             at::OptionalIntArrayRef subpixel) {
  TORCH_CHECK(acc_in.scalar_type() == at::kFloat && acc_in.dim() == 4, "expanded_epilogue: acc must be 4-d float32");
  const at::Tensor acc = acc_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t ca = subpixel.has_value() ? acc.size(1) / ((*subpixel)[0] * (*subpixel)[1]) : acc.size(1), c = ca - 1;
  std::vector<int64_t> hw2;
  const Rows<float> rows = make_rows<float>(acc, ca, subpixel, hw2);
  const int64_t hw = hw2[0] * hw2[1];
  const at::Tensor zw = zw_in.contiguous().to(at::kDouble), scale = scale_in.contiguous().to(at::kDouble);
  TORCH_CHECK(zw.numel() == c && scale.numel() == c, "expanded_epilogue: ", zw.numel(), " zero points and ",
              scale.numel(), " scales for ", c, " channels");
  const bool borders = za != 0.0;
  at::Tensor c1, bias;
  const float* c1p = nullptr;
  if (borders) {
    TORCH_CHECK(cq_in.has_value() && c1_in.has_value(), "expanded_epilogue: z_a != 0 needs c_q and c_1");
    TORCH_CHECK(cq_in->dim() == 4 && cq_in->size(0) == 1 && cq_in->size(1) == c && cq_in->numel() == c * hw &&
                c1_in->numel() == hw, "expanded_epilogue: border terms of the wrong size");
    c1 = c1_in->contiguous().to(at::kFloat);
    c1p = c1.data_ptr<float>();
  }
  const double* bp = bias_ptr(bias_in, c, "expanded_epilogue", bias);
  std::vector<int64_t> shape{acc.size(0), c, hw2[0], hw2[1]};
  at::Tensor out = nchw ? at::empty(shape, acc.options())
                        : at::empty(shape, acc.options().memory_format(at::MemoryFormat::ChannelsLast));
  const double *zp = zw.data_ptr<double>(), *sc = scale.data_ptr<double>();
  // c_q read channels-last (hw x C): contiguous over the channels, as the sums are (cached.py keeps its
  // c_q channels-last; any other layout is transposed here)
  const at::Tensor cqt = borders ? cq_in->to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
  const float* cqtp = borders ? cqt.data_ptr<float>() : nullptr;
  auto value = [&](float* __restrict__ o, const float* __restrict__ a, int64_t p) {
    const double s = std::nearbyint(double(a[c]));
    if (borders) {
      const float* __restrict__ q = cqtp + p * c;
      const double one = std::nearbyint(double(c1p[p]));
      for (int64_t k = 0; k < c; ++k) {
        const double t = (std::nearbyint(double(a[k])) - zp[k] * s) - za * (std::nearbyint(double(q[k])) - zp[k] * one);
        o[k] = float(bp ? t * sc[k] + bp[k] : t * sc[k]);
      }
    } else {
      for (int64_t k = 0; k < c; ++k) {
        const double t = std::nearbyint(double(a[k])) - zp[k] * s;
        o[k] = float(bp ? t * sc[k] + bp[k] : t * sc[k]);
      }
    }
  };
  if (nchw) write_nchw(out.data_ptr<float>(), acc.size(0) * hw, c, hw, rows, value);
  else write_rows(out.data_ptr<float>(), acc.size(0) * hw, c, hw, rows, value);
  return out;
}

// logact_levels: the log2 / log-sqrt2 softmax quantizer's inference value (zoo/quantizers/logq.py,
// LogAct.forward without gradients) from l2 = torch.log2(x / s), computed by torch as the quantizer does:
//   q = clamp(x > 0 ? round(-k * l2) : top, 0, top),   y = table[q] + (x - x)
// in float32 (round half to even); table[q] is LogAct.levels of code q (torch's own values, scale and
// the zero top code included), so this pass replaces the ~20 torch passes after the log2.
at::Tensor logact_levels(const at::Tensor& x_in, const at::Tensor& l2_in, double k, const at::Tensor& table_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && l2_in.scalar_type() == at::kFloat && x_in.sizes() == l2_in.sizes(),
              "logact_levels: x and l2 must be float32 tensors of one shape");
  const at::Tensor x = x_in.contiguous(), l2 = l2_in.contiguous(), table = table_in.contiguous().to(at::kFloat);
  const int64_t top = table.numel() - 1;
  TORCH_CHECK(top >= 1, "logact_levels: the table needs a value per code");
  at::Tensor out = at::empty(x.sizes(), x.options());
  const float *xp = x.data_ptr<float>(), *lp = l2.data_ptr<float>(), *tp = table.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float nk = float(-k), topf = float(top);
  at::parallel_for(0, x.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float r = std::nearbyint(nk * lp[i]);
      r = xp[i] > 0.0f ? r : topf;
      r = r < 0.0f ? 0.0f : r;  // torch.clamp's order (NaN stays NaN)
      r = r > topf ? topf : r;
      op[i] = r == r ? tp[int64_t(r)] + (xp[i] - xp[i]) : r;  // (a NaN scale: NaN, as torch's levels give)
    }
  });
  return out;
}

// rprelu: ReActNet's RPReLU (zoo/quantizers/binary.py) at inference, per channel c
//   y = x - gamma[c],   out = (y >= 0 ? y : slope[c] * y) + zeta[c]
// the float32 operations of RPReLU.forward in the same order (torch.where's select, NaN -> slope * NaN),
// one pass where torch takes five (sub, ge, mul, where, add). x: N x C x ... contiguous, or 4-d
// channels-last (read in place; the output keeps x's layout).
at::Tensor rprelu(const at::Tensor& x_in, const at::Tensor& gamma_in, const at::Tensor& slope_in,
                  const at::Tensor& zeta_in) {
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.dim() >= 2, "rprelu: x must be float32 with a channel dim");
  const int64_t c = x_in.size(1);
  const bool cl = x_in.dim() == 4 && !x_in.is_contiguous() && x_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor x = cl ? x_in : x_in.contiguous();
  const at::Tensor g = gamma_in.contiguous().to(at::kFloat), s = slope_in.contiguous().to(at::kFloat),
                   z = zeta_in.contiguous().to(at::kFloat);
  TORCH_CHECK(g.numel() == c && s.numel() == c && z.numel() == c, "rprelu: one gamma, slope and zeta per channel");
  at::Tensor out = at::empty_like(x);  // preserves the layout
  const float *xp = x.data_ptr<float>(), *gp = g.data_ptr<float>(), *sp = s.data_ptr<float>(),
              *zp = z.data_ptr<float>();
  float* op = out.data_ptr<float>();
  if (!x.numel()) return out;
  if (cl) {  // rows of C channels
    const int64_t rows = x.numel() / c;
    at::parallel_for(0, rows, std::max<int64_t>(1, 4096 / c), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float* __restrict__ src = xp + r * c;
        float* __restrict__ dst = op + r * c;
        for (int64_t k = 0; k < c; ++k) {
          const float y = src[k] - gp[k];
          dst[k] = (y >= 0.0f ? y : sp[k] * y) + zp[k];
        }
      }
    });
    return out;
  }
  const int64_t inner = x.numel() / (x.size(0) * c), planes = x.size(0) * c;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(inner, 1));
  at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const int64_t k = p % c;
      const float gk = gp[k], sk = sp[k], zk = zp[k];
      const float* __restrict__ src = xp + p * inner;
      float* __restrict__ dst = op + p * inner;
      for (int64_t i = 0; i < inner; ++i) {
        const float y = src[i] - gk;
        dst[i] = (y >= 0.0f ? y : sk * y) + zk;
      }
    }
  });
  return out;
}

// dyadic_exponent: for a float32 first operand a whose rows (last dim) multiply integer-valued values of
// magnitude <= umax (zoo/quantizers/attention.py, _certified_float32_product): e = the largest integer
// with umax * R * 2^e < 2^24, R = the largest row sum of |a| (float64, times 1 + 1e-9 for its rounding),
// if 0 <= e <= 100 and every a * 2^e is integer-valued -- then every partial sum of a row's product is
// a multiple of 2^-e below 2^24 of them, exact in float32 in any order; else -1 (also for NaN / inf).
int64_t dyadic_exponent(const at::Tensor& a_in, double umax) {
  TORCH_CHECK(a_in.scalar_type() == at::kFloat && a_in.dim() >= 1, "dyadic_exponent: a must be float32");
  const at::Tensor a = a_in.contiguous();
  const int64_t len = a.size(-1), n = len ? a.numel() / len : 0;
  if (!n) return -1;
  const float* ap = a.data_ptr<float>();
  const double rows = at::parallel_reduce(0, n, 64, 0.0, [&](int64_t begin, int64_t end, double best) {
    for (int64_t r = begin; r < end; ++r) {
      const float* __restrict__ row = ap + r * len;
      double t = 0.0;
      for (int64_t i = 0; i < len; ++i) t += std::fabs(double(row[i]));
      best = t > best || t != t ? t : best;  // (NaN wins: the bound below is then not finite)
    }
    return best;
  }, [](double x, double y) { return x > y || x != x ? x : y; });
  const double bound = rows * (1 + 1e-9) * umax;
  if (!(bound > 0.0 && bound < INFINITY)) return -1;
  int64_t e = int64_t(std::ceil(std::log2(16777216.0 / bound))) - 1;
  while (e > -200 && std::ldexp(bound, int(e)) >= 16777216.0) --e;  // (log2's rounding: make sure)
  if (e < 0 || e > 100) return -1;
  const double f = std::ldexp(1.0, int(e));
  const int64_t total = a.numel();
  const bool dyadic = at::parallel_reduce(0, total, 16384, true, [&](int64_t begin, int64_t end, bool ok) {
    if (!ok) return false;
    bool all = true;
    for (int64_t i = begin; i < end; ++i) {
      const double t = double(ap[i]) * f;
      all &= t == std::nearbyint(t);
    }
    return all;
  }, [](bool x, bool y) { return x && y; });
  return dyadic ? e : -1;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(zoo_cpu, m) {
  m.def("affine_input(Tensor x, Tensor? shift, float scale, float offset, float qmin, float qmax, float z, float m, "
        "bool ch_last, bool u8=False, bool cl_out=False) -> Tensor");
  m.def("threshold_input(Tensor x, Tensor? shift, Tensor thresholds, float z, float m, bool ch_last, bool u8=False, "
        "bool cl_out=False) -> Tensor");
  m.def("epilogue(Tensor acc, Tensor scale, Tensor? bias, bool ch_last, bool nchw=False, int[]? subpixel=None) "
        "-> Tensor");
  m.def("epilogue_sum(Tensor acc, Tensor d, Tensor scale, Tensor? bias, bool nchw=False) -> Tensor");
  m.def("logact_levels(Tensor x, Tensor l2, float k, Tensor table) -> Tensor");
  m.def("rprelu(Tensor x, Tensor gamma, Tensor slope, Tensor zeta) -> Tensor");
  m.def("dyadic_exponent(Tensor a, float umax) -> int");
  m.def("epilogue_split(Tensor acc, int m, Tensor scale, Tensor? bias, bool nchw=False) -> Tensor");
  m.def("expanded_epilogue(Tensor acc, Tensor? c_q, Tensor? c_1, Tensor z_w, float z_a, Tensor scale, Tensor? bias, "
        "bool nchw, int[]? subpixel=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) {
  m.impl("affine_input", affine_input);
  m.impl("threshold_input", threshold_input);
  m.impl("epilogue", epilogue);
  m.impl("epilogue_sum", epilogue_sum);
  m.impl("epilogue_split", epilogue_split);
  m.impl("logact_levels", logact_levels);
  m.impl("rprelu", rprelu);
  m.impl("dyadic_exponent", dyadic_exponent);
  m.impl("expanded_epilogue", expanded_epilogue);
}
