// AVX2 + FMA + F16C quantized-GEMM loops: the natural activation layout of the scalar table
// (quant_layout.h), integer products with vpmaddubsw (unsigned weight codes x signed int8
// activations, pairs summed to int16) and vpmaddwd (pairs to int32, times the K-quants' 6/8-bit
// sub-block scales). Also the table for AVX-512 CPUs without VNNI. This file alone is compiled
// with -mavx2 -mfma -mf16c and is reached only after the runtime check in quant_gemm.cc.
//
// vpmaddubsw saturates its int16 pair sums: the weight codes here stay below 64 (nibbles, 5-bit
// and 6-bit codes) so a pair is at most 2 * 63 * 127 < 32767, and Q8_0 uses |w| x sign(a, w)
// (|w| <= 128, |a| <= 127) instead of w + 128.
//
// Blocking: one weight row at a time, unpacked once per block and multiplied with up to four
// tokens' activations (MR), each token with its own f32 accumulator; a panel of rows (~128 KiB)
// stays in L2 while the token tiles pass over it.
#include "kernels/cpu/quant_ops.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "kernels/cpu/quant_layout.h"
#include "kernels/quant.h"

namespace loraplex::kernels::cpu {
namespace {

#define LP_AVX2_INLINE inline __attribute__((always_inline))
#define LP_AVX2_INLINE_LAMBDA __attribute__((always_inline))

LP_AVX2_INLINE float HalfAt(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return _cvtsh_ss(h);
}

LP_AVX2_INLINE float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

LP_AVX2_INLINE int32_t HorizontalSum(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

LP_AVX2_INLINE float HorizontalMax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---- activation quantization (values identical to the scalar table's)

// 32 floats -> 32 int8 at q (round to nearest even under the default MXCSR); returns sum of q.
LP_AVX2_INLINE __m256i Quantize32(const float* x, __m256 inv, int8_t* q) {
  const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), inv));
  const __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), inv));
  const __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16), inv));
  const __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 24), inv));
  // packs interleave the 128-bit lanes: [0-3 8-11 16-19 24-27 | 4-7 12-15 20-23 28-31] in
  // dwords, which the permute puts back in order.
  const __m256i p16a = _mm256_packs_epi32(i0, i1);
  const __m256i p16b = _mm256_packs_epi32(i2, i3);
  const __m256i p8 = _mm256_packs_epi16(p16a, p16b);
  const __m256i ordered =
      _mm256_permutevar8x32_epi32(p8, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), ordered);
  return _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
}

LP_AVX2_INLINE float AbsMax(const float* x, int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8)
    m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  return HorizontalMax(m);
}

void QuantizeAct(DType t, const float* x, int64_t k, int64_t i_begin, int64_t i_end, uint8_t* xq) {
  const NaturalLayout l = NaturalLayoutOf(t, k);
  for (int64_t i = i_begin; i < i_end; ++i) {
    const float* xi = x + i * k;
    uint8_t* row = xq + i * l.row_bytes;
    int8_t* qa = reinterpret_cast<int8_t*>(row);
    float* da = reinterpret_cast<float*>(row + l.scale_offset);
    if (IsKQuant(t)) {
      int16_t* bsums = reinterpret_cast<int16_t*>(row + l.extra_offset);
      for (int64_t b = 0; b < k / kQK; ++b) {
        const ActScale s = ActScaleOf(AbsMax(xi + b * kQK, kQK));
        da[b] = s.d;
        const __m256 inv = _mm256_set1_ps(s.inv);
        for (int64_t c = 0; c < kQK; c += 32) {
          Quantize32(xi + b * kQK + c, inv, qa + b * kQK + c);
          // bsums of the two 16-value halves, from the stored bytes.
          for (int64_t h = 0; h < 32; h += 16) {
            const __m256i v = _mm256_cvtepi8_epi16(
                _mm_loadu_si128(reinterpret_cast<const __m128i*>(qa + b * kQK + c + h)));
            bsums[(b * kQK + c + h) / kSums] =
                static_cast<int16_t>(HorizontalSum(_mm256_madd_epi16(v, _mm256_set1_epi16(1))));
          }
        }
      }
    } else {
      float* sa = reinterpret_cast<float*>(row + l.extra_offset);
      for (int64_t b = 0; b < k / kQ32; ++b) {
        const ActScale s = ActScaleOf(AbsMax(xi + b * kQ32, kQ32));
        da[b] = s.d;
        const __m256i sum = Quantize32(xi + b * kQ32, _mm256_set1_ps(s.inv), qa + b * kQ32);
        sa[b] = s.d * static_cast<float>(HorizontalSum(sum));
      }
    }
  }
}

