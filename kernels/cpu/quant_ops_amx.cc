// AMX (Advanced Matrix Extensions, AMX-TILE + AMX-INT8) loops for Q8_0, Q4_0, Q4_1, Q4_K and Q5_K
// on batches of tokens: prefill and batched decode. quant_gemm.cc calls this table only where the
// CPU has AMX, the kernel granted this process the tile state (arch_prctl), and a call has enough
// tokens (AmxMinTokens() in quant_ops.h); decode (m = 1) and Q6_K (scales per 16 values) stay on
// the AVX-512 VNNI table. This file alone is compiled with the AMX flags (kernels/quant.cmake).
//
// One tile multiply (tdpbssd / tdpbsud) computes the int32 dot products of 16 tokens x 16 weight
// rows over one 32-value block (K = 32 bytes; for the K-quants one 32-value sub-block):
//   A: 16 token rows x 32 int8 activation codes, read in place from the activations
//     (the natural layout of quant_layout.h: each row's codes contiguous, block b at b * 32);
//   B: the 32 codes of 16 weight rows in the tiles' "VNNI" order, 8 rows of 64 bytes:
//     row r holds codes 4r..4r+3 of weight rows 0..15, four bytes each. The codes are unpacked
//     once per group of 16 weight rows into a panel (per block: these 512 bytes and the rows'
//     scales as f32), then serve every 16-token tile of the call. Q4_0's codes become q - 8 and
//     Q8_0's stay signed (tdpbssd); Q4_1's, Q4_K's and Q5_K's stay unsigned (tdpbsud: signed
//     activations x unsigned weights).
//   C: the 16 x 16 int32 sums, stored to memory and folded into f32 accumulators by
//     AVX-512: acc[i] += float(C[i]) * (dw * da[i]) (+ mw * sa[i]), per block, where dw is the
//     block's scale (d, or d * sc[s] for a K-quant sub-block), mw its min (m of Q4_1,
//     -dmin * mn[s] of a K-quant), da the token's activation scale and sa = da * sum(codes).
// These are the same integer sums and the same per-block scales as the other tables (quant_ops.h);
// only the order of the float operations differs.
//
// Tile state: every call configures the tiles on its thread (ldtilecfg) and releases them at the
// end (tilerelease), so a thread that does not run AMX carries no tile state through context
// switches and signal frames.
#include "kernels/cpu/quant_ops.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__FMA__)
#include <immintrin.h>

// See cpu_ops_avx512.cc: GCC 12's AVX-512 headers trip -Wuninitialized (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/cpu/quant_layout.h"
#include "kernels/quant.h"

namespace loraplex::kernels::cpu {
namespace {

#define LP_AMX_INLINE inline __attribute__((always_inline))
#define LP_AMX_LAMBDA_INLINE __attribute__((always_inline))

constexpr int kTile = 16;         // tokens and weight rows per tile multiply
constexpr int kPanelBlock = 512;  // bytes of one block's B tile (8 rows x 64)

// The tile configuration ldtilecfg reads (palette 1): tiles 0-3 C (16 x 16 int32), 4-5 A (16 x 32
// bytes), 6-7 B (8 x 64 bytes).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

TileConfig MakeConfig() {
  TileConfig c;
  for (int t = 0; t < 4; ++t) {  // C
    c.colsb[t] = 64;
    c.rows[t] = kTile;
  }
  for (int t = 4; t < 6; ++t) {  // A
    c.colsb[t] = 32;
    c.rows[t] = kTile;
  }
  for (int t = 6; t < 8; ++t) {  // B
    c.colsb[t] = 64;
    c.rows[t] = 8;
  }
  return c;
}

// Claims the tiles for this thread for the duration of one call.
class TileScope {
 public:
  TileScope() {
    static const TileConfig config = MakeConfig();
    _tile_loadconfig(&config);
  }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};

// ---- activations: the natural layout (quant_layout.h), int8 qa[k] | f32 da[k/32] | f32 sa[k/32]
// with sa = da * sum(qa), quantized as every table does.

LP_AMX_INLINE __m512i Quantize16(const float* x, __m512 inv, int8_t* q) {
  const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(i));
  return i;
}

int64_t ActRowBytes(DType t, int64_t k) { return NaturalLayoutOf(t, k).row_bytes; }

LP_AMX_INLINE float AbsMax(const float* x, int64_t n) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  return _mm512_reduce_max_ps(m);
}

