// Where a LlamaModel's weights live and its forward pass runs (internal to model/). LlamaModel
// chooses one backend at load (LoadOptions.device) and keeps what is common to all of them: the
// config and tokenizer, batch and KV validation, the step's LoRA plan (model/lora_plan.h) and the
// merged-adapter bookkeeping (which adapter is merged, the pristine matrices Unmerge restores).
// A backend owns the weights in its own storage and runs steps:
// - the CPU backend (model/cpu_backend.h): host weights, the kernels of kernels/kernels.h;
// - the CUDA backend (model/cuda_model.h): device weights, the kernels of kernels/cuda.
//
// Not thread-safe: one engine thread owns the model and so its backend, except scratch_bytes().
#pragma once

#include <cstdint>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/kernels.h"
#include "model/kv_cache.h"
#include "model/llama_model.h"
#include "model/llama_weights.h"
#include "model/lora_plan.h"
#include "model/sampler.h"

namespace loraplex::model {

class Backend {
 public:
  virtual ~Backend() = default;

  // One step of LlamaModel::Forward. The batch, top_k (0..min(kMaxTopLogits, vocab)) and the KV
  // block tables were validated by the caller, and `plan` was built from this batch with the
  // model's merged adapter. Writes out->vocab and out->k; top_k = 0 asks for whole logit rows,
  // top_k > 0 allows the backend to return only each row's best top_k (out->k = top_k) when it can
  // select them cheaply; whole rows (out->k = 0) are always a valid answer.
  virtual absl::Status Forward(const ForwardBatch& batch, const LoraPlan& plan, KvCache* cache,
                               int64_t top_k, StepLogits* out) = 0;

  // Whether KV caches for this backend keep their K/V pools in host memory (LlamaModel's
  // CreateKvCache); a backend without them attaches its own pools at the first Forward.
  virtual bool host_kv_storage() const = 0;

  // The base weight of one linear module; on a device the data pointer is null (shape and dtype
  // only).
  virtual kernels::WeightView LinearWeight(int64_t layer, LinearModule m) const = 0;
  // A host copy of one linear module's current bits, and their replacement by `w` (same shape and
  // dtype; moved from only on success): what Merge and Unmerge go through. Writing back the bits
  // read before restores them exactly. Called between steps only.
  virtual absl::StatusOr<StoredMatrix> ReadLinear(int64_t layer, LinearModule m) const = 0;
  virtual absl::Status WriteLinear(int64_t layer, LinearModule m, StoredMatrix&& w) = 0;
  // Puts `w` in place of one linear module's bits and returns the bits it replaced (Merge of a
  // prepared merge). This default reads and writes; a host backend swaps buffers.
  virtual absl::StatusOr<StoredMatrix> ExchangeLinear(int64_t layer, LinearModule m,
                                                      StoredMatrix&& w) {
    absl::StatusOr<StoredMatrix> old = ReadLinear(layer, m);
    if (!old.ok()) return old.status();
    if (absl::Status s = WriteLinear(layer, m, std::move(w)); !s.ok()) return s;
    return old;
  }
  // Whether LinearWeight's views hold host data that stays valid while steps run (PrepareMerge
  // may then read the base from another thread).
  virtual bool host_weights() const { return false; }

  // Bytes of the stored weights (from their shapes).
  virtual int64_t weight_bytes() const = 0;
  // LlamaModel::scratch_bytes: host bytes the backend holds between steps as scratch. Safe to call
  // from any thread.
  virtual int64_t scratch_bytes() const = 0;
  // LlamaModel::cuda_graph_stats.
  virtual CudaGraphStats graph_stats() const { return {}; }
  // Seconds spent in the LoRA passes of every step so far (LlamaModel::lora_cost); 0 where the
  // backend does not measure them (CUDA: its passes run asynchronously on the device). Read on the
  // thread that runs Forward.
  virtual double lora_seconds() const { return 0; }
};

}  // namespace loraplex::model
