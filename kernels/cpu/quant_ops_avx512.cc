// AVX-512 (F, BW, VL, DQ) + VNNI quantized-GEMM loops: vpdpbusd (unsigned weight codes x signed
// int8 activations, four products summed into each int32 lane, no saturation) for the 32-value
// formats, vpmaddubsw + vpdpwssd (pairs to int16, then times the 16-bit sub-block scales into
// int32) for the K-quants. This file alone is compiled with the AVX-512 + VNNI flags
// (kernels/quant.cmake) and is reached only after quant_gemm.cc has checked the CPU.
//
// 32-value formats (Q8_0, Q4_0, Q4_1). Blocks are taken 4 at a time (a "quad"): for Q4 the 16
// nibble bytes of block i go to 128-bit lane i of one zmm, and masking / shifting gives the low
// nibbles (values 0..15 of each block) and high nibbles (16..31) in two zmm; Q8_0 takes two
// blocks per zmm (w + 128: the sign bit flipped makes the codes unsigned). The activations are
// stored in that same order (layout below), so vpdpbusd leaves block i's products in lanes 4i..4i+3
// (Q8_0 folds its two zmm into that form with two lane shuffles), and one f32 FMA per quad applies
// the 16 lanes' scales dw * da; the offset of each format (-8 for Q4_0, + m for Q4_1, -128 for the
// flipped Q8_0) is a second FMA against the activation sums.
//
// K-quants (Q4_K, Q5_K, Q6_K): a 256-value super-block is four zmm of weight codes; the activations
// of Q4_K/Q5_K are stored with their 32-value sub-blocks in the order the nibble split produces
// them (0, 2, 1, 3, 4, 6, 5, 7), Q6_K's in natural order. vpmaddubsw + vpdpwssd multiply each code
// pair by its sub-block's scale on the way to int32; the mins (Q4_K/Q5_K) and the -32 offset of
// Q6_K are one vpmaddwd of the scales with the activations' 16-value sums.
//
// Blocking: decode (m = 1) reads the weight rows in address order with 4 accumulators per row
// ("drivers" below); more tokens run MR x NR tiles in which every unpacked weight vector serves MR
// tokens, over a panel of rows that stays in L2 while the token tiles pass. Weight bytes 2 KiB
// ahead are prefetched (quant_layout.h).
#include "kernels/cpu/quant_ops.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__AVX512VNNI__) && defined(__FMA__)
#include <immintrin.h>

// See cpu_ops_avx512.cc: GCC 12's AVX-512 headers trip -Wuninitialized (GCC bug 105593).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#include "kernels/cpu/quant_layout.h"
#include "kernels/quant.h"

namespace loraplex::kernels::cpu {
namespace {

#define LP_AVX512_INLINE inline __attribute__((always_inline))
#define LP_AVX512_LAMBDA_INLINE __attribute__((always_inline))

LP_AVX512_INLINE float HalfAt(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return _cvtsh_ss(h);
}

// Asks for the weight bytes kPrefetchDistance ahead of [p, p + kBytes): the hardware prefetchers
// alone left streaming a matrix from memory ~25% below the bandwidth this reaches.
template <int kBytes>
LP_AVX512_INLINE void Prefetch(const uint8_t* p) {
  const char* a = reinterpret_cast<const char*>(p) + kPrefetchDistance;
  for (int o = 0; o < kBytes; o += 64) _mm_prefetch(a + o, _MM_HINT_T0);
}

// ---- layout of the 32-value formats' activations
//
// Per token row, with nb = k / 32 blocks padded to np = 4 * ceil(nb / 4) (padding all zeros):
//   qa:  np * 32 bytes; quad Q (blocks 4Q..4Q+3) is 128 bytes: for Q4_0/Q4_1 the values 0..15 of
//        the four blocks (16 bytes each), then their values 16..31; for Q8_0 the four blocks in
//        natural order.
//   dax: np * 4 floats; quad Q's 16 floats are da[4Q + lane / 4], the scale of each int32 lane.
//   sax: np * 4 floats; quad Q's lane 4i is c * da[b] * sum(qa of block b), b = 4Q + i, with
//        c = -128 (Q8_0), -8 (Q4_0), 1 (Q4_1); the other lanes are 0.
struct Layout32 {
  int64_t nb, np, dax_offset, sax_offset, row_bytes;
};
LP_AVX512_INLINE Layout32 Layout32Of(int64_t k) {
  Layout32 l;
  l.nb = k / kQ32;
  l.np = (l.nb + 3) / 4 * 4;
  l.dax_offset = l.np * kQ32;
  l.sax_offset = l.dax_offset + l.np * 16;
  l.row_bytes = l.sax_offset + l.np * 16;
  return l;
}

// Sub-block s of a Q4_K / Q5_K super-block goes to 32-byte slot KSlot(s) of the activations: the
// order 0, 2, 1, 3, 4, 6, 5, 7 in which the low / high nibble split of 64 code bytes yields them.
LP_AVX512_INLINE int64_t KSlot(int64_t s) { return (s & ~3) | ((s & 1) << 1) | ((s >> 1) & 1); }

int64_t ActRowBytes(DType t, int64_t k) {
  return IsKQuant(t) ? NaturalLayoutOf(t, k).row_bytes : Layout32Of(k).row_bytes;
}

// 16 floats -> 16 int32 codes (round to nearest even under the default MXCSR, as the scalar
// table's nearbyint), stored as int8.
LP_AVX512_INLINE __m512i Quantize16(const float* x, __m512 inv, int8_t* q) {
  const __m512i i = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x), inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(i));
  return i;
}

