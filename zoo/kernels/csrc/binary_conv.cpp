// W1A1 convolution on the CPU: signs packed 64 per word, XOR + popcount, the reference's epilogue.
//
// Built on first use against the installed torch by zoo/kernels/cpu_ops.py (torch's cpp_extension,
// -O3 -march=native so AVX-512 VPOPCNTDQ is used where the CPU has it; -ffp-contract=off so the
// epilogue rounds exactly as torch's separate float64 multiply and add do).
//
// Codes: an activation is +1 where x - shift >= 0 (the training form's sign(0) = +1), else -1; a
// weight is +1 where its 1-bit code q is 1, else -1. Bit 1 stands for +1, so for the C real channels
// of one input pixel and one kernel tap
//     sum_c u_c * w_c = C - 2 * popcount(xbits ^ wbits)
// (bits past C are 0 in both words and never count). The training form zero-pads the activations, so
// a tap outside the input contributes 0: it is skipped, and only the valid taps' C count. The integer
// sum acc is exact (int64); the epilogue is y = float(double(acc) * scale[co] + bias[co]), the same
// float64 operations, in the same order, as zoo.kernels.cached._epilogue.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

namespace {

inline int64_t words_for(int64_t c) { return (c + 63) / 64; }

// x: N x C x H x W float32 (contiguous), shift: C float32 or empty -> N x H x W x ceil(C/64) int64 words
at::Tensor pack_signs(const at::Tensor& x_in, const c10::optional<at::Tensor>& shift_in) {
  TORCH_CHECK(x_in.dim() == 4 && x_in.scalar_type() == at::kFloat, "pack_signs: x must be N x C x H x W float32");
  const at::Tensor x = x_in.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3), wc = words_for(c);
  at::Tensor shift;
  const float* sp = nullptr;
  if (shift_in.has_value() && shift_in->defined()) {
    shift = shift_in->contiguous().to(at::kFloat);
    TORCH_CHECK(shift.numel() == c, "pack_signs: shift has ", shift.numel(), " values for ", c, " channels");
    sp = shift.data_ptr<float>();
  }
  at::Tensor out = at::empty({n, h, w, wc}, x.options().dtype(at::kLong));
  const float* xp = x.data_ptr<float>();
  uint64_t* op = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  at::parallel_for(0, n * h, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nh = begin; nh < end; ++nh) {
      const int64_t b = nh / h, y = nh % h;
      uint64_t* row = op + nh * w * wc;
      for (int64_t k = 0; k < wc; ++k) {
        const int64_t c_end = c < 64 * (k + 1) ? c : 64 * (k + 1);
        int64_t i0 = 0;
        for (; i0 + 8 <= w; i0 += 8) {  // 8 pixels at a time, their words kept in registers over the channels
          uint64_t acc[8] = {};
          for (int64_t ch = 64 * k; ch < c_end; ++ch) {
            const float* src = xp + ((b * c + ch) * h + y) * w + i0;
            const float s = sp ? sp[ch] : 0.0f;
            const int sh = int(ch % 64);
            // float32 subtraction, as x - shift in torch; branch-free (random signs mispredict)
            for (int p = 0; p < 8; ++p) acc[p] |= uint64_t((sp ? src[p] - s : src[p]) >= 0.0f) << sh;
          }
          for (int p = 0; p < 8; ++p) row[(i0 + p) * wc + k] = acc[p];
        }
        for (int64_t i = i0; i < w; ++i) {
          uint64_t word = 0;
          for (int64_t ch = 64 * k; ch < c_end; ++ch) {
            const float v = xp[((b * c + ch) * h + y) * w + i];
            word |= uint64_t((sp ? v - sp[ch] : v) >= 0.0f) << (ch % 64);
          }
          row[i * wc + k] = word;
        }
      }
    }
  });
  return out;
}

constexpr int64_t BLOCK = 32;  // output channels padded to a multiple of this (the widest register block)