// ---- 32-value formats: one weight row x MR tokens

// 16 bytes of nibbles -> 32 codes in element order (low nibbles, then high nibbles).
LP_AVX2_INLINE __m256i Nibbles32(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(v, 4), v);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// Two accumulators per token, even and odd blocks, so that one token's FMAs do not wait on each
// other's latency.
template <DType T, int MR>
void Row32(float* y, int64_t ldy, const uint8_t* xq, int64_t ldx, const NaturalLayout& l,
           const uint8_t* w, int64_t k, bool accumulate) {
  constexpr int64_t kBytes = T == DType::kQ8_0 ? 34 : T == DType::kQ4_0 ? 18 : 20;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[2][MR];
  float extra[2][MR];  // the sums of cw * sa
  for (int s = 0; s < 2; ++s) {
    for (int t = 0; t < MR; ++t) {
      acc[s][t] = _mm256_setzero_ps();
      extra[s][t] = 0.0f;
    }
  }
  auto block = [&](int64_t b, int s) LP_AVX2_INLINE_LAMBDA {
    const uint8_t* blk = w + b * kBytes;
    _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchDistance, _MM_HINT_T0);
    const float dw = HalfAt(blk);
    __m256i wq;
    float cw = 0.0f;
    if constexpr (T == DType::kQ8_0) {
      wq = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
    } else if constexpr (T == DType::kQ4_0) {
      wq = Nibbles32(blk + 2);
      cw = -8.0f * dw;
    } else {
      wq = Nibbles32(blk + 4);
      cw = HalfAt(blk + 2);
    }
    const __m256i wabs = T == DType::kQ8_0 ? _mm256_sign_epi8(wq, wq) : wq;
    for (int t = 0; t < MR; ++t) {
      const uint8_t* row = xq + t * ldx;
      __m256i a = _mm256_load_si256(reinterpret_cast<const __m256i*>(row + b * kQ32));
      if constexpr (T == DType::kQ8_0) a = _mm256_sign_epi8(a, wq);
      const __m256i i32 = _mm256_madd_epi16(_mm256_maddubs_epi16(wabs, a), ones);
      const float da = reinterpret_cast<const float*>(row + l.scale_offset)[b];
      acc[s][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_set1_ps(dw * da), acc[s][t]);
      if constexpr (T != DType::kQ8_0) {
        extra[s][t] += cw * reinterpret_cast<const float*>(row + l.extra_offset)[b];
      }
    }
  };
  const int64_t nb = k / kQ32;
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    block(b, 0);
    block(b + 1, 1);
  }
  if (b < nb) block(b, 0);
  for (int t = 0; t < MR; ++t) {
    const float sum =
        HorizontalSum(_mm256_add_ps(acc[0][t], acc[1][t])) + (extra[0][t] + extra[1][t]);
    float* out = y + t * ldy;
    *out = accumulate ? *out + sum : sum;
  }
}

// ---- K-quants: one weight row x MR tokens

// The 16 words [b (8 times), c (8 times)]: the scales of two 16-value sub-blocks.
LP_AVX2_INLINE __m256i ScalePair(int b, int c) {
  return _mm256_set_m128i(_mm_set1_epi16(static_cast<int16_t>(c)),
                          _mm_set1_epi16(static_cast<int16_t>(b)));
}