LP_AVX512_INLINE float AbsMax(const float* x, int64_t n) {
  __m512 m = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(x + i)));
  return _mm512_reduce_max_ps(m);
}

void QuantizeAct(DType t, const float* x, int64_t k, int64_t i_begin, int64_t i_end, uint8_t* xq) {
  const int64_t row_bytes = ActRowBytes(t, k);
  for (int64_t i = i_begin; i < i_end; ++i) {
    const float* xi = x + i * k;
    uint8_t* row = xq + i * row_bytes;
    int8_t* qa = reinterpret_cast<int8_t*>(row);
    if (IsKQuant(t)) {
      const NaturalLayout l = NaturalLayoutOf(t, k);
      float* da = reinterpret_cast<float*>(row + l.scale_offset);
      int16_t* bsums = reinterpret_cast<int16_t*>(row + l.extra_offset);
      const bool permute = t != DType::kQ6_K;
      for (int64_t b = 0; b < k / kQK; ++b) {
        const float* xb = xi + b * kQK;
        const ActScale s = ActScaleOf(AbsMax(xb, kQK));
        da[b] = s.d;
        const __m512 inv = _mm512_set1_ps(s.inv);
        for (int64_t g = 0; g < kQK / kSums; ++g) {  // 16 values: one bsum
          const int64_t sub = g / 2;                 // the 32-value sub-block
          const int64_t slot = permute ? KSlot(sub) : sub;
          const __m512i q =
              Quantize16(xb + g * kSums, inv, qa + b * kQK + slot * 32 + (g % 2) * 16);
          bsums[b * (kQK / kSums) + g] = static_cast<int16_t>(_mm512_reduce_add_epi32(q));
        }
      }
    } else {
      const Layout32 l = Layout32Of(k);
      float* dax = reinterpret_cast<float*>(row + l.dax_offset);
      float* sax = reinterpret_cast<float*>(row + l.sax_offset);
      const float c = t == DType::kQ8_0 ? -128.0f : t == DType::kQ4_0 ? -8.0f : 1.0f;
      const bool split = t != DType::kQ8_0;
      // sax is mostly zeros; and in a quad that is only partly used, the blocks' bytes interleave
      // with the padding's, so the padding is zeroed first.
      std::memset(sax, 0, static_cast<size_t>(l.np * 16));
      const int64_t first_partial = l.nb / 4 * 4;
      std::memset(qa + first_partial * kQ32, 0, static_cast<size_t>((l.np - first_partial) * kQ32));
      std::memset(dax + 4 * l.nb, 0, static_cast<size_t>((l.np - l.nb) * 16));
      for (int64_t b = 0; b < l.nb; ++b) {
        const float* xb = xi + b * kQ32;
        const ActScale s = ActScaleOf(AbsMax(xb, kQ32));
        const __m512 inv = _mm512_set1_ps(s.inv);
        int8_t* quad = qa + (b / 4) * 128;
        int8_t* lo = split ? quad + (b % 4) * 16 : quad + (b % 4) * 32;
        int8_t* hi = split ? quad + 64 + (b % 4) * 16 : lo + 16;
        const __m512i q0 = Quantize16(xb, inv, lo);
        const __m512i q1 = Quantize16(xb + 16, inv, hi);
        _mm_storeu_ps(dax + 4 * b, _mm_set1_ps(s.d));
        sax[4 * b] =
            c * (s.d * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1))));
      }
    }
  }
}