void QuantizeAct(DType t, const float* x, int64_t k, int64_t i_begin, int64_t i_end, uint8_t* xq) {
  const NaturalLayout l = NaturalLayoutOf(t, k);
  for (int64_t i = i_begin; i < i_end; ++i) {
    const float* xi = x + i * k;
    uint8_t* row = xq + i * l.row_bytes;
    int8_t* qa = reinterpret_cast<int8_t*>(row);
    float* da = reinterpret_cast<float*>(row + l.scale_offset);
    if (IsKQuant(t)) {  // one scale per 256 values, the sums of each 16 codes (bsums)
      int16_t* bsums = reinterpret_cast<int16_t*>(row + l.extra_offset);
      for (int64_t b = 0; b < k / kQK; ++b) {
        const float* xb = xi + b * kQK;
        const ActScale s = ActScaleOf(AbsMax(xb, kQK));
        da[b] = s.d;
        const __m512 inv = _mm512_set1_ps(s.inv);
        for (int64_t g = 0; g < kQK / kSums; ++g) {
          const __m512i q = Quantize16(xb + g * kSums, inv, qa + b * kQK + g * kSums);
          bsums[b * (kQK / kSums) + g] = static_cast<int16_t>(_mm512_reduce_add_epi32(q));
        }
      }
      continue;
    }
    float* sa = reinterpret_cast<float*>(row + l.extra_offset);
    for (int64_t b = 0; b < k / kQ32; ++b) {
      const float* xb = xi + b * kQ32;
      const ActScale s = ActScaleOf(AbsMax(xb, kQ32));
      const __m512 inv = _mm512_set1_ps(s.inv);
      const __m512i q0 = Quantize16(xb, inv, qa + b * kQ32);
      const __m512i q1 = Quantize16(xb + 16, inv, qa + b * kQ32 + 16);
      da[b] = s.d;
      sa[b] = s.d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));
    }
  }
}

// ---- weights: one group of up to 16 rows unpacked into B tiles, block by block

template <DType T>
struct Format;
template <>
struct Format<DType::kQ4_0> {
  static constexpr int kBytes = 18, kCodes = 2;  // f16 d | 16 nibble bytes
  static constexpr bool kNibbles = true, kMins = false, kUnsigned = false;
};
template <>
struct Format<DType::kQ4_1> {
  static constexpr int kBytes = 20, kCodes = 4;  // f16 d | f16 m | 16 nibble bytes
  static constexpr bool kNibbles = true, kMins = true, kUnsigned = true;
};
template <>
struct Format<DType::kQ8_0> {
  static constexpr int kBytes = 34, kCodes = 2;  // f16 d | 32 int8 codes
  static constexpr bool kNibbles = false, kMins = false, kUnsigned = false;
};
// The K-quants with 32-value sub-blocks (kernels/quant.h): each sub-block is one tile block, its
// scale d * sc[s] and min -dmin * mn[s]; codes 0..15 (Q4_K) or 0..31 (Q5_K), unsigned.
template <>
struct Format<DType::kQ4_K> {
  static constexpr int kBytes = 144, kCodes = 16, kHigh = -1;  // d | dmin | scales[12] | qs[128]
  static constexpr bool kNibbles = true, kMins = true, kUnsigned = true;
};
template <>
struct Format<DType::kQ5_K> {
  static constexpr int kBytes = 176, kCodes = 48, kHigh = 16;  // ... | qh[32] | qs[128]
  static constexpr bool kNibbles = true, kMins = true, kUnsigned = true;
};

