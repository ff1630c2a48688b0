// AVX-512 (F, BW, VL, DQ) + FMA + F16C inner loops: the same numerics as the AVX2 table (bf16
// weights widened to f32, f32 FMA, f32 sums), 16 lanes wide and with 32 vector registers. This file
// alone is compiled with the AVX-512 flags (see kernels/CMakeLists.txt); its table is reached only
// after cpu_ops.cc has checked the CPU (and that the OS saves the zmm state), so no AVX-512
// instruction runs on a machine without it.
//
// What AVX-512 changes beyond the width: masked loads and stores replace every scalar tail (a
// masked-off lane reads nothing and contributes a zero), the register file holds 24 accumulators
// per GEMM tile instead of 12, and gathers/scatters make a prefill tile with tokens in the lanes
// cheap to feed (see "prefill GEMM" below).
//
// Why no vdpbf16ps (AVX512-BF16) variant of gemm_bf16: activations are f32 (DESIGN.md section 3),
// so x must be split into bf16 parts; hi+lo gave 2.5-4x the error of the f32 loops against
// ref::Gemm and hi+mid+lo matched it, but on a Xeon with AVX512-BF16 both were slower than the
// FMA dot-product tiles below (2.3-2.6x and 2.9-3.9x the time at 128 tokens): there the
// instruction has half the FMA throughput, and each FMA it replaces costs two or three of them.
#include "kernels/cpu/cpu_ops.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__FMA__)
#include <immintrin.h>

// GCC 12's AVX-512 headers start many intrinsics (_mm512_max_ps, _mm512_extractf64x4_pd, ...) from
// _mm512_undefined_*(), which its -Wuninitialized then reports at every inlined use (GCC bug
// 105593, fixed in GCC 13). Nothing here reads an uninitialized value.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace loraplex::kernels::cpu {
namespace {

// The tile bodies must inline into their loops, or the accumulators live in memory.
#define LP_AVX512_INLINE inline __attribute__((always_inline))

// Lanes [0, n) of 16, n in [0, 16].
LP_AVX512_INLINE __mmask16 FirstLanes(int64_t n) {
  return static_cast<__mmask16>((1u << static_cast<unsigned>(n)) - 1u);
}

// ---- loads
// ---------------------------------------------------------------------------------------

LP_AVX512_INLINE __m512 Load16(const float* p) { return _mm512_loadu_ps(p); }
LP_AVX512_INLINE __m512 Load16(const float* p, __mmask16 lanes) {
  return _mm512_maskz_loadu_ps(lanes, p);
}

// Sixteen bf16 values widened to f32: bf16 is the top half of an f32, so zero-extend and shift.
LP_AVX512_INLINE __m512 Widen16(__m256i raw) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
LP_AVX512_INLINE __m512 Load16(const uint16_t* p) {
  return Widen16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
LP_AVX512_INLINE __m512 Load16(const uint16_t* p, __mmask16 lanes) {
  return Widen16(_mm256_maskz_loadu_epi16(lanes, p));
}

// ---- reductions
// ----------------------------------------------------------------------------------

LP_AVX512_INLINE __m256 Fold(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// Lane i = the sum of the 16 lanes of a[i], for 8 accumulators at once: each is folded to 8 lanes,
// then one hadd tree (3 levels) and a cross-half add reduce all eight together, about 3 operations
// per sum instead of the ~8 of a separate horizontal sum each.
LP_AVX512_INLINE __m256 Reduce8(const __m512* a) {
  __m256 f[8];
  for (int i = 0; i < 8; ++i) f[i] = Fold(a[i]);
  const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(f[0], f[1]), _mm256_hadd_ps(f[2], f[3]));
  const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(f[4], f[5]), _mm256_hadd_ps(f[6], f[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

LP_AVX512_INLINE float HorizontalSum(__m512 v) {
  __m256 h = Fold(v);
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// exp(x) for 16 lanes: the AVX2 table's Cephes range reduction and degree-5 polynomial (about 2
// ulp over the clamped range), so both tables give the same softmax to within rounding. Inputs
// below -88.38 give 0 (the reference gives a denormal there).
LP_AVX512_INLINE __m512 Exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-kExpPoly.clamp)),
                    _mm512_set1_ps(kExpPoly.clamp));
  __m512 fx = _mm512_fmadd_ps(x, _mm512_set1_ps(kExpPoly.log2e), _mm512_set1_ps(0.5f));
  fx = _mm512_roundscale_ps(fx, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kExpPoly.ln2_hi), x);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(kExpPoly.ln2_lo), x);
  __m512 y = _mm512_set1_ps(kExpPoly.p[0]);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpPoly.p[1]));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpPoly.p[2]));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpPoly.p[3]));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpPoly.p[4]));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(kExpPoly.p[5]));
  y = _mm512_fmadd_ps(y, _mm512_mul_ps(x, x), _mm512_add_ps(x, _mm512_set1_ps(1.0f)));
  __m512i n = _mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127));
  return _mm512_mul_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(n, 23)));
}