template <DType T, int MR>
void RowK(float* y, int64_t ldy, const uint8_t* xq, int64_t ldx, const NaturalLayout& l,
          const uint8_t* w, int64_t k, bool accumulate) {
  constexpr int64_t kBytes = T == DType::kQ4_K ? 144 : T == DType::kQ5_K ? 176 : 210;
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m256 acc[MR];
  for (int t = 0; t < MR; ++t) acc[t] = _mm256_setzero_ps();
  for (int64_t b = 0; b < k / kQK; ++b, w += kBytes) {
    for (int64_t o = 0; o < kBytes; o += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(w) + kPrefetchDistance + o, _MM_HINT_T0);
    }
    __m256i isum[MR];
    for (int t = 0; t < MR; ++t) isum[t] = _mm256_setzero_si256();
    // Multiplies one vector of 32 weight codes (values 32c .. 32c + 31 of the super-block) with
    // each token's activations and its 16-bit scales, into isum.
    auto accumulate_codes = [&](__m256i codes, int64_t first, __m256i scales) {
      for (int t = 0; t < MR; ++t) {
        const __m256i a =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(xq + t * ldx + b * kQK + first));
        isum[t] =
            _mm256_add_epi32(isum[t], _mm256_madd_epi16(_mm256_maddubs_epi16(codes, a), scales));
      }
    };
    if constexpr (T == DType::kQ6_K) {
      const uint8_t* ql = w;
      const uint8_t* qh = w + 128;
      const int8_t* sc = reinterpret_cast<const int8_t*>(w + 192);
      for (int h = 0; h < 2; ++h) {
        const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * h));
        const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 64 * h + 32));
        const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * h));
        const __m256i top = _mm256_set1_epi8(0x30);
        const __m256i q[4] = {_mm256_or_si256(_mm256_and_si256(l0, low4),
                                              _mm256_and_si256(_mm256_slli_epi16(hb, 4), top)),
                              _mm256_or_si256(_mm256_and_si256(l1, low4),
                                              _mm256_and_si256(_mm256_slli_epi16(hb, 2), top)),
                              _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                                              _mm256_and_si256(hb, top)),
                              _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                                              _mm256_and_si256(_mm256_srli_epi16(hb, 2), top))};
        for (int c = 0; c < 4; ++c) {
          const int s = 8 * h + 2 * c;  // the 16-value sub-blocks s, s + 1
          accumulate_codes(q[c], 128 * h + 32 * c, ScalePair(sc[s], sc[s + 1]));
        }
      }
      // The codes are q + 32: subtract 32 * sum_s sc[s] * bsum[s].
      const __m256i sc16 =
          _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
      const float d = HalfAt(w + 208);
      for (int t = 0; t < MR; ++t) {
        const uint8_t* row = xq + t * ldx;
        const __m256i bs =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(row + l.extra_offset) + b);
        const __m256i corr = _mm256_slli_epi32(_mm256_madd_epi16(sc16, bs), 5);
        const float da = reinterpret_cast<const float*>(row + l.scale_offset)[b];
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(isum[t], corr)),
                                 _mm256_set1_ps(d * da), acc[t]);
      }
    } else {
      uint64_t sc_bits, mn_bits;
      UnpackScalesMins64(w + 4, &sc_bits, &mn_bits);
      uint8_t sc[8];
      std::memcpy(sc, &sc_bits, 8);
      const uint8_t* qh = w + 16;
      const uint8_t* qs = w + (T == DType::kQ5_K ? 48 : 16);
      __m256i hbits = _mm256_setzero_si256();
      if constexpr (T == DType::kQ5_K) {
        hbits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh));
      }
      for (int c = 0; c < 4; ++c) {
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * c));
        __m256i lo = _mm256_and_si256(v, low4);
        __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        if constexpr (T == DType::kQ5_K) {
          // Bit s of qh[l] is the fifth bit of element l of sub-block s (here 2c and 2c + 1).
          const __m256i one = _mm256_set1_epi8(1);
          lo = _mm256_or_si256(
              lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * c), one), 4));
          hi = _mm256_or_si256(
              hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hbits, 2 * c + 1), one), 4));
        }
        accumulate_codes(lo, 64 * c, _mm256_set1_epi16(sc[2 * c]));
        accumulate_codes(hi, 64 * c + 32, _mm256_set1_epi16(sc[2 * c + 1]));
      }
      // Mins: sum_s mn[s] * (bsum[2s] + bsum[2s+1]), with mn[s] repeated for both halves.
      const __m128i mn8 = _mm_cvtsi64_si128(static_cast<long long>(mn_bits));
      const __m256i mn16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(mn8, mn8));
      const float d = HalfAt(w);
      const float dmin = HalfAt(w + 2);
      for (int t = 0; t < MR; ++t) {
        const uint8_t* row = xq + t * ldx;
        const __m256i bs =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(row + l.extra_offset) + b);
        const float da = reinterpret_cast<const float*>(row + l.scale_offset)[b];
        acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(d * da), acc[t]);
        acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(mn16, bs)),
                                  _mm256_set1_ps(dmin * da), acc[t]);
      }
    }
  }
  for (int t = 0; t < MR; ++t) {
    const float sum = HorizontalSum(acc[t]);
    float* out = y + t * ldy;
    *out = accumulate ? *out + sum : sum;
  }
}

