// The portable inner loops: used on CPUs without AVX2 (and with LP_CPU_ISA=scalar). Written with
// several independent partial sums so that the compiler's baseline vectoriser (SSE2 on x86-64, NEON
// on arm64) can use them without -ffast-math.
#include <cmath>
#include <cstdint>

#include "common/half.h"
#include "kernels/cpu/cpu_ops.h"

namespace loraplex::kernels::cpu {
namespace {

inline float Widen(float v) { return v; }
inline float Widen(uint16_t v) { return Bf16ToF32(v); }

template <typename WT>
float DotT(const float* a, const WT* b, int64_t n) {
  float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) s[l] += a[i + l] * Widen(b[i + l]);
  float sum = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  for (; i < n; ++i) sum += a[i] * Widen(b[i]);
  return sum;
}

template <typename WT>
void GemmRange(float* y, const float* x, int64_t m, const WT* w, int64_t n, int64_t k,
               int64_t j_begin, int64_t j_end, bool accumulate) {
  // Weight row outer: each row is read from memory once and reused by every token from cache.
  for (int64_t j = j_begin; j < j_end; ++j) {
    for (int64_t i = 0; i < m; ++i) {
      float sum = DotT(x + i * k, w + j * k, k);
      y[i * n + j] = accumulate ? y[i * n + j] + sum : sum;
    }
  }
}

void GemmF32(float* y, const float* x, int64_t m, const float* w, int64_t n, int64_t k,
             int64_t j_begin, int64_t j_end, bool accumulate) {
  GemmRange(y, x, m, w, n, k, j_begin, j_end, accumulate);
}

void GemmBf16(float* y, const float* x, int64_t m, const uint16_t* w, int64_t n, int64_t k,
              int64_t j_begin, int64_t j_end, bool accumulate) {
  GemmRange(y, x, m, w, n, k, j_begin, j_end, accumulate);
}

float Dot(const float* a, const float* b, int64_t n) { return DotT(a, b, n); }

void Axpy(float* y, float alpha, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

void Scale(float* y, float alpha, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] *= alpha;
}

float ExpShiftSum(float* s, float shift, int64_t n) {
  float sum = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    s[i] = std::exp(s[i] - shift);
    sum += s[i];
  }
  return sum;
}

void AttnScores(float* scores, const float* q, const float* k, int64_t stride, int64_t count,
                int64_t dim, float scale) {
  for (int64_t c = 0; c < count; ++c) scores[c] = DotT(q, k + c * stride, dim) * scale;
}

void AttnAccumulate(float* out, const float* p, const float* v, int64_t stride, int64_t count,
                    int64_t dim) {
  for (int64_t c = 0; c < count; ++c) Axpy(out, p[c], v + c * stride, dim);
}

void AttnScoresF16(float* scores, const float* q, const uint16_t* k, int64_t stride, int64_t count,
                   int64_t dim, float scale) {
  for (int64_t c = 0; c < count; ++c) {
    const uint16_t* kc = k + c * stride;
    float acc = 0.0f;
    for (int64_t i = 0; i < dim; ++i) acc += q[i] * F16ToF32(kc[i]);
    scores[c] = acc * scale;
  }
}

void AttnAccumulateF16(float* out, const float* p, const uint16_t* v, int64_t stride, int64_t count,
                       int64_t dim) {
  for (int64_t c = 0; c < count; ++c) {
    const uint16_t* vc = v + c * stride;
    for (int64_t i = 0; i < dim; ++i) out[i] += p[c] * F16ToF32(vc[i]);
  }
}

void SiluMul(float* out, const float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

const CpuOps kScalarOps = {
    .name = "scalar",
    .gemm_f32 = GemmF32,
    .gemm_bf16 = GemmBf16,
    .dot = Dot,
    .axpy = Axpy,
    .scale = Scale,
    .exp_shift_sum = ExpShiftSum,
    .attn_scores = AttnScores,
    .attn_accumulate = AttnAccumulate,
    .attn_scores_f16 = AttnScoresF16,
    .attn_accumulate_f16 = AttnAccumulateF16,
    .silu_mul = SiluMul,
};

}  // namespace

const CpuOps& ScalarOps() { return kScalarOps; }

}  // namespace loraplex::kernels::cpu