// out[r] (r < 4), lane j = 32-bit word r of the 16 bytes at rows[j] (j < 16): four 128-bit
// loads per vector, a word transpose within each vector, then a transpose of 128-bit lanes.
LP_AMX_INLINE void LoadWords4(const uint8_t* const rows[kTile], __m512i out[4]) {
  __m512i z[4];
  for (int g = 0; g < 4; ++g) {
    __m512i v =
        _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[4 * g])));
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[4 * g + 1])),
                           1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[4 * g + 2])),
                           2);
    v = _mm512_inserti32x4(v, _mm_loadu_si128(reinterpret_cast<const __m128i*>(rows[4 * g + 3])),
                           3);
    // Word 4L + r (row 4g + L, word r) to position 4r + L.
    const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    z[g] = _mm512_permutexvar_epi32(idx, v);
  }
  // z[g] lane r = word r of rows 4g..4g+3; out[r] lane g = that.
  const __m512i t0 = _mm512_shuffle_i32x4(z[0], z[1], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512i t1 = _mm512_shuffle_i32x4(z[0], z[1], _MM_SHUFFLE(3, 2, 3, 2));
  const __m512i t2 = _mm512_shuffle_i32x4(z[2], z[3], _MM_SHUFFLE(1, 0, 1, 0));
  const __m512i t3 = _mm512_shuffle_i32x4(z[2], z[3], _MM_SHUFFLE(3, 2, 3, 2));
  out[0] = _mm512_shuffle_i32x4(t0, t2, _MM_SHUFFLE(2, 0, 2, 0));
  out[1] = _mm512_shuffle_i32x4(t0, t2, _MM_SHUFFLE(3, 1, 3, 1));
  out[2] = _mm512_shuffle_i32x4(t1, t3, _MM_SHUFFLE(2, 0, 2, 0));
  out[3] = _mm512_shuffle_i32x4(t1, t3, _MM_SHUFFLE(3, 1, 3, 1));
}

// The panel of rows [j, j + nr) (nr <= 16; the missing rows are zeros): per block b, the B tile at
// tiles + b * 512, and the rows' f32 scales at dw + b * 16 (Q4_1: mins at mw + b * 16).
template <DType T>
void PackPanel(const uint8_t* w, int64_t ldw, int nr, int64_t nb, uint8_t* tiles, float* dw,
               float* mw) {
  using F = Format<T>;
  static const uint8_t zeros[64] = {};
  const uint8_t* rows[kTile];
  for (int64_t b = 0; b < nb; ++b) {
    for (int j = 0; j < kTile; ++j) rows[j] = j < nr ? w + j * ldw + b * F::kBytes : zeros;
    alignas(32) uint16_t d[kTile], m[kTile];
    for (int j = 0; j < kTile; ++j) {
      std::memcpy(&d[j], rows[j], 2);
      if constexpr (F::kMins) std::memcpy(&m[j], rows[j] + 2, 2);
    }
    _mm512_storeu_ps(dw + b * kTile,
                     _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(d))));
    if constexpr (F::kMins) {
      _mm512_storeu_ps(mw + b * kTile,
                       _mm512_cvtph_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(m))));
    }
    uint8_t* tile = tiles + b * kPanelBlock;
    const uint8_t* codes[kTile];
    for (int j = 0; j < kTile; ++j) codes[j] = rows[j] + F::kCodes;
    __m512i words[4];
    LoadWords4(codes, words);
    if constexpr (F::kNibbles) {
      // Byte t of word r is qs[4r + t]: its low nibble is code 4r + t (tile row r), its high
      // nibble code 16 + 4r + t (tile row 4 + r).
      const __m512i low = _mm512_set1_epi8(0x0F);
      for (int r = 0; r < 4; ++r) {
        __m512i lo = _mm512_and_si512(words[r], low);
        __m512i hi = _mm512_and_si512(_mm512_srli_epi16(words[r], 4), low);
        if constexpr (T == DType::kQ4_0) {  // signed codes q - 8
          lo = _mm512_sub_epi8(lo, _mm512_set1_epi8(8));
          hi = _mm512_sub_epi8(hi, _mm512_set1_epi8(8));
        }
        _mm512_store_si512(tile + r * 64, lo);
        _mm512_store_si512(tile + (4 + r) * 64, hi);
      }
    } else {
      for (int r = 0; r < 4; ++r) _mm512_store_si512(tile + r * 64, words[r]);
      for (int j = 0; j < kTile; ++j) codes[j] += 16;
      LoadWords4(codes, words);
      for (int r = 0; r < 4; ++r) _mm512_store_si512(tile + (4 + r) * 64, words[r]);
    }
  }
}

