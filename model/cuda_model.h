// The CUDA twin of LlamaModel's state and forward pass (internal to model/; LlamaModel dispatches
// here when LoadOptions.device is kCuda). Plain C++: no CUDA headers, only kernels/cuda's wrappers.
//
// Device memory (all plain cudaMalloc):
// - base weights: every matrix in the load dtype (bf16 by default, f32 on request) in its own
//   buffer; norms, biases and the RoPE frequencies in f32; uploaded once by CreateCudaModel, after
//   which the host copies of the matrices are released (LlamaWeights keeps shapes only);
// - the KV pools, f32 [num_blocks, block_size, n_kv_heads, head_dim] per layer, attached to the
//   KvCache at its first Forward (KvCache::DeviceStorage), so their size is the engine's choice
//   (--kv-blocks / --kv-memory); refused with RESOURCE_EXHAUSTED when they do not fit the free
//   device memory minus a margin;
// - adapter slots (model/cuda_adapter_slots.h): an adapter's pairs copied on their own stream when
//   a step first needs them, an LRU of LoadOptions.cuda_adapter_slots copies;
// - step scratch (activations, per-step metadata), grown on demand and reused.
//
// Numerics: activations, the residual stream, the KV cache and LoRA's A/B stay f32 on the device,
// as on the CPU, so the two backends differ only where cuBLAS rounds a GEMM's f32 input to bf16
// for bf16 weights (and in summation order). bf16 activations halve activation traffic and are the
// next optimisation; the ops already take a dtype.
//
// Streams: one compute stream runs every op of a step in order; Forward ends by copying the logits
// back on it and synchronising, so between calls nothing is in flight (which is what lets scratch
// grow and slots be evicted at the start of a step). Adapter uploads go on a second stream, and the
// compute stream waits on an event recorded after them before the first LoRA op.
//
// Not thread-safe: one engine thread owns the model (as LlamaModel).
#pragma once

#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "model/kv_cache.h"
#include "model/llama_config.h"
#include "model/llama_model.h"
#include "model/llama_weights.h"

namespace loraplex::model {

class CudaModel {
 public:
  virtual ~CudaModel() = default;

  // The forward pass of LlamaModel::Forward (same contract; the batch and top_k were validated by
  // the caller), config.sliding_window included. `merged` is the adapter merged into the device
  // weights, or null (mixed mode as on the CPU: other tokens get its delta subtracted). top_k = 0
  // copies whole logit rows back; top_k > 0 selects each row's best top_k on the device
  // (kernels/cuda CudaTopK) and copies back only those.
  virtual absl::Status Forward(const ForwardBatch& batch, KvCache* cache,
                               const LoraWeightsView* merged, int64_t top_k, StepLogits* out) = 0;

  // W += B A on the device copy of every matrix `adapter` touches (f32 math on the host from the
  // device bits, rounded once to the storage dtype: the same bits as the CPU's Merge). The
  // pristine bits are kept on the host so Unmerge restores them exactly. Shapes were checked by
  // the caller.
  virtual absl::Status Merge(const LoraWeightsView& adapter) = 0;
  virtual absl::Status Unmerge() = 0;

  // Bytes of device memory held for the base weights.
  virtual int64_t weight_bytes() const = 0;

  // LlamaModel::cuda_graph_stats.
  virtual CudaGraphStats graph_stats() const = 0;
};

// W += B A for one pair, element by element in f32 from the current value, rounded once to w's
// dtype (defined in llama_model.cc; the CPU and CUDA merges share it, so both give the same bits).
void MergePairInto(const LoraPair& pair, StoredMatrix* w);

// Uploads `weights` (then releases their host matrices). UNAVAILABLE without a device or in a
// build without CUDA ("no CUDA device found: ..."); RESOURCE_EXHAUSTED when the weights do not fit
// the free device memory (the message gives both sizes); INVALID_ARGUMENT when head_dim is odd or
// over 256 (the attention kernel's limit).
absl::StatusOr<std::unique_ptr<CudaModel>> CreateCudaModel(const LlamaConfig& config,
                                                           LlamaWeights* weights,
                                                           const std::vector<float>& inv_freq,
                                                           const LoadOptions& options);

}  // namespace loraplex::model
