// The portable quantized-GEMM loops (CPUs without AVX2, and LP_CPU_ISA=scalar): one weight block
// at a time against the natural activation layout (quant_layout.h), integer dot products in plain
// loops that the baseline vectoriser can widen, f32 sums per block. Also the readable statement
// of what the SIMD tables compute (quant_ops.h); here the weight codes keep their sign (q - 8,
// q8, q - 32) instead of the SIMD tables' unsigned codes plus a correction term, which gives the
// same integers.
#include <cmath>
#include <cstdint>

#include "kernels/cpu/quant_layout.h"
#include "kernels/cpu/quant_ops.h"
#include "kernels/quant.h"

namespace loraplex::kernels::cpu {
namespace {

int64_t ActRowBytes(DType t, int64_t k) { return NaturalLayoutOf(t, k).row_bytes; }

// Quantizes n values (one activation block) with the shared scale rule; returns the sum of q.
int32_t QuantizeBlock(const float* x, int64_t n, int8_t* q, float* d) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::max(amax, std::fabs(x[i]));
  const ActScale s = ActScaleOf(amax);
  *d = s.d;
  int32_t sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    q[i] = static_cast<int8_t>(std::nearbyint(x[i] * s.inv));
    sum += q[i];
  }
  return sum;
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
        QuantizeBlock(xi + b * kQK, kQK, qa + b * kQK, &da[b]);
        for (int64_t s = 0; s < kQK / kSums; ++s) {
          int32_t sum = 0;
          for (int64_t e = 0; e < kSums; ++e) sum += qa[b * kQK + s * kSums + e];
          bsums[b * (kQK / kSums) + s] = static_cast<int16_t>(sum);
        }
      }
    } else {
      float* sa = reinterpret_cast<float*>(row + l.extra_offset);
      for (int64_t b = 0; b < k / kQ32; ++b) {
        const int32_t sum = QuantizeBlock(xi + b * kQ32, kQ32, qa + b * kQ32, &da[b]);
        sa[b] = da[b] * static_cast<float>(sum);
      }
    }
  }
}

// ---- one weight row . one activation row, per format
// The 32-value formats: sum_b (dw * da) * isum (+ m * sa for Q4_1).

float DotQ8_0(const uint8_t* w, const uint8_t* xa, const NaturalLayout& l, int64_t k) {
  const int8_t* qa = reinterpret_cast<const int8_t*>(xa);
  const float* da = reinterpret_cast<const float*>(xa + l.scale_offset);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQ32; ++b, w += 34) {
    const int8_t* qw = reinterpret_cast<const int8_t*>(w + 2);
    int32_t isum = 0;
    for (int e = 0; e < 32; ++e) isum += qw[e] * qa[b * kQ32 + e];
    sum += LoadF16(w) * da[b] * static_cast<float>(isum);
  }
  return sum;
}

float DotQ4_0(const uint8_t* w, const uint8_t* xa, const NaturalLayout& l, int64_t k) {
  const int8_t* qa = reinterpret_cast<const int8_t*>(xa);
  const float* da = reinterpret_cast<const float*>(xa + l.scale_offset);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQ32; ++b, w += 18) {
    const uint8_t* qs = w + 2;
    const int8_t* a = qa + b * kQ32;
    int32_t isum = 0;
    for (int e = 0; e < 16; ++e) {
      isum += ((qs[e] & 0x0F) - 8) * a[e] + ((qs[e] >> 4) - 8) * a[e + 16];
    }
    sum += LoadF16(w) * da[b] * static_cast<float>(isum);
  }
  return sum;
}

float DotQ4_1(const uint8_t* w, const uint8_t* xa, const NaturalLayout& l, int64_t k) {
  const int8_t* qa = reinterpret_cast<const int8_t*>(xa);
  const float* da = reinterpret_cast<const float*>(xa + l.scale_offset);
  const float* sa = reinterpret_cast<const float*>(xa + l.extra_offset);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQ32; ++b, w += 20) {
    const uint8_t* qs = w + 4;
    const int8_t* a = qa + b * kQ32;
    int32_t isum = 0;
    for (int e = 0; e < 16; ++e) isum += (qs[e] & 0x0F) * a[e] + (qs[e] >> 4) * a[e + 16];
    sum += LoadF16(w) * da[b] * static_cast<float>(isum) + LoadF16(w + 2) * sa[b];
  }
  return sum;
}

