// AVX2/FMA micro-kernel of the LoRA ops. This file alone is compiled with -mavx2 -mfma
// (kernels/lora.cmake); lora_fast.cc calls it only after checking the CPU at runtime.

#include <immintrin.h>

#include <cstdint>

#include "common/half.h"
#include "kernels/kernels.h"

namespace loraplex::kernels::lora_internal {

namespace {

inline float HorizontalSum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// 8 weights at w + k widened to f32.
template <DType kDType>
inline __m256 Load8(const void* w, int64_t k) {
  if constexpr (kDType == DType::kF32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + k);
  } else {
    __m128i h =
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + k));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
}

template <DType kDType>
inline float Scalar(const void* w, int64_t k) {
  if constexpr (kDType == DType::kF32) {
    return static_cast<const float*>(w)[k];
  } else {
    return Bf16ToF32(static_cast<const uint16_t*>(w)[k]);
  }
}

template <DType kDType>
void Rows(float* out, int64_t out_stride, const float* in, int64_t in_stride, int64_t tokens,
          const WeightView& w, int64_t row_begin, int64_t row_end, bool accumulate) {
  const int64_t k_len = w.cols;
  const int64_t k_vec = k_len & ~int64_t{7};
  const size_t elem = kDType == DType::kF32 ? 4 : 2;
  int64_t t = 0;
  // Four tokens at a time: each weight vector loaded once feeds four FMAs.
  for (; t + 4 <= tokens; t += 4) {
    const float* x0 = in + (t + 0) * in_stride;
    const float* x1 = in + (t + 1) * in_stride;
    const float* x2 = in + (t + 2) * in_stride;
    const float* x3 = in + (t + 3) * in_stride;
    for (int64_t n = row_begin; n < row_end; ++n) {
      const void* wr = static_cast<const char*>(w.data) + n * k_len * elem;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      for (int64_t k = 0; k < k_vec; k += 8) {
        __m256 wv = Load8<kDType>(wr, k);
        a0 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0 + k), a0);
        a1 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1 + k), a1);
        a2 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x2 + k), a2);
        a3 = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x3 + k), a3);
      }
      float s0 = HorizontalSum(a0), s1 = HorizontalSum(a1);
      float s2 = HorizontalSum(a2), s3 = HorizontalSum(a3);
      for (int64_t k = k_vec; k < k_len; ++k) {
        const float wk = Scalar<kDType>(wr, k);
        s0 += wk * x0[k];
        s1 += wk * x1[k];
        s2 += wk * x2[k];
        s3 += wk * x3[k];
      }
      float* o = out + t * out_stride + n;
      if (accumulate) {
        o[0] += s0;
        o[out_stride] += s1;
        o[2 * out_stride] += s2;
        o[3 * out_stride] += s3;
      } else {
        o[0] = s0;
        o[out_stride] = s1;
        o[2 * out_stride] = s2;
        o[3 * out_stride] = s3;
      }
    }
  }
  for (; t < tokens; ++t) {
    const float* x0 = in + t * in_stride;
    for (int64_t n = row_begin; n < row_end; ++n) {
      const void* wr = static_cast<const char*>(w.data) + n * k_len * elem;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 16 <= k_vec; k += 16) {  // two chains hide the FMA latency
        a0 = _mm256_fmadd_ps(Load8<kDType>(wr, k), _mm256_loadu_ps(x0 + k), a0);
        a1 = _mm256_fmadd_ps(Load8<kDType>(wr, k + 8), _mm256_loadu_ps(x0 + k + 8), a1);
      }
      for (; k < k_vec; k += 8) {
        a0 = _mm256_fmadd_ps(Load8<kDType>(wr, k), _mm256_loadu_ps(x0 + k), a0);
      }
      float s0 = HorizontalSum(_mm256_add_ps(a0, a1));
      for (k = k_vec; k < k_len; ++k) s0 += Scalar<kDType>(wr, k) * x0[k];
      float* o = out + t * out_stride + n;
      *o = accumulate ? *o + s0 : s0;
    }
  }
}

}  // namespace

// out[t * out_stride + n] (+)= sum_k W[n, k] * in[t * in_stride + k] for t < tokens and
// row_begin <= n < row_end.
void RowsAvx2(float* out, int64_t out_stride, const float* in, int64_t in_stride, int64_t tokens,
              const WeightView& w, int64_t row_begin, int64_t row_end, bool accumulate) {
  if (w.dtype == DType::kF32) {
    Rows<DType::kF32>(out, out_stride, in, in_stride, tokens, w, row_begin, row_end, accumulate);
  } else {
    Rows<DType::kBF16>(out, out_stride, in, in_stride, tokens, w, row_begin, row_end, accumulate);
  }
}

}  // namespace loraplex::kernels::lora_internal
