// A Llama-family model in memory and its batched forward pass. Start here for the model.
//
// One LlamaModel holds the config, the tokenizer and one backend, chosen at load
// (LoadOptions.device): the CPU or the CUDA device, which stores the frozen base weights (f32 or
// bf16) and runs the forward pass (model/backend.h). Forward() runs one step over a batch that
// mixes prefill chunks and single decode tokens of many sequences, each token with its own LoRA
// adapter (or none), against a paged KvCache: the model validates the batch, plans its LoRA work
// once (model/lora_plan.h) and hands both to the backend. Not thread-safe: one engine thread owns a
// model; Load may run anywhere.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/kernels.h"
#include "model/kv_cache.h"
#include "model/llama_config.h"
#include "model/sampler.h"
#include "model/tokenizer.h"

namespace loraplex::model {

// The linear layers of a decoder block that LoRA can target, in PEFT's names.
enum class LinearModule : int { kQ = 0, kK, kV, kO, kGate, kUp, kDown };
inline constexpr int kNumLinearModules = 7;
// "q_proj", "k_proj", ... "down_proj".
const char* LinearModuleName(LinearModule m);
// In and out features of module m of a decoder block of `c` (the shapes its weight and any LoRA
// pair of it have: A [rank, in], B [out, rank]).
int64_t LinearInFeatures(const LlamaConfig& c, LinearModule m);
int64_t LinearOutFeatures(const LlamaConfig& c, LinearModule m);

// One LoRA pair for one module of one layer, in compute layout: delta(x) = B (A x), with the scale
// (alpha / r or alpha / sqrt(r)) already folded into B. For GGUF bases, q/k rows of B follow the
// base's row order.
//
// DoRA (PEFT's use_dora): the pair also has a per-row scale g = m / ||W + B A||_row (m the learned
// magnitude, the norm over each output row of the pristine base weight plus the delta, computed
// once when the adapter is loaded). A token of the adapter then gets y = g * (W x + B A x), and
// merging writes W' = g * (W + B A).
struct LoraPair {
  int64_t rank = 0;
  kernels::WeightView a;                  // [rank, in]
  kernels::WeightView b;                  // [out, rank]
  const float* dora_scale = nullptr;      // [out] g; null for plain LoRA
  const float* dora_inv_scale = nullptr;  // [out] 1 / g (mixed mode with a merged DoRA adapter)
};

// A process-unique id for a LoraWeightsView (never 0, never reused).
uint64_t NewLoraViewId();

// The weights of one adapter as the forward pass sees them. `layers[l][m]` is null when the
// adapter does not touch module m of layer l. Owned elsewhere (adapters/); must outlive the steps
// that use it, and must not change once a step has used it: the CUDA model caches a device copy
// keyed by `id`.
struct LoraWeightsView {
  LoraWeightsView() = default;
  // A copy is another view (it may be edited), so it gets a fresh id; so does a moved-to view.
  LoraWeightsView(const LoraWeightsView& o) : layers(o.layers), dora(o.dora) {}
  LoraWeightsView(LoraWeightsView&& o) noexcept : layers(std::move(o.layers)), dora(o.dora) {
    o.id = NewLoraViewId();
  }
  LoraWeightsView& operator=(const LoraWeightsView& o) {
    layers = o.layers;
    dora = o.dora;
    id = NewLoraViewId();
    return *this;
  }
  LoraWeightsView& operator=(LoraWeightsView&& o) noexcept {
    layers = std::move(o.layers);
    dora = o.dora;
    id = NewLoraViewId();
    o.id = NewLoraViewId();
    return *this;
  }