// ---- reductions

LP_AVX512_INLINE __m256 Fold(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v),
                       _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

// Lane r = the sum of the 16 lanes of a[r], r < 4.
LP_AVX512_INLINE __m128 Reduce4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
  const __m256 h01 = _mm256_hadd_ps(Fold(a0), Fold(a1));
  const __m256 h23 = _mm256_hadd_ps(Fold(a2), Fold(a3));
  const __m256 h = _mm256_hadd_ps(h01, h23);
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// y[t * ldy + r] (+)= the sum of acc[t][r], r < NR.
template <int MR, int NR>
LP_AVX512_INLINE void Store(float* y, int64_t ldy, const __m512 (&acc)[MR][NR], bool accumulate) {
  static_assert(NR <= 4);
  const __mmask8 outs = static_cast<__mmask8>((1u << NR) - 1u);
  const __m512 z = _mm512_setzero_ps();
  for (int t = 0; t < MR; ++t) {
    __m128 s = Reduce4(acc[t][0], NR > 1 ? acc[t][NR > 1 ? 1 : 0] : z,
                       NR > 2 ? acc[t][NR > 2 ? 2 : 0] : z, NR > 3 ? acc[t][NR > 3 ? 3 : 0] : z);
    float* out = y + t * ldy;
    if (accumulate) s = _mm_add_ps(s, _mm_maskz_loadu_ps(outs, out));
    _mm_mask_storeu_ps(out, outs, s);
  }
}

// ---- 32-value formats
//
// A quad of Q4 blocks is 72 (Q4_0) or 80 (Q4_1) bytes: two loads (the second masked to what the
// quad has left) hold it, and since every field starts on an even byte, word permutes
// (vpermt2w, vpermw) pick out the 64 code bytes in block order and the f16 scales already spread
// over the lanes of their blocks. Q8_0 does the same per pair of blocks (68 bytes). No gathers:
// they measured ~2x slower here, and slower still when the weights stream from memory.

template <DType T>
struct Format32 {
  static constexpr int kBytes = T == DType::kQ8_0 ? 34 : T == DType::kQ4_0 ? 18 : 20;
  static constexpr int kCodes = T == DType::kQ4_1 ? 4 : 2;  // offset of the code bytes
};

// Word indices for the permutes (index i < 32 picks word i of the first source, 32 + i word i
// of the second).
struct alignas(64) WordIndex {
  uint16_t w[32];
};

// Q4: the 8 code words of block i = w / 8 of a quad, from its first 128 bytes.
template <int kBytes, int kCodes>
constexpr WordIndex Q4CodeWords() {
  WordIndex x{};
  for (int w = 0; w < 32; ++w) {
    x.w[w] = static_cast<uint16_t>((w / 8 * kBytes + kCodes) / 2 + w % 8);
  }
  return x;
}
// Q4: words 0..15: d of block lane / 4; words 16..31: the word after it (m of Q4_1).
template <int kBytes>
constexpr WordIndex Q4HeadWords() {
  WordIndex x{};
  for (int w = 0; w < 32; ++w) x.w[w] = static_cast<uint16_t>((w % 16) / 4 * kBytes / 2 + w / 16);
  return x;
}
// Q8_0 (quad of 136 bytes, taken as bytes 0..127 and 64..191): the 16 code words of block w / 16
// of the first pair from bytes 0..127; of the second pair (blocks 2, 3) from bytes 64..191; and
// the d of block lane / 4 from bytes 0..127.
constexpr WordIndex Q8CodeWords(int pair) {
  WordIndex x{};
  for (int w = 0; w < 32; ++w) {
    const int byte = (2 * pair + w / 16) * 34 + 2 + 2 * (w % 16) - 64 * pair;
    x.w[w] = static_cast<uint16_t>(byte / 2);
  }
  return x;
}
constexpr WordIndex Q8HeadWords() {
  WordIndex x{};
  for (int w = 0; w < 32; ++w) x.w[w] = static_cast<uint16_t>((w % 16) / 4 * 17);
  return x;
}
constexpr WordIndex kQ4_0Codes = Q4CodeWords<18, 2>();
constexpr WordIndex kQ4_1Codes = Q4CodeWords<20, 4>();
constexpr WordIndex kQ4_0Heads = Q4HeadWords<18>();
constexpr WordIndex kQ4_1Heads = Q4HeadWords<20>();
constexpr WordIndex kQ8CodesA = Q8CodeWords(0);
constexpr WordIndex kQ8CodesB = Q8CodeWords(1);
constexpr WordIndex kQ8Heads = Q8HeadWords();

