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

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
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
#if defined(__AVX512F__) && defined(__AVX512VL__)
        for (; i0 < w; i0 += 16) {  // 16 pixels at a time (the row's last ones masked): one compare mask
          // per channel ORs the channel's bit into their words (two vectors of 8)
          const int64_t np = w - i0 < 16 ? w - i0 : 16;
          const __mmask16 lanes = __mmask16((1u << np) - 1);
          __m512i lo8 = _mm512_setzero_si512(), hi8 = lo8, bit = _mm512_set1_epi64(1);
          const float* src = xp + ((b * c + 64 * k) * h + y) * w + i0;
          for (int64_t ch = 64 * k; ch < c_end; ++ch, src += h * w) {
            __m512 v = _mm512_maskz_loadu_ps(lanes, src);
            if (sp) v = _mm512_sub_ps(v, _mm512_set1_ps(sp[ch]));  // float32 x - shift, as torch
            const __mmask16 ge = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GE_OQ);  // NaN: false
            lo8 = _mm512_mask_or_epi64(lo8, __mmask8(ge), lo8, bit);
            hi8 = _mm512_mask_or_epi64(hi8, __mmask8(ge >> 8), hi8, bit);
            bit = _mm512_add_epi64(bit, bit);
          }
          if (wc == 1) {
            _mm512_mask_storeu_epi64(row + i0, __mmask8(lanes), lo8);
            if (np > 8) _mm512_mask_storeu_epi64(row + i0 + 8, __mmask8(lanes >> 8), hi8);
          } else {
            alignas(64) uint64_t words[16];
            _mm512_store_si512(words, lo8);
            _mm512_store_si512(words + 8, hi8);
            for (int64_t p = 0; p < np; ++p) row[(i0 + p) * wc + k] = words[p];
          }
        }
#endif
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

// The popcounts of every output row of a W1A1 convolution, handed to `epi(b, oy, cnt, valid)` one row at a
// time inside the parallel loop: cnt[o * ow + ox] = popcount(x ^ w) over output channel o's window at
// column ox, valid[ox] = the real channels times the kernel taps inside the image there (so the window's
// integer sum is valid[ox] - 2 cnt[o * ow + ox]).
// xbits: N x H x W x WC, wbits: kh x kw x WC x roundup(C_out, 32).
struct Geometry {
  int64_t n, h, w, wc, kh, kw, co_pad, co, oh, ow, c_in, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
};

Geometry geometry(const at::Tensor& xbits, const at::Tensor& wbits, int64_t c_in, int64_t co, int64_t stride_h,
                  int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, const char* name) {
  TORCH_CHECK(xbits.dim() == 4 && wbits.dim() == 4 && xbits.size(3) == wbits.size(2), name,
              ": packed activations and weights disagree on the words per pixel");
  TORCH_CHECK(words_for(c_in) == xbits.size(3), name, ": ", c_in, " channels need ", words_for(c_in), " words, got ",
              xbits.size(3));
  Geometry g{xbits.size(0), xbits.size(1), xbits.size(2), xbits.size(3), wbits.size(0), wbits.size(1),
             wbits.size(3), co, 0, 0, c_in, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w};
  g.oh = (g.h + 2 * pad_h - dil_h * (g.kh - 1) - 1) / stride_h + 1;
  g.ow = (g.w + 2 * pad_w - dil_w * (g.kw - 1) - 1) / stride_w + 1;
  TORCH_CHECK(g.oh > 0 && g.ow > 0, name, ": empty output for input ", g.h, "x", g.w);
  TORCH_CHECK(g.co_pad % BLOCK == 0 && co <= g.co_pad && co > g.co_pad - BLOCK, name, ": ", co,
              " output channels for packed weights of ", g.co_pad, " (padded to a multiple of ", BLOCK, ")");
  return g;
}

// The weight words of tap groups: kh x ceil(kw / tpw) x co_pad, tap j of a group shifted by (j % tpw) * c_in.
std::vector<uint64_t> group_weights(const uint64_t* wp, int64_t kh, int64_t kw, int64_t ng, int64_t tpw,
                                    int64_t co_pad, int64_t c_in) {
  std::vector<uint64_t> wg(kh * ng * co_pad, 0);
  for (int64_t i = 0; i < kh; ++i)
    for (int64_t j = 0; j < kw; ++j)
      for (int64_t o = 0; o < co_pad; ++o)
        wg[(i * ng + j / tpw) * co_pad + o] |= wp[(i * kw + j) * co_pad + o] << ((j % tpw) * c_in);
  return wg;
}

