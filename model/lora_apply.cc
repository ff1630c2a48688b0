#include "model/lora_apply.h"

#include <algorithm>

#include "common/logging.h"

namespace loraplex::model {
namespace {

using kernels::LoraOutput;
using kernels::LoraSliceWeights;
using kernels::WeightView;

// Shrink + expand of `w` for the tokens of `pass` (which is active), SGMV or BGMV as the plan
// chose; a negated pass subtracts the delta.
void ShrinkExpand(const LoraSliceWeights& w, const LoraPass& pass, const float* x, int64_t x_stride,
                  const LoraOutput* y) {
  if (pass.sgmv) {
    kernels::SgmvShrinkExpand(y, x, x_stride, pass.segments(), w, pass.negate);
  } else {
    kernels::BgmvShrinkExpand(y, x, x_stride, pass.token_adapter.data(),
                              static_cast<int64_t>(pass.token_adapter.size()), w, pass.negate);
  }
}

// Fills s->a / s->b for `views` x the group's modules in one layer; returns false when no pair
// exists.
bool Gather(const std::vector<const LoraWeightsView*>& views, const LoraModuleGroup& group,
            int64_t layer, LoraScratch* s) {
  const int num_modules = group.num_modules;
  s->a.assign(views.size() * num_modules, WeightView{});
  s->b.assign(views.size() * num_modules, WeightView{});
  bool any = false;
  for (size_t j = 0; j < views.size(); ++j) {
    if (views[j] == nullptr) continue;
    LP_CHECK(layer < static_cast<int64_t>(views[j]->layers.size()));
    for (int i = 0; i < num_modules; ++i) {
      const LoraPair* p = views[j]->layers[layer][static_cast<int>(group.modules[i])];
      if (p == nullptr) continue;
      s->a[j * num_modules + i] = p->a;
      s->b[j * num_modules + i] = p->b;
      any = true;
    }
  }
  return any;
}

// DoRA: multiplies the output row of every token `pass` gives an adapter by that adapter's
// per-column scale (`inv`: 1 / g, else g) for each module of the group it has one for.
void ScaleDoraRows(const LoraPass& pass, const LoraModuleGroup& group, int64_t layer, bool inv,
                   const LoraOutput* y) {
  // Most steps have no DoRA adapter at all: no per-token walk then.
  if (std::none_of(pass.adapters.begin(), pass.adapters.end(),
                   [](const LoraWeightsView* v) { return v != nullptr && v->dora; })) {
    return;
  }
  const int64_t n = static_cast<int64_t>(pass.token_adapter.size());
  for (int64_t t = 0; t < n; ++t) {
    const int32_t j = pass.token_adapter[t];
    if (j < 0) continue;
    const LoraWeightsView* view = pass.adapters[j];
    if (view == nullptr || !view->dora) continue;
    for (int i = 0; i < group.num_modules; ++i) {
      const LoraPair* p = view->layers[layer][static_cast<int>(group.modules[i])];
      const float* g = p == nullptr ? nullptr : inv ? p->dora_inv_scale : p->dora_scale;
      if (g == nullptr) continue;
      float* row = y[i].data + t * y[i].stride;
      for (int64_t c = 0; c < p->b.rows; ++c) row[c] *= g[c];
    }
  }
}

}  // namespace

void ApplyLora(const LoraPlan& plan, LoraGroup group, int64_t layer, const float* x,
               int64_t x_stride, const LoraOutput* y, LoraScratch* s) {
  if (plan.empty()) return;
  const LoraModuleGroup& modules = ModulesOf(group);
  // A merged DoRA adapter M left g_M (W + B_M A_M) x in the rows of the other tokens: they take
  // g_M back out first, then the unmerge pass takes B_M A_M x.
  if (plan.unmerge().active) ScaleDoraRows(plan.unmerge(), modules, layer, /*inv=*/true, y);
  for (const LoraPass* pass : {&plan.own(), &plan.unmerge()}) {
    if (!pass->active || !Gather(pass->adapters, modules, layer, s)) continue;
    const LoraSliceWeights w{static_cast<int64_t>(pass->adapters.size()), modules.num_modules,
                             s->a.data(), s->b.data()};
    ShrinkExpand(w, *pass, x, x_stride, y);
  }
  // Each DoRA token now holds W x + B_j A_j x; it takes its g_j.
  if (plan.own().active) ScaleDoraRows(plan.own(), modules, layer, /*inv=*/false, y);
}

void ApplyLora(const LoraPlan& plan, LoraGroup group, int64_t layer, const float* x,
               int64_t x_stride, std::initializer_list<LoraOutput> y, LoraScratch* scratch) {
  LP_CHECK(static_cast<int>(y.size()) == ModulesOf(group).num_modules)
      << "one output per module of the group";
  ApplyLora(plan, group, layer, x, x_stride, y.begin(), scratch);
}

}  // namespace loraplex::model
