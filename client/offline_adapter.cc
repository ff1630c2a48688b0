#include "client/offline_adapter.h"

#include "absl/strings/str_cat.h"
#include "adapters/lora_adapter.h"
#include "adapters/lora_mix.h"

namespace loraplex {

struct OfflineAdapter::Impl {
  std::vector<std::unique_ptr<adapters::LoraAdapter>> adapters;
  std::unique_ptr<adapters::LoraMix> mix;
};

OfflineAdapter::OfflineAdapter() : impl_(std::make_unique<Impl>()) {}
OfflineAdapter::~OfflineAdapter() = default;

absl::Status OfflineAdapter::Load(const std::vector<std::string>& dirs,
                                  const std::vector<double>& weights,
                                  const model::LlamaModel& model, int max_rank) {
  if (!weights.empty() && weights.size() != dirs.size()) {
    return absl::InvalidArgumentError(absl::StrCat("--adapter-weights: ", weights.size(),
                                                   " weights for ", dirs.size(), " adapters"));
  }
  adapters::AdapterLoadOptions opts;
  opts.dtype = model.adapter_dtype();
  opts.max_rank = max_rank;
  // Nothing merges while adapters load here (Merge runs after, on this thread).
  opts.base_weights = adapters::DirectBaseWeights(model);
  std::vector<adapters::MixPart> parts;
  for (size_t i = 0; i < dirs.size(); ++i) {
    auto a = adapters::LoraAdapter::Load(dirs[i], model.config(), opts);
    if (!a.ok()) return a.status();
    parts.push_back({&(*a)->view(), weights.empty() ? 1.0f : static_cast<float>(weights[i])});
    impl_->adapters.push_back(std::move(a).value());
  }
  if (dirs.size() > 1 || !weights.empty()) {
    auto mix = adapters::LoraMix::Build(parts, model.config(), max_rank);
    if (!mix.ok()) return mix.status();
    impl_->mix = std::move(mix).value();
  }
  return absl::OkStatus();
}

const model::LoraWeightsView* OfflineAdapter::view() const {
  if (impl_->mix) return &impl_->mix->view();
  return impl_->adapters.empty() ? nullptr : &impl_->adapters[0]->view();
}

}  // namespace loraplex
