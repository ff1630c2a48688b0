// The base weights of a Llama-family model in compute layout (internal to model/).
// Matrices are [out, in] row-major in the chosen storage dtype; norms and biases are f32. GGUF q/k
// rows are un-permuted at load to HF's rotate-half order, so one rope kernel and unmodified HF
// LoRA adapters serve both file formats.
#pragma once

#include <array>
#include <cstdint>
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

  kernels::WeightView view() const;
  // Stores rows*cols f32 values, rounding to bf16 (nearest even) when dtype is kBF16.
  void Assign(kernels::DType d, int64_t r, int64_t c, const float* src);
  // Reads element (r, c) widened to f32.
  float At(int64_t r, int64_t c) const;
  int64_t bytes() const;
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

  const StoredMatrix& output() const { return lm_head.rows > 0 ? lm_head : embed; }
  int64_t bytes() const;
};

// Errors name the file and tensor: NOT_FOUND for a missing tensor, INVALID_ARGUMENT for a shape
// that does not match the config or an unsupported stored type.
absl::StatusOr<LlamaWeights> LoadWeightsFromGguf(const formats::GgufFile& gguf,
                                                 const LlamaConfig& config, kernels::DType dtype);
absl::StatusOr<LlamaWeights> LoadWeightsFromSafetensors(const formats::SafetensorsModel& st,
                                                        const std::string& path,
                                                        const LlamaConfig& config,
                                                        kernels::DType dtype);

// GGUF's llama converter reorders the rows of each q/k head from rotate-half order to
// adjacent-pair order; this undoes it in place on a [n_heads * head_dim, cols] matrix (or bias
// with cols = 1).
void UnpermuteGgufRows(float* data, int64_t n_heads, int64_t head_dim, int64_t cols);

}  // namespace loraplex::model