template <typename Epi>
void conv_rows(const at::Tensor& xbits, const at::Tensor& wbits, const Geometry& g, Epi&& epi) {
  const int64_t h = g.h, w = g.w, wc = g.wc, kh = g.kh, kw = g.kw, co_pad = g.co_pad, co = g.co, oh = g.oh,
                ow = g.ow, c_in = g.c_in, stride_h = g.stride_h, stride_w = g.stride_w, pad_h = g.pad_h,
                pad_w = g.pad_w, dil_h = g.dil_h, dil_w = g.dil_w;
  const at::Tensor xc = xbits.contiguous(), wcont = wbits.contiguous();
  const uint64_t* xp = reinterpret_cast<const uint64_t*>(xc.data_ptr<int64_t>());
  const uint64_t* wp = reinterpret_cast<const uint64_t*>(wcont.data_ptr<int64_t>());
  // tap groups for few input channels (see row_counts_grouped)
  const int64_t tpw = wc == 1 ? 64 / c_in : 1;  // taps per word
  const bool grouped = tpw >= 2 && kw >= 2;
  const int64_t ng = grouped ? (kw + tpw - 1) / tpw : 0;
  std::vector<uint64_t> wg = grouped ? group_weights(wp, kh, kw, ng, tpw, co_pad, c_in) : std::vector<uint64_t>(), mg;
  if (grouped) {
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
  at::parallel_for(0, g.n * oh, 1, [&](int64_t begin, int64_t end) {
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
            for (int64_t gi = 0; gi < ng; ++gi) {
              const uint64_t* at = padded.data() + ox * stride_w + gi * tpw * dil_w;
              const int64_t taps = kw - gi * tpw < tpw ? kw - gi * tpw : tpw;
              uint64_t word = 0;
              for (int64_t t = 0; t < taps; ++t) word |= at[t * dil_w] << (t * c_in);
              dst[ox * ng + gi] = word;
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
      epi(b, oy, cnt.data(), valid.data());
    }
  });
}

std::tuple<at::Tensor, at::Tensor> binary_conv2d_table(
    const at::Tensor& xbits, const at::Tensor& wbits, int64_t c_in, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, const at::Tensor& table_in,
    const c10::optional<at::Tensor>& residual_in, double lo_d, double hi_d, bool pack_next,
    const c10::optional<at::Tensor>& shift_in, const c10::optional<at::Tensor>& linear_in,
    const c10::optional<at::Tensor>& rprelu_in);

// The tap words of one output row at most (binary_conv2d_table's rows): kh * ceil(kw / taps per word)
// where a pixel's signs fill at most half a word, else kh * kw * words per pixel.
int64_t row_tap_words(int64_t c_in, int64_t wc, int64_t kh, int64_t kw) {
  const int64_t tpw = wc == 1 ? 64 / c_in : 1;
  return tpw >= 2 && kw >= 2 ? kh * ((kw + tpw - 1) / tpw) : kh * kw * wc;
}

// xbits: N x H x W x WC, wbits: kh x kw x WC x roundup(C_out, 32), C_out = scale.numel()
//   -> y: N x C_out x OH x OW float32
at::Tensor binary_conv2d(const at::Tensor& xbits, const at::Tensor& wbits, int64_t c_in, int64_t stride_h,
                         int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                         const at::Tensor& scale_in, const c10::optional<at::Tensor>& bias_in) {
  const at::Tensor scale = scale_in.contiguous().to(at::kDouble);
  const int64_t co = scale.numel();
  const Geometry g = geometry(xbits, wbits, c_in, co, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, "binary_conv2d");
  at::Tensor bias;
  const double* bp = nullptr;
  if (bias_in.has_value() && bias_in->defined()) {
    bias = bias_in->contiguous().to(at::kDouble);  // float32 -> float64 exactly, as bias.double()
    TORCH_CHECK(bias.numel() == co, "binary_conv2d: ", bias.numel(), " biases for ", co, " output channels");
    bp = bias.data_ptr<double>();
  }
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
  // Few tap words a row (ResNet-20's convs): the column-vectorised kernel of binary_conv2d_table, whose
  // computed value fma(float32(float64(s) * scale + bias), 1, -0.0) is this epilogue's float32(float64(s)
  // * scale + bias) exactly (x * 1 + -0.0 == x, a zero's sign included; no bias: + -0.0 changes nothing).
  if (row_tap_words(c_in, g.wc, g.kh, g.kw) <= 9) {
    at::Tensor linear = at::empty({4, co}, scale.options());
    linear[0].copy_(scale.reshape(-1));
    if (bp) linear[1].copy_(bias.reshape(-1));
    else linear[1].fill_(-0.0);
    linear[2].fill_(1.0);
    linear[3].fill_(-0.0);
    return std::get<0>(binary_conv2d_table(xbits, wbits, c_in, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                           at::empty({co, 0}, xbits.options().dtype(at::kFloat)), c10::nullopt,
                                           -INFINITY, INFINITY, false, c10::nullopt, linear, c10::nullopt));
  }
#endif
  at::Tensor y = at::empty({g.n, co, g.oh, g.ow}, xbits.options().dtype(at::kFloat));
  const double* sc = scale.data_ptr<double>();
  float* yp = y.data_ptr<float>();
  const int64_t oh = g.oh, ow = g.ow;
  // the epilogue, one contiguous output row per channel (vectorised: int64 -> double, multiply, add,
  // round to float, in the order of the reference's float64 operations)
  conv_rows(xbits, wbits, g, [&](int64_t b, int64_t oy, const int64_t* cnt, const int64_t* valid) {
    for (int64_t o = 0; o < co; ++o) {
      float* out = yp + ((b * co + o) * oh + oy) * ow;
      const int64_t* c = cnt + o * ow;
      const double s = sc[o];
      if (bp) {
        const double bo = bp[o];
        for (int64_t ox = 0; ox < ow; ++ox) out[ox] = float(double(valid[ox] - 2 * c[ox]) * s + bo);
      } else {
        for (int64_t ox = 0; ox < ow; ++ox) out[ox] = float(double(valid[ox] - 2 * c[ox]) * s);
      }
    }
  });
  return y;
}

// The input words of one tap group at every output column of a row: xt[ox] = OR over the group's taps t
// of src[ix] << (t * c_in), ix = ox * stride + off + t * dil (off: the group's first tap's column offset,
// its first tap index times dil minus the padding), 0 for an ix outside 0 .. w - 1. The border columns
// (some tap outside) one at a time; the rest with restrict pointers and a unit-stride case, so the
// compiler vectorises it (read straight from the packed row: a zero-padded copy written word by word and
// read back as vectors stalled on store forwarding).
void group_words(uint64_t* __restrict xt, const uint64_t* __restrict src, int64_t w, int64_t ow, int64_t stride,
                 int64_t off, int64_t dil, int64_t taps, int64_t c_in) {
  int64_t lo = 0, hi = ow;  // columns lo .. hi - 1 have every tap inside the row (lo <= hi)
  while (lo < ow && lo * stride + off < 0) ++lo;
  while (hi > lo && (hi - 1) * stride + off + (taps - 1) * dil > w - 1) --hi;
  const auto border = [&](int64_t ox) {
    uint64_t word = 0;
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t ix = ox * stride + off + t * dil;
      if (ix >= 0 && ix < w) word |= src[ix] << (t * c_in);
    }
    xt[ox] = word;
  };
  for (int64_t ox = 0; ox < lo; ++ox) border(ox);
  for (int64_t ox = hi; ox < ow; ++ox) border(ox);
  if (lo == hi) return;
  const uint64_t* __restrict first = src + lo * stride + off;
  uint64_t* __restrict out = xt + lo;
  const int64_t n = hi - lo;
  if (stride == 1 && taps <= 4) {  // one pass, each word written once (ResNet-20's 16- and 32-channel convs)
    const uint64_t* __restrict a1 = first + dil;
    const uint64_t* __restrict a2 = first + 2 * dil;
    const uint64_t* __restrict a3 = first + 3 * dil;
    const uint64_t s1 = uint64_t(c_in), s2 = uint64_t(2 * c_in), s3 = uint64_t(3 * c_in);
    switch (taps) {
      case 1: for (int64_t i = 0; i < n; ++i) out[i] = first[i]; break;
      case 2: for (int64_t i = 0; i < n; ++i) out[i] = first[i] | a1[i] << s1; break;
      case 3: for (int64_t i = 0; i < n; ++i) out[i] = first[i] | a1[i] << s1 | a2[i] << s2; break;
      default: for (int64_t i = 0; i < n; ++i) out[i] = first[i] | a1[i] << s1 | a2[i] << s2 | a3[i] << s3;
    }
    return;
  }
  if (stride == 1) {
    for (int64_t i = 0; i < n; ++i) out[i] = first[i];
    for (int64_t t = 1; t < taps; ++t) {
      const uint64_t* __restrict at = first + t * dil;
      const uint64_t sh = uint64_t(t * c_in);
      for (int64_t i = 0; i < n; ++i) out[i] |= at[i] << sh;
    }
    return;
  }
  for (int64_t i = 0; i < n; ++i) out[i] = first[i * stride];
  for (int64_t t = 1; t < taps; ++t) {
    const uint64_t* __restrict at = first + t * dil;
    const uint64_t sh = uint64_t(t * c_in);
    for (int64_t i = 0; i < n; ++i) out[i] |= at[i * stride] << sh;
  }
}

