// Block geometry, DequantizeRow and QuantizeRow of kernels/quant.h: plain loops, one block at a
// time, in the arithmetic order of ggml's reference functions and the gguf Python package (every
// product and sum its own f32 rounding). This file is built with -ffp-contract=off
// (kernels/quant.cmake) so that no compiler fuses `d * q - m` into one rounding.
#include "kernels/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/half.h"
#include "common/logging.h"

namespace loraplex::kernels {
namespace {

constexpr int64_t kQK = 32;    // values per Q8_0 / Q4_0 / Q4_1 block
constexpr int64_t kQKK = 256;  // values per K-quant super-block

inline float LoadF16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return F16ToF32(h);
}

inline void StoreF16(uint8_t* p, float v) {
  const uint16_t h = F32ToF16(v);
  std::memcpy(p, &h, sizeof(h));
}

void DequantizeQ8_0(const uint8_t* b, float* out) {
  const float d = LoadF16(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int i = 0; i < kQK; ++i) out[i] = static_cast<float>(qs[i]) * d;
}

void DequantizeQ4_0(const uint8_t* b, float* out) {
  const float d = LoadF16(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < kQK / 2; ++j) {
    out[j] = d * static_cast<float>((qs[j] & 0x0F) - 8);
    out[j + kQK / 2] = d * static_cast<float>((qs[j] >> 4) - 8);
  }
}

void DequantizeQ4_1(const uint8_t* b, float* out) {
  const float d = LoadF16(b);
  const float m = LoadF16(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < kQK / 2; ++j) {
    out[j] = d * static_cast<float>(qs[j] & 0x0F) + m;
    out[j + kQK / 2] = d * static_cast<float>(qs[j] >> 4) + m;
  }
}

// The eight 6-bit scales and mins of a Q4_K / Q5_K super-block (layout in kernels/quant.h).
void UnpackScalesMins(const uint8_t* s, uint8_t sc[8], uint8_t mn[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = s[j] & 0x3F;
    mn[j] = s[4 + j] & 0x3F;
    sc[4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 6) << 4);
    mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 6) << 4);
  }
}

// Q4_K and Q5_K share everything but the fifth bit (qh == nullptr for Q4_K).
void DequantizeK4or5(const uint8_t* b, const uint8_t* qh, const uint8_t* qs, float* out) {
  const float d = LoadF16(b);
  const float dmin = LoadF16(b + 2);
  uint8_t sc[8], mn[8];
  UnpackScalesMins(b + 4, sc, mn);
  for (int s = 0; s < 8; ++s) {
    const float ds = d * static_cast<float>(sc[s]);
    const float ms = dmin * static_cast<float>(mn[s]);
    const uint8_t* q = qs + 32 * (s / 2);
    const int shift = 4 * (s % 2);
    for (int l = 0; l < 32; ++l) {
      int v = (q[l] >> shift) & 0x0F;
      if (qh != nullptr) v |= ((qh[l] >> s) & 1) << 4;
      out[32 * s + l] = ds * static_cast<float>(v) - ms;
    }
  }
}

void DequantizeQ4_K(const uint8_t* b, float* out) { DequantizeK4or5(b, nullptr, b + 16, out); }
void DequantizeQ5_K(const uint8_t* b, float* out) { DequantizeK4or5(b, b + 16, b + 48, out); }

void DequantizeQ6_K(const uint8_t* b, float* out) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  const float d = LoadF16(b + 208);
  for (int e = 0; e < kQKK; ++e) {
    const int h = e / 128, c = (e % 128) / 32, l = e % 32;
    const uint8_t low = ql[64 * h + 32 * (c % 2) + l];
    const int lo4 = c < 2 ? (low & 0x0F) : (low >> 4);
    const int hi2 = (qh[32 * h + l] >> (2 * c)) & 3;
    const float ds = d * static_cast<float>(scales[e / 16]);
    out[e] = ds * static_cast<float>((lo4 | (hi2 << 4)) - 32);
  }
}

