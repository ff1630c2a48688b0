// AVX2/FMA micro-kernel of the LoRA ops (lora_internal.h). This file alone is compiled with
// -mavx2 -mfma (kernels/lora.cmake); lora_fast.cc calls it only after checking the CPU at runtime.
//
// Register blocking: 8 accumulators of 8 floats, one per (weight row, token) pair: 8 rows x 1
// token, or 4 rows x 2 tokens when a tile has several tokens of one adapter (each weight vector
// then feeds two FMAs, halving the loads and bf16 widenings per FMA). The 8 accumulators are
// reduced together by a transpose tree (Reduce8), so one hadd tree serves 8 outputs.
//
// bf16 widening with the shift trick: a 256-bit load holds 16 bf16 weights; as 8 32-bit lanes,
// `lane << 16` is the even element as an f32 and `lane & 0xffff0000` the odd one, two cheap
// in-lane ops instead of a cross-lane zero-extension per 8. The packed input holds each 16-block
// as its 8 even then its 8 odd elements to match. The block tail (8 <= rest < 16) is widened with
// the zero-extension in natural order; the last rest < 8 goes through a zero-padded copy, so all
// tails share the loop body.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "kernels/cpu/lora_internal.h"

namespace loraplex::kernels::lora_internal {
namespace {

// The block functions below must inline into their row loop, or the accumulators live in memory.
#define LP_LORA_INLINE inline __attribute__((always_inline))

// Lane i = ((a_i0 + a_i1) + (a_i2 + a_i3)) + ((a_i4 + a_i5) + (a_i6 + a_i7)) for accumulator a_i.
LP_LORA_INLINE __m256 Reduce8(const __m256* a) {
  const __m256 q0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 q1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(q0, q1, 0x20), _mm256_permute2f128_ps(q0, q1, 0x31));
}

// Accumulates rows x tokens dot products over all of k. acc[t * kRows + r] belongs to weight row
// wr[r] and input in[t]; every accumulator sees the same operations in the same order.
// A block's rows are contiguous, and the next blocks follow: each step of a block prefetches as
// many bytes as it consumes, kPrefetchBytes past the block start plus what it has consumed so far,
// so the stream stays that far ahead of the loads across blocks, tiles and matrices of any shape
// (the hardware prefetcher alone ramps up too slowly on the many small matrices of a decode step).
constexpr int64_t kPrefetchBytes = 2048;
template <int kBytes, typename T>
LP_LORA_INLINE void PrefetchAhead(const T* block_start, int64_t consumed_bytes) {
  const char* p = reinterpret_cast<const char*>(block_start) + kPrefetchBytes + consumed_bytes;
  for (int line = 0; line < kBytes; line += 64) _mm_prefetch(p + line, _MM_HINT_T0);
}

// One natural-order 8-block at k: weights wr[r] + k, or padded[r] when given (then already offset).
template <int kRows, int kTokens>
LP_LORA_INLINE void NaturalBf16(const uint16_t* const* wr, const float* const* in, int64_t k,
                                const uint16_t* const* padded, __m256* acc) {
  __m256 x[kTokens];
  for (int t = 0; t < kTokens; ++t) x[t] = _mm256_loadu_ps(in[t] + k);
  for (int r = 0; r < kRows; ++r) {
    const uint16_t* p = padded != nullptr ? padded[r] : wr[r] + k;
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256 w = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
    for (int t = 0; t < kTokens; ++t) {
      acc[t * kRows + r] = _mm256_fmadd_ps(w, x[t], acc[t * kRows + r]);
    }
  }
}

template <int kRows, int kTokens>
LP_LORA_INLINE void DotBf16(const uint16_t* const* wr, const float* const* in, int64_t k_len,
                            __m256* acc) {
  for (int i = 0; i < kRows * kTokens; ++i) acc[i] = _mm256_setzero_ps();
  const __m256i hi_mask = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  int64_t k = 0;
  for (; k + 16 <= k_len; k += 16) {
    __m256 xe[kTokens], xo[kTokens];
    for (int t = 0; t < kTokens; ++t) {
      xe[t] = _mm256_loadu_ps(in[t] + k);
      xo[t] = _mm256_loadu_ps(in[t] + k + 8);
    }
    PrefetchAhead<kRows * 32>(wr[0], k * kRows * 2);
    for (int r = 0; r < kRows; ++r) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr[r] + k));
      const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(raw, 16));
      const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(raw, hi_mask));
      for (int t = 0; t < kTokens; ++t) {
        acc[t * kRows + r] = _mm256_fmadd_ps(we, xe[t], acc[t * kRows + r]);
        acc[t * kRows + r] = _mm256_fmadd_ps(wo, xo[t], acc[t * kRows + r]);
      }
    }
  }
  // The rest in natural order: at most one full 8-block, then a zero-padded one (odd sizes only).
  if (k + 8 <= k_len) {
    PrefetchAhead<kRows * 16>(wr[0], k * kRows * 2);
    NaturalBf16<kRows, kTokens>(wr, in, k, nullptr, acc);
    k += 8;
  }
  if (k < k_len) {
    uint16_t pad[kRows][8] = {};
    const uint16_t* padded[kRows];
    for (int r = 0; r < kRows; ++r) {
      std::memcpy(pad[r], wr[r] + k, (k_len - k) * sizeof(uint16_t));
      padded[r] = pad[r];
    }
    NaturalBf16<kRows, kTokens>(padded, in, k, padded, acc);
  }
}