#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
// The popcounts of 8 output columns for one output channel o: sum over the row's tap words t of
// popcount((X[t] ^ w[t][o]) & M[t]). Taps8: NT tap words, their columns' words and masks loaded once
// into registers and reused for every output channel; TapsN: any number, loaded per channel.
template <int NT>
struct Taps8 {
  __m512i x[NT], m[NT];
  const uint64_t* const* wt;
  Taps8(const uint64_t* const* xt, const uint64_t* const* mt, const uint64_t* const* w, int64_t p) : wt(w) {
    for (int t = 0; t < NT; ++t) {
      x[t] = _mm512_loadu_si512(xt[t] + p);
      m[t] = _mm512_loadu_si512(mt[t] + p);
    }
  }
  inline __m512i count(int64_t o) const {
    __m512i acc = _mm512_setzero_si512();
    for (int t = 0; t < NT; ++t)
      acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_and_si512(
                                      _mm512_xor_si512(x[t], _mm512_set1_epi64(static_cast<long long>(wt[t][o]))), m[t])));
    return acc;
  }
};

struct TapsN {  // xm: the 8 columns' words of every tap word, then their masks (2 x nt x 8, contiguous)
  const uint64_t* xm;
  const uint64_t* const* wt;
  int64_t nt;
  inline __m512i count(int64_t o) const {
    __m512i acc = _mm512_setzero_si512();
    for (int64_t t = 0; t < nt; ++t)
      acc = _mm512_add_epi64(acc, _mm512_popcnt_epi64(_mm512_and_si512(
                                      _mm512_xor_si512(_mm512_loadu_si512(xm + 8 * t),
                                                       _mm512_set1_epi64(static_cast<long long>(wt[t][o]))),
                                      _mm512_loadu_si512(xm + 8 * (nt + t)))));
    return acc;
  }
};

