// The readable twins of the fast CPU kernels: plain loops, one output element at a time, f32
// accumulation in the obvious order. These are the definition of each op; the fast versions and the
// CUDA ops are tested against them. Nothing here is threaded or vectorised on purpose.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/half.h"
#include "common/logging.h"
#include "kernels/kernels.h"
#include "kernels/quant.h"

namespace loraplex::kernels::ref {
namespace {

// W[r, c] widened to f32, whatever the storage dtype.
float WeightAt(const WeightView& w, int64_t r, int64_t c) {
  int64_t i = r * w.cols + c;
  if (w.dtype == DType::kF32) return static_cast<const float*>(w.data)[i];
  return Bf16ToF32(static_cast<const uint16_t*>(w.data)[i]);
}

// Offset of (position, kv_head, 0) of one sequence in a cache pool
// [num_blocks, block_size, n_kv_heads, head_dim].
int64_t CacheOffset(const int32_t* block_table, int64_t pos, int64_t kv_head,
                    const KvLayout& layout) {
  int64_t block = block_table[pos / layout.block_size];
  int64_t slot = pos % layout.block_size;
  return ((block * layout.block_size + slot) * layout.n_kv_heads + kv_head) * layout.head_dim;
}

}  // namespace

void Gemm(float* y, const float* x, int64_t m, const WeightView& w, bool accumulate) {
  if (IsQuantized(w.dtype)) {  // dequantize W to f32, then the loop below
    std::vector<float> wf(static_cast<size_t>(w.rows * w.cols));
    for (int64_t r = 0; r < w.rows; ++r) {
      DequantizeRow(w.dtype, static_cast<const uint8_t*>(w.data) + r * RowBytes(w.dtype, w.cols),
                    wf.data() + r * w.cols, w.cols);
    }
    return ref::Gemm(y, x, m, WeightView{DType::kF32, wf.data(), w.rows, w.cols}, accumulate);
  }
  const int64_t n = w.rows;            // output features
  const int64_t k = w.cols;            // input features
  for (int64_t i = 0; i < m; ++i) {    // token
    for (int64_t j = 0; j < n; ++j) {  // output feature
      float sum = 0.0f;
      for (int64_t c = 0; c < k; ++c) sum += x[i * k + c] * WeightAt(w, j, c);
      y[i * n + j] = accumulate ? y[i * n + j] + sum : sum;
    }
  }
}

void RmsNorm(float* out, const float* x, const float* weight, int64_t rows, int64_t dim,
             float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * dim;  // [dim]
    float sum_sq = 0.0f;
    for (int64_t i = 0; i < dim; ++i) sum_sq += xr[i] * xr[i];
    float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) out[r * dim + i] = xr[i] * inv_rms * weight[i];
  }
}

void Rope(float* x, const int32_t* positions, int64_t tokens, int64_t heads, int64_t head_dim,
          const float* inv_freq) {
  const int64_t half = head_dim / 2;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (t * heads + h) * head_dim;  // [head_dim]
      for (int64_t i = 0; i < half; ++i) {
        float angle = static_cast<float>(positions[t]) * inv_freq[i];
        float c = std::cos(angle);
        float s = std::sin(angle);
        float a = v[i];
        float b = v[i + half];
        v[i] = a * c - b * s;
        v[i + half] = b * c + a * s;
      }
    }
  }
}

void SiluMul(float* out, const float* gate, const float* up, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    float g = gate[i];
    out[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void Add(float* y, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

float Max(const float* x, int64_t n) {
  float max = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] > max) max = x[i];
  }
  return max;
}

double LogSumExp(const float* x, int64_t n) {
  double max = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] > max) max = x[i];
  }
  if (std::isinf(max)) return max;
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isnan(x[i])) sum += std::exp(double{x[i]} - max);
  }
  return max + std::log(sum);
}

double ExpMass(const float* x, int64_t n, float max, double inv_t) {
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (x[i] == max) {
      sum += 1.0;
    } else if (!std::isnan(x[i])) {
      sum += std::exp((double{x[i]} - max) * inv_t);
    }
  }
  return sum;
}

