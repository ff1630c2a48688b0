// AVX2 + FMA (+ F16C) inner loops. This file alone is compiled with -mavx2 -mfma -mf16c (see
// kernels/CMakeLists.txt); its table is reached only after cpu_ops.cc has checked the CPU, so no
// AVX2 instruction runs on a machine without it.
#include "kernels/cpu/cpu_ops.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace loraplex::kernels::cpu {
namespace {

// ---- loads
// ---------------------------------------------------------------------------------------

inline __m256 Load8(const float* p) { return _mm256_loadu_ps(p); }

// Eight bf16 values widened to f32: bf16 is the top half of an f32, so zero-extend and shift.
inline __m256 Load8(const uint16_t* p) {
  __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline float Widen(float v) { return v; }
inline float Widen(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  __builtin_memcpy(&f, &bits, sizeof(f));
  return f;
}

inline float HorizontalSum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 8 lanes: Cephes' single-precision range reduction and degree-5 polynomial (about 2 ulp
// over the clamped range). Inputs below -88.38 give 0 (the reference gives a denormal there).
inline __m256 Exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-kExpPoly.clamp)),
                    _mm256_set1_ps(kExpPoly.clamp));
  __m256 fx = _mm256_fmadd_ps(x, _mm256_set1_ps(kExpPoly.log2e), _mm256_set1_ps(0.5f));
  fx = _mm256_floor_ps(fx);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kExpPoly.ln2_hi), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(kExpPoly.ln2_lo), x);
  __m256 y = _mm256_set1_ps(kExpPoly.p[0]);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpPoly.p[1]));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpPoly.p[2]));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpPoly.p[3]));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpPoly.p[4]));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(kExpPoly.p[5]));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  __m256i n = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
  return _mm256_mul_ps(y, _mm256_castsi256_ps(_mm256_slli_epi32(n, 23)));
}

// ---- GEMM
// ----------------------------------------------------------------------------------------
//
// The weight is [n, k] with k contiguous, as is x, so every output is a dot product along k. A tile
// computes MR tokens x NR output features at once: MR*NR accumulators (each 8 partial sums along k)
// share every x load NR times and every (widened) weight load MR times. 4x3 uses 12 accumulators +
// 3 weight registers + 1 x register = all 16 ymm registers. The partial sums are reduced once at
// the end of k, and the k % 8 tail is done in scalar.

template <int MR, int NR, typename WT>
void Tile(float* y, int64_t ldy, const float* x, const WT* w, int64_t k, bool accumulate) {
  __m256 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 8 <= k; c += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = Load8(w + r * k + c);
    for (int i = 0; i < MR; ++i) {
      __m256 xv = Load8(x + i * k + c);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm256_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int r = 0; r < NR; ++r) {
      float sum = HorizontalSum(acc[i][r]);
      for (int64_t t = c; t < k; ++t) sum += x[i * k + t] * Widen(w[r * k + t]);
      float* out = y + i * ldy + r;
      *out = accumulate ? *out + sum : sum;
    }
  }
}

template <typename WT>
using TileFn = void (*)(float*, int64_t, const float*, const WT*, int64_t, bool);

// fn[mr - 1][nr - 1] for mr, nr in 1..4: runtime tile sizes map to compile-time ones here only.
template <typename WT>
struct TileTable {
  TileFn<WT> fn[4][4] = {
      {Tile<1, 1, WT>, Tile<1, 2, WT>, Tile<1, 3, WT>, Tile<1, 4, WT>},
      {Tile<2, 1, WT>, Tile<2, 2, WT>, Tile<2, 3, WT>, Tile<2, 4, WT>},
      {Tile<3, 1, WT>, Tile<3, 2, WT>, Tile<3, 3, WT>, Tile<3, 4, WT>},
      {Tile<4, 1, WT>, Tile<4, 2, WT>, Tile<4, 3, WT>, Tile<4, 4, WT>},
  };
};

// Decode (one token): eight weight rows at a time, so eight independent FMA chains and eight
// streams of weight loads are in flight. For bf16, seven: GCC hoists all the widening loads ahead
// of the FMAs, and 8 accumulators + 8 widened rows + x is one register more than AVX2 has (it then
// kept an accumulator on the stack, a store/load round trip every step).
template <typename WT>
constexpr int kGemvRows = sizeof(WT) == sizeof(float) ? 8 : 7;

template <typename WT>
struct GemvTable {
  TileFn<WT> fn[8] = {Tile<1, 1, WT>, Tile<1, 2, WT>, Tile<1, 3, WT>, Tile<1, 4, WT>,
                      Tile<1, 5, WT>, Tile<1, 6, WT>, Tile<1, 7, WT>, Tile<1, 8, WT>};
};

