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
  std::vector<float> f32;       // when dtype == kF32
  std::vector<uint16_t> bf16;   // when dtype == kBF16
  std::vector<uint8_t> blocks;  // a quantized dtype: the rows' blocks (kernels/quant.h)

  kernels::WeightView view() const;
  // Stores rows*cols f32 values, rounding to bf16 (nearest even) when dtype is kBF16 and
  // quantizing per row when it is kQ8_0 or kQ4_0 (kernels::QuantizeRow; c a multiple of 32).
  void Assign(kernels::DType d, int64_t r, int64_t c, const float* src);
  // Reads element (r, c) widened (or dequantized) to f32.
  float At(int64_t r, int64_t c) const;
  int64_t bytes() const;
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

  const StoredMatrix& output() const { return lm_head.rows > 0 ? lm_head : embed; }
  int64_t bytes() const;
  // The storage formats of the matrices, most common first: "bf16", "q4_1 x210, q8_0 x1".
  std::string Formats() const;
  bool AnyQuantized() const;
};

// Errors name the file and tensor: NOT_FOUND for a missing tensor, INVALID_ARGUMENT for a shape
// that does not match the config or an unsupported stored type.
absl::StatusOr<LlamaWeights> LoadWeightsFromGguf(const formats::GgufFile& gguf,
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