// acc[i] += C[i] * (dw * da[i]) (+ mw * sa[i] for Q4_1) for the tokens i < mt of one block's tile
// product C (16 x 16 int32, row i = token i, lane = weight row); da, sa: the block's 16 token
// scales. Unrolled over all 16 rows, so that acc stays in registers (rows past mt are computed
// and never stored).
template <DType T>
LP_AMX_INLINE void Fold(__m512 (&acc)[kTile], const int32_t* c, const float* da, const float* sa,
                        const float* dw, const float* mw) {
  const __m512 dwb = _mm512_loadu_ps(dw);
  const __m512 mwb = Format<T>::kMins ? _mm512_loadu_ps(mw) : _mm512_setzero_ps();
#pragma GCC unroll 16
  for (int i = 0; i < kTile; ++i) {
    const __m512 ci = _mm512_cvtepi32_ps(_mm512_load_si512(c + i * kTile));
    const __m512 s = _mm512_mul_ps(dwb, _mm512_set1_ps(da[i]));
    acc[i] = _mm512_fmadd_ps(ci, s, acc[i]);
    if constexpr (Format<T>::kMins) {
      acc[i] = _mm512_fmadd_ps(mwb, _mm512_set1_ps(sa[i]), acc[i]);
    }
  }
}

// Starts the tile product of block b into tile C, loading it through tiles A and B. Tile numbers
// are immediates of the instructions, so this is a macro taking literal numbers: four C tiles (two
// pairs: 0, 1 and 2, 3), and one pair of A (4, 5) and B (6, 7) tiles.
#define LP_AMX_ISSUE(C, A, B, b)                 \
  do {                                           \
    _tile_loadd(A, xq + (b)*kQ32, ldx);          \
    _tile_loadd(B, tiles + (b)*kPanelBlock, 64); \
    _tile_zero(C);                               \
    if constexpr (Format<T>::kUnsigned) {        \
      _tile_dpbsud(C, A, B);                     \
    } else {                                     \
      _tile_dpbssd(C, A, B);                     \
    }                                            \
  } while (false)

// The scales of one token tile, by block: da[b * 16 + i], sa[b * 16 + i] (token i of the tile).
struct TileScales {
  const float* da;
  const float* sa;
};

// PackPanel for Q4_K / Q5_K: per super-block, the eight sub-blocks' B tiles (tile block 8B + s),
// their scales d * sc[s] at dw and mins -dmin * mn[s] at mw.
template <DType T>
void PackPanelK(const uint8_t* w, int64_t ldw, int nr, int64_t nb, uint8_t* tiles, float* dw,
                float* mw) {
  using F = Format<T>;
  static const uint8_t zeros[F::kBytes] = {};
  const __m512i low = _mm512_set1_epi8(0x0F);
  const uint8_t* rows[kTile];
  for (int64_t sb = 0; sb < nb / 8; ++sb) {
    for (int j = 0; j < kTile; ++j) rows[j] = j < nr ? w + j * ldw + sb * F::kBytes : zeros;
    for (int j = 0; j < kTile; ++j) {
      uint8_t sc[8], mn[8];
      UnpackScalesMins(rows[j] + 4, sc, mn);
      const float d = LoadF16(rows[j]), dmin = LoadF16(rows[j] + 2);
      for (int sub = 0; sub < 8; ++sub) {
        dw[(sb * 8 + sub) * kTile + j] = d * static_cast<float>(sc[sub]);
        mw[(sb * 8 + sub) * kTile + j] = -dmin * static_cast<float>(mn[sub]);
      }
    }
    // The fifth bits of Q5_K: bit s of qh[l] belongs to element l of sub-block s.
    __m512i high[2][4];
    if constexpr (F::kHigh >= 0) {
      const uint8_t* h[kTile];
      for (int half = 0; half < 2; ++half) {
        for (int j = 0; j < kTile; ++j) h[j] = rows[j] + F::kHigh + 16 * half;
        LoadWords4(h, high[half]);
      }
    }
    const uint8_t* codes[kTile];
    for (int c = 0; c < 4; ++c) {  // sub-blocks 2c (low nibbles) and 2c + 1 (high nibbles)
      __m512i words[2][4];         // elements 0..15 and 16..31
      for (int half = 0; half < 2; ++half) {
        for (int j = 0; j < kTile; ++j) codes[j] = rows[j] + F::kCodes + 32 * c + 16 * half;
        LoadWords4(codes, words[half]);
      }
      for (int nib = 0; nib < 2; ++nib) {
        const int sub = 2 * c + nib;
        uint8_t* tile = tiles + (sb * 8 + sub) * kPanelBlock;
        for (int half = 0; half < 2; ++half) {
          for (int r = 0; r < 4; ++r) {
            __m512i q = nib == 0 ? _mm512_and_si512(words[half][r], low)
                                 : _mm512_and_si512(_mm512_srli_epi16(words[half][r], 4), low);
            if constexpr (F::kHigh >= 0) {
              const __m512i bit = _mm512_and_si512(
                  _mm512_srl_epi16(high[half][r], _mm_cvtsi32_si128(sub)), _mm512_set1_epi8(1));
              q = _mm512_or_si512(q, _mm512_slli_epi16(bit, 4));
            }
            _mm512_store_si512(tile + (4 * half + r) * 64, q);
          }
        }
      }
    }
  }
}