// Q4_K / Q5_K (qh_offset 0 for Q4_K): per super-block d da sum_s sc isum_s - dmin da sum_s mn
// asum_s.
template <bool kFifthBit>
float DotK4or5(const uint8_t* w, const uint8_t* xa, const NaturalLayout& l, int64_t k) {
  constexpr int64_t kBytes = kFifthBit ? 176 : 144;
  const int8_t* qa = reinterpret_cast<const int8_t*>(xa);
  const float* da = reinterpret_cast<const float*>(xa + l.scale_offset);
  const int16_t* bsums = reinterpret_cast<const int16_t*>(xa + l.extra_offset);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQK; ++b, w += kBytes) {
    uint8_t sc[8], mn[8];
    UnpackScalesMins(w + 4, sc, mn);
    const uint8_t* qh = w + 16;
    const uint8_t* qs = w + (kFifthBit ? 48 : 16);
    const int8_t* a = qa + b * kQK;
    const int16_t* bs = bsums + b * (kQK / kSums);
    int32_t sumi = 0, summ = 0;
    for (int s = 0; s < 8; ++s) {
      const uint8_t* q = qs + 32 * (s / 2);
      const int shift = 4 * (s % 2);
      int32_t isum = 0;
      for (int e = 0; e < 32; ++e) {
        int v = (q[e] >> shift) & 0x0F;
        if (kFifthBit) v |= ((qh[e] >> s) & 1) << 4;
        isum += v * a[32 * s + e];
      }
      sumi += sc[s] * isum;
      summ += mn[s] * (bs[2 * s] + bs[2 * s + 1]);
    }
    sum += LoadF16(w) * da[b] * static_cast<float>(sumi) -
           LoadF16(w + 2) * da[b] * static_cast<float>(summ);
  }
  return sum;
}

float DotQ6_K(const uint8_t* w, const uint8_t* xa, const NaturalLayout& l, int64_t k) {
  const int8_t* qa = reinterpret_cast<const int8_t*>(xa);
  const float* da = reinterpret_cast<const float*>(xa + l.scale_offset);
  float sum = 0.0f;
  for (int64_t b = 0; b < k / kQK; ++b, w += 210) {
    const uint8_t* ql = w;
    const uint8_t* qh = w + 128;
    const int8_t* scales = reinterpret_cast<const int8_t*>(w + 192);
    const int8_t* a = qa + b * kQK;
    int32_t isum[16] = {};
    for (int h = 0; h < 2; ++h) {
      for (int c = 0; c < 4; ++c) {
        for (int e = 0; e < 32; ++e) {
          const uint8_t low = ql[64 * h + 32 * (c % 2) + e];
          const int lo4 = c < 2 ? (low & 0x0F) : (low >> 4);
          const int hi2 = (qh[32 * h + e] >> (2 * c)) & 3;
          const int idx = 128 * h + 32 * c + e;
          isum[idx / 16] += ((lo4 | (hi2 << 4)) - 32) * a[idx];
        }
      }
    }
    int32_t sumi = 0;
    for (int s = 0; s < 16; ++s) sumi += scales[s] * isum[s];
    sum += LoadF16(w + 208) * da[b] * static_cast<float>(sumi);
  }
  return sum;
}

using DotFn = float (*)(const uint8_t*, const uint8_t*, const NaturalLayout&, int64_t);

DotFn DotOf(DType t) {
  switch (t) {
    case DType::kQ8_0:
      return DotQ8_0;
    case DType::kQ4_0:
      return DotQ4_0;
    case DType::kQ4_1:
      return DotQ4_1;
    case DType::kQ4_K:
      return DotK4or5<false>;
    case DType::kQ5_K:
      return DotK4or5<true>;
    case DType::kQ6_K:
      return DotQ6_K;
    case DType::kF32:
    case DType::kBF16:
      break;
  }
  return nullptr;
}

void Gemm(DType t, float* y, const uint8_t* xq, int64_t m, const uint8_t* w, int64_t n, int64_t k,
          int64_t j_begin, int64_t j_end, bool accumulate) {
  const NaturalLayout l = NaturalLayoutOf(t, k);
  const int64_t rb = RowBytes(t, k);
  const DotFn dot = DotOf(t);
  // Weight row outer: each row is read from memory once and reused by every token from cache.
  for (int64_t j = j_begin; j < j_end; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      const float sum = dot(w + j * rb, xq + i * l.row_bytes, l, k);
      y[i * n + j] = accumulate ? y[i * n + j] + sum : sum;
    }
  }
}

const QuantOps kScalarQuantOps = {
    .name = "scalar",
    .act_row_bytes = ActRowBytes,
    .quantize_act = QuantizeAct,
    .gemm = Gemm,
};

}  // namespace

const QuantOps& ScalarQuantOps() { return kScalarQuantOps; }

}  // namespace loraplex::kernels::cpu