void Embed(float* out, const int32_t* ids, int64_t n, const WeightView& table) {
  for (int64_t t = 0; t < n; ++t) {
    LP_CHECK(ids[t] >= 0 && ids[t] < table.rows) << "token id " << ids[t];
    if (IsQuantized(table.dtype)) {
      const int64_t row_bytes = RowBytes(table.dtype, table.cols);
      DequantizeRow(table.dtype, static_cast<const uint8_t*>(table.data) + ids[t] * row_bytes,
                    out + t * table.cols, table.cols);
      continue;
    }
    for (int64_t c = 0; c < table.cols; ++c) out[t * table.cols + c] = WeightAt(table, ids[t], c);
  }
}

void WriteKv(float* k_cache, float* v_cache, const float* k, const float* v,
             const AttentionBatch& batch, const KvLayout& layout) {
  const int64_t hd = layout.head_dim;
  for (int64_t t = 0; t < batch.num_tokens; ++t) {
    const int32_t* table = batch.block_tables + batch.token_seq[t] * layout.max_blocks_per_seq;
    for (int64_t h = 0; h < layout.n_kv_heads; ++h) {
      int64_t dst = CacheOffset(table, batch.token_pos[t], h, layout);
      int64_t src = (t * layout.n_kv_heads + h) * hd;  // k, v: [num_tokens, n_kv_heads, hd]
      for (int64_t i = 0; i < hd; ++i) {
        k_cache[dst + i] = k[src + i];
        v_cache[dst + i] = v[src + i];
      }
    }
  }
}

void PagedAttention(float* out, const float* q, const float* k_cache, const float* v_cache,
                    const AttentionBatch& batch, const KvLayout& layout, int64_t n_heads,
                    float scale, int64_t sliding_window) {
  const int64_t hd = layout.head_dim;
  const int64_t group = n_heads / layout.n_kv_heads;  // query heads per kv head
  std::vector<float> scores;
  for (int64_t t = 0; t < batch.num_tokens; ++t) {
    const int32_t* table = batch.block_tables + batch.token_seq[t] * layout.max_blocks_per_seq;
    const int64_t len = batch.token_pos[t] + 1;  // causal: positions 0..token_pos[t]
    // Sliding window: the first visible position; keys before it are masked out (see kernels.h).
    const int64_t first = sliding_window > 0 ? std::max<int64_t>(0, len - sliding_window) : 0;
    scores.assign(len, 0.0f);
    for (int64_t h = 0; h < n_heads; ++h) {
      const int64_t kvh = h / group;
      const float* qh = q + (t * n_heads + h) * hd;  // [hd]
      // scores[p] = scale * q . K[p]
      float max_score = -INFINITY;
      for (int64_t p = first; p < len; ++p) {
        const float* kp = k_cache + CacheOffset(table, p, kvh, layout);
        float dot = 0.0f;
        for (int64_t i = 0; i < hd; ++i) dot += qh[i] * kp[i];
        scores[p] = dot * scale;
        max_score = std::max(max_score, scores[p]);
      }
      // softmax, shifted by the max so exp never overflows
      float denom = 0.0f;
      for (int64_t p = first; p < len; ++p) {
        scores[p] = std::exp(scores[p] - max_score);
        denom += scores[p];
      }
      // out = sum_p softmax[p] * V[p]
      float* oh = out + (t * n_heads + h) * hd;  // [hd]
      for (int64_t i = 0; i < hd; ++i) oh[i] = 0.0f;
      for (int64_t p = first; p < len; ++p) {
        const float* vp = v_cache + CacheOffset(table, p, kvh, layout);
        for (int64_t i = 0; i < hd; ++i) oh[i] += scores[p] * vp[i];
      }
      for (int64_t i = 0; i < hd; ++i) oh[i] /= denom;
    }
  }
}

}  // namespace loraplex::kernels::ref