constexpr int kMaxMr = 4;

using RowFn = void (*)(float*, int64_t, const uint8_t*, int64_t, const NaturalLayout&,
                       const uint8_t*, int64_t, bool);

template <DType T, int MR>
void Row(float* y, int64_t ldy, const uint8_t* xq, int64_t ldx, const NaturalLayout& l,
         const uint8_t* w, int64_t k, bool accumulate) {
  if constexpr (T == DType::kQ4_K || T == DType::kQ5_K || T == DType::kQ6_K) {
    RowK<T, MR>(y, ldy, xq, ldx, l, w, k, accumulate);
  } else {
    Row32<T, MR>(y, ldy, xq, ldx, l, w, k, accumulate);
  }
}

template <DType T>
struct RowTable {
  RowFn fn[kMaxMr] = {Row<T, 1>, Row<T, 2>, Row<T, 3>, Row<T, 4>};
};

template <DType T>
void GemmT(float* y, const uint8_t* xq, int64_t m, const uint8_t* w, int64_t n, int64_t k,
           int64_t j_begin, int64_t j_end, bool accumulate) {
  static const RowTable<T> rows;
  const NaturalLayout l = NaturalLayoutOf(T, k);
  const int64_t rb = RowBytes(T, k);
  // A panel of weight rows (~128 KiB) stays in L2 while every token tile passes over it.
  const int64_t panel = std::max<int64_t>(1, 128 * 1024 / rb);
  for (int64_t jp = j_begin; jp < j_end; jp += panel) {
    const int64_t jp_end = std::min(j_end, jp + panel);
    for (int64_t i = 0; i < m; i += kMaxMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMaxMr, m - i));
      for (int64_t j = jp; j < jp_end; ++j) {
        rows.fn[mr - 1](y + i * n + j, n, xq + i * l.row_bytes, l.row_bytes, l, w + j * rb, k,
                        accumulate);
      }
    }
  }
}

int64_t ActRowBytes(DType t, int64_t k) { return NaturalLayoutOf(t, k).row_bytes; }

void Gemm(DType t, float* y, const uint8_t* xq, int64_t m, const uint8_t* w, int64_t n, int64_t k,
          int64_t j_begin, int64_t j_end, bool accumulate) {
  WithQuantType(t, [&](auto type) {
    GemmT<decltype(type)::value>(y, xq, m, w, n, k, j_begin, j_end, accumulate);
  });
}

const QuantOps kAvx2QuantOps = {
    .name = "avx2",
    .act_row_bytes = ActRowBytes,
    .quantize_act = QuantizeAct,
    .gemm = Gemm,
};

}  // namespace

const QuantOps* Avx2QuantOps() { return &kAvx2QuantOps; }

}  // namespace loraplex::kernels::cpu

#else  // not an x86 build with the AVX2 flags (see kernels/quant.cmake)

namespace loraplex::kernels::cpu {
const QuantOps* Avx2QuantOps() { return nullptr; }
}  // namespace loraplex::kernels::cpu

#endif
