// Block geometry, DequantizeRow and QuantizeRow of kernels/quant.h. Dequantization is formats/
// dequantize.h's (bit-exact with the gguf Python package); quantization follows ggml's reference
// functions, every product and sum its own f32 rounding. This file is built with
// -ffp-contract=off (kernels/quant.cmake) so that no compiler fuses a multiply and an add.
#include "kernels/quant.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/half.h"
#include "common/logging.h"
#include "formats/dequantize.h"

namespace loraplex::kernels {
namespace {

constexpr int64_t kQK = 32;    // values per Q8_0 / Q4_0 / Q4_1 block
constexpr int64_t kQKK = 256;  // values per K-quant super-block

inline void StoreF16(uint8_t* p, float v) {
  const uint16_t h = F32ToF16(v);
  std::memcpy(p, &h, sizeof(h));
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

// The file format's name of a quantized DType (formats/ holds the one dequantizer).
formats::StoredType StoredTypeOf(DType t) {
  switch (t) {
    case DType::kQ8_0:
      return formats::StoredType::kQ8_0;
    case DType::kQ4_0:
      return formats::StoredType::kQ4_0;
    case DType::kQ4_1:
      return formats::StoredType::kQ4_1;
    case DType::kQ4_K:
      return formats::StoredType::kQ4_K;
    case DType::kQ5_K:
      return formats::StoredType::kQ5_K;
    case DType::kQ6_K:
      return formats::StoredType::kQ6_K;
    case DType::kF32:
      return formats::StoredType::kF32;
    case DType::kBF16:
      return formats::StoredType::kBF16;
  }
  LP_CHECK(false) << "unknown DType " << static_cast<int>(t);
  return formats::StoredType::kF32;
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
  const int64_t bs = BlockSize(t);
  LP_CHECK(cols >= 0 && cols % bs == 0) << DTypeName(t) << " row of " << cols << " values";
  formats::DequantizeBlocks(StoredTypeOf(t), static_cast<const uint8_t*>(row), cols / bs, out);
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