template <int kRows, int kTokens>
LP_LORA_INLINE void DotF32(const float* const* wr, const float* const* in, int64_t k_len,
                           __m256* acc) {
  for (int i = 0; i < kRows * kTokens; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t k = 0; k < k_len; k += 8) {
    const int64_t n = std::min<int64_t>(8, k_len - k);
    // Lanes past the row end are masked off: never read, zero in the FMA.
    const __m256i mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 x[kTokens];
    for (int t = 0; t < kTokens; ++t) x[t] = _mm256_loadu_ps(in[t] + k);
    for (int r = 0; r < kRows; ++r) {
      const __m256 w = n == 8 ? _mm256_loadu_ps(wr[r] + k) : _mm256_maskload_ps(wr[r] + k, mask);
      for (int t = 0; t < kTokens; ++t) {
        acc[t * kRows + r] = _mm256_fmadd_ps(w, x[t], acc[t * kRows + r]);
      }
    }
  }
}

// One block of kRows rows (from n0; rows past the tile end repeat its last row, already in cache,
// and their sums are dropped) x kTokens tokens (in[0..], out[0..]).
template <typename T, int kRows, int kTokens>
LP_LORA_INLINE void Block(const Tile& tile, const T* w, int64_t n0, const float* const* in,
                          float* const* out) {
  const int64_t k_len = tile.w->cols;
  const int64_t valid = std::min<int64_t>(kRows, tile.row_end - n0);
  const T* wr[kRows];
  if (valid == kRows) {
    for (int r = 0; r < kRows; ++r) wr[r] = w + (n0 + r) * k_len;
  } else {
    for (int r = 0; r < kRows; ++r) wr[r] = w + (n0 + std::min<int64_t>(r, valid - 1)) * k_len;
  }
  __m256 acc[8];
  for (int i = kRows * kTokens; i < 8; ++i) acc[i] = _mm256_setzero_ps();
  if constexpr (sizeof(T) == 2) {
    DotBf16<kRows, kTokens>(wr, in, k_len, acc);
  } else {
    DotF32<kRows, kTokens>(wr, in, k_len, acc);
  }
  const __m256 sums = Reduce8(acc);
  if (valid == kRows && kRows * kTokens == 8) {
    // Lanes [t * kRows, (t + 1) * kRows) are token t's rows n0.., contiguous in its output row.
    if constexpr (kTokens == 1) {
      float* o = out[0] + n0;
      _mm256_storeu_ps(o, tile.accumulate ? _mm256_add_ps(_mm256_loadu_ps(o), sums) : sums);
      return;
    } else if constexpr (kTokens == 2) {
      __m128 part[2] = {_mm256_castps256_ps128(sums), _mm256_extractf128_ps(sums, 1)};
      for (int t = 0; t < 2; ++t) {
        float* o = out[t] + n0;
        _mm_storeu_ps(o, tile.accumulate ? _mm_add_ps(_mm_loadu_ps(o), part[t]) : part[t]);
      }
      return;
    }
  }
  alignas(32) float s[8];
  _mm256_store_ps(s, sums);
  for (int t = 0; t < kTokens; ++t) {
    float* o = out[t] + n0;
    for (int64_t r = 0; r < valid; ++r) {
      o[r] = tile.accumulate ? o[r] + s[t * kRows + r] : s[t * kRows + r];
    }
  }
}