// y[i, c] (+)= tokens i < mt (mt <= 16) x the panel's rows c < nr. Blocks go in pairs through two
// sets of C tiles (0, 1 and 2, 3): the products of the next pair are issued before the current
// pair is stored and folded, so that the tile unit works while AVX-512 folds.
template <DType T>
void TokenTile(float* y, int64_t ldy, const uint8_t* xq, int64_t ldx, TileScales ts, int mt, int nr,
               int64_t nb, const uint8_t* tiles, const float* dw, const float* mw,
               bool accumulate) {
  alignas(64) int32_t c0[kTile * kTile];
  alignas(64) int32_t c1[kTile * kTile];
  __m512 acc[kTile];
#pragma GCC unroll 16
  for (int i = 0; i < kTile; ++i) acc[i] = _mm512_setzero_ps();
  auto fold = [&](const int32_t* c, int64_t b) LP_AMX_LAMBDA_INLINE {
    Fold<T>(acc, c, ts.da + b * kTile, ts.sa + b * kTile, dw + b * kTile, mw + b * kTile);
  };
  // One pair: tiles C0, C1 hold blocks b, b + 1; the next pair (if whole) is issued into N0, N1
  // first, then C0, C1 are stored and folded. Leaves the loop after the last whole pair.
#define LP_AMX_PAIR(C0, C1, N0, N1)  \
  {                                  \
    const bool more = b + 4 <= nb;   \
    if (more) {                      \
      LP_AMX_ISSUE(N0, 4, 6, b + 2); \
      LP_AMX_ISSUE(N1, 5, 7, b + 3); \
    }                                \
    _tile_stored(C0, c0, 64);        \
    _tile_stored(C1, c1, 64);        \
    fold(c0, b);                     \
    fold(c1, b + 1);                 \
    b += 2;                          \
    if (!more) break;                \
  }
  int64_t b = 0;
  if (nb >= 2) {
    LP_AMX_ISSUE(0, 4, 6, 0);
    LP_AMX_ISSUE(1, 5, 7, 1);
    for (;;) {
      LP_AMX_PAIR(0, 1, 2, 3);
      LP_AMX_PAIR(2, 3, 0, 1);
    }
  }
#undef LP_AMX_PAIR
  if (b < nb) {  // an odd last block
    LP_AMX_ISSUE(0, 4, 6, b);
    _tile_stored(0, c0, 64);
    fold(c0, b);
  }
  const __mmask16 cols = static_cast<__mmask16>((1u << nr) - 1u);
#pragma GCC unroll 16
  for (int i = 0; i < kTile; ++i) {
    if (i >= mt) break;
    __m512 a = acc[i];
    if (accumulate) a = _mm512_add_ps(a, _mm512_maskz_loadu_ps(cols, y + i * ldy));
    _mm512_mask_storeu_ps(y + i * ldy, cols, a);
  }
}