  std::vector<std::array<const LoraPair*, kNumLinearModules>> layers;
  // Some pair has a DoRA scale (the forward pass then rescales that adapter's tokens' rows).
  bool dora = false;
  // Unique per view object, drawn from a global counter: a new adapter at a reused host address
  // can never hit a stale device copy.
  uint64_t id = NewLoraViewId();
};

// Where the model's weights live and its forward pass runs.
enum class Device { kCpu, kCuda };
const char* DeviceName(Device d);  // "cpu", "cuda"

struct LoadOptions {
  // Storage of the big matrices: kF32 or kBF16 (converted), kQ8_0 or kQ4_0 (quantized at load
  // with ggml's reference rounding; matrices whose rows do not split into 32-value blocks stay
  // bf16). Other values: INVALID_ARGUMENT from Load.
  kernels::DType dtype = kernels::DType::kBF16;
  // A GGUF file's quantized matrices (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) keep their own blocks
  // and run on the integer kernels (kernels/quant.h); only the others take `dtype` (--dtype
  // native). CPU only (the CUDA backend has no quantized kernels: INVALID_ARGUMENT).
  bool keep_quantized = false;
  // The element type of the KV caches CreateKvCache makes (kv_bytes_per_token()). Unset: f16 on
  // the CPU when some base matrices are stored quantized (the int8-activation products already
  // round more than f16 does; llama.cpp's default), f32 otherwise. f16 on CUDA is
  // INVALID_ARGUMENT (its pools are f32).
  std::optional<KvDType> kv_dtype;
  // Take the tokenizer from this GGUF file or HF folder instead of the model's own files (for HF
  // folders that ship no tokenizer.json, like the test copy of stories260K).
  std::string tokenizer_path;
  // When false, a model without any tokenizer loads (token ids in, token ids out; has_tokenizer()
  // is false). When true, a missing tokenizer is NOT_FOUND.
  bool require_tokenizer = true;
  // kCuda: the weights are uploaded to the CUDA device and Forward runs there (UNAVAILABLE from
  // Load without a usable device or in a build without CUDA); the host keeps no copy of the big
  // matrices then.
  Device device = Device::kCpu;
  // CUDA only: how many adapters keep a device copy between steps (LRU; an adapter used by the
  // running step is never evicted, so one step may exceed this).
  int64_t cuda_adapter_slots = 64;
  // CUDA only: replay the launches of a step as a CUDA graph when an earlier step had the same
  // shape (small batches: decode), instead of launching each op from the host. Off by default
  // until it has run on a GPU (docs/cuda.md); the environment variable LP_CUDA_GRAPHS=1 turns it
  // on, LP_CUDA_GRAPHS=0 off, whatever this says.
  bool cuda_graphs = false;
};

// Sets options->dtype and keep_quantized from a --dtype value: "native" (a GGUF file's quantized
// matrices as stored, the rest bf16), "bf16", "f32", "q8_0", "q4_0". INVALID_ARGUMENT otherwise.
absl::Status ParseWeightStorage(const std::string& name, LoadOptions* options);
// Sets options->kv_dtype from a --kv-dtype value: "auto" (unset: see LoadOptions), "f32", "f16".
// INVALID_ARGUMENT otherwise.
absl::Status ParseKvDType(const std::string& name, LoadOptions* options);

// One step's input. Per-token arrays all have num_tokens entries. A sequence's tokens must appear
// in position order, and their KV slots must already be covered by its block table.
struct ForwardBatch {
  std::vector<int32_t> tokens;
  std::vector<int32_t> positions;
  std::vector<int32_t> token_seq;     // index of the token's sequence in [0, num_seqs)
  std::vector<int32_t> block_tables;  // [num_seqs, max_blocks_per_seq]
  int64_t max_blocks_per_seq = 0;
  // Which tokens need logits (usually the last token of each sequence); logits come out in this
  // order.
  std::vector<int32_t> logit_rows;
  // LoRA: per token, the token's adapter as an index into `adapters`, or -1 for the base model.
  // Empty = all base.
  std::vector<int32_t> token_adapter;
  std::vector<const LoraWeightsView*> adapters;

  int64_t num_tokens() const { return static_cast<int64_t>(tokens.size()); }
};

// Steps a CUDA model replayed from captured CUDA graphs, and graphs it captured.
struct CudaGraphStats {
  int64_t replays = 0;
  int64_t captures = 0;
};

class LlamaModel {
 public:
  // `path` is a GGUF file or an HF folder (config.json + *.safetensors + tokenizer.json).
  // NOT_FOUND when missing; INVALID_ARGUMENT for malformed files; UNIMPLEMENTED for unsupported
  // architectures; messages name the file and tensor.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& path,
                                                          const LoadOptions& options = {});
  ~LlamaModel();

