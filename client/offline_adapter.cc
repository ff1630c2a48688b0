#include "client/offline_adapter.h"

namespace loraplex {

struct OfflineAdapter::Impl {};

OfflineAdapter::OfflineAdapter() = default;
OfflineAdapter::~OfflineAdapter() = default;

absl::Status OfflineAdapter::Load(const std::string& dir, const model::LlamaModel&, int) {
  return absl::UnimplementedError("--adapter " + dir +
                                  ": PEFT adapter loading is not in this build yet");
}

const model::LoraWeightsView* OfflineAdapter::view() const { return nullptr; }

}  // namespace loraplex