// One token: short rows (the expand, k = rank) go 8 at a time so that one reduction tree serves 8
// outputs; long rows (the shrink, k = hidden size) 2 at a time, which streams the weights nearly
// sequentially: 8 interleaved row streams measured ~25% slower from DRAM. The per-output
// arithmetic is the same either way.
constexpr int64_t kShortRow = 64;

template <typename T>
void TileT(const Tile& tile) {
  const T* w = static_cast<const T*>(tile.w->data);
  int64_t t = 0;
  for (; t + 2 <= tile.num_tokens; t += 2) {
    for (int64_t n = tile.row_begin; n < tile.row_end; n += 4) {
      Block<T, 4, 2>(tile, w, n, tile.in + t, tile.out + t);
    }
  }
  for (; t < tile.num_tokens; ++t) {
    if (tile.w->cols <= kShortRow) {
      for (int64_t n = tile.row_begin; n < tile.row_end; n += 8) {
        Block<T, 8, 1>(tile, w, n, tile.in + t, tile.out + t);
      }
    } else {
      for (int64_t n = tile.row_begin; n < tile.row_end; n += 2) {
        Block<T, 2, 1>(tile, w, n, tile.in + t, tile.out + t);
      }
    }
  }
}

void TileAvx2(const Tile& tile) {
  if (tile.w->dtype == DType::kF32) {
    TileT<float>(tile);
  } else {
    TileT<uint16_t>(tile);
  }
}

void PackAvx2(float* dst, const float* src, int64_t k_len, DType dtype) {
  int64_t k = 0;
  if (dtype == DType::kBF16) {
    // Each 16-block as its even then its odd elements (see the file comment).
    for (; k + 16 <= k_len; k += 16) {
      const __m256 a = _mm256_loadu_ps(src + k), b = _mm256_loadu_ps(src + k + 8);
      // shuffle_ps works within 128-bit lanes: [a0 a2 b0 b2 | a4 a6 b4 b6]; the 64-bit permute
      // puts the pairs in order.
      const __m256 e = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0));
      const __m256 o = _mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1));
      _mm256_storeu_ps(dst + k, _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(e),
                                                                       _MM_SHUFFLE(3, 1, 2, 0))));
      _mm256_storeu_ps(dst + k + 8, _mm256_castpd_ps(_mm256_permute4x64_pd(
                                        _mm256_castps_pd(o), _MM_SHUFFLE(3, 1, 2, 0))));
    }
  }
  for (; k < k_len; ++k) dst[k] = src[k];
  for (; k < PackedLength(k_len); ++k) dst[k] = 0.0f;
}

}  // namespace

const MicroKernel& Avx2Kernel() {
  static const MicroKernel kernel{&PackAvx2, &TileAvx2, "avx2"};
  return kernel;
}

}  // namespace loraplex::kernels::lora_internal