// RPReLU on 8 lanes: d = v - gamma[o], (d >= 0 ? d : slope[o] * d) + zeta[o] (NaN: slope * NaN), the float32
// operations of elementwise.cpp's rprelu (RPReLU.forward's) in order; gp: 3 x C_out (gamma, slope, zeta)
inline __m256 rprelu8(__m256 v, const float* gp, int64_t co, int64_t o) {
  const __m256 d = _mm256_sub_ps(v, _mm256_set1_ps(gp[o]));
  const __mmask8 pos = _mm256_cmp_ps_mask(d, _mm256_setzero_ps(), _CMP_GE_OQ);
  return _mm256_add_ps(_mm256_mask_blend_ps(pos, _mm256_mul_ps(_mm256_set1_ps(gp[co + o]), d), d),
                       _mm256_set1_ps(gp[2 * co + o]));
}

// binary_conv2d_table's epilogue for 8 output columns through every output channel, with the computed
// float32 value (linear, f32) and the options fixed at compile time: + residual (RES), RPReLU or the
// clamp (RPR), the next conv's packed signs (PACK). The same operations as the generic loop there.
struct Columns8 {
  int64_t ow, co, ostep, wo, owp;
  const int64_t* valid;
  const float *fl, *rp, *gp, *sp;
  float* yp;
  uint64_t* words;
  float lo, hi;
  template <bool RES, bool RPR, bool PACK, typename Taps>
  inline void run(const Taps& taps, int64_t p, int64_t base) const {
    const __mmask8 lane = ow - p >= 8 ? __mmask8(0xff) : __mmask8((1u << (ow - p)) - 1);
    const __m512i validv = _mm512_loadu_si512(valid + p);
    const __m256 lov = _mm256_set1_ps(lo), hiv = _mm256_set1_ps(hi), zero = _mm256_setzero_ps();
    const float* const f = fl;
    const float* const r = rp;
    const float* const g = gp;
    const float* const s = sp;
    float* const y = yp;
    const int64_t c = co, step = ostep;
    for (int64_t k = 0; k < (PACK ? wo : 1); ++k) {
      const int64_t o_end = PACK && 64 * (k + 1) < c ? 64 * (k + 1) : c;
      __m512i word = _mm512_setzero_si512(), bit = _mm512_set1_epi64(1);
      for (int64_t o = 64 * k; o < o_end; ++o) {
        const __m512i sum = _mm512_sub_epi64(validv, _mm512_slli_epi64(taps.count(o), 1));
        const int64_t at = base + o * step;
        __m256 v = _mm256_fmadd_ps(_mm256_mul_ps(_mm512_cvtepi64_ps(sum), _mm256_set1_ps(f[o])),
                                   _mm256_set1_ps(f[c + o]), _mm256_set1_ps(f[2 * c + o]));
        if (RES) v = _mm256_add_ps(v, _mm256_maskz_loadu_ps(lane, r + at));
        if (RPR) v = rprelu8(v, g, c, o);
        else v = _mm256_min_ps(hiv, _mm256_max_ps(lov, v));  // lo > v ? lo : v, then hi < v ? hi : v: NaN stays
        _mm256_mask_storeu_ps(y + at, lane, v);
        if (PACK) {
          const __m256 d = s ? _mm256_sub_ps(v, _mm256_set1_ps(s[o])) : v;
          word = _mm512_mask_or_epi64(word, _mm256_cmp_ps_mask(d, zero, _CMP_GE_OQ) & lane, word, bit);
          bit = _mm512_add_epi64(bit, bit);
        }
      }
      if (PACK) _mm512_storeu_si512(words + k * owp + p, word);
    }
  }
};
#endif

// float32 fma(float32(float64(s) * scale + bias), alpha, beta): the reference's epilogue, then an eval
// BatchNorm as torch computes it (one fused multiply-add per element) -- when linear_matches says so.
inline float linear_value(int64_t s, const double* lp, int64_t co, int64_t o) {
  return std::fma(float(double(s) * lp[o] + lp[co + o]), float(lp[2 * co + o]), float(lp[3 * co + o]));
}

// linear (4 x C_out float64: scale, bias, alpha, beta) -> C_out bools: whether linear_value gives every
// entry of table row o (C_out x (2K + 1) float32, sums -K .. K) bit for bit.
at::Tensor linear_matches(const at::Tensor& table_in, const at::Tensor& linear_in) {
  TORCH_CHECK(table_in.dim() == 2 && table_in.scalar_type() == at::kFloat && table_in.size(1) % 2 == 1,
              "linear_matches: table must be C_out x (2K + 1) float32");
  const at::Tensor table = table_in.contiguous(), linear = linear_in.contiguous().to(at::kDouble);
  const int64_t co = table.size(0), kk = table.size(1) / 2;
  TORCH_CHECK(linear.dim() == 2 && linear.size(0) == 4 && linear.size(1) == co, "linear_matches: linear must be 4 x ",
              co, ", got ", linear.sizes());
  at::Tensor ok = at::empty({co}, table.options().dtype(at::kBool));
  const float* tp = table.data_ptr<float>();
  const double* lp = linear.data_ptr<double>();
  bool* okp = ok.data_ptr<bool>();
  for (int64_t o = 0; o < co; ++o) {
    bool same = true;
    for (int64_t s = -kk; s <= kk && same; ++s) {
      const float v = linear_value(s, lp, co, o), t = tp[o * (2 * kk + 1) + s + kk];
      same = std::memcmp(&v, &t, sizeof(float)) == 0;
    }
    okp[o] = same;
  }
  return ok;
}