template <DType T>
void GemmT(float* y, const uint8_t* xq, int64_t m, const uint8_t* w, int64_t n, int64_t k,
           int64_t j_begin, int64_t j_end, bool accumulate) {
  const NaturalLayout l = NaturalLayoutOf(T, k);
  const int64_t nb = k / kQ32;
  const int64_t rb = RowBytes(T, k);
  const int64_t token_tiles = (m + kTile - 1) / kTile;
  // Per thread: the panel of one 16-row group (nb B tiles, the rows' d and m by block), and the
  // activation scales of every token tile by block (read as broadcasts in the folds).
  thread_local std::vector<float> buffer;
  const size_t tile_floats = static_cast<size_t>(nb * kPanelBlock / 4);
  const size_t panel_floats = tile_floats + 2 * static_cast<size_t>(nb * kTile);
  const size_t scale_floats = 2 * static_cast<size_t>(token_tiles * nb * kTile);
  buffer.resize(panel_floats + scale_floats + 16);
  float* base =
      reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) / 64 * 64);
  uint8_t* tiles = reinterpret_cast<uint8_t*>(base);
  float* dw = base + tile_floats;
  float* mw = dw + nb * kTile;
  float* scales = mw + nb * kTile;  // tile t: da at t * 2 * nb * 16, sa after it
  for (int64_t t = 0; t < token_tiles; ++t) {
    float* da = scales + t * 2 * nb * kTile;
    float* sa = da + nb * kTile;
    for (int i = 0; i < kTile; ++i) {
      const int64_t token = std::min(t * kTile + i, m - 1);  // the last tile's spare lanes: unused
      const uint8_t* row = xq + token * l.row_bytes;
      const float* row_da = reinterpret_cast<const float*>(row + l.scale_offset);
      if constexpr (IsKQuant(T)) {  // sub-block b: its super-block's scale, times its 32 codes' sum
        const int16_t* bsums = reinterpret_cast<const int16_t*>(row + l.extra_offset);
        for (int64_t b = 0; b < nb; ++b) {
          da[b * kTile + i] = row_da[b / 8];
          sa[b * kTile + i] = row_da[b / 8] * static_cast<float>(bsums[2 * b] + bsums[2 * b + 1]);
        }
      } else {
        const float* row_sa = reinterpret_cast<const float*>(row + l.extra_offset);
        for (int64_t b = 0; b < nb; ++b) {
          da[b * kTile + i] = row_da[b];
          sa[b * kTile + i] = row_sa[b];
        }
      }
    }
  }
  TileScope scope;
  for (int64_t j = j_begin; j < j_end; j += kTile) {
    const int nr = static_cast<int>(std::min<int64_t>(kTile, j_end - j));
    if constexpr (IsKQuant(T)) {
      PackPanelK<T>(w + j * rb, rb, nr, nb, tiles, dw, mw);
    } else {
      PackPanel<T>(w + j * rb, rb, nr, nb, tiles, dw, mw);
    }
    for (int64_t t = 0; t < token_tiles; ++t) {
      const int mt = static_cast<int>(std::min<int64_t>(kTile, m - t * kTile));
      const float* da = scales + t * 2 * nb * kTile;
      TokenTile<T>(y + t * kTile * n + j, n, xq + t * kTile * l.row_bytes, l.row_bytes,
                   TileScales{da, da + nb * kTile}, mt, nr, nb, tiles, dw, mw, accumulate);
    }
  }
}

void Gemm(DType t, float* y, const uint8_t* xq, int64_t m, const uint8_t* w, int64_t n, int64_t k,
          int64_t j_begin, int64_t j_end, bool accumulate) {
  WithQuantType(t, [&](auto type) {
    // quant_gemm.cc sends Q6_K (scales per 16 values) to the VNNI table.
    if constexpr (decltype(type)::value != DType::kQ6_K) {
      GemmT<decltype(type)::value>(y, xq, m, w, n, k, j_begin, j_end, accumulate);
    }
  });
}

const QuantOps kAmxQuantOps = {
    .name = "amx",
    .act_row_bytes = ActRowBytes,
    .quantize_act = QuantizeAct,
    .gemm = Gemm,
};

}  // namespace

const QuantOps* AmxQuantOps() { return &kAmxQuantOps; }

}  // namespace loraplex::kernels::cpu

#else  // not an x86 build with the AMX flags (see kernels/quant.cmake)

namespace loraplex::kernels::cpu {
const QuantOps* AmxQuantOps() { return nullptr; }
}  // namespace loraplex::kernels::cpu

#endif
