// The CUDA backend (model/backend.h; internal to model/): LlamaModel holds one when
// LoadOptions.device is kCuda. Plain C++: no CUDA headers, only kernels/cuda's wrappers.
//
// Device memory (all plain cudaMalloc):
// - base weights: every matrix in the load dtype (bf16 by default, f32 on request) in its own
//   buffer; norms, biases and the RoPE frequencies in f32; uploaded once by CreateCudaBackend,
//   which releases the host copies as it goes (the host keeps none);
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
// grow, slots be evicted and Merge write weights at the start of a step or between steps). Adapter
// uploads go on a second stream, and the compute stream waits on an event recorded after them
// before the first LoRA op.
//
// A step (model/cuda_model.cc), in order: attach the KV pools to the cache on its first use; pack
// the step's metadata into one host buffer (tokens, positions, block tables, logit rows and the
// LoRA plan's passes with their device slice tables, acquiring adapter copies); grow the step
// buffers; upload the metadata; enqueue the forward pass (replayed from a CUDA graph when an
// earlier step had the same shape, LoadOptions.cuda_graphs); copy the logits (or their top k) back.
//
// Forward's contract is Backend::Forward's, config.sliding_window included; with top_k > 0 it
// selects each row's best top_k on the device (kernels/cuda CudaTopK) and copies back only those.
// Mixed mode as on the CPU: the plan's unmerge pass runs with a copy of the merged adapter whose B
// is negated. ReadLinear / WriteLinear (LlamaModel::Merge and Unmerge) copy a matrix's device bits
// to and from the host.
//
// Not thread-safe: one engine thread owns the model (as LlamaModel).
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "model/backend.h"
#include "model/llama_config.h"
#include "model/llama_model.h"
#include "model/llama_weights.h"

namespace loraplex::model {

// Uploads `weights` (releasing their host matrices as it goes). UNAVAILABLE without a device or in
// a build without CUDA ("no CUDA device found: ..."); RESOURCE_EXHAUSTED when the weights do not
// fit the free device memory (the message gives both sizes); INVALID_ARGUMENT when head_dim is odd
// or over 256 (the attention kernel's limit) or the matrices mix dtypes.
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const LlamaConfig& config,
                                                           LlamaWeights weights,
                                                           const std::vector<float>& inv_freq,
                                                           const LoadOptions& options);

}  // namespace loraplex::model
