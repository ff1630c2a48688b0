#include "model/lora_apply.h"

#include <algorithm>

#include "common/logging.h"

namespace loraplex::model {
namespace {

using kernels::LoraOutput;
using kernels::LoraSegments;
using kernels::LoraSliceWeights;
using kernels::WeightView;

// Shrink + expand of `w` for the tokens with an index in token_adapter (-1 = none); `negate` flips
// the sign of the delta (mixed mode). Picks SGMV when runs of equal indices are long.
void ShrinkExpand(const LoraSliceWeights& w, const std::vector<int32_t>& token_adapter,
                  const float* x, int64_t x_stride, const LoraOutput* y, bool negate,
                  LoraScratch* s) {
  const int64_t n = static_cast<int64_t>(token_adapter.size());
  int64_t v_stride = 0;
  for (int64_t j = 0; j < w.num_adapters; ++j) {
    v_stride = std::max(v_stride, kernels::LoraTotalRank(w, j));
  }
  if (v_stride == 0) return;
  s->v.resize(n * v_stride);

  // Runs of equal indices.
  s->starts.clear();
  s->seg_adapter.clear();
  int64_t active = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (t == 0 || token_adapter[t] != token_adapter[t - 1]) {
      s->starts.push_back(t);
      s->seg_adapter.push_back(token_adapter[t]);
    }
    active += token_adapter[t] >= 0;
  }
  if (active == 0) return;
  s->starts.push_back(n);
  const int64_t runs = static_cast<int64_t>(s->seg_adapter.size());
  // Segments pay off when each reuses its weights over a few tokens.
  const bool sgmv = n >= 4 * runs;
  LoraSegments seg{runs, s->starts.data(), s->seg_adapter.data()};

  if (sgmv) {
    kernels::SgmvShrink(s->v.data(), v_stride, x, x_stride, seg, w);
  } else {
    kernels::BgmvShrink(s->v.data(), v_stride, x, x_stride, token_adapter.data(), n, w);
  }
  if (negate) {
    for (int64_t t = 0; t < n; ++t) {
      if (token_adapter[t] < 0) continue;
      const int64_t r = kernels::LoraTotalRank(w, token_adapter[t]);
      for (int64_t i = 0; i < r; ++i) s->v[t * v_stride + i] = -s->v[t * v_stride + i];
    }
  }
  if (sgmv) {
    kernels::SgmvExpand(y, s->v.data(), v_stride, seg, w);
  } else {
    kernels::BgmvExpand(y, s->v.data(), v_stride, token_adapter.data(), n, w);
  }
}

// Fills s->a / s->b for `views` x modules of one layer; returns false when no pair exists.
bool Gather(const std::vector<const LoraWeightsView*>& views, const LinearModule* modules,
            int num_modules, int64_t layer, LoraScratch* s) {
  s->a.assign(views.size() * num_modules, WeightView{});
  s->b.assign(views.size() * num_modules, WeightView{});
  bool any = false;
  for (size_t j = 0; j < views.size(); ++j) {
    if (views[j] == nullptr) continue;
    LP_CHECK(layer < static_cast<int64_t>(views[j]->layers.size()));
    for (int i = 0; i < num_modules; ++i) {
      const LoraPair* p = views[j]->layers[layer][static_cast<int>(modules[i])];
      if (p == nullptr) continue;
      s->a[j * num_modules + i] = p->a;
      s->b[j * num_modules + i] = p->b;
      any = true;
    }
  }
  return any;
}

}  // namespace

void ApplyLora(const LinearModule* modules, int num_modules, int64_t layer, const float* x,
               int64_t x_stride, const LoraOutput* y, const ForwardBatch& batch,
               const LoraWeightsView* merged, LoraScratch* s) {
  LP_CHECK(num_modules >= 1 && num_modules <= kernels::kMaxLoraSlices);
  const int64_t n = batch.num_tokens();
  const bool any_slot = std::any_of(batch.adapter_slot.begin(), batch.adapter_slot.end(),
                                    [](int32_t v) { return v >= 0; });
  if (!any_slot && merged == nullptr) return;

  // Each token's own adapter, except the merged one (already in W).
  if (any_slot && Gather(batch.adapters, modules, num_modules, layer, s)) {
    s->token_adapter.assign(n, -1);
    for (int64_t t = 0; t < n; ++t) {
      const int32_t slot = batch.adapter_slot[t];
      if (slot >= 0 && batch.adapters[slot] != merged) s->token_adapter[t] = slot;
    }
    LoraSliceWeights w{static_cast<int64_t>(batch.adapters.size()), num_modules, s->a.data(),
                       s->b.data()};
    ShrinkExpand(w, s->token_adapter, x, x_stride, y, /*negate=*/false, s);
  }

  // Mixed mode: every token not of the merged adapter takes its delta back out.
  if (merged != nullptr && Gather({merged}, modules, num_modules, layer, s)) {
    s->token_adapter.assign(n, 0);
    for (int64_t t = 0; t < n; ++t) {
      const int32_t slot = batch.adapter_slot.empty() ? -1 : batch.adapter_slot[t];
      if (slot >= 0 && batch.adapters[slot] == merged) s->token_adapter[t] = -1;
    }
    LoraSliceWeights w{1, num_modules, s->a.data(), s->b.data()};
    ShrinkExpand(w, s->token_adapter, x, x_stride, y, /*negate=*/true, s);
  }
}

void ApplyLora(std::initializer_list<LinearModule> modules, int64_t layer, const float* x,
               int64_t x_stride, std::initializer_list<LoraOutput> y, const ForwardBatch& batch,
               const LoraWeightsView* merged, LoraScratch* scratch) {
  LP_CHECK(modules.size() == y.size()) << "one output per module";
  ApplyLora(modules.begin(), static_cast<int>(modules.size()), layer, x, x_stride, y.begin(), batch,
            merged, scratch);
}

}  // namespace loraplex::model
