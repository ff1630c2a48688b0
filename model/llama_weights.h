// The base weights of a Llama-family model in compute layout (internal to model/).
// Matrices are [out, in] row-major in the chosen storage dtype; norms and biases are f32. GGUF q/k
// rows are un-permuted at load to HF's rotate-half order, so one rope kernel and unmodified HF
// LoRA adapters serve both file formats.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/kernels.h"
#include "model/llama_config.h"

namespace loraplex::formats {
class GgufFile;
class SafetensorsModel;
}  // namespace loraplex::formats

namespace loraplex::model {

struct StoredMatrix {
  kernels::DType dtype = kernels::DType::kF32;
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<float> f32;      // when dtype == kF32
  std::vector<uint16_t> bf16;  // when dtype == kBF16
  // A quantized dtype: the rows' blocks (kernels/quant.h), either in `blocks` or, for a matrix
  // kept as a GGUF file stores it, at `mapped` inside the file's mapping (LlamaWeights::mapping
  // keeps it alive; `blocks` is then empty).
  std::vector<uint8_t> blocks;
  const uint8_t* mapped = nullptr;

  const uint8_t* block_data() const { return mapped != nullptr ? mapped : blocks.data(); }
  kernels::WeightView view() const;
  // Stores rows*cols f32 values, rounding to bf16 (nearest even) when dtype is kBF16 and
  // quantizing per row when it is kQ8_0 or kQ4_0 (kernels::QuantizeRow; c a multiple of 32).
  void Assign(kernels::DType d, int64_t r, int64_t c, const float* src);
  // Reads element (r, c) widened (or dequantized) to f32.
  float At(int64_t r, int64_t c) const;
  // Every element widened (or dequantized) to f32, row-major [rows, cols].
  std::vector<float> ToF32() const;
  int64_t bytes() const;
  // The bytes that are the file's own pages (0 unless `mapped`).
  int64_t mapped_bytes() const { return mapped != nullptr ? bytes() : 0; }
};

// How the big matrices are stored (LoadOptions::dtype and keep_quantized in llama_model.h).
struct WeightStorage {
  // f32 or bf16: every matrix converted; q8_0 or q4_0: quantized at load (ggml's reference
  // rounding), except matrices whose rows are not a multiple of 32 values, which stay bf16.
  kernels::DType dtype = kernels::DType::kBF16;
  // A GGUF file's quantized matrices (Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K) keep their blocks as
  // stored (q/k rows reordered as whole rows); the others take `dtype`.
  bool keep_quantized = false;
};

struct LayerWeights {
  std::array<StoredMatrix, 7> linear;         // indexed by LinearModule
  std::vector<float> attn_norm;               // [hidden]
  std::vector<float> ffn_norm;                // [hidden]
  std::vector<float> q_bias, k_bias, v_bias;  // empty unless attention_bias
};

struct LlamaWeights {
  StoredMatrix embed;    // [vocab, hidden]
  StoredMatrix lm_head;  // [vocab, hidden]; empty when tied to embed
  std::vector<float> final_norm;
  std::vector<LayerWeights> layers;
  // The model file whose mapping the `mapped` matrices point into (empty when none does).
  std::shared_ptr<const void> mapping;

  const StoredMatrix& output() const { return lm_head.rows > 0 ? lm_head : embed; }
  // All the weights, and the part of them read in place from the file's mapping.
  int64_t bytes() const;
  int64_t mapped_bytes() const;
  // The storage formats of the matrices, most common first: "bf16", "q4_1 x210, q8_0 x1".
  std::string Formats() const;
  bool AnyQuantized() const;
};

// Errors name the file and tensor: NOT_FOUND for a missing tensor, INVALID_ARGUMENT for a shape
// that does not match the config or an unsupported stored type. With storage.keep_quantized, a
// GGUF's quantized matrices are used where the file maps them (no copy), except q/k of the
// architectures whose rows GGUF reorders (copied, their rows put back in HF order); the pages
// of every tensor copied or converted are then dropped from the resident set, so the resident
// weights are the file's tensor bytes (for the formats kept). The file must not be truncated or
// rewritten in place while the model is loaded (a replaced file, a new inode, is fine).
absl::StatusOr<LlamaWeights> LoadWeightsFromGguf(std::shared_ptr<const formats::GgufFile> gguf,
                                                 const LlamaConfig& config, WeightStorage storage);
absl::StatusOr<LlamaWeights> LoadWeightsFromSafetensors(const formats::SafetensorsModel& st,
                                                        const std::string& path,
                                                        const LlamaConfig& config,
                                                        WeightStorage storage);

// GGUF's llama converter reorders the rows of each q/k head from rotate-half order to
// adjacent-pair order; this undoes it in place on a [n_heads * head_dim, cols] matrix (or bias
// with cols = 1).
void UnpermuteGgufRows(float* data, int64_t n_heads, int64_t head_dim, int64_t cols);
// The same on rows of `row_bytes` bytes each (quantized rows, moved whole).
void UnpermuteGgufRowBytes(uint8_t* data, int64_t n_heads, int64_t head_dim, int64_t row_bytes);

}  // namespace loraplex::model