// ---- GEMM
// ----------------------------------------------------------------------------------------
//
// As in the AVX2 table, every output is a dot product along k (x and w both have k contiguous).
// A tile computes MR tokens x NR output features: MR*NR accumulators of 16 partial sums share every
// x load NR times and every widened weight load MR times. The k % 16 tail is one more step with
// masked loads. At the end, each token's NR accumulators are reduced together (Reduce8) into NR
// contiguous outputs, written with one masked store.

template <int MR, int NR, typename WT>
void Tile(float* y, int64_t ldy, const float* x, const WT* w, int64_t k, bool accumulate) {
  static_assert(NR <= 8, "Reduce8 serves at most 8 outputs per token");
  __m512 acc[MR][8];
  for (int i = 0; i < MR; ++i)
    for (int r = 0; r < 8; ++r) acc[i][r] = _mm512_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= k; c += 16) {
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = Load16(w + r * k + c);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = Load16(x + i * k + c);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  if (c < k) {
    const __mmask16 lanes = FirstLanes(k - c);
    __m512 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = Load16(w + r * k + c, lanes);
    for (int i = 0; i < MR; ++i) {
      const __m512 xv = Load16(x + i * k + c, lanes);
      for (int r = 0; r < NR; ++r) acc[i][r] = _mm512_fmadd_ps(xv, wv[r], acc[i][r]);
    }
  }
  const __mmask8 outs = static_cast<__mmask8>((1u << NR) - 1u);
  for (int i = 0; i < MR; ++i) {
    __m256 sums = Reduce8(acc[i]);
    float* out = y + i * ldy;
    if (accumulate) sums = _mm256_add_ps(sums, _mm256_maskz_loadu_ps(outs, out));
    _mm256_mask_storeu_ps(out, outs, sums);
  }
}

template <typename WT>
using TileFn = void (*)(float*, int64_t, const float*, const WT*, int64_t, bool);

// The largest tile: 4 tokens x 6 features = 24 accumulators + 6 weight registers + 1 x register
// of the 32. Decode (one token) takes 8 weight rows at a time: 8 independent FMA chains and 8
// streams of weight loads in flight, and one Reduce8 for all of them.
constexpr int kMaxMr = 4;
constexpr int kMaxNr = 6;
constexpr int kGemvRows = 8;

