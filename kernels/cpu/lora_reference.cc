// The readable LoRA ops: plain loops over tokens, slices, rows and columns (kernels/lora.h).
// SGMV is expressed through BGMV (one adapter index per token) so the two cannot disagree.

#include <algorithm>
#include <vector>

#include "common/half.h"
#include "common/logging.h"
#include "kernels/lora.h"

namespace loraplex::kernels {

// Shared by the reference and the fast versions (declared in lora.h).
int64_t LoraSliceOffset(const LoraSliceWeights& w, int64_t adapter, int64_t slice) {
  int64_t off = 0;
  for (int64_t s = 0; s < slice; ++s) off += w.a[adapter * w.num_slices + s].rows;
  return off;
}

int64_t LoraTotalRank(const LoraSliceWeights& w, int64_t adapter) {
  return LoraSliceOffset(w, adapter, w.num_slices);
}

namespace ref {
namespace {

// W[row, col] widened to f32.
float At(const WeightView& w, int64_t row, int64_t col) {
  int64_t i = row * w.cols + col;
  if (w.dtype == DType::kF32) return static_cast<const float*>(w.data)[i];
  return Bf16ToF32(static_cast<const uint16_t*>(w.data)[i]);
}

void CheckAdapter(const LoraSliceWeights& w, int32_t j) {
  LP_CHECK(j >= -1 && j < w.num_adapters) << "adapter index " << j << " of " << w.num_adapters;
}

}  // namespace

void BgmvShrink(float* v, int64_t v_stride, const float* x, int64_t x_stride,
                const int32_t* token_adapter, int64_t num_tokens, const LoraSliceWeights& w) {
  LP_CHECK(w.num_slices >= 1 && w.num_slices <= kMaxLoraSlices);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int32_t j = token_adapter[t];
    CheckAdapter(w, j);
    if (j < 0) continue;
    LP_CHECK(LoraTotalRank(w, j) <= v_stride) << "v_stride " << v_stride;
    const float* xt = x + t * x_stride;  // [in]
    for (int64_t s = 0; s < w.num_slices; ++s) {
      const WeightView& a = w.a[j * w.num_slices + s];          // [r, in]
      float* vt = v + t * v_stride + LoraSliceOffset(w, j, s);  // [r]
      for (int64_t r = 0; r < a.rows; ++r) {
        float acc = 0.0f;
        for (int64_t i = 0; i < a.cols; ++i) acc += At(a, r, i) * xt[i];
        vt[r] = acc;
      }
    }
  }
}

void BgmvExpand(const LoraOutput* y, const float* v, int64_t v_stride, const int32_t* token_adapter,
                int64_t num_tokens, const LoraSliceWeights& w) {
  LP_CHECK(w.num_slices >= 1 && w.num_slices <= kMaxLoraSlices);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int32_t j = token_adapter[t];
    CheckAdapter(w, j);
    if (j < 0) continue;
    for (int64_t s = 0; s < w.num_slices; ++s) {
      const WeightView& b = w.b[j * w.num_slices + s];  // [out, r]
      LP_CHECK(b.cols == w.a[j * w.num_slices + s].rows) << "rank of A and B differ";
      const float* vt = v + t * v_stride + LoraSliceOffset(w, j, s);  // [r]
      float* yt = y[s].data + t * y[s].stride;                        // [out]
      for (int64_t o = 0; o < b.rows; ++o) {
        float acc = 0.0f;
        for (int64_t r = 0; r < b.cols; ++r) acc += At(b, o, r) * vt[r];
        yt[o] += acc;
      }
    }
  }
}

namespace {
// Segments -> one adapter index per token.
std::vector<int32_t> TokenAdapters(const LoraSegments& seg) {
  std::vector<int32_t> per_token(seg.num_segments > 0 ? seg.starts[seg.num_segments] : 0, -1);
  for (int64_t i = 0; i < seg.num_segments; ++i) {
    LP_CHECK(seg.starts[i] <= seg.starts[i + 1]) << "segment starts must ascend";
    for (int64_t t = seg.starts[i]; t < seg.starts[i + 1]; ++t) per_token[t] = seg.adapter[i];
  }
  return per_token;
}
}  // namespace

void SgmvShrink(float* v, int64_t v_stride, const float* x, int64_t x_stride,
                const LoraSegments& segments, const LoraSliceWeights& w) {
  if (segments.num_segments == 0) return;
  const int64_t first = segments.starts[0];
  std::vector<int32_t> per_token = TokenAdapters(segments);
  ref::BgmvShrink(v + first * v_stride, v_stride, x + first * x_stride, x_stride,
                  per_token.data() + first, static_cast<int64_t>(per_token.size()) - first, w);
}

void SgmvExpand(const LoraOutput* y, const float* v, int64_t v_stride, const LoraSegments& segments,
                const LoraSliceWeights& w) {
  if (segments.num_segments == 0) return;
  const int64_t first = segments.starts[0];
  std::vector<int32_t> per_token = TokenAdapters(segments);
  LoraOutput shifted[kMaxLoraSlices];
  for (int64_t s = 0; s < w.num_slices; ++s) {
    shifted[s] = {y[s].data + first * y[s].stride, y[s].stride};
  }
  ref::BgmvExpand(shifted, v + first * v_stride, v_stride, per_token.data() + first,
                  static_cast<int64_t>(per_token.size()) - first, w);
}

void BgmvShrinkExpand(const LoraOutput* y, const float* x, int64_t x_stride,
                      const int32_t* token_adapter, int64_t num_tokens, const LoraSliceWeights& w,
                      bool negate) {
  int64_t v_stride = 1;
  for (int64_t t = 0; t < num_tokens; ++t) {
    CheckAdapter(w, token_adapter[t]);
    if (token_adapter[t] >= 0) v_stride = std::max(v_stride, LoraTotalRank(w, token_adapter[t]));
  }
  std::vector<float> v(num_tokens * v_stride, 0.0f);
  ref::BgmvShrink(v.data(), v_stride, x, x_stride, token_adapter, num_tokens, w);
  if (negate) {
    for (float& e : v) e = -e;
  }
  ref::BgmvExpand(y, v.data(), v_stride, token_adapter, num_tokens, w);
}

void SgmvShrinkExpand(const LoraOutput* y, const float* x, int64_t x_stride,
                      const LoraSegments& segments, const LoraSliceWeights& w, bool negate) {
  const std::vector<int32_t> per_token = TokenAdapters(segments);
  ref::BgmvShrinkExpand(y, x, x_stride, per_token.data(), static_cast<int64_t>(per_token.size()), w,
                        negate);
}

}  // namespace ref
}  // namespace loraplex::kernels