// A W1A1 convolution and what follows it in a residual block, in one pass over its output:
//   y = clamp(table[o][sum + K] (+ residual), lo, hi),    K = C_in * kh * kw, sum = the window's integer sum
// where table[o] holds, for every sum in [-K, K], the value the layers between the convolution and the
// residual add give that sum (the caller builds it by running those layers' own torch operations on
// the convolution's float32 outputs, so no arithmetic of theirs is reproduced here); the residual add
// and the clamp (hardtanh, ReLU or none: lo/hi = -inf/inf) are single float32 operations, as torch's.
// With `pack_next`, also the signs of y (bit o where y - shift[o] >= 0, shift optional) packed as
// pack_signs would pack y, for a binary convolution that reads y next. `rprelu` (3 x C_out float32: gamma,
// slope, zeta): ReActNet's RPReLU instead of the clamp, (d >= 0 ? d : slope * d) + zeta with d = y - gamma,
// the float32 operations of elementwise.cpp's rprelu (RPReLU.forward's) in the same order.
// `linear` (4 x C_out float64: scale, bias, alpha, beta; alpha and beta float32 values): table[o][s] is
// linear_value(s, ...) -- the caller checked that on every entry with linear_matches -- and is computed
// so instead of looked up.
//   -> (y: N x C_out x OH x OW float32, bits: N x OH x OW x ceil(C_out/64) int64 or empty)
std::tuple<at::Tensor, at::Tensor> binary_conv2d_table(
    const at::Tensor& xbits, const at::Tensor& wbits, int64_t c_in, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, const at::Tensor& table_in,
    const c10::optional<at::Tensor>& residual_in, double lo_d, double hi_d, bool pack_next,
    const c10::optional<at::Tensor>& shift_in, const c10::optional<at::Tensor>& linear_in,
    const c10::optional<at::Tensor>& rprelu_in) {
  TORCH_CHECK(table_in.dim() == 2 && table_in.scalar_type() == at::kFloat, "binary_conv2d_table: table must be "
              "C_out x (2K + 1) float32");
  const at::Tensor table = table_in.contiguous();
  const int64_t co = table.size(0), kk = wbits.size(0) * wbits.size(1) * c_in;
  const bool computed = linear_in.has_value() && linear_in->defined();
  TORCH_CHECK(table.size(1) == 2 * kk + 1 || (computed && table.size(1) == 0), "binary_conv2d_table: a table row "
              "holds ", table.size(1), " values; sums of ", kk, " terms need ", 2 * kk + 1);
  const Geometry g =
      geometry(xbits, wbits, c_in, co, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, "binary_conv2d_table");
  const int64_t oh = g.oh, ow = g.ow, wo = words_for(co);
  at::Tensor res;
  const float* rp = nullptr;
  if (residual_in.has_value() && residual_in->defined()) {
    TORCH_CHECK(residual_in->scalar_type() == at::kFloat && residual_in->dim() == 4 &&
                    residual_in->size(0) == g.n && residual_in->size(1) == co && residual_in->size(2) == oh &&
                    residual_in->size(3) == ow,
                "binary_conv2d_table: the residual must be float32 of the output's shape ",
                at::IntArrayRef({g.n, co, oh, ow}), ", got ", residual_in->sizes());
    res = residual_in->contiguous();
    rp = res.data_ptr<float>();
  }
  at::Tensor shift;
  const float* sp = nullptr;
  if (shift_in.has_value() && shift_in->defined()) {
    shift = shift_in->contiguous().to(at::kFloat);
    TORCH_CHECK(shift.numel() == co, "binary_conv2d_table: shift has ", shift.numel(), " values for ", co,
                " channels");
    sp = shift.data_ptr<float>();
  }
  at::Tensor y = at::empty({g.n, co, oh, ow}, xbits.options().dtype(at::kFloat));
  at::Tensor bits = pack_next ? at::empty({g.n, oh, ow, wo}, xbits.options().dtype(at::kLong))
                              : at::empty({0}, xbits.options().dtype(at::kLong));
  const float* tp = table.data_ptr<float>();
  at::Tensor linear;
  const double* lp = nullptr;
  if (linear_in.has_value() && linear_in->defined()) {
    linear = linear_in->contiguous().to(at::kDouble);
    TORCH_CHECK(linear.dim() == 2 && linear.size(0) == 4 && linear.size(1) == co, "binary_conv2d_table: linear "
                "must be 4 x ", co, " (scale, bias, alpha, beta), got ", linear.sizes());
    lp = linear.data_ptr<double>();
  }
  // float32 suffices for linear_value's float32(float64(s) * scale + bias) where every scale is a float32
  // value and every bias -0.0: |s| <= K < 2^24 and scale's 24 significant bits make the float64 product
  // exact, + -0.0 changes nothing, so its rounding to float32 is float32's s * scale, rounded once
  bool f32 = lp != nullptr && kk < (int64_t(1) << 24);
  for (int64_t o = 0; f32 && o < co; ++o)
    f32 = double(float(lp[o])) == lp[o] && lp[co + o] == 0.0 && std::signbit(lp[co + o]);
  at::Tensor rpre;
  const float* gp = nullptr;  // RPReLU's gamma, slope, zeta (3 x C_out) instead of the clamp
  if (rprelu_in.has_value() && rprelu_in->defined()) {
    rpre = rprelu_in->contiguous().to(at::kFloat);
    TORCH_CHECK(rpre.dim() == 2 && rpre.size(0) == 3 && rpre.size(1) == co, "binary_conv2d_table: rprelu must be "
                "3 x ", co, " (gamma, slope, zeta), got ", rpre.sizes());
    gp = rpre.data_ptr<float>();
  }
  std::vector<float> fl(lp ? 3 * co : 0);  // float32 scale, alpha, beta (the vector epilogue's broadcasts)
  for (int64_t o = 0; lp && o < co; ++o) {
    fl[o] = float(lp[o]);
    fl[co + o] = float(lp[2 * co + o]);
    fl[2 * co + o] = float(lp[3 * co + o]);
  }
  float* yp = y.data_ptr<float>();
  uint64_t* bp = pack_next ? reinterpret_cast<uint64_t*>(bits.data_ptr<int64_t>()) : nullptr;
  const float lo = float(lo_d), hi = float(hi_d);
  const int64_t h = g.h, w = g.w, wc = g.wc, kh = g.kh, kw = g.kw, co_pad = g.co_pad;
  const at::Tensor xc = xbits.contiguous(), wcont = wbits.contiguous();
  const uint64_t* xp = reinterpret_cast<const uint64_t*>(xc.data_ptr<int64_t>());
  const uint64_t* wp = reinterpret_cast<const uint64_t*>(wcont.data_ptr<int64_t>());
  // tap groups for few input channels, as in conv_rows
  const int64_t tpw = wc == 1 ? 64 / c_in : 1;
  const bool grouped = tpw >= 2 && kw >= 2;
  const int64_t ng = grouped ? (kw + tpw - 1) / tpw : 0;
  const std::vector<uint64_t> wg = grouped ? group_weights(wp, kh, kw, ng, tpw, co_pad, c_in) : std::vector<uint64_t>();
  const uint64_t ones = c_in >= 64 ? ~uint64_t(0) : (uint64_t(1) << c_in) - 1;
  const int64_t owp = (ow + 7) / 8 * 8;             // output columns padded to whole vectors of 8
  const int64_t tmax = row_tap_words(c_in, wc, kh, kw);  // tap words of one output row, at most
  // which bits of a tap word are real taps at each output column (0 outside the image; the same for
  // every row): per tap group (grouped) or per kernel column, and the columns' taps inside the image
  const int64_t nm = grouped ? ng : kw;
  std::vector<uint64_t> masks(nm * owp, 0);
  std::vector<int64_t> colsok(owp, 0);
  for (int64_t ox = 0; ox < ow; ++ox)
    for (int64_t j = 0; j < kw; ++j) {
      const int64_t ix = ox * g.stride_w - g.pad_w + j * g.dil_w;
      if (ix < 0 || ix >= w) continue;
      colsok[ox] += 1;
      if (grouped) masks[(j / tpw) * owp + ox] |= ones << ((j % tpw) * c_in);
      else masks[j * owp + ox] = ~uint64_t(0);
    }
  // The tap words of one input row (per tap group, or per kernel column and word): built once per input
  // row and kept while the next output rows read it (kh rows apart at most (kh - 1) * dil_h + 1: a ring
  // of that many rows, each tagged with the image and row it holds).
  const int64_t per_row = grouped ? ng : kw * wc, ring = (kh - 1) * g.dil_h + 1;
  // One output row at a time, vectorised over 8 output columns: X[t][ox] the input word of tap word t
  // at column ox (0 outside the image), mt[t] which of its bits are real taps, wt[t] the packed weights
  // of tap word t (one word per output channel), so column ox's popcount for channel o is
  // sum_t popcount((X[t][ox] ^ wt[t][o]) & mt[t][ox]) and its integer sum valid[ox] - 2 * popcount.
  // valid[ox] for each number r of kernel rows inside the image: c_in * r * colsok[ox] (row r of valids)
  std::vector<int64_t> valids((kh + 1) * owp);
  for (int64_t r = 0; r <= kh; ++r)
    for (int64_t ox = 0; ox < owp; ++ox) valids[r * owp + ox] = c_in * r * colsok[ox];
  at::parallel_for(0, g.n * oh, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> built(ring * per_row * owp, 0), words(pack_next ? wo * owp : 0);
    std::vector<int64_t> tag(ring, -1);  // b * h + iy of the row each ring slot holds
    std::vector<const uint64_t*> xt_of(tmax), wt(tmax), mt(tmax);
    std::vector<uint64_t> xm(16 * tmax);  // TapsN's gathered words and masks
    for (int64_t no = begin; no < end; ++no) {
      const int64_t b = no / oh, oy = no % oh;
      int64_t nt = 0, rows = 0;
      for (int64_t i = 0; i < kh; ++i) {
        const int64_t iy = oy * g.stride_h - g.pad_h + i * g.dil_h;
        if (iy < 0 || iy >= h) continue;  // a kernel row outside the image: its taps are padding
        ++rows;
        const int64_t slot = iy % ring;
        uint64_t* row = built.data() + slot * per_row * owp;
        if (tag[slot] != b * h + iy) {  // build the input row's tap words
          tag[slot] = b * h + iy;
          const uint64_t* src = xp + (b * h + iy) * w * wc;
          if (grouped) {
            for (int64_t gi = 0; gi < ng; ++gi) {
              const int64_t taps = kw - gi * tpw < tpw ? kw - gi * tpw : tpw;
              group_words(row + gi * owp, src, w, ow, g.stride_w, gi * tpw * g.dil_w - g.pad_w, g.dil_w, taps, c_in);
            }
          } else {
            for (int64_t j = 0; j < kw; ++j)
              for (int64_t k = 0; k < wc; ++k) {
                uint64_t* xt = row + (j * wc + k) * owp;
                for (int64_t ox = 0; ox < ow; ++ox) {
                  const int64_t ix = ox * g.stride_w - g.pad_w + j * g.dil_w;
                  xt[ox] = ix >= 0 && ix < w ? src[ix * wc + k] : 0;
                }
              }
          }
        }
        for (int64_t t = 0; t < per_row; ++t, ++nt) {
          xt_of[nt] = row + t * owp;
          wt[nt] = grouped ? wg.data() + (i * ng + t) * co_pad : wp + (i * kw * wc + t) * co_pad;
          mt[nt] = masks.data() + (grouped ? t : t / wc) * owp;
        }
      }
      const int64_t* const valid = valids.data() + rows * owp;
#if defined(__AVX512F__) && defined(__AVX512VPOPCNTDQ__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
      // 8 columns at a time through every output channel: the columns' sign words (64 channels each)
      // stay in a register
      const __m256 lov = _mm256_set1_ps(lo), hiv = _mm256_set1_ps(hi), zero = _mm256_setzero_ps();
      const float* const flp = fl.data();
      // any options, tested per channel (the table, float64 values, rare tap counts)
      const auto columns = [&](const auto& taps, int64_t p) {
        const __mmask8 lane = ow - p >= 8 ? __mmask8(0xff) : __mmask8((1u << (ow - p)) - 1);
        const __m512i validv = _mm512_loadu_si512(valid + p);
        const int64_t base = (b * co * oh + oy) * ow + p, ostep = oh * ow;
        for (int64_t k = 0; k < (pack_next ? wo : 1); ++k) {
          const int64_t o_end = pack_next && 64 * (k + 1) < co ? 64 * (k + 1) : co;
          __m512i word = _mm512_setzero_si512(), bit = _mm512_set1_epi64(1);
          for (int64_t o = 64 * k; o < o_end; ++o) {
            const __m512i sum = _mm512_sub_epi64(validv, _mm512_slli_epi64(taps.count(o), 1));
            const int64_t at = base + o * ostep;
            __m256 v;
            if (lp && f32) {  // linear_value, 8 lanes, in float32 (see f32)
              v = _mm256_fmadd_ps(_mm256_mul_ps(_mm512_cvtepi64_ps(sum), _mm256_set1_ps(flp[o])),
                                  _mm256_set1_ps(flp[co + o]), _mm256_set1_ps(flp[2 * co + o]));
            } else if (lp) {  // linear_value, 8 lanes
              const __m512d d = _mm512_add_pd(_mm512_mul_pd(_mm512_cvtepi64_pd(sum), _mm512_set1_pd(lp[o])),
                                              _mm512_set1_pd(lp[co + o]));
              v = _mm256_fmadd_ps(_mm512_cvtpd_ps(d), _mm256_set1_ps(flp[co + o]), _mm256_set1_ps(flp[2 * co + o]));
            } else {
              v = _mm512_mask_i64gather_ps(zero, lane, sum, tp + o * (2 * kk + 1) + kk, 4);
            }
            if (rp) v = _mm256_add_ps(v, _mm256_maskz_loadu_ps(lane, rp + at));
            if (gp) v = rprelu8(v, gp, co, o);
            else v = _mm256_min_ps(hiv, _mm256_max_ps(lov, v));  // lo > v ? lo : v, then hi < v ? hi : v: NaN stays
            _mm256_mask_storeu_ps(yp + at, lane, v);
            if (pack_next) {  // bit o % 64 of each column's word where v - shift >= 0
              const __m256 d = sp ? _mm256_sub_ps(v, _mm256_set1_ps(sp[o])) : v;
              word = _mm512_mask_or_epi64(word, _mm256_cmp_ps_mask(d, zero, _CMP_GE_OQ) & lane, word, bit);
              bit = _mm512_add_epi64(bit, bit);
            }
          }
          if (pack_next) _mm512_storeu_si512(words.data() + k * owp + p, word);
        }
      };
      const Columns8 fast{ow, co, oh * ow, wo, owp, valid, flp, rp, gp, sp, yp, words.data(), lo, hi};
      const bool quick = lp && f32;
      // the float32 values with the options fixed at compile time (each tested per channel ran ~1.2-1.5x
      // slower at ResNet-20's 16-channel shapes) for up to 4 tap words a row (with 6 or 9, whose words
      // and masks take 12-18 vector registers, this was slower than the loop above); the rest as above
      const auto run = [&](const auto& taps, int64_t p) {
        const int64_t base = (b * co * oh + oy) * ow + p;
        if (!quick) columns(taps, p);
        else if (rp && gp && pack_next) fast.run<true, true, true>(taps, p, base);
        else if (rp && gp) fast.run<true, true, false>(taps, p, base);
        else if (rp && pack_next) fast.run<true, false, true>(taps, p, base);
        else if (rp) fast.run<true, false, false>(taps, p, base);
        else if (gp && pack_next) fast.run<false, true, true>(taps, p, base);
        else if (gp) fast.run<false, true, false>(taps, p, base);
        else if (pack_next) fast.run<false, false, true>(taps, p, base);
        else fast.run<false, false, false>(taps, p, base);
      };
      for (int64_t p = 0; p < owp; p += 8) {
        switch (nt) {  // few tap words (every ResNet-20 conv: 2 to 9): in registers across the channels
          case 1: run(Taps8<1>(xt_of.data(), mt.data(), wt.data(), p), p); break;
          case 2: run(Taps8<2>(xt_of.data(), mt.data(), wt.data(), p), p); break;
          case 3: run(Taps8<3>(xt_of.data(), mt.data(), wt.data(), p), p); break;
          case 4: run(Taps8<4>(xt_of.data(), mt.data(), wt.data(), p), p); break;
          case 5: columns(Taps8<5>(xt_of.data(), mt.data(), wt.data(), p), p); break;
          case 6: columns(Taps8<6>(xt_of.data(), mt.data(), wt.data(), p), p); break;
          case 7: columns(Taps8<7>(xt_of.data(), mt.data(), wt.data(), p), p); break;
          case 8: columns(Taps8<8>(xt_of.data(), mt.data(), wt.data(), p), p); break;
          case 9: columns(Taps8<9>(xt_of.data(), mt.data(), wt.data(), p), p); break;
          default:  // the columns' words and masks gathered once, then read contiguously for every channel
            for (int64_t t = 0; t < nt; ++t) {
              std::memcpy(xm.data() + 8 * t, xt_of[t] + p, 8 * sizeof(uint64_t));
              std::memcpy(xm.data() + 8 * (nt + t), mt[t] + p, 8 * sizeof(uint64_t));
            }
            columns(TapsN{xm.data(), wt.data(), nt}, p);
        }
      }
#else
      if (pack_next) std::fill(words.begin(), words.end(), uint64_t(0));
      for (int64_t o = 0; o < co; ++o) {
        const int64_t at = ((b * co + o) * oh + oy) * ow;
        float* out = yp + at;
        const float* r = rp ? rp + at : nullptr;
        const float* tb = tp + o * (2 * kk + 1) + kk;
        const float s = sp ? sp[o] : 0.0f;
        uint64_t* wrow = pack_next ? words.data() + (o / 64) * owp : nullptr;
        const uint64_t bit = uint64_t(1) << (o % 64);
        for (int64_t ox = 0; ox < ow; ++ox) {
          int64_t c = 0;
          for (int64_t t = 0; t < nt; ++t)
            c += __builtin_popcountll((xt_of[t][ox] ^ wt[t][o]) & mt[t][ox]);
          float v = lp ? linear_value(valid[ox] - 2 * c, lp, co, o) : tb[valid[ox] - 2 * c];
          if (r) v = v + r[ox];
          if (gp) {  // RPReLU
            const float d = v - gp[o];
            v = (d >= 0.0f ? d : gp[co + o] * d) + gp[2 * co + o];
          } else {
            v = v < lo ? lo : v;  // NaN stays NaN, as torch's clamp
            v = hi < v ? hi : v;
          }
          out[ox] = v;
          if (wrow && (sp ? v - s : v) >= 0.0f) wrow[ox] |= bit;
        }
      }
#endif
      if (pack_next) {
        uint64_t* dst = bp + (b * oh + oy) * ow * wo;
        for (int64_t ox = 0; ox < ow; ++ox)
          for (int64_t k = 0; k < wo; ++k) dst[ox * wo + k] = words[k * owp + ox];
      }
    }
  });
  return {y, bits};
}

}  // namespace