LP_AVX512_INLINE __m512i Words(const WordIndex& x) {
  return _mm512_load_si512(static_cast<const void*>(x.w));
}

// Bytes [0, count) of 64 (count may be <= 0 or >= 64).
LP_AVX512_INLINE __mmask64 FirstBytes(int count) {
  if (count <= 0) return 0;
  return count >= 64 ? ~__mmask64{0} : (__mmask64{1} << count) - 1;
}

// One weight row's quad: the code vectors a and c (block i's products land in int32 lanes
// 4i..4i+3 of QuadDot), the scale dw and offset factor cw of each lane's block.
struct Quad {
  __m512i a, c;
  __m512 dw, cw;
};

// The quad's bytes [0, 64) in z0 and [64, 128) in z1 (Q8_0 also [128, 192) in z2), each load
// reading only the quad's own bytes: a full quad is 72 (Q4_0), 80 (Q4_1) or 136 (Q8_0) bytes, so
// the last load is a 64-bit or 128-bit one; a partial quad (n < 4 blocks, the end of a row) uses
// masked loads, and its missing blocks read as zero codes and zero scales.
template <DType T>
LP_AVX512_INLINE void LoadQuadBytes(const uint8_t* p, int n, __m512i* z0, __m512i* z1,
                                    __m512i* z2) {
  constexpr int kBytes = Format32<T>::kBytes;
  if (n == 4) {
    if constexpr (T == DType::kQ8_0) {
      *z0 = _mm512_loadu_si512(p);
      *z1 = _mm512_loadu_si512(p + 64);
      *z2 = _mm512_zextsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 128)));
    } else if constexpr (T == DType::kQ4_1) {
      *z0 = _mm512_loadu_si512(p);
      *z1 = _mm512_zextsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 64)));
    } else {
      *z0 = _mm512_loadu_si512(p);
      *z1 = _mm512_zextsi128_si512(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + 64)));
    }
    return;
  }
  const int bytes = n * kBytes;
  *z0 = _mm512_maskz_loadu_epi8(FirstBytes(bytes), p);
  *z1 = _mm512_maskz_loadu_epi8(FirstBytes(bytes - 64), p + 64);
  if constexpr (T == DType::kQ8_0) *z2 = _mm512_maskz_loadu_epi8(FirstBytes(bytes - 128), p + 128);
}

template <DType T>
LP_AVX512_INLINE Quad LoadQuad(const uint8_t* p, int n) {
  Quad q;
  __m512i z0, z1, z2;
  LoadQuadBytes<T>(p, n, &z0, &z1, &z2);
  if constexpr (T == DType::kQ8_0) {
    // w + 128 (the sign bit flipped): unsigned codes for vpdpbusd; the sax term of Tile32 takes
    // the 128 back off. A missing block has a zero scale, so its lanes add nothing.
    const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
    q.a = _mm512_xor_si512(_mm512_permutex2var_epi16(z0, Words(kQ8CodesA), z1), flip);
    q.c = _mm512_xor_si512(_mm512_permutex2var_epi16(z1, Words(kQ8CodesB), z2), flip);
    q.dw =
        _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutex2var_epi16(z0, Words(kQ8Heads), z1)));
    q.cw = q.dw;
  } else {
    const __m512i v =
        _mm512_permutex2var_epi16(z0, Words(T == DType::kQ4_0 ? kQ4_0Codes : kQ4_1Codes), z1);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    q.a = _mm512_and_si512(v, low4);
    q.c = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
    const __m512i heads =
        _mm512_permutexvar_epi16(Words(T == DType::kQ4_0 ? kQ4_0Heads : kQ4_1Heads), z0);
    q.dw = _mm512_cvtph_ps(_mm512_castsi512_si256(heads));
    q.cw = T == DType::kQ4_1 ? _mm512_cvtph_ps(_mm512_extracti64x4_epi64(heads, 1)) : q.dw;
  }
  return q;
}