// fn[mr - 1][nr - 1]: runtime tile sizes map to compile-time ones here only.
template <typename WT>
struct TileTable {
  TileFn<WT> fn[kMaxMr][kMaxNr] = {
      {Tile<1, 1, WT>, Tile<1, 2, WT>, Tile<1, 3, WT>, Tile<1, 4, WT>, Tile<1, 5, WT>,
       Tile<1, 6, WT>},
      {Tile<2, 1, WT>, Tile<2, 2, WT>, Tile<2, 3, WT>, Tile<2, 4, WT>, Tile<2, 5, WT>,
       Tile<2, 6, WT>},
      {Tile<3, 1, WT>, Tile<3, 2, WT>, Tile<3, 3, WT>, Tile<3, 4, WT>, Tile<3, 5, WT>,
       Tile<3, 6, WT>},
      {Tile<4, 1, WT>, Tile<4, 2, WT>, Tile<4, 3, WT>, Tile<4, 4, WT>, Tile<4, 5, WT>,
       Tile<4, 6, WT>},
  };
};

template <typename WT>
struct GemvTable {
  TileFn<WT> fn[kGemvRows] = {Tile<1, 1, WT>, Tile<1, 2, WT>, Tile<1, 3, WT>, Tile<1, 4, WT>,
                              Tile<1, 5, WT>, Tile<1, 6, WT>, Tile<1, 7, WT>, Tile<1, 8, WT>};
};

template <typename WT>
void GemmRange(float* y, const float* x, int64_t m, const WT* w, int64_t n, int64_t k,
               int64_t j_begin, int64_t j_end, bool accumulate) {
  static const TileTable<WT> tiles;
  if (m == 1) {
    static const GemvTable<WT> gemv;
    for (int64_t j = j_begin; j < j_end; j += kGemvRows) {
      const int nr = static_cast<int>(std::min<int64_t>(kGemvRows, j_end - j));
      gemv.fn[nr - 1](y + j, n, x, w + j * k, k, accumulate);
    }
    return;
  }
  // A panel of weight rows (~128 KiB) stays in L2 while every token tile passes over it, so for
  // prefill the weights are read from memory once per call rather than once per 4 tokens.
  const int64_t panel = std::max<int64_t>(
      kMaxNr, (128 * 1024 / std::max<int64_t>(1, k * sizeof(WT))) / kMaxNr * kMaxNr);
  for (int64_t jp = j_begin; jp < j_end; jp += panel) {
    const int64_t jp_end = std::min(j_end, jp + panel);
    for (int64_t i = 0; i < m; i += kMaxMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMaxMr, m - i));
      for (int64_t j = jp; j < jp_end; j += kMaxNr) {
        const int nr = static_cast<int>(std::min<int64_t>(kMaxNr, jp_end - j));
        tiles.fn[mr - 1][nr - 1](y + i * n + j, n, x + i * k, w + j * k, k, accumulate);
      }
    }
  }
}

// ---- prefill GEMM: tokens in the lanes
//
// From kBcastMinTokens tokens on, the lanes hold 16 tokens instead of 16 steps of k: x is
// transposed once per call into xt[k][tokens] (gathers, m*k elements, small beside the m*n*k
// multiply-adds), and a tile of 32 tokens x 12 output features keeps 24 accumulators, each one FMA
// chain along k for 16 outputs: every step broadcasts one weight per feature and loads two
// 16-token vectors of xt. There is no horizontal reduction at all (the dot-product tiles reduce
// 24 accumulators per tile), and the outputs, which are columns of y, go out with one masked
// scatter per 16 tokens at the end of k. bf16 weights are widened a panel at a time into a
// per-thread buffer (exact, so the same bits as widening in the tile), since a scalar bf16
// broadcast costs three operations per weight. Measured on one Xeon core: 0.55-0.93x the time of
// the dot-product tiles at 32-128 tokens (docs/benchmarks.md); below 32 tokens it was slower.
constexpr int kBcastRows = 12;
constexpr int64_t kBcastTokens = 32;  // two vectors of tokens per tile
constexpr int64_t kBcastMinTokens = 32;