  const LlamaConfig& config() const { return config_; }
  bool has_tokenizer() const { return tokenizer_ != nullptr; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }  // requires has_tokenizer()
  kernels::DType dtype() const { return options_.dtype; }
  // What the big matrices are stored as, e.g. "bf16" or "q4_1 x210, q8_0 x1" (GetModelInfo).
  const std::string& weight_formats() const { return weight_formats_; }
  // The part of weight_bytes() read in place from the model file's mapping (--dtype native).
  int64_t weight_mapped_bytes() const { return weight_mapped_bytes_; }
  // The dtype LoRA weights for this model are kept in: f32 for an f32 model, else bf16 (the
  // LoRA kernels take f32 or bf16; a quantized base keeps its adapters in bf16).
  kernels::DType adapter_dtype() const {
    return options_.dtype == kernels::DType::kF32 ? kernels::DType::kF32 : kernels::DType::kBF16;
  }
  // True when q/k rows are in GGUF's adjacent-pair order in the source file (they are un-permuted
  // at load, so adapters need no change; informational).
  bool from_gguf() const { return from_gguf_; }
  // Bytes of the stored weights.
  int64_t weight_bytes() const;
  // Bytes the CPU forward pass holds between steps as scratch (activations of the largest step so
  // far and the LoRA buffers; it grows to what --max-batch-tokens needs and stays). 0 until the
  // first CPU step; a CUDA model keeps its scratch on the device. Safe to call from any thread
  // (published at the end of each step).
  int64_t scratch_bytes() const;
  Device device() const { return options_.device; }
  // A KV cache for this model: host K/V pools on the CPU, block bookkeeping only on CUDA (the
  // device pools are attached to it at its first Forward). Errors as KvCache::Create.
  absl::StatusOr<KvCache> CreateKvCache(int64_t num_blocks, int64_t block_size) const;
  // The element type of those caches, and the bytes one token takes in them across all layers.
  KvDType kv_dtype() const { return kv_dtype_; }
  int64_t kv_bytes_per_token() const { return KvCache::BytesPerToken(config_, kv_dtype_); }

  // Runs one step. Writes [batch.logit_rows.size(), vocab_size] logits into *logits (resized).
  // INVALID_ARGUMENT for token ids out of the vocabulary, positions past max context, block table
  // entries outside the KV pool, or inconsistent batch arrays; nothing is written to the cache
  // then. FAILED_PRECONDITION for a CPU model given a cache without host storage. On CUDA the
  // logits are copied back as f32 and the call returns when the step has finished on the device;
  // RESOURCE_EXHAUSTED when device memory for the KV pools, scratch or adapter copies runs out.
  absl::Status Forward(const ForwardBatch& batch, KvCache* cache, std::vector<float>* logits);

  // Runs one step for the samplers (engine and generate). top_k > 0 says that sampling needs only
  // the best top_k entries of each row (Sampler::TopLogitsNeeded; at most kMaxTopLogits, else
  // INVALID_ARGUMENT; more than the vocabulary counts as all of it): a CUDA model then selects them
  // on the device and copies back [rows, top_k] (id, logit, log-prob) triples instead of
  // [rows, vocab] logits; the CPU model hands over its whole rows (out->k = 0), which it has in
  // host memory anyway. top_k = 0: whole rows on both. Errors as Forward.
  absl::Status Forward(const ForwardBatch& batch, KvCache* cache, int64_t top_k, StepLogits* out);
  static constexpr int64_t kMaxTopLogits = 256;  // kernels/cuda's kCudaMaxTopK

  // CUDA graphs used so far (LoadOptions::cuda_graphs); zeros on the CPU.
  CudaGraphStats cuda_graph_stats() const;

  // What the LoRA passes of every step so far cost: token_passes counts each token once per pass
  // that applies a delta to it (its own adapter's, and the unmerge pass in mixed mode); seconds is
  // the time in those passes (measured on the CPU; 0 on CUDA). Call on the thread that runs
  // Forward (the engine thread).
  struct LoraCost {
    double seconds = 0;
    int64_t token_passes = 0;
  };
  LoraCost lora_cost() const;