// The int32 lanes of one quad: block i's products in lanes 4i..4i+3.
template <DType T>
LP_AVX512_INLINE __m512i QuadDot(__m512i a, __m512i c, const uint8_t* xa) {
  const __m512i x0 = _mm512_load_si512(xa);
  const __m512i x1 = _mm512_load_si512(xa + 64);
  if constexpr (T == DType::kQ8_0) {
    // a: blocks 0 | 1 (8 lanes each), c: blocks 2 | 3; fold each block's 8 lanes to 4.
    const __m512i pa = _mm512_dpbusd_epi32(_mm512_setzero_si512(), a, x0);
    const __m512i pc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c, x1);
    return _mm512_add_epi32(_mm512_shuffle_i32x4(pa, pc, _MM_SHUFFLE(2, 0, 2, 0)),
                            _mm512_shuffle_i32x4(pa, pc, _MM_SHUFFLE(3, 1, 3, 1)));
  } else {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), a, x0), c, x1);
  }
}

// The sums over all k of MR tokens x NR weight rows, one 16-lane vector per pair (its lanes still
// to be added up). xq: token rows ldx bytes apart; w: weight rows ldw bytes apart. Each row's quad
// is unpacked once and used by all MR tokens before the next row's. Each pair keeps U
// accumulators, quad q adding to number q % U (and its offset term to the next), so that decode, a
// single pair, is not bound by the latency of one chain of FMAs.
template <DType T, int MR, int NR, int U>
LP_AVX512_INLINE void Sums32(__m512 (&sums)[MR][NR], const uint8_t* xq, int64_t ldx,
                             const Layout32& l, const uint8_t* w, int64_t ldw) {
  using F = Format32<T>;
  __m512 acc[MR][NR][U];
  for (int t = 0; t < MR; ++t)
    for (int r = 0; r < NR; ++r)
      for (int u = 0; u < U; ++u) acc[t][r][u] = _mm512_setzero_ps();
  auto quad_step = [&](int64_t b, int n, auto u_constant) LP_AVX512_LAMBDA_INLINE {
    constexpr int u = decltype(u_constant)::value;
    for (int r = 0; r < NR; ++r) {
      Prefetch<4 * F::kBytes>(w + r * ldw + b * F::kBytes);
      const Quad q = LoadQuad<T>(w + r * ldw + b * F::kBytes, n);
      for (int t = 0; t < MR; ++t) {
        const uint8_t* xt = xq + t * ldx;
        const __m512 dax =
            _mm512_load_ps(reinterpret_cast<const float*>(xt + l.dax_offset) + 4 * b);
        const __m512 sax =
            _mm512_load_ps(reinterpret_cast<const float*>(xt + l.sax_offset) + 4 * b);
        const __m512i isum = QuadDot<T>(q.a, q.c, xt + b * kQ32);
        acc[t][r][u] =
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(q.dw, dax), acc[t][r][u]);
        acc[t][r][(u + 1) % U] = _mm512_fmadd_ps(q.cw, sax, acc[t][r][(u + 1) % U]);
      }
    }
  };
  using U0 = std::integral_constant<int, 0>;
  int64_t b = 0;
  for (; b + 4 * U <= l.nb; b += 4 * U) {
    [&]<int... u>(std::integer_sequence<int, u...>) LP_AVX512_LAMBDA_INLINE {
      (quad_step(b + 4 * u, 4, std::integral_constant<int, u>{}), ...);
    }
    (std::make_integer_sequence<int, U>{});
  }
  for (; b + 4 <= l.nb; b += 4) quad_step(b, 4, U0{});
  if (b < l.nb) quad_step(b, static_cast<int>(l.nb - b), U0{});
  for (int t = 0; t < MR; ++t) {
    for (int r = 0; r < NR; ++r) {
      sums[t][r] = acc[t][r][0];
      for (int u = 1; u < U; ++u) sums[t][r] = _mm512_add_ps(sums[t][r], acc[t][r][u]);
    }
  }
}

// ---- K-quants

template <DType T>
struct FormatK {
  static constexpr int64_t kBytes = T == DType::kQ4_K ? 144 : T == DType::kQ5_K ? 176 : 210;
};

// One row's super-block, unpacked: four vectors of 64 codes (in the activation order), the 16-bit
// scale of every code pair, and what the per-16 activation sums are multiplied with (mins, or the
// Q6_K scales), and the f16 scales.
struct UnpackedK {
  __m512i codes[4];
  __m512i scales[4];
  __m256i sums16;  // 16 words against the 16 bsums
  float d, dmin;
};