template <int NR>
void BcastTile(float* y, int64_t n, const float* xt, int64_t ldxt, const float* w, int64_t k,
               int64_t valid, bool accumulate) {
  __m512 acc[NR][2];
  for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  for (int64_t c = 0; c < k; ++c) {
    const __m512 x0 = _mm512_loadu_ps(xt + c * ldxt);
    const __m512 x1 = _mm512_loadu_ps(xt + c * ldxt + 16);
    for (int r = 0; r < NR; ++r) {
      const __m512 b = _mm512_set1_ps(w[r * k + c]);
      acc[r][0] = _mm512_fmadd_ps(b, x0, acc[r][0]);
      acc[r][1] = _mm512_fmadd_ps(b, x1, acc[r][1]);
    }
  }
  // Token t of the tile is row t of y: offsets t * n (BcastUsable keeps 32 * n within int32).
  const __m512i lo_rows =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int>(n)));
  const __m512i hi_rows = _mm512_add_epi32(lo_rows, _mm512_set1_epi32(static_cast<int>(16 * n)));
  const __mmask16 lo = FirstLanes(std::min<int64_t>(16, valid));
  const __mmask16 hi = FirstLanes(std::clamp<int64_t>(valid - 16, 0, 16));
  for (int r = 0; r < NR; ++r) {
    __m512 a0 = acc[r][0], a1 = acc[r][1];
    if (accumulate) {
      a0 = _mm512_add_ps(a0, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lo, lo_rows, y + r, 4));
      a1 = _mm512_add_ps(a1, _mm512_mask_i32gather_ps(_mm512_setzero_ps(), hi, hi_rows, y + r, 4));
    }
    _mm512_mask_i32scatter_ps(y + r, lo, lo_rows, a0, 4);
    _mm512_mask_i32scatter_ps(y + r, hi, hi_rows, a1, 4);
  }
}

using BcastFn = void (*)(float*, int64_t, const float*, int64_t, const float*, int64_t, int64_t,
                         bool);
struct BcastTable {
  BcastFn fn[kBcastRows] = {BcastTile<1>, BcastTile<2>,  BcastTile<3>,  BcastTile<4>,
                            BcastTile<5>, BcastTile<6>,  BcastTile<7>,  BcastTile<8>,
                            BcastTile<9>, BcastTile<10>, BcastTile<11>, BcastTile<12>};
};

// Gather/scatter offsets are int32: token rows of a tile lie up to 31 * n floats apart, and a
// gather reads x rows up to 15 * k floats apart.
bool BcastUsable(int64_t m, int64_t n, int64_t k) {
  return m >= kBcastMinTokens && n < (int64_t{1} << 26) && k < (int64_t{1} << 27);
}

// xt[c * mp + i] = x[i * k + c] for i < m, 0 for m <= i < mp.
void TransposeTokens(float* xt, int64_t mp, const float* x, int64_t m, int64_t k) {
  const __m512i token_rows =
      _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                         _mm512_set1_epi32(static_cast<int>(k)));
  for (int64_t i = 0; i < mp; i += 16) {
    const __mmask16 lanes = FirstLanes(std::clamp<int64_t>(m - i, 0, 16));
    const float* xi = x + i * k;
    for (int64_t c = 0; c < k; ++c) {
      _mm512_storeu_ps(xt + c * mp + i,
                       _mm512_mask_i32gather_ps(_mm512_setzero_ps(), lanes, token_rows, xi + c, 4));
    }
  }
}