// quantize_row_q8_0_ref: d = max|x| / 127, q = roundf(x / d) (half away from zero).
void QuantizeQ8_0(const float* x, uint8_t* b) {
  float amax = 0.0f;
  for (int j = 0; j < kQK; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  StoreF16(b, d);
  int8_t* qs = reinterpret_cast<int8_t*>(b + 2);
  for (int j = 0; j < kQK; ++j) qs[j] = static_cast<int8_t>(std::roundf(x[j] * id));
}

// quantize_row_q4_0_ref: d = -(the value of largest magnitude) / 8 (the first such value),
// q = min(15, trunc(x / d + 8.5)).
void QuantizeQ4_0(const float* x, uint8_t* b) {
  float amax = 0.0f, max = 0.0f;
  for (int j = 0; j < kQK; ++j) {
    if (amax < std::fabs(x[j])) {
      amax = std::fabs(x[j]);
      max = x[j];
    }
  }
  const float d = max / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  StoreF16(b, d);
  uint8_t* qs = b + 2;
  for (int j = 0; j < kQK / 2; ++j) {
    const float x0 = x[j] * id;
    const float x1 = x[kQK / 2 + j] * id;
    const int q0 = std::min(15, static_cast<int>(x0 + 8.5f));  // x0 >= -8: truncation
    const int q1 = std::min(15, static_cast<int>(x1 + 8.5f));
    qs[j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

using DequantizeBlockFn = void (*)(const uint8_t*, float*);

DequantizeBlockFn DequantizeFn(DType t) {
  switch (t) {
    case DType::kQ8_0:
      return DequantizeQ8_0;
    case DType::kQ4_0:
      return DequantizeQ4_0;
    case DType::kQ4_1:
      return DequantizeQ4_1;
    case DType::kQ4_K:
      return DequantizeQ4_K;
    case DType::kQ5_K:
      return DequantizeQ5_K;
    case DType::kQ6_K:
      return DequantizeQ6_K;
    case DType::kF32:
    case DType::kBF16:
      break;
  }
  return nullptr;
}

}  // namespace

bool IsQuantized(DType t) { return t != DType::kF32 && t != DType::kBF16; }

int64_t BlockSize(DType t) {
  switch (t) {
    case DType::kF32:
    case DType::kBF16:
      return 1;
    case DType::kQ8_0:
    case DType::kQ4_0:
    case DType::kQ4_1:
      return kQK;
    case DType::kQ4_K:
    case DType::kQ5_K:
    case DType::kQ6_K:
      return kQKK;
  }
  LP_CHECK(false) << "unknown DType " << static_cast<int>(t);
  return 1;
}

int64_t BytesPerBlock(DType t) {
  switch (t) {
    case DType::kF32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kQ8_0:
      return 34;
    case DType::kQ4_0:
      return 18;
    case DType::kQ4_1:
      return 20;
    case DType::kQ4_K:
      return 144;
    case DType::kQ5_K:
      return 176;
    case DType::kQ6_K:
      return 210;
  }
  LP_CHECK(false) << "unknown DType " << static_cast<int>(t);
  return 0;
}

int64_t RowBytes(DType t, int64_t cols) {
  const int64_t bs = BlockSize(t);
  LP_CHECK(cols >= 0 && cols % bs == 0)
      << DTypeName(t) << " row of " << cols << " values: not a multiple of the block size " << bs;
  return cols / bs * BytesPerBlock(t);
}

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "f32";
    case DType::kBF16:
      return "bf16";
    case DType::kQ8_0:
      return "q8_0";
    case DType::kQ4_0:
      return "q4_0";
    case DType::kQ4_1:
      return "q4_1";
    case DType::kQ4_K:
      return "q4_K";
    case DType::kQ5_K:
      return "q5_K";
    case DType::kQ6_K:
      return "q6_K";
  }
  return "unknown";
}

void DequantizeRow(DType t, const void* row, float* out, int64_t cols) {
  const uint8_t* src = static_cast<const uint8_t*>(row);
  if (t == DType::kF32) {
    std::memcpy(out, src, static_cast<size_t>(cols) * sizeof(float));
    return;
  }
  if (t == DType::kBF16) {
    for (int64_t i = 0; i < cols; ++i) {
      uint16_t h;
      std::memcpy(&h, src + 2 * i, sizeof(h));
      out[i] = Bf16ToF32(h);
    }
    return;
  }
  const int64_t bs = BlockSize(t);
  const int64_t bytes = BytesPerBlock(t);
  LP_CHECK(cols >= 0 && cols % bs == 0) << DTypeName(t) << " row of " << cols << " values";
  const DequantizeBlockFn fn = DequantizeFn(t);
  for (int64_t b = 0; b < cols / bs; ++b) fn(src + b * bytes, out + b * bs);
}

void QuantizeRow(DType t, const float* x, void* row, int64_t cols) {
  LP_CHECK(t == DType::kQ8_0 || t == DType::kQ4_0)
      << "QuantizeRow supports q8_0 and q4_0, not " << DTypeName(t);
  LP_CHECK(cols >= 0 && cols % kQK == 0) << DTypeName(t) << " row of " << cols << " values";
  uint8_t* dst = static_cast<uint8_t*>(row);
  const int64_t bytes = BytesPerBlock(t);
  for (int64_t b = 0; b < cols / kQK; ++b) {
    if (t == DType::kQ8_0) {
      QuantizeQ8_0(x + b * kQK, dst + b * bytes);
    } else {
      QuantizeQ4_0(x + b * kQK, dst + b * bytes);
    }
  }
}

}  // namespace loraplex::kernels