// Word w of scale vector v: for Q4_K/Q5_K the sub-block (of 8) whose codes vector v holds in
// its low (w < 16) or high 32 bytes, for Q6_K the 16-value sub-block (of 16) of its code pair.
constexpr int kKSubBlocks[4][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
constexpr WordIndex K45ScaleWords(int v) {
  WordIndex x{};
  for (int w = 0; w < 32; ++w) x.w[w] = static_cast<uint16_t>(kKSubBlocks[v][w / 16]);
  return x;
}
constexpr WordIndex Q6ScaleWords(int v) {
  WordIndex x{};
  for (int w = 0; w < 32; ++w) x.w[w] = static_cast<uint16_t>(4 * v + w / 8);
  return x;
}
constexpr WordIndex kK45Scales[4] = {K45ScaleWords(0), K45ScaleWords(1), K45ScaleWords(2),
                                     K45ScaleWords(3)};
constexpr WordIndex kQ6Scales[4] = {Q6ScaleWords(0), Q6ScaleWords(1), Q6ScaleWords(2),
                                    Q6ScaleWords(3)};

template <DType T>
LP_AVX512_INLINE void UnpackK(const uint8_t* blk, UnpackedK* u) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  if constexpr (T == DType::kQ6_K) {
    const uint8_t* ql = blk;
    const uint8_t* qh = blk + 128;
    const __m512i top = _mm512_set1_epi8(0x30);
    // Bits 2c..2c+1 of qh[l] are the top bits of chunk c (32 values); the low 16 words of a
    // vector hold chunk 0 (or 2), the high 16 words chunk 1 (or 3).
    const __m512i up_lo = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i down_hi = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    for (int h = 0; h < 2; ++h) {
      const __m512i lq = _mm512_loadu_si512(ql + 64 * h);
      const __m512i hq =
          _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(qh + 32 * h)));
      u->codes[2 * h] = _mm512_or_si512(_mm512_and_si512(lq, low4),
                                        _mm512_and_si512(_mm512_sllv_epi16(hq, up_lo), top));
      u->codes[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(lq, 4), low4),
                                            _mm512_and_si512(_mm512_srlv_epi16(hq, down_hi), top));
    }
    const __m256i sc16 =
        _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 192)));
    // Vector v holds values 64v .. 64v + 63: the 16-value sub-blocks 4v .. 4v + 3, 8 words each.
    const __m512i s = _mm512_castsi256_si512(sc16);
    for (int v = 0; v < 4; ++v) u->scales[v] = _mm512_permutexvar_epi16(Words(kQ6Scales[v]), s);
    u->sums16 = sc16;
    u->d = HalfAt(blk + 208);
    u->dmin = 0.0f;
  } else {
    uint64_t sc_bits, mn_bits;
    UnpackScalesMins64(blk + 4, &sc_bits, &mn_bits);
    const uint8_t* qs = blk + (T == DType::kQ5_K ? 48 : 16);
    const __m512i v0 = _mm512_loadu_si512(qs);
    const __m512i v1 = _mm512_loadu_si512(qs + 64);
    // Sub-blocks (0, 2), (1, 3), (4, 6), (5, 7): low 32 bytes, high 32 bytes of each vector.
    u->codes[0] = _mm512_and_si512(v0, low4);
    u->codes[1] = _mm512_and_si512(_mm512_srli_epi16(v0, 4), low4);
    u->codes[2] = _mm512_and_si512(v1, low4);
    u->codes[3] = _mm512_and_si512(_mm512_srli_epi16(v1, 4), low4);
    if constexpr (T == DType::kQ5_K) {
      const __m512i hq =
          _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 16)));
      const __m512i sixteen = _mm512_set1_epi8(16);
      for (int v = 0; v < 4; ++v) {
        const __m512i bit =
            _mm512_inserti64x4(_mm512_set1_epi8(static_cast<char>(1 << kKSubBlocks[v][0])),
                               _mm256_set1_epi8(static_cast<char>(1 << kKSubBlocks[v][1])), 1);
        u->codes[v] =
            _mm512_mask_add_epi8(u->codes[v], _mm512_test_epi8_mask(hq, bit), u->codes[v], sixteen);
      }
    }
    const __m512i s = _mm512_castsi128_si512(
        _mm_cvtepu8_epi16(_mm_cvtsi64_si128(static_cast<long long>(sc_bits))));
    for (int v = 0; v < 4; ++v) u->scales[v] = _mm512_permutexvar_epi16(Words(kK45Scales[v]), s);
    const __m128i m8 = _mm_cvtsi64_si128(static_cast<long long>(mn_bits));
    u->sums16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));  // mn[s] for bsums 2s, 2s + 1
    u->d = HalfAt(blk);
    u->dmin = HalfAt(blk + 2);
  }
}