  // The base weight of one linear module (for LoRA shape validation and merging). On CUDA the
  // view has the shape and dtype but a null data pointer (the matrix lives on the device).
  kernels::WeightView LinearWeight(int64_t layer, LinearModule m) const;
  int64_t LinearInFeatures(LinearModule m) const;
  int64_t LinearOutFeatures(LinearModule m) const;

  // Merge: W += B A for every pair of `adapter` (f32 math, rounded once to the storage dtype); a
  // DoRA pair writes W' = g (W + B A). The touched matrices are copied first so Unmerge restores
  // them bit for bit. A matrix stored quantized is refused (FAILED_PRECONDITION): rounding W + B A
  // to 4 or 8 bits again would lose most of a low-rank delta and change the base for every other
  // request; such adapters are served unmerged. While merged, tokens of other adapters or of the
  // base model get the merged delta taken back out in the forward pass (mixed mode: y / g - B A x
  // for DoRA), so the batch stays correct. FAILED_PRECONDITION when one is already merged.
  absl::Status Merge(const LoraWeightsView* adapter);

  // Merge in two parts, so that the engine stops for the swap only: PrepareMerge computes W + B A
  // (or g (W + B A)) for every matrix `adapter` touches, with Merge's checks and arithmetic, into
  // copies; Merge(prepared) then swaps them in and keeps the pristine matrices for Unmerge (same
  // result, bit for bit, as Merge(adapter)). PrepareMerge only reads the base: where
  // prepares_merge_anywhere() it may run on any thread while steps run, provided no Merge or
  // Unmerge runs meanwhile (the caller serialises those); otherwise (CUDA, whose reads copy device
  // bits) where Merge runs. Merge(prepared) FAILED_PRECONDITION when an adapter is merged already.
  class PreparedMerge {
   public:
    PreparedMerge(PreparedMerge&&);
    PreparedMerge& operator=(PreparedMerge&&);
    ~PreparedMerge();
    const LoraWeightsView* adapter() const { return adapter_; }

   private:
    friend class LlamaModel;
    struct Matrices;
    PreparedMerge();
    const LoraWeightsView* adapter_ = nullptr;
    std::unique_ptr<Matrices> matrices_;
  };
  absl::StatusOr<PreparedMerge> PrepareMerge(const LoraWeightsView* adapter) const;
  absl::Status Merge(PreparedMerge prepared);
  bool prepares_merge_anywhere() const;
  // Restores the pristine base. FAILED_PRECONDITION when nothing is merged. On the CPU the merged
  // matrices it takes out are kept until FreeUnmerged or the next PrepareMerge, so that unmapping
  // them does not hold the engine thread.
  absl::Status Unmerge();
  // Frees what Unmerge took out (on any thread, at any time); returns the bytes freed.
  int64_t FreeUnmerged() const;
  // The pristine base weight of one linear module, without a merged adapter's delta, widened (or
  // dequantized) to f32, row-major [out, in] (adapter inspection, DoRA norms). Reads what Merge
  // writes, so call it where Merge runs (the engine thread, between steps). On CUDA it copies the
  // device bits.
  absl::StatusOr<std::vector<float>> BaseLinearF32(int64_t layer, LinearModule m) const;
  const LoraWeightsView* merged() const { return merged_; }

  struct Impl;

 private:
  LlamaModel() = default;
  LlamaConfig config_;
  LoadOptions options_;
  std::unique_ptr<Tokenizer> tokenizer_;
  bool from_gguf_ = false;
  std::string weight_formats_;
  int64_t weight_mapped_bytes_ = 0;
  KvDType kv_dtype_ = KvDType::kF32;
  const LoraWeightsView* merged_ = nullptr;
  int64_t lora_token_passes_ = 0;
  // The backend, the step's LoRA plan and the pristine matrices of a merge (model/llama_model.cc).
  std::unique_ptr<Impl> impl_;
};

}  // namespace loraplex::model
