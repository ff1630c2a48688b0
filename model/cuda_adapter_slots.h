// Device copies of LoRA adapters for the CUDA model: an LRU of slots keyed by LoraWeightsView::id
// (unique per view, so a new adapter at a reused host address never hits a stale copy).
//
// A copy holds every pair of one adapter as f32 A [rank, in] and B [out, rank] in one device
// buffer (bf16 pairs are widened exactly, so the device sees the CPU's values); `negate` makes a
// second, separate copy whose B is -B, used in mixed mode to take the merged adapter's delta back
// out (negation is exact). A DoRA pair (LoraPair::dora_scale) also has its per-row scale in f32 in
// the same buffer: g in a plain copy, 1 / g in a `negate` copy, which is the scale each pass
// applies (the own pass multiplies its tokens' rows by g after the deltas; the unmerge pass of a
// merged DoRA adapter divides the other tokens' rows by g before its delta). Uploads are
// asynchronous on the caller's upload stream from a host staging copy that the copy keeps until
// ReleaseStaging (call it once that stream has finished).
//
// Eviction: when a new copy would exceed max_slots, the least recently used copy that the current
// step has not acquired is freed; copies acquired for the current step are never evicted, so a step
// that needs more adapters than max_slots holds them all until a later step can evict. Freeing
// device memory is only safe when no kernel still reads it, which the CUDA model guarantees by
// acquiring at the start of a step, before it queues any work.
//
// Not thread-safe (the engine thread owns it, through the model).
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cuda/cuda_kernels.h"
#include "model/llama_config.h"
#include "model/llama_model.h"

namespace loraplex::model {

// One pair on the device; rank 0 (and null pointers) when the adapter does not touch the module.
struct CudaLoraModule {
  const float* a = nullptr;  // [rank, in]
  const float* b = nullptr;  // [out, rank], scale folded in (negated for a `negate` copy)
  int32_t rank = 0;
  // DoRA: [out] g (1 / g in a `negate` copy); null for plain LoRA.
  const float* dora_scale = nullptr;
};

struct CudaAdapterCopy {
  std::vector<std::array<CudaLoraModule, kNumLinearModules>> layers;  // [num_layers]
  int64_t max_rank = 0;                                               // over all pairs
  bool dora = false;  // some module has a dora_scale
  int64_t bytes = 0;  // device bytes
  kernels::cuda::CudaBuffer buffer;
  std::vector<float> staging;  // host source of the upload, until ReleaseStaging
  uint64_t last_step = 0;      // the step that last acquired it (LRU order and pinning)
};

class CudaAdapterSlots {
 public:
  CudaAdapterSlots(const LlamaConfig& config, int64_t max_slots)
      : config_(config), max_slots_(max_slots < 1 ? 1 : max_slots) {}

  // The device copy of `view` (with -B when negate), acquired for `step` (steps increase). When it
  // is not resident it is uploaded on `upload_stream` and *uploaded is set to true (else left
  // alone). INVALID_ARGUMENT naming layer and module when the view does not fit the model (wrong
  // layer count, shapes, rank over kCudaMaxLoraRank, null data, unknown dtype);
  // RESOURCE_EXHAUSTED when device memory runs out even after evicting every idle copy.
  absl::StatusOr<const CudaAdapterCopy*> Acquire(const LoraWeightsView& view, bool negate,
                                                 uint64_t step, void* upload_stream,
                                                 bool* uploaded);

  // Frees the host staging copies (the uploads have completed).
  void ReleaseStaging();

  int64_t num_copies() const { return static_cast<int64_t>(copies_.size()); }
  int64_t device_bytes() const;

 private:
  // Frees the least recently used copy not acquired for `step`; false when there is none.
  bool EvictOne(uint64_t step);

  LlamaConfig config_;
  int64_t max_slots_;
  std::map<std::pair<uint64_t, bool>, std::unique_ptr<CudaAdapterCopy>> copies_;
};

}  // namespace loraplex::model
