// The fast row-wise and element-wise ops. They are memory-bound and small next to Gemm, so they are
// plain loops the compiler vectorises (or the ISA table's loops where a reduction or exp is
// involved), threaded only when a call is large enough to pay for the wake-up.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/half.h"
#include "common/logging.h"
#include "common/thread_pool.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/kernels.h"
#include "kernels/quant.h"

namespace loraplex::kernels {
namespace {

// Elements below which an element-wise call stays on the calling thread.
constexpr int64_t kMinElementsPerShare = 1 << 14;

int64_t RowGrain(int64_t row_elements) {
  return std::max<int64_t>(1, kMinElementsPerShare / std::max<int64_t>(1, row_elements));
}

}  // namespace

void RmsNorm(float* out, const float* x, const float* weight, int64_t rows, int64_t dim,
             float eps) {
  if (rows <= 0 || dim <= 0) return;
  const cpu::CpuOps& ops = cpu::ActiveCpuOps();
  ThreadPool::Default().ParallelFor(
      rows,
      [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const float* xr = x + r * dim;
          float* o = out + r * dim;
          const float sum_sq = ops.dot(xr, xr, dim);
          const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(dim) + eps);
          for (int64_t i = 0; i < dim; ++i) o[i] = xr[i] * inv_rms * weight[i];
        }
      },
      RowGrain(dim));
}

void Rope(float* x, const int32_t* positions, int64_t tokens, int64_t heads, int64_t head_dim,
          const float* inv_freq) {
  if (tokens <= 0 || heads <= 0 || head_dim <= 0) return;
  const int64_t half = head_dim / 2;
  ThreadPool::Default().ParallelFor(
      tokens,
      [&](int64_t t0, int64_t t1) {
        // cos/sin depend on the position only: computed once per token, shared by its heads.
        std::vector<float> cs(2 * half);
        for (int64_t t = t0; t < t1; ++t) {
          for (int64_t i = 0; i < half; ++i) {
            const float angle = static_cast<float>(positions[t]) * inv_freq[i];
            cs[i] = std::cos(angle);
            cs[half + i] = std::sin(angle);
          }
          for (int64_t h = 0; h < heads; ++h) {
            float* v = x + (t * heads + h) * head_dim;
            for (int64_t i = 0; i < half; ++i) {
              const float a = v[i];
              const float b = v[i + half];
              v[i] = a * cs[i] - b * cs[half + i];
              v[i + half] = b * cs[i] + a * cs[half + i];
            }
          }
        }
      },
      RowGrain(heads * head_dim));
}

void SiluMul(float* out, const float* gate, const float* up, int64_t n) {
  if (n <= 0) return;
  const cpu::CpuOps& ops = cpu::ActiveCpuOps();
  ThreadPool::Default().ParallelFor(
      n, [&](int64_t b, int64_t e) { ops.silu_mul(out + b, gate + b, up + b, e - b); },
      kMinElementsPerShare);
}

void Add(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

float Max(const float* x, int64_t n) {
  // 16 independent running maxima the compiler keeps in vector registers; `v > m ? v : m` is
  // MAXPS exactly (a NaN v keeps m).
  constexpr int64_t kLanes = 16;
  float m[kLanes];
  std::fill(m, m + kLanes, -std::numeric_limits<float>::infinity());
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) m[j] = x[i + j] > m[j] ? x[i + j] : m[j];
  }
  for (; i < n; ++i) m[0] = x[i] > m[0] ? x[i] : m[0];
  float max = m[0];
  for (int64_t j = 1; j < kLanes; ++j) max = m[j] > max ? m[j] : max;
  return max;
}

double LogSumExp(const float* x, int64_t n) {
  const float max = Max(x, n);
  if (std::isinf(max)) return max;
  return max + std::log(ExpMass(x, n, max, 1.0));
}

double ExpMass(const float* x, int64_t n, float max, double inv_t) {
  // exp in f32 SIMD over chunks small enough that their f32 sums stay accurate; chunks summed in
  // f64. Each entry becomes its scaled distance to the maximum first: 0 for the maximum itself,
  // at most 200 below (exp(-200) underflows to 0 in f32 anyway), -200 for NaN (not a candidate)
  // and -inf.
  if (std::isinf(max)) {  // only the entries equal to it count (inf - inf would be NaN below)
    return static_cast<double>(std::count(x, x + n, max));
  }
  constexpr int64_t kChunk = 1024;
  constexpr float kFloor = -200.0f;
  const cpu::CpuOps& ops = cpu::ActiveCpuOps();
  const float scale = static_cast<float>(inv_t);
  float buf[kChunk];
  double sum = 0;
  for (int64_t b = 0; b < n; b += kChunk) {
    const int64_t len = std::min(kChunk, n - b);
    for (int64_t i = 0; i < len; ++i) {
      const float d = (x[b + i] - max) * scale;
      buf[i] = d >= kFloor ? d : kFloor;  // NaN compares false: the floor
    }
    sum += ops.exp_shift_sum(buf, 0.0f, len);
  }
  return sum;
}

void Embed(float* out, const int32_t* ids, int64_t n, const WeightView& table) {
  const int64_t dim = table.cols;
  for (int64_t t = 0; t < n; ++t) {
    LP_CHECK(ids[t] >= 0 && ids[t] < table.rows) << "token id " << ids[t] << " of " << table.rows;
    float* o = out + t * dim;
    if (IsQuantized(table.dtype)) {
      const int64_t row_bytes = RowBytes(table.dtype, dim);
      DequantizeRow(table.dtype, static_cast<const uint8_t*>(table.data) + ids[t] * row_bytes, o,
                    dim);
    } else if (table.dtype == DType::kF32) {
      std::memcpy(o, static_cast<const float*>(table.data) + ids[t] * dim, dim * sizeof(float));
    } else {
      const uint16_t* row = static_cast<const uint16_t*>(table.data) + ids[t] * dim;
      for (int64_t c = 0; c < dim; ++c) o[c] = Bf16ToF32(row[c]);
    }
  }
}

}  // namespace loraplex::kernels
