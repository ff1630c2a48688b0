#include "client/offline_adapter.h"

#include "adapters/lora_adapter.h"

namespace loraplex {

struct OfflineAdapter::Impl {
  std::unique_ptr<adapters::LoraAdapter> adapter;
};

OfflineAdapter::OfflineAdapter() : impl_(std::make_unique<Impl>()) {}
OfflineAdapter::~OfflineAdapter() = default;

absl::Status OfflineAdapter::Load(const std::string& dir, const model::LlamaModel& model,
                                  int max_rank) {
  adapters::AdapterLoadOptions opts;
  opts.dtype = model.adapter_dtype();
  opts.max_rank = max_rank;
  auto a = adapters::LoraAdapter::Load(dir, model.config(), opts);
  if (!a.ok()) return a.status();
  impl_->adapter = std::move(a).value();
  return absl::OkStatus();
}

const model::LoraWeightsView* OfflineAdapter::view() const {
  return impl_->adapter ? &impl_->adapter->view() : nullptr;
}

}  // namespace loraplex