template <DType T, int MR, int NR>
LP_AVX512_INLINE void SumsK(__m512 (&acc)[MR][NR], const uint8_t* xq, int64_t ldx,
                            const NaturalLayout& l, const uint8_t* w, int64_t ldw, int64_t k) {
  using F = FormatK<T>;
  for (int t = 0; t < MR; ++t)
    for (int r = 0; r < NR; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < k / kQK; ++b) {
    // One row's super-block at a time (an unpacked one fills 8 vector registers), used by all MR
    // tokens before the next row's.
    for (int r = 0; r < NR; ++r) {
      Prefetch<F::kBytes>(w + r * ldw + b * F::kBytes);
      UnpackedK u;
      UnpackK<T>(w + r * ldw + b * F::kBytes, &u);
      for (int t = 0; t < MR; ++t) {
        const uint8_t* xt = xq + t * ldx;
        const uint8_t* xa = xt + b * kQK;
        const float da = reinterpret_cast<const float*>(xt + l.scale_offset)[b];
        const __m256i bs =
            _mm256_load_si256(reinterpret_cast<const __m256i*>(xt + l.extra_offset) + b);
        __m512i isum = _mm512_setzero_si512();
        for (int v = 0; v < 4; ++v) {
          isum = _mm512_dpwssd_epi32(
              isum, _mm512_maddubs_epi16(u.codes[v], _mm512_load_si512(xa + 64 * v)), u.scales[v]);
        }
        const __m256i side = _mm256_madd_epi16(u.sums16, bs);
        if constexpr (T == DType::kQ6_K) {
          // Codes are q + 32: subtract 32 * sum_s sc[s] * bsum[s].
          isum = _mm512_sub_epi32(isum, _mm512_zextsi256_si512(_mm256_slli_epi32(side, 5)));
          acc[t][r] =
              _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(u.d * da), acc[t][r]);
        } else {
          acc[t][r] =
              _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_set1_ps(u.d * da), acc[t][r]);
          acc[t][r] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(_mm512_zextsi256_si512(side)),
                                       _mm512_set1_ps(u.dmin * da), acc[t][r]);
        }
      }
    }
  }
}

// ---- drivers
//
// Decode (m = 1) takes one weight row at a time, so that the rows are read in address order, one
// sequential stream for the prefetchers, and adds up and stores four rows' sums at a time.
// Interleaving 4 rows (4 streams of quads one row apart) was 1.4x faster with the weights in L2
// but 1.75x slower streaming 100 MB of Q4_1 / Q8_0 from memory, where decode spends its time.
constexpr int kMaxMr = 4;  // more tokens: tiles of up to 4 tokens x kTileRows rows
constexpr int kTileRows = 2;
constexpr int kGemvAccumulators = 4;

template <DType T>
constexpr bool kIsK = T == DType::kQ4_K || T == DType::kQ5_K || T == DType::kQ6_K;

template <DType T, int MR, int NR>
LP_AVX512_INLINE void Sums(__m512 (&sums)[MR][NR], const uint8_t* xq, int64_t ldx,
                           const Layout32& l32, const NaturalLayout& lk, const uint8_t* w,
                           int64_t ldw, int64_t k) {
  if constexpr (kIsK<T>) {
    SumsK<T, MR, NR>(sums, xq, ldx, lk, w, ldw, k);
  } else {
    constexpr int kU = MR * NR == 1 ? kGemvAccumulators : 1;
    Sums32<T, MR, NR, kU>(sums, xq, ldx, l32, w, ldw);
  }
}

// y[t * ldy + r] (+)= tokens t < MR x rows r < NR.
template <DType T, int MR, int NR>
void Tile(float* y, int64_t ldy, const uint8_t* xq, int64_t ldx, const Layout32& l32,
          const NaturalLayout& lk, const uint8_t* w, int64_t ldw, int64_t k, bool accumulate) {
  __m512 sums[MR][NR];
  Sums<T, MR, NR>(sums, xq, ldx, l32, lk, w, ldw, k);
  Store<MR, NR>(y, ldy, sums, accumulate);
}

