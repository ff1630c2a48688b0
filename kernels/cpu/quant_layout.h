// Internal to the quant_ops_*.cc tables: block geometry and the activation quantization they all
// share (quant_ops.h explains the scheme). Everything here has internal linkage (an unnamed
// namespace): each table's translation unit is compiled with its own ISA flags, and a shared
// inline definition could otherwise be taken from a TU whose instructions the CPU lacks.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include "common/half.h"
#include "kernels/kernels.h"

namespace loraplex::kernels::cpu {
namespace {

constexpr int64_t kQ32 = 32;   // values per Q8_0 / Q4_0 / Q4_1 block (and activation block)
constexpr int64_t kQK = 256;   // values per K-quant super-block (and activation block)
constexpr int64_t kSums = 16;  // activation bsums per super-block, one per 16 values

// How far ahead of the block being multiplied the SIMD tables prefetch weight bytes: about the
// bytes in flight at DRAM bandwidth times latency (~15 GB/s x ~100 ns) and then some. Measured on
// a 2-core EPYC streaming 100 MB of Q4_1 / Q8_0 rows: 1 KiB +10%, 2-4 KiB +25% over none.
constexpr int kPrefetchDistance = 2048;

constexpr bool IsKQuant(DType t) {
  return t == DType::kQ4_K || t == DType::kQ5_K || t == DType::kQ6_K;
}

inline int64_t Round64(int64_t bytes) { return (bytes + 63) / 64 * 64; }

inline float LoadF16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return F16ToF32(h);
}

// The activation scale of one block and its inverse: d = max|x| / 127, q = round(x * inv) with
// inv = 127 / max|x|. Every table computes exactly these two floats and rounds x * inv to nearest
// even, so all tables produce the same int8 activations. A block that is all zeros, or so small
// (max|x| < ~4e-37) that inv overflows, becomes zeros (d = inv = 0). Non-finite activations give
// unspecified outputs.
struct ActScale {
  float d;
  float inv;
};
inline ActScale ActScaleOf(float amax) {
  const float inv = 127.0f / amax;
  if (amax == 0.0f || !(inv <= std::numeric_limits<float>::max())) return {0.0f, 0.0f};
  return {amax / 127.0f, inv};
}

// The natural activation layout of the scalar and AVX2 tables, per token row:
//   32-value blocks (Q8_0, Q4_0, Q4_1): int8 qa[k] | f32 da[k/32] | f32 sa[k/32], sa = da*sum(qa)
//   K-quants:                           int8 qa[k] | f32 da[k/256] | int16 bsums[k/16]
// each part starting on a 64-byte boundary.
struct NaturalLayout {
  int64_t scale_offset;  // da
  int64_t extra_offset;  // sa (f32) or bsums (int16)
  int64_t row_bytes;
};
inline NaturalLayout NaturalLayoutOf(DType t, int64_t k) {
  NaturalLayout l;
  l.scale_offset = Round64(k);
  if (IsKQuant(t)) {
    l.extra_offset = l.scale_offset + Round64(k / kQK * 4);
    l.row_bytes = l.extra_offset + Round64(k / kSums * 2);
  } else {
    l.extra_offset = l.scale_offset + Round64(k / kQ32 * 4);
    l.row_bytes = l.extra_offset + Round64(k / kQ32 * 4);
  }
  return l;
}

// The eight 6-bit scales and mins of a Q4_K / Q5_K super-block (layout in kernels/quant.h).
inline void UnpackScalesMins(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 0x3F;
    mn[j] = s[4 + j] & 0x3F;
    sc[4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 6) << 4);
    mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 6) << 4);
  }
}

// The same as 8-byte words (byte s = sc[s] / mn[s]) with 32-bit operations, for the SIMD tables
// (x86, little-endian): three loads, a dozen ALU operations.
inline void UnpackScalesMins64(const uint8_t* s, uint64_t* sc, uint64_t* mn) {
  uint32_t u[3];
  std::memcpy(u, s, sizeof(u));
  constexpr uint32_t k6 = 0x3f3f3f3f, k4 = 0x0f0f0f0f, k2 = 0x03030303;
  const uint32_t sc_lo = u[0] & k6;
  const uint32_t mn_lo = u[1] & k6;
  const uint32_t sc_hi = (u[2] & k4) | (((u[0] >> 6) & k2) << 4);
  const uint32_t mn_hi = ((u[2] >> 4) & k4) | (((u[1] >> 6) & k2) << 4);
  *sc = sc_lo | static_cast<uint64_t>(sc_hi) << 32;
  *mn = mn_lo | static_cast<uint64_t>(mn_hi) << 32;
}

// Calls fn(std::integral_constant<DType, T>{}) with T = t, for the quantized formats (a table's
// templated loops, chosen once per call); f32 and bf16 call nothing.
template <typename Fn>
inline void WithQuantType(DType t, Fn&& fn) {
  switch (t) {
    case DType::kQ8_0:
      return fn(std::integral_constant<DType, DType::kQ8_0>{});
    case DType::kQ4_0:
      return fn(std::integral_constant<DType, DType::kQ4_0>{});
    case DType::kQ4_1:
      return fn(std::integral_constant<DType, DType::kQ4_1>{});
    case DType::kQ4_K:
      return fn(std::integral_constant<DType, DType::kQ4_K>{});
    case DType::kQ5_K:
      return fn(std::integral_constant<DType, DType::kQ5_K>{});
    case DType::kQ6_K:
      return fn(std::integral_constant<DType, DType::kQ6_K>{});
    case DType::kF32:
    case DType::kBF16:
      break;
  }
}

}  // namespace
}  // namespace loraplex::kernels::cpu
