// Hyper-parameters of a Llama-family model (llama incl. SmolLM2/TinyLlama, mistral, qwen2), read
// from an HF config.json or from GGUF metadata.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace loraplex::formats {
class GgufFile;
}

namespace loraplex::model {

struct RopeScaling {
  enum class Type { kNone, kLinear, kLlama3 };
  Type type = Type::kNone;
  float factor = 1.0f;
  float low_freq_factor = 1.0f;                     // llama3
  float high_freq_factor = 4.0f;                    // llama3
  int64_t original_max_position_embeddings = 8192;  // llama3
};

struct LlamaConfig {
  std::string architecture;  // "llama", "mistral" or "qwen2"
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t vocab_size = 0;
  int64_t max_position_embeddings = 2048;
  float rms_norm_eps = 1e-5f;
  float rope_theta = 10000.0f;
  RopeScaling rope_scaling;
  bool tie_word_embeddings = false;
  bool attention_bias = false;  // q/k/v bias (qwen2)
  // Mistral sliding-window attention: each token attends to itself and the sliding_window - 1
  // positions before it (kernels::PagedAttention states the exact convention). 0 = no window:
  // config.json's "sliding_window" absent or null, and every llama model. qwen2 configs that turn
  // their window on (use_sliding_window) are refused as UNIMPLEMENTED instead.
  int64_t sliding_window = 0;
  int32_t bos_token_id = -1;
  int32_t eos_token_id = -1;

  int64_t q_dim() const { return num_heads * head_dim; }
  int64_t kv_dim() const { return num_kv_heads * head_dim; }

  // head_dim/2 inverse frequencies with the rope scaling applied (HF semantics).
  std::vector<float> RopeInvFreq() const;
  // INVALID_ARGUMENT naming the field when sizes are missing, non-positive or inconsistent
  // (heads not dividing hidden, kv heads not dividing heads, absurd values).
  absl::Status Validate() const;

  // UNIMPLEMENTED for model types other than llama/mistral/qwen2, and for qwen2 with
  // use_sliding_window on some layer (per-layer windows are not implemented); errors name the file
  // and field.
  static absl::StatusOr<LlamaConfig> FromHfJson(const std::string& path);
  static absl::StatusOr<LlamaConfig> FromGguf(const formats::GgufFile& gguf);
};

}  // namespace loraplex::model