TORCH_LIBRARY(zoo_cpu, m) {
  m.def("pack_signs(Tensor x, Tensor? shift) -> Tensor");
  m.def("pack_weight_signs(Tensor q) -> Tensor");
  m.def("binary_conv2d(Tensor xbits, Tensor wbits, int c_in, int stride_h, int stride_w, int pad_h, int pad_w, "
        "int dil_h, int dil_w, Tensor scale, Tensor? bias) -> Tensor");
  m.def("binary_conv2d_table(Tensor xbits, Tensor wbits, int c_in, int stride_h, int stride_w, int pad_h, "
        "int pad_w, int dil_h, int dil_w, Tensor table, Tensor? residual, float lo, float hi, bool pack_next, "
        "Tensor? shift, Tensor? linear=None, Tensor? rprelu=None) -> (Tensor, Tensor)");
  m.def("linear_matches(Tensor table, Tensor linear) -> Tensor");
}

TORCH_LIBRARY_IMPL(zoo_cpu, CPU, m) {
  m.impl("pack_signs", pack_signs);
  m.impl("pack_weight_signs", pack_weight_signs);
  m.impl("binary_conv2d", binary_conv2d);
  m.impl("binary_conv2d_table", binary_conv2d_table);
  m.impl("linear_matches", linear_matches);
}