template <typename WT>
void GemmRange(float* y, const float* x, int64_t m, const WT* w, int64_t n, int64_t k,
               int64_t j_begin, int64_t j_end, bool accumulate) {
  static const TileTable<WT> tiles;
  if (m == 1) {
    static const GemvTable<WT> gemv;
    for (int64_t j = j_begin; j < j_end; j += kGemvRows<WT>) {
      const int nr = static_cast<int>(std::min<int64_t>(kGemvRows<WT>, j_end - j));
      gemv.fn[nr - 1](y + j, n, x, w + j * k, k, accumulate);
    }
    return;
  }
  // A panel of weight rows (~128 KiB) stays in L2 while every token tile passes over it, so for
  // prefill the weights are read from memory once per call rather than once per 4 tokens.
  const int64_t panel =
      std::max<int64_t>(12, (128 * 1024 / std::max<int64_t>(1, k * sizeof(WT))) / 12 * 12);
  for (int64_t jp = j_begin; jp < j_end; jp += panel) {
    const int64_t jp_end = std::min(j_end, jp + panel);
    for (int64_t i = 0; i < m; i += 4) {
      const int mr = static_cast<int>(std::min<int64_t>(4, m - i));
      // 4 tokens: 4x3 fills the register file; fewer tokens leave room for 4 weight rows, except
      // 3x4 with bf16, where GCC's hoisted widening loads spill an accumulator (as in the GEMV).
      const int nr_max = (mr == 4 || (mr == 3 && sizeof(WT) != sizeof(float))) ? 3 : 4;
      for (int64_t j = jp; j < jp_end; j += nr_max) {
        const int nr = static_cast<int>(std::min<int64_t>(nr_max, jp_end - j));
        tiles.fn[mr - 1][nr - 1](y + i * n + j, n, x + i * k, w + j * k, k, accumulate);
      }
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

// ---- vector helpers
// ------------------------------------------------------------------------------

float Dot(const float* a, const float* b, int64_t n) {
  __m256 s0 = _mm256_setzero_ps();
  __m256 s1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    s0 = _mm256_fmadd_ps(Load8(a + i), Load8(b + i), s0);
    s1 = _mm256_fmadd_ps(Load8(a + i + 8), Load8(b + i + 8), s1);
  }
  for (; i + 8 <= n; i += 8) s0 = _mm256_fmadd_ps(Load8(a + i), Load8(b + i), s0);
  float sum = HorizontalSum(_mm256_add_ps(s0, s1));
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

void Axpy(float* y, float alpha, const float* x, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, Load8(x + i), Load8(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

void Scale(float* y, float alpha, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_mul_ps(a, Load8(y + i)));
  for (; i < n; ++i) y[i] *= alpha;
}

// The scalar tails go through an 8-lane buffer so that every element uses the same exp.
float ExpShiftSum(float* s, float shift, int64_t n) {
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 sum = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 e = Exp8(_mm256_sub_ps(Load8(s + i), sh));
    _mm256_storeu_ps(s + i, e);
    sum = _mm256_add_ps(sum, e);
  }
  float total = HorizontalSum(sum);
  if (i < n) {
    alignas(32) float buf[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t t = i; t < n; ++t) buf[t - i] = s[t];
    __m256 e = Exp8(_mm256_sub_ps(_mm256_load_ps(buf), sh));
    _mm256_store_ps(buf, e);
    for (int64_t t = i; t < n; ++t) {
      s[t] = buf[t - i];
      total += buf[t - i];
    }
  }
  return total;
}

// K and V rows: f32, or f16 bits (KvHalf, widened with vcvtph2ps; a type of its own, since a
// uint16_t row elsewhere in this file is bf16).
struct KvHalf {
  uint16_t bits;
};
inline __m256 LoadKv8(const float* p) { return Load8(p); }
inline __m256 LoadKv8(const KvHalf* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float KvValue(float v) { return v; }
inline float KvValue(KvHalf h) { return _cvtsh_ss(h.bits); }

// Four positions at a time: four dot products share the q loads and are reduced together (two
// rounds of hadd) into one 4-wide store, so a position costs no separate horizontal sum.
template <typename T>
void AttnScoresT(float* scores, const float* q, const T* k, int64_t stride, int64_t count,
                 int64_t dim, float scale) {
  const int64_t dim8 = dim / 8 * 8;
  int64_t c = 0;
  for (; c + 4 <= count; c += 4) {
    const T* k0 = k + c * stride;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t i = 0; i < dim8; i += 8) {
      const __m256 qv = Load8(q + i);
      a0 = _mm256_fmadd_ps(qv, LoadKv8(k0 + i), a0);
      a1 = _mm256_fmadd_ps(qv, LoadKv8(k0 + stride + i), a1);
      a2 = _mm256_fmadd_ps(qv, LoadKv8(k0 + 2 * stride + i), a2);
      a3 = _mm256_fmadd_ps(qv, LoadKv8(k0 + 3 * stride + i), a3);
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    alignas(16) float out[4];
    _mm_store_ps(out, sums);
    for (int j = 0; j < 4; ++j) {
      for (int64_t i = dim8; i < dim; ++i) out[j] += q[i] * KvValue(k0[j * stride + i]);
      scores[c + j] = out[j] * scale;
    }
  }
  for (; c < count; ++c) {
    const T* kc = k + c * stride;
    if constexpr (std::is_same_v<T, float>) {
      scores[c] = Dot(q, kc, dim) * scale;
    } else {
      float acc = 0.0f;
      for (int64_t i = 0; i < dim; ++i) acc += q[i] * KvValue(kc[i]);
      scores[c] = acc * scale;
    }
  }
}

// 32 dims at a time in four accumulators, each value row's weight broadcast once for all four:
// one accumulator per 8 dims over all `count` rows was a chain of dependent FMAs, latency-bound.
template <typename T>
void AttnAccumulateT(float* out, const float* p, const T* v, int64_t stride, int64_t count,
                     int64_t dim) {
  const int64_t dim32 = dim / 32 * 32;
  for (int64_t i = 0; i < dim32; i += 32) {
    __m256 acc[4];
    for (int j = 0; j < 4; ++j) acc[j] = Load8(out + i + 8 * j);
    for (int64_t c = 0; c < count; ++c) {
      const __m256 pc = _mm256_set1_ps(p[c]);
      const T* vc = v + c * stride + i;
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(pc, LoadKv8(vc + 8 * j), acc[j]);
    }
    for (int j = 0; j < 4; ++j) _mm256_storeu_ps(out + i + 8 * j, acc[j]);
  }
  const int64_t dim8 = dim / 8 * 8;
  for (int64_t i = dim32; i < dim8; i += 8) {
    __m256 acc = Load8(out + i);
    for (int64_t c = 0; c < count; ++c) {
      acc = _mm256_fmadd_ps(_mm256_set1_ps(p[c]), LoadKv8(v + c * stride + i), acc);
    }
    _mm256_storeu_ps(out + i, acc);
  }
  for (int64_t i = dim8; i < dim; ++i) {
    float acc = out[i];
    for (int64_t c = 0; c < count; ++c) acc += p[c] * KvValue(v[c * stride + i]);
    out[i] = acc;
  }
}

void AttnScores(float* scores, const float* q, const float* k, int64_t stride, int64_t count,
                int64_t dim, float scale) {
  AttnScoresT(scores, q, k, stride, count, dim, scale);
}
void AttnAccumulate(float* out, const float* p, const float* v, int64_t stride, int64_t count,
                    int64_t dim) {
  AttnAccumulateT(out, p, v, stride, count, dim);
}
void AttnScoresF16(float* scores, const float* q, const uint16_t* k, int64_t stride, int64_t count,
                   int64_t dim, float scale) {
  AttnScoresT(scores, q, reinterpret_cast<const KvHalf*>(k), stride, count, dim, scale);
}
void AttnAccumulateF16(float* out, const float* p, const uint16_t* v, int64_t stride, int64_t count,
                       int64_t dim) {
  AttnAccumulateT(out, p, reinterpret_cast<const KvHalf*>(v), stride, count, dim);
}

inline __m256 SiluMul8(__m256 g, __m256 u) {
  __m256 e = Exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
  return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}

void SiluMul(float* out, const float* gate, const float* up, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, SiluMul8(Load8(gate + i), Load8(up + i)));
  if (i < n) {
    alignas(32) float g[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    alignas(32) float u[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t t = i; t < n; ++t) {
      g[t - i] = gate[t];
      u[t - i] = up[t];
    }
    _mm256_store_ps(g, SiluMul8(_mm256_load_ps(g), _mm256_load_ps(u)));
    for (int64_t t = i; t < n; ++t) out[t] = g[t - i];
  }
}

const CpuOps kAvx2Ops = {
    .name = "avx2",
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

const CpuOps* Avx2Ops() { return &kAvx2Ops; }

}  // namespace loraplex::kernels::cpu

#else  // not an x86 build with the AVX2 flags (see kernels/CMakeLists.txt)

namespace loraplex::kernels::cpu {
const CpuOps* Avx2Ops() { return nullptr; }
}  // namespace loraplex::kernels::cpu

#endif