// y[j] (+)= one token x rows [j, j + rows), rows <= 4, one row after the other.
template <DType T>
void GemvRows(float* y, const uint8_t* xq, const Layout32& l32, const NaturalLayout& lk,
              const uint8_t* w, int64_t ldw, int64_t k, int rows, bool accumulate) {
  __m512 sums[1][4];
  for (int r = 0; r < 4; ++r) {
    __m512 one[1][1] = {{_mm512_setzero_ps()}};
    if (r < rows) Sums<T, 1, 1>(one, xq, 0, l32, lk, w + r * ldw, ldw, k);
    sums[0][r] = one[0][0];
  }
  __m128 s = Reduce4(sums[0][0], sums[0][1], sums[0][2], sums[0][3]);
  const __mmask8 outs = static_cast<__mmask8>((1u << rows) - 1u);
  if (accumulate) s = _mm_add_ps(s, _mm_maskz_loadu_ps(outs, y));
  _mm_mask_storeu_ps(y, outs, s);
}

template <DType T>
using TileFn = void (*)(float*, int64_t, const uint8_t*, int64_t, const Layout32&,
                        const NaturalLayout&, const uint8_t*, int64_t, int64_t, bool);

template <DType T>
struct Tiles {
  TileFn<T> tile[kMaxMr][kTileRows] = {{Tile<T, 1, 1>, Tile<T, 1, 2>},
                                       {Tile<T, 2, 1>, Tile<T, 2, 2>},
                                       {Tile<T, 3, 1>, Tile<T, 3, 2>},
                                       {Tile<T, 4, 1>, Tile<T, 4, 2>}};
};

template <DType T>
void GemmT(float* y, const uint8_t* xq, int64_t m, const uint8_t* w, int64_t n, int64_t k,
           int64_t j_begin, int64_t j_end, bool accumulate) {
  const Layout32 l32 = Layout32Of(k);
  const NaturalLayout lk = NaturalLayoutOf(T, k);
  const int64_t ldx = ActRowBytes(T, k);
  const int64_t rb = RowBytes(T, k);
  if (m == 1) {
    for (int64_t j = j_begin; j < j_end; j += 4) {
      const int rows = static_cast<int>(std::min<int64_t>(4, j_end - j));
      GemvRows<T>(y + j, xq, l32, lk, w + j * rb, rb, k, rows, accumulate);
    }
    return;
  }
  static const Tiles<T> tiles;
  // A panel of weight rows (~128 KiB) stays in L2 while every token tile passes over it.
  const int64_t panel = std::max<int64_t>(kTileRows, 128 * 1024 / rb / kTileRows * kTileRows);
  for (int64_t jp = j_begin; jp < j_end; jp += panel) {
    const int64_t jp_end = std::min(j_end, jp + panel);
    for (int64_t i = 0; i < m; i += kMaxMr) {
      const int mr = static_cast<int>(std::min<int64_t>(kMaxMr, m - i));
      for (int64_t j = jp; j < jp_end; j += kTileRows) {
        const int nr = static_cast<int>(std::min<int64_t>(kTileRows, jp_end - j));
        tiles.tile[mr - 1][nr - 1](y + i * n + j, n, xq + i * ldx, ldx, l32, lk, w + j * rb, rb, k,
                                   accumulate);
      }
    }
  }
}

void Gemm(DType t, float* y, const uint8_t* xq, int64_t m, const uint8_t* w, int64_t n, int64_t k,
          int64_t j_begin, int64_t j_end, bool accumulate) {
  WithQuantType(t, [&](auto type) {
    GemmT<decltype(type)::value>(y, xq, m, w, n, k, j_begin, j_end, accumulate);
  });
}

const QuantOps kAvx512VnniQuantOps = {
    .name = "avx512vnni",
    .act_row_bytes = ActRowBytes,
    .quantize_act = QuantizeAct,
    .gemm = Gemm,
};

}  // namespace

const QuantOps* Avx512VnniQuantOps() { return &kAvx512VnniQuantOps; }

}  // namespace loraplex::kernels::cpu

#else  // not an x86 build with the AVX-512 VNNI flags (see kernels/quant.cmake)

namespace loraplex::kernels::cpu {
const QuantOps* Avx512VnniQuantOps() { return nullptr; }
}  // namespace loraplex::kernels::cpu

#endif