// q: C_out x C_in x kh x kw 1-bit codes (uint8 0/1) -> kh x kw x ceil(C_in/64) x roundup(C_out, 32) int64
// words (the padding columns are 0 and never read back)
at::Tensor pack_weight_signs(const at::Tensor& q_in) {
  TORCH_CHECK(q_in.dim() == 4 && q_in.scalar_type() == at::kByte, "pack_weight_signs: q must be 4-d uint8 codes");
  const at::Tensor q = q_in.contiguous();
  const int64_t c_out = q.size(0), ci = q.size(1), kh = q.size(2), kw = q.size(3), wc = words_for(ci);
  const int64_t co = (c_out + BLOCK - 1) / BLOCK * BLOCK;
  at::Tensor out = at::zeros({kh, kw, wc, co}, q.options().dtype(at::kLong));
  const uint8_t* qp = q.data_ptr<uint8_t>();
  uint64_t* op = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  for (int64_t o = 0; o < c_out; ++o)
    for (int64_t c = 0; c < ci; ++c)
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j) {
          const uint8_t v = qp[((o * ci + c) * kh + i) * kw + j];
          TORCH_CHECK(v <= 1, "pack_weight_signs: code ", int(v), " is not a 1-bit code");
          if (v) op[((i * kw + j) * wc + c / 64) * co + o] |= uint64_t(1) << (c % 64);
        }
  return out;
}

// B popcount accumulators for B consecutive output channels, kept in vector registers over all taps
// and words of one output pixel: AVX-512 VPOPCNTDQ where the compiler targets it (-march=native on a
// CPU that has it), a plain loop (the compiler's popcount) elsewhere.
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__)
#include <immintrin.h>
template <int B>
struct Acc {
  __m512i v[B / 8];
  Acc() { for (int r = 0; r < B / 8; ++r) v[r] = _mm512_setzero_si512(); }
  inline void add(uint64_t a, const uint64_t* wk) {
    const __m512i x = _mm512_set1_epi64(static_cast<long long>(a));
    for (int r = 0; r < B / 8; ++r)
      v[r] = _mm512_add_epi64(v[r], _mm512_popcnt_epi64(_mm512_xor_si512(x, _mm512_loadu_si512(wk + 8 * r))));
  }
  inline void add_masked(uint64_t a, uint64_t m, const uint64_t* wk) {
    const __m512i x = _mm512_set1_epi64(static_cast<long long>(a));
    const __m512i mm = _mm512_set1_epi64(static_cast<long long>(m));
    for (int r = 0; r < B / 8; ++r)
      v[r] = _mm512_add_epi64(
          v[r], _mm512_popcnt_epi64(_mm512_and_si512(_mm512_xor_si512(x, _mm512_loadu_si512(wk + 8 * r)), mm)));
  }
  inline void store(int64_t* out) const {
    for (int r = 0; r < B / 8; ++r) _mm512_storeu_si512(out + 8 * r, v[r]);
  }
};
#else
template <int B>
struct Acc {
  int64_t v[B] = {};
  inline void add(uint64_t a, const uint64_t* wk) {
    for (int r = 0; r < B; ++r) v[r] += __builtin_popcountll(a ^ wk[r]);
  }
  inline void add_masked(uint64_t a, uint64_t m, const uint64_t* wk) {
    for (int r = 0; r < B; ++r) v[r] += __builtin_popcountll((a ^ wk[r]) & m);
  }
  inline void store(int64_t* out) const {
    for (int r = 0; r < B; ++r) out[r] = v[r];
  }
};
#endif

