#include "model/cuda_step_graphs.h"

#include <algorithm>
#include <utility>

#include "common/logging.h"
#include "common/status.h"

namespace loraplex::model {
namespace {

using kernels::cuda::CudaGraph;

// Graphs kept per model: a decode batch's shape changes as sequences join and leave and as their
// block tables double; the last few shapes are the ones that recur.
constexpr size_t kMaxGraphs = 16;

}  // namespace

absl::Status CudaStepGraphs::Run(std::vector<int64_t> key, void* stream,
                                 const std::function<absl::Status()>& body) {
  if (!enabled_) return body();
  for (size_t i = 0; i < graphs_.size(); ++i) {
    if (graphs_[i].key == key) {
      std::rotate(graphs_.begin(), graphs_.begin() + i, graphs_.begin() + i + 1);
      LP_RETURN_IF_ERROR(graphs_.front().graph.Launch(stream));
      ++stats_.replays;
      return absl::OkStatus();
    }
  }
  auto seen = std::find(seen_once_.begin(), seen_once_.end(), key);
  if (seen == seen_once_.end()) {
    // First sight: run it directly, capture it if it comes again.
    if (seen_once_.size() >= 2 * kMaxGraphs) seen_once_.erase(seen_once_.begin());
    seen_once_.push_back(std::move(key));
    return body();
  }
  seen_once_.erase(seen);
  if (absl::Status s = CudaGraph::BeginCapture(stream); !s.ok()) {
    // No graphs here (e.g. the host emulation of the tests): launch op by op from now on.
    LP_LOG(WARNING) << "CUDA graphs off: " << s.ToString();
    enabled_ = false;
    return body();
  }
  absl::Status s = body();
  absl::StatusOr<CudaGraph> graph = CudaGraph::EndCapture(stream);
  LP_RETURN_IF_ERROR(s);
  if (!graph.ok()) {
    // Something in the step cannot be captured: nothing ran, so run it op by op, and stay so.
    LP_LOG(WARNING) << "CUDA graphs off: capturing a step failed: " << graph.status().ToString();
    enabled_ = false;
    return body();
  }
  if (graphs_.size() >= kMaxGraphs) graphs_.pop_back();
  graphs_.insert(graphs_.begin(), KeyedGraph{std::move(key), *std::move(graph)});
  ++stats_.captures;
  LP_RETURN_IF_ERROR(graphs_.front().graph.Launch(stream));
  ++stats_.replays;
  return absl::OkStatus();
}

}  // namespace loraplex::model
