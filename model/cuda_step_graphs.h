// The CUDA model's graphs of recurring steps (model/cuda_model.cc): a step's launches, keyed by
// every host value that reaches a launch, are captured the second time the key is seen and
// replayed from then on with one launch. Only device memory contents (the step's metadata upload,
// queued before) may differ between replays of one key. Off unless enabled (LoadOptions); turns
// itself off for good when a capture cannot begin or end (e.g. in the host emulation of the tests).
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "absl/status/status.h"
#include "kernels/cuda/cuda_kernels.h"
#include "model/llama_model.h"

namespace loraplex::model {

class CudaStepGraphs {
 public:
  explicit CudaStepGraphs(bool enabled) : enabled_(enabled) {}

  bool enabled() const { return enabled_; }
  void Disable() { enabled_ = false; }
  CudaGraphStats stats() const { return stats_; }

  // Queues `body` (a step's launches) on `stream`: replayed from the graph of `key`, captured when
  // this is the key's second sight, else (first sight, or disabled) run op by op.
  absl::Status Run(std::vector<int64_t> key, void* stream,
                   const std::function<absl::Status()>& body);

 private:
  struct KeyedGraph {
    std::vector<int64_t> key;
    kernels::cuda::CudaGraph graph;
  };
  bool enabled_;
  std::vector<KeyedGraph> graphs_;  // most recently used first
  std::vector<std::vector<int64_t>> seen_once_;
  CudaGraphStats stats_;
};

}  // namespace loraplex::model