template <typename WT>
void BcastGemm(float* y, const float* x, int64_t m, const WT* w, int64_t n, int64_t k,
               int64_t j_begin, int64_t j_end, bool accumulate) {
  static const BcastTable table;
  const int64_t mp = (m + kBcastTokens - 1) / kBcastTokens * kBcastTokens;
  thread_local std::vector<float> xt;
  xt.resize(static_cast<size_t>(mp * k));
  TransposeTokens(xt.data(), mp, x, m, k);
  // A panel of weight rows (~256 KiB as f32) stays in L2 while every token tile passes over it.
  const int64_t panel = std::max<int64_t>(
      kBcastRows, (256 * 1024 / std::max<int64_t>(1, k * 4)) / kBcastRows * kBcastRows);
  thread_local std::vector<float> wide;
  for (int64_t jp = j_begin; jp < j_end; jp += panel) {
    const int64_t jp_end = std::min(j_end, jp + panel);
    const float* rows;  // rows jp..jp_end-1 as f32
    if constexpr (sizeof(WT) == sizeof(float)) {
      rows = w + jp * k;
    } else {
      const int64_t count = (jp_end - jp) * k;  // the panel's rows are contiguous
      wide.resize(static_cast<size_t>(count));
      for (int64_t e = 0; e < count; e += 16) {
        const __mmask16 lanes = FirstLanes(std::min<int64_t>(16, count - e));
        _mm512_mask_storeu_ps(wide.data() + e, lanes, Load16(w + jp * k + e, lanes));
      }
      rows = wide.data();
    }
    for (int64_t i = 0; i < m; i += kBcastTokens) {
      for (int64_t j = jp; j < jp_end; j += kBcastRows) {
        const int nr = static_cast<int>(std::min<int64_t>(kBcastRows, jp_end - j));
        table.fn[nr - 1](y + i * n + j, n, xt.data() + i, mp, rows + (j - jp) * k, k, m - i,
                         accumulate);
      }
    }
  }
}

void GemmF32(float* y, const float* x, int64_t m, const float* w, int64_t n, int64_t k,
             int64_t j_begin, int64_t j_end, bool accumulate) {
  if (BcastUsable(m, n, k)) return BcastGemm(y, x, m, w, n, k, j_begin, j_end, accumulate);
  GemmRange(y, x, m, w, n, k, j_begin, j_end, accumulate);
}

void GemmBf16(float* y, const float* x, int64_t m, const uint16_t* w, int64_t n, int64_t k,
              int64_t j_begin, int64_t j_end, bool accumulate) {
  if (BcastUsable(m, n, k)) return BcastGemm(y, x, m, w, n, k, j_begin, j_end, accumulate);
  GemmRange(y, x, m, w, n, k, j_begin, j_end, accumulate);
}

// ---- vector helpers
// ------------------------------------------------------------------------------

float Dot(const float* a, const float* b, int64_t n) {
  __m512 s0 = _mm512_setzero_ps();
  __m512 s1 = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 32 <= n; i += 32) {
    s0 = _mm512_fmadd_ps(Load16(a + i), Load16(b + i), s0);
    s1 = _mm512_fmadd_ps(Load16(a + i + 16), Load16(b + i + 16), s1);
  }
  for (; i < n; i += 16) {
    const __mmask16 lanes = FirstLanes(std::min<int64_t>(16, n - i));
    s0 = _mm512_fmadd_ps(Load16(a + i, lanes), Load16(b + i, lanes), s0);
  }
  return HorizontalSum(_mm512_add_ps(s0, s1));
}

void Axpy(float* y, float alpha, const float* x, int64_t n) {
  const __m512 a = _mm512_set1_ps(alpha);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = FirstLanes(std::min<int64_t>(16, n - i));
    _mm512_mask_storeu_ps(y + i, lanes,
                          _mm512_fmadd_ps(a, Load16(x + i, lanes), Load16(y + i, lanes)));
  }
}

void Scale(float* y, float alpha, int64_t n) {
  const __m512 a = _mm512_set1_ps(alpha);
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = FirstLanes(std::min<int64_t>(16, n - i));
    _mm512_mask_storeu_ps(y + i, lanes, _mm512_mul_ps(a, Load16(y + i, lanes)));
  }
}

float ExpShiftSum(float* s, float shift, int64_t n) {
  const __m512 sh = _mm512_set1_ps(shift);
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = FirstLanes(std::min<int64_t>(16, n - i));
    const __m512 e = Exp16(_mm512_sub_ps(Load16(s + i, lanes), sh));
    _mm512_mask_storeu_ps(s + i, lanes, e);
    sum = _mm512_mask_add_ps(sum, lanes, sum, e);
  }
  return HorizontalSum(sum);
}

