#include "model/lora_plan.h"

namespace loraplex::model {
namespace {

template <typename T>
int64_t CapacityBytes(const std::vector<T>& v) {
  return static_cast<int64_t>(v.capacity() * sizeof(T));
}

// Fills the segments, `active` and `sgmv` of a pass whose token_adapter is set.
void FormRuns(LoraPass* pass) {
  const int64_t n = static_cast<int64_t>(pass->token_adapter.size());
  const std::vector<int32_t>& ta = pass->token_adapter;
  pass->starts.clear();
  pass->seg_adapter.clear();
  int64_t active = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (t == 0 || ta[t] != ta[t - 1]) {
      pass->starts.push_back(t);
      pass->seg_adapter.push_back(ta[t]);
    }
    active += ta[t] >= 0;
  }
  pass->starts.push_back(n);
  pass->active = active > 0;
  pass->sgmv = UseSgmv(n, pass->num_segments());
}

void Deactivate(LoraPass* pass) {
  pass->token_adapter.clear();
  pass->starts.clear();
  pass->seg_adapter.clear();
  pass->active = false;
  pass->sgmv = false;
}

}  // namespace

void LoraPlan::Build(const ForwardBatch& batch, const LoraWeightsView* merged) {
  const int64_t n = batch.num_tokens();
  num_tokens_ = n;
  merged_ = merged;

  // Each token's own adapter, except the merged one (already in W).
  own_.adapters.assign(batch.adapters.begin(), batch.adapters.end());
  own_.negate = false;
  if (batch.token_adapter.empty()) {
    Deactivate(&own_);
  } else {
    own_.token_adapter.assign(n, -1);
    for (int64_t t = 0; t < n; ++t) {
      const int32_t j = batch.token_adapter[t];
      if (j >= 0 && batch.adapters[j] != merged) own_.token_adapter[t] = j;
    }
    FormRuns(&own_);
  }

  // Mixed mode: every token not of the merged adapter takes its delta back out.
  unmerge_.adapters.clear();
  unmerge_.negate = true;
  if (merged == nullptr) {
    Deactivate(&unmerge_);
  } else {
    unmerge_.adapters.push_back(merged);
    unmerge_.token_adapter.assign(n, 0);
    for (int64_t t = 0; t < static_cast<int64_t>(batch.token_adapter.size()); ++t) {
      const int32_t j = batch.token_adapter[t];
      if (j >= 0 && batch.adapters[j] == merged) unmerge_.token_adapter[t] = -1;
    }
    FormRuns(&unmerge_);
  }
}

int64_t LoraPlan::capacity_bytes() const {
  int64_t total = 0;
  for (const LoraPass* p : {&own_, &unmerge_}) {
    total += CapacityBytes(p->adapters) + CapacityBytes(p->token_adapter) +
             CapacityBytes(p->starts) + CapacityBytes(p->seg_adapter);
  }
  return total;
}

}  // namespace loraplex::model