// Popcounts of one output row for the output channels o0 .. o0+B-1 (B a multiple of 8).
template <int B>
void row_counts(const uint64_t* xp, const uint64_t* wp, int64_t b, int64_t oy, int64_t h, int64_t w, int64_t wc,
                int64_t kh, int64_t kw, int64_t co_pad, int64_t ow, int64_t stride_h, int64_t stride_w,
                int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int64_t o0, int64_t co, int64_t* cnt) {
  int64_t tmp[B];
  for (int64_t ox = 0; ox < ow; ++ox) {
    Acc<B> acc;
    for (int64_t i = 0; i < kh; ++i) {
      const int64_t iy = oy * stride_h - pad_h + i * dil_h;
      if (iy < 0 || iy >= h) continue;
      for (int64_t j = 0; j < kw; ++j) {
        const int64_t ix = ox * stride_w - pad_w + j * dil_w;
        if (ix < 0 || ix >= w) continue;
        const uint64_t* xv = xp + ((b * h + iy) * w + ix) * wc;
        const uint64_t* wv = wp + (i * kw + j) * wc * co_pad + o0;
        for (int64_t k = 0; k < wc; ++k) acc.add(xv[k], wv + k * co_pad);
      }
    }
    acc.store(tmp);
    const int64_t nb = co - o0 < B ? co - o0 : B;
    for (int64_t r = 0; r < nb; ++r) cnt[(o0 + r) * ow + ox] = tmp[r];  // [C_out][OW]: rows for the epilogue
  }
}

// Few input channels (C <= 32, one word per pixel): T = 64 / C horizontally adjacent kernel taps share one
// word ("tap groups"), so a 3x3 kernel over 16 channels costs 3 popcounts per output channel, not 9.
// xrow: [kh][ow][G] the input words of each tap group (taps outside the image are 0 bits), mrow: [ow][G]
// which of their bits are real taps, rowok: [kh] kernel rows inside the image, wg: [kh][G][co_pad].
template <int B>
void row_counts_grouped(const uint64_t* xrow, const uint64_t* mrow, const uint8_t* rowok, const uint64_t* wg,
                        int64_t kh, int64_t groups, int64_t ow, int64_t co_pad, int64_t o0, int64_t co, int64_t* cnt) {
  int64_t tmp[B];
  for (int64_t ox = 0; ox < ow; ++ox) {
    Acc<B> acc;
    for (int64_t i = 0; i < kh; ++i) {
      if (!rowok[i]) continue;
      for (int64_t g = 0; g < groups; ++g)
        acc.add_masked(xrow[(i * ow + ox) * groups + g], mrow[ox * groups + g], wg + (i * groups + g) * co_pad + o0);
    }
    acc.store(tmp);
    const int64_t nb = co - o0 < B ? co - o0 : B;
    for (int64_t r = 0; r < nb; ++r) cnt[(o0 + r) * ow + ox] = tmp[r];  // [C_out][OW]: rows for the epilogue
  }
}

template <typename F>
void for_blocks(int64_t co, F&& f) {  // output-channel blocks of 32, then 16 or 8 for the rest
  for (int64_t o0 = 0; o0 < co;) {
    const int64_t left = co - o0;
    const int64_t bsz = left > 16 ? 32 : left > 8 ? 16 : 8;
    f(o0, bsz);
    o0 += bsz;
  }
}