// K and V rows: f32, or f16 bits (KvHalf, widened with vcvtph2ps; a type of its own, since a
// uint16_t row elsewhere in this file is bf16).
struct KvHalf {
  uint16_t bits;
};
LP_AVX512_INLINE __m512 LoadKv16(const float* p, __mmask16 lanes) { return Load16(p, lanes); }
LP_AVX512_INLINE __m512 LoadKv16(const KvHalf* p, __mmask16 lanes) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, p));
}
LP_AVX512_INLINE float KvValue(float v) { return v; }
LP_AVX512_INLINE float KvValue(KvHalf h) { return _cvtsh_ss(h.bits); }

// Eight positions at a time: eight dot products share the q loads and are reduced together
// (Reduce8) into one 8-wide store.
template <typename T>
void AttnScoresT(float* scores, const float* q, const T* k, int64_t stride, int64_t count,
                 int64_t dim, float scale) {
  const __m256 sc = _mm256_set1_ps(scale);
  int64_t c = 0;
  for (; c + 8 <= count; c += 8) {
    const T* k0 = k + c * stride;
    __m512 acc[8];
    for (int j = 0; j < 8; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < dim; i += 16) {
      const __mmask16 lanes = FirstLanes(std::min<int64_t>(16, dim - i));
      const __m512 qv = Load16(q + i, lanes);
      for (int j = 0; j < 8; ++j) {
        acc[j] = _mm512_fmadd_ps(qv, LoadKv16(k0 + j * stride + i, lanes), acc[j]);
      }
    }
    _mm256_storeu_ps(scores + c, _mm256_mul_ps(Reduce8(acc), sc));
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

// 64 dims at a time in four accumulators, each value row's weight broadcast once for all four:
// one accumulator per 16 dims over all `count` rows was a chain of dependent FMAs, latency-bound.
template <typename T>
void AttnAccumulateT(float* out, const float* p, const T* v, int64_t stride, int64_t count,
                     int64_t dim) {
  for (int64_t i = 0; i < dim; i += 64) {
    __mmask16 lanes[4];
    __m512 acc[4];
    for (int j = 0; j < 4; ++j) {
      lanes[j] = FirstLanes(std::clamp<int64_t>(dim - i - 16 * j, 0, 16));
      acc[j] = Load16(out + i + 16 * j, lanes[j]);
    }
    for (int64_t c = 0; c < count; ++c) {
      const __m512 pc = _mm512_set1_ps(p[c]);
      const T* vc = v + c * stride + i;
      for (int j = 0; j < 4; ++j) {
        acc[j] = _mm512_fmadd_ps(pc, LoadKv16(vc + 16 * j, lanes[j]), acc[j]);
      }
    }
    for (int j = 0; j < 4; ++j) _mm512_mask_storeu_ps(out + i + 16 * j, lanes[j], acc[j]);
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

LP_AVX512_INLINE __m512 SiluMul16(__m512 g, __m512 u) {
  const __m512 e = Exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
  return _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), u);
}

void SiluMul(float* out, const float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = FirstLanes(std::min<int64_t>(16, n - i));
    _mm512_mask_storeu_ps(out + i, lanes,
                          SiluMul16(Load16(gate + i, lanes), Load16(up + i, lanes)));
  }
}

const CpuOps kAvx512Ops = {
    .name = "avx512",
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

const CpuOps* Avx512Ops() { return &kAvx512Ops; }

}  // namespace loraplex::kernels::cpu

#else  // not an x86 build with the AVX-512 flags (see kernels/CMakeLists.txt)

namespace loraplex::kernels::cpu {
const CpuOps* Avx512Ops() { return nullptr; }
}  // namespace loraplex::kernels::cpu

#endif
