// One PEFT LoRA adapter, loaded, validated against the base model, and held in compute layout.
//
// Input: a folder as PEFT's save_pretrained writes it: adapter_config.json and
// adapter_model.safetensors (F32, F16 or BF16; keys
// "base_model.model.model.layers.<l>.<self_attn|mlp>.<module>.lora_A.weight" [r, in] and
// "...lora_B.weight" [out, r]).
//
// Output: a LoraWeightsView (model/llama_model.h) whose pairs hold A [r, in] and s*B [out, r] with
// the scale s = alpha/r (alpha/sqrt(r) with use_rslora, per-module rank/alpha patterns applied)
// folded into B in f32 and then rounded once to the storage dtype. The same view feeds the forward
// pass (SGMV/BGMV) and LlamaModel::Merge.
//
// DoRA (use_dora: true, PEFT's weight-decomposed LoRA, peft/tuners/lora/dora.py): every module
// also has "...<module>.lora_magnitude_vector" [out] (or "....lora_magnitude_vector.weight"), the
// learned magnitude m. PEFT's layer computes y = W x + (g - 1) W x + g s B A x = g (W x + s B A x)
// with g = m / ||W + s B A||_row, the norm of each output row of the base weight plus the delta
// (the "column norm" of the DoRA paper, whose W is [in, out]); merging writes g (W + s B A). The
// norms are computed here, once per load, from the pristine base weights (options.base_weights)
// and the f32 values of A and s B (after any rank compression: a compressed DoRA adapter keeps
// its magnitudes exactly); each pair then carries g and 1 / g in f32 (LoraPair::dora_scale).
//
// GGUF bases: GGUF files store q/k rows permuted for adjacent-pair RoPE. The model un-permutes them
// at load (LlamaModel::from_gguf), so the base always has HF's row order and an HF adapter's lora_B
// rows of q_proj/k_proj apply unchanged: the same adapter gives the same output on the GGUF and the
// safetensors copy of a model.
//
// Thread-safety: immutable after Load; share freely. The view points into this object, which must
// outlive every forward step and merge that uses it.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "adapters/base_weights.h"
#include "adapters/peft_config.h"
#include "kernels/kernels.h"
#include "model/llama_config.h"
#include "model/llama_model.h"

namespace loraplex::adapters {

struct AdapterLoadOptions {
  kernels::DType dtype = kernels::DType::kBF16;  // storage of A and B (the model's dtype)
  int64_t max_rank = 256;                        // the server's --max-lora-rank
  // Rank compression (0: serve as trained): each module of rank r > compress_rank is replaced by
  // the best rank-compress_rank approximation of its s*B*A (adapters/low_rank.h), computed in f64
  // from the file's values before they are rounded to `dtype`. max_rank then applies to the
  // compressed rank, so an adapter trained above --max-lora-rank can be served compressed.
  int64_t compress_rank = 0;
  // Reads the base weights a DoRA adapter's norms need (adapters/base_weights.h). Unset: DoRA
  // adapters are refused (FAILED_PRECONDITION).
  BaseWeights base_weights;
  // When not empty, DoRA adapters are refused (FAILED_PRECONDITION) with this reason (a backend
  // that cannot run them).
  std::string dora_refused;
};

// What the rank compression did to one module, and to the whole adapter.
struct ModuleCompression {
  std::string module;  // "model.layers.0.self_attn.q_proj"
  int64_t trained_rank = 0;
  int64_t rank = 0;           // served
  double relative_error = 0;  // ||dW - dW_k||_F / ||dW||_F (0 when not truncated)
};
struct CompressionReport {
  int64_t max_rank = 0;          // the compress_rank asked for
  int64_t trained_max_rank = 0;  // the largest rank in the files
  // Over every module together: sqrt(sum of discarded sigma^2 / sum of all sigma^2).
  double relative_error = 0;
  std::vector<ModuleCompression> modules;  // layer then LinearModule order
};

// "model.layers.<layer>.self_attn.q_proj" etc.: the HF module key PEFT matches against.
std::string ModuleKey(int64_t layer, model::LinearModule m);

class LoraAdapter {
 public:
  // Loads `dir`. Errors name the file and the field or tensor:
  //  NOT_FOUND            dir or adapter_config.json missing; no adapter_model.safetensors
  //  INVALID_ARGUMENT     malformed JSON or safetensors; unsupported config field (see
  //                       ParsePeftConfig); .bin pickle weights; a tensor that is not a LoRA A/B of
  //                       a decoder linear (embedding, lm_head, bias, modules_to_save); A or B
  //                       missing; ranks of the config, A and B disagree; a tensor for a module
  //                       the config does not target or the reverse; non-finite values; DoRA: a
  //                       magnitude missing, of the wrong shape or without use_dora, or a row of
  //                       W + s B A with norm 0
  //  FAILED_PRECONDITION  does not fit the base: layer index past num_layers, in/out features
  //                       differ from the base's, rank (after compress_rank) above
  //                       options.max_rank, or the adapter matches no module of the base model;
  //                       a DoRA adapter without options.base_weights or with dora_refused set
  //  (any code)           an error of options.base_weights, as it is
  //  INVALID_ARGUMENT     also for a negative options.compress_rank
  static absl::StatusOr<std::unique_ptr<LoraAdapter>> Load(const std::string& dir,
                                                           const model::LlamaConfig& base,
                                                           const AdapterLoadOptions& options = {});

  const model::LoraWeightsView& view() const { return view_; }
  const PeftConfig& config() const { return config_; }
  // Largest rank over its modules (as served: after compression).
  int64_t max_rank() const { return max_rank_; }
  // Set when it was loaded with compress_rank > 0.
  const std::optional<CompressionReport>& compression() const { return compression_; }
  // Bytes of the stored A and B matrices (and DoRA scales).
  int64_t bytes() const { return bytes_; }
  bool dora() const { return config_.use_dora; }
  int64_t num_pairs() const { return static_cast<int64_t>(pairs_.size()); }
  // The distinct module names it touches ("q_proj", "v_proj", ...), in LinearModule order.
  std::vector<std::string> target_modules() const;

 private:
  struct Stored {
    model::LoraPair pair;  // a and b point into storage_
  };
  LoraAdapter() = default;

  PeftConfig config_;
  std::vector<std::unique_ptr<Stored>> pairs_;  // stable addresses for the view
  model::LoraWeightsView view_;
  // Every A and B matrix, in one allocation. An adapter of a few MiB is then one block that
  // glibc maps on its own (past the mmap threshold, fixed at 1 MiB by loraplex-server) and unmaps
  // when the adapter is dropped, instead of hundreds of small blocks left free, and resident, in
  // the loading thread's arena: measured ~107 MiB of deleted adapters still resident after a
  // benchmark removed its 32 uploads (docs/benchmarks.md, resident memory).
  std::unique_ptr<uint8_t[]> storage_;
  int64_t max_rank_ = 0;
  int64_t bytes_ = 0;
  std::optional<CompressionReport> compression_;
};

}  // namespace loraplex::adapters