// xbits: N x H x W x WC, wbits: kh x kw x WC x roundup(C_out, 32), C_out = scale.numel()
//   -> y: N x C_out x OH x OW float32
at::Tensor binary_conv2d(const at::Tensor& xbits, const at::Tensor& wbits, int64_t c_in, int64_t stride_h,
                         int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                         const at::Tensor& scale_in, const c10::optional<at::Tensor>& bias_in) {
  TORCH_CHECK(xbits.dim() == 4 && wbits.dim() == 4 && xbits.size(3) == wbits.size(2),
              "binary_conv2d: packed activations and weights disagree on the words per pixel");
  TORCH_CHECK(words_for(c_in) == xbits.size(3), "binary_conv2d: ", c_in, " channels need ", words_for(c_in),
              " words, got ", xbits.size(3));
  const int64_t n = xbits.size(0), h = xbits.size(1), w = xbits.size(2), wc = xbits.size(3);
  const int64_t kh = wbits.size(0), kw = wbits.size(1), co_pad = wbits.size(3);
  const int64_t oh = (h + 2 * pad_h - dil_h * (kh - 1) - 1) / stride_h + 1;
  const int64_t ow = (w + 2 * pad_w - dil_w * (kw - 1) - 1) / stride_w + 1;
  TORCH_CHECK(oh > 0 && ow > 0, "binary_conv2d: empty output for input ", h, "x", w);
  const at::Tensor scale = scale_in.contiguous().to(at::kDouble);
  const int64_t co = scale.numel();
  TORCH_CHECK(co_pad % BLOCK == 0 && co <= co_pad && co > co_pad - BLOCK, "binary_conv2d: ", co,
              " scales for packed weights of ", co_pad, " output channels (padded to a multiple of ", BLOCK, ")");
  at::Tensor bias;
  const double* bp = nullptr;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous().to(at::kDouble);  // float32 -> float64 exactly, as bias.double()
    TORCH_CHECK(bias.numel() == co, "binary_conv2d: ", bias.numel(), " biases for ", co, " output channels");
    bp = bias.data_ptr<double>();
  }
  at::Tensor y = at::empty({n, co, oh, ow}, xbits.options().dtype(at::kFloat));
  const at::Tensor xc = xbits.contiguous(), wcont = wbits.contiguous();
  const uint64_t* xp = reinterpret_cast<const uint64_t*>(xc.data_ptr<int64_t>());
  const uint64_t* wp = reinterpret_cast<const uint64_t*>(wcont.data_ptr<int64_t>());
  const double* sc = scale.data_ptr<double>();
  float* yp = y.data_ptr<float>();
  // tap groups for few input channels (see row_counts_grouped)
  const int64_t tpw = wc == 1 ? 64 / c_in : 1;  // taps per word
  const bool grouped = tpw >= 2 && kw >= 2;
  const int64_t ng = grouped ? (kw + tpw - 1) / tpw : 0;
  std::vector<uint64_t> wg, mg;
  if (grouped) {
    wg.assign(kh * ng * co_pad, 0);
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j)
        for (int64_t o = 0; o < co_pad; ++o)
          wg[(i * ng + j / tpw) * co_pad + o] |= wp[(i * kw + j) * co_pad + o] << ((j % tpw) * c_in);
    const uint64_t ones = (uint64_t(1) << c_in) - 1;  // c_in <= 32 here
    mg.assign(ow * ng, 0);
    for (int64_t ox = 0; ox < ow; ++ox)
      for (int64_t j = 0; j < kw; ++j) {
        const int64_t ix = ox * stride_w - pad_w + j * dil_w;
        if (ix >= 0 && ix < w) mg[ox * ng + j / tpw] |= ones << ((j % tpw) * c_in);
      }
  }
  std::vector<int64_t> colsok(ow, 0);  // kernel columns inside the image, per output column
  for (int64_t ox = 0; ox < ow; ++ox)
    for (int64_t j = 0; j < kw; ++j) {
      const int64_t ix = ox * stride_w - pad_w + j * dil_w;
      colsok[ox] += ix >= 0 && ix < w;
    }
  // the input columns a row of taps reaches: -pad_w .. span - 1 - pad_w (a zero-padded copy of each row)
  const int64_t span = (ow - 1) * stride_w + (kw - 1) * dil_w + 1;
  at::parallel_for(0, n * oh, 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> cnt(ow * co);  // one output row: popcounts per (output channel, column)
    std::vector<int64_t> valid(ow);
    std::vector<uint64_t> xrow(grouped ? kh * ow * ng : 0), padded(grouped ? span : 0);
    std::vector<uint8_t> rowok(kh);
    for (int64_t no = begin; no < end; ++no) {
      const int64_t b = no / oh, oy = no % oh;
      int64_t rows = 0;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t iy = oy * stride_h - pad_h + i * dil_h;
        rowok[i] = iy >= 0 && iy < h;
        rows += rowok[i];
      }
      for (int64_t ox = 0; ox < ow; ++ox) valid[ox] = c_in * rows * colsok[ox];  // real channels x taps inside
      if (grouped) {
        for (int64_t i = 0; i < kh; ++i) {
          if (!rowok[i]) continue;
          const uint64_t* src = xp + (b * h + oy * stride_h - pad_h + i * dil_h) * w;
          for (int64_t k = 0; k < span; ++k) {
            const int64_t ix = k - pad_w;
            padded[k] = ix >= 0 && ix < w ? src[ix] : 0;
          }
          uint64_t* dst = xrow.data() + i * ow * ng;
          for (int64_t ox = 0; ox < ow; ++ox)
            for (int64_t g = 0; g < ng; ++g) {
              const uint64_t* at = padded.data() + ox * stride_w + g * tpw * dil_w;
              const int64_t taps = kw - g * tpw < tpw ? kw - g * tpw : tpw;
              uint64_t word = 0;
              for (int64_t t = 0; t < taps; ++t) word |= at[t * dil_w] << (t * c_in);
              dst[ox * ng + g] = word;
            }
        }
        for_blocks(co, [&](int64_t o0, int64_t bsz) {
          if (bsz == 32) row_counts_grouped<32>(xrow.data(), mg.data(), rowok.data(), wg.data(), kh, ng, ow, co_pad, o0, co, cnt.data());
          else if (bsz == 16) row_counts_grouped<16>(xrow.data(), mg.data(), rowok.data(), wg.data(), kh, ng, ow, co_pad, o0, co, cnt.data());
          else row_counts_grouped<8>(xrow.data(), mg.data(), rowok.data(), wg.data(), kh, ng, ow, co_pad, o0, co, cnt.data());
        });
      } else {
        for_blocks(co, [&](int64_t o0, int64_t bsz) {
          if (bsz == 32)
            row_counts<32>(xp, wp, b, oy, h, w, wc, kh, kw, co_pad, ow, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                           o0, co, cnt.data());
          else if (bsz == 16)
            row_counts<16>(xp, wp, b, oy, h, w, wc, kh, kw, co_pad, ow, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                           o0, co, cnt.data());
          else
            row_counts<8>(xp, wp, b, oy, h, w, wc, kh, kw, co_pad, ow, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                          o0, co, cnt.data());
        });
      }
      // the epilogue, one contiguous output row per channel (vectorised: int64 -> double, multiply, add,
      // round to float, in the order of the reference's float64 operations)
      for (int64_t o = 0; o < co; ++o) {
        float* out = yp + ((b * co + o) * oh + oy) * ow;
        const int64_t* c = cnt.data() + o * ow;
        const double s = sc[o];
        if (bp) {
          const double bo = bp[o];
          for (int64_t ox = 0; ox < ow; ++ox) out[ox] = float(double(valid[ox] - 2 * c[ox]) * s + bo);
        } else {
          for (int64_t ox = 0; ox < ow; ++ox) out[ox] = float(double(valid[ox] - 2 * c[ox]) * s);
        }
      }
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(zoo_cpu, m) {
  m.def("pack_signs(Tensor x, Tensor? shift) -> Tensor");
  m.def("pack_weight_signs(Tensor q) -> Tensor");
  m.def("binary_conv2d(Tensor xbits, Tensor wbits, int c_in, int stride_h, int stride_w, int pad_h, int pad_w, "
        "int dil_h, int dil_w, Tensor scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) {
  m.impl("pack_signs", pack_signs);
  m.impl("pack_weight_signs", pack_weight_signs);
  m.impl("binary_conv2d", binary_conv2d);
}
