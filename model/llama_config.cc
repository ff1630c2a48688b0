#include "model/llama_config.h"

#include <cmath>
#include <numbers>

#include "absl/strings/str_cat.h"
#include "common/mapped_file.h"
#include "common/status.h"
#include "formats/gguf.h"
#include "nlohmann/json.hpp"

namespace loraplex::model {
namespace {

using json = nlohmann::json;

bool SupportedArchitecture(const std::string& arch) {
  return arch == "llama" || arch == "mistral" || arch == "qwen2";
}

absl::StatusOr<int64_t> JsonInt(const json& j, const char* key, const std::string& path,
                                std::optional<int64_t> fallback = std::nullopt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (fallback) return *fallback;
    return absl::InvalidArgumentError(absl::StrCat(path, ": missing field '", key, "'"));
  }
  if (!it->is_number_integer()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": field '", key, "' is not an integer"));
  }
  return it->get<int64_t>();
}

absl::StatusOr<double> JsonFloat(const json& j, const char* key, const std::string& path,
                                 double fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_number()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": field '", key, "' is not a number"));
  }
  return it->get<double>();
}

int32_t FirstId(const json& j, const char* key) {
  auto it = j.find(key);
  if (it == j.end()) return -1;
  if (it->is_number_integer()) return it->get<int32_t>();
  if (it->is_array() && !it->empty() && (*it)[0].is_number_integer())
    return (*it)[0].get<int32_t>();
  return -1;
}

// Sliding-window attention as transformers 5 reads it. mistral: "sliding_window" (an int, or
// null/absent for none) applies to every layer. qwen2: the window is used only when
// "use_sliding_window" is true, and then only on layers i >= "max_window_layers" (or those that
// "layer_types" marks "sliding_attention"); a per-layer window is not implemented, so such a
// config is refused rather than served with full attention and wrong numbers. llama ignores the
// key, as transformers' LlamaModel does.
absl::Status ReadSlidingWindow(const json& j, const std::string& path, LlamaConfig* c) {
  if (c->architecture == "mistral") {
    LP_ASSIGN_OR_RETURN(c->sliding_window, JsonInt(j, "sliding_window", path, int64_t{0}));
    if (c->sliding_window <= 0 && j.contains("sliding_window") && !j["sliding_window"].is_null()) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": field 'sliding_window' must be positive or null, got ", c->sliding_window));
    }
    return absl::OkStatus();
  }
  if (c->architecture != "qwen2") return absl::OkStatus();
  auto use = j.find("use_sliding_window");
  if (use == j.end() || use->is_null() || (use->is_boolean() && !use->get<bool>())) {
    return absl::OkStatus();
  }
  if (!use->is_boolean()) {
    return absl::InvalidArgumentError(path + ": field 'use_sliding_window' is not a boolean");
  }
  if (auto w = j.find("sliding_window"); w == j.end() || w->is_null()) return absl::OkStatus();
  bool any_sliding = false;
  if (auto lt = j.find("layer_types"); lt != j.end() && lt->is_array()) {
    for (const auto& t : *lt) any_sliding |= t == "sliding_attention";
  } else {
    LP_ASSIGN_OR_RETURN(int64_t full_layers,
                        JsonInt(j, "max_window_layers", path, int64_t{28}));  // qwen2's default
    any_sliding = full_layers < c->num_layers;
  }
  if (!any_sliding) return absl::OkStatus();
  return absl::UnimplementedError(
      absl::StrCat(path,
                   ": use_sliding_window is true (sliding-window attention on some layers, see "
                   "max_window_layers/layer_types); per-layer sliding windows are not supported"));
}

}  // namespace

std::vector<float> LlamaConfig::RopeInvFreq() const {
  int64_t half = head_dim / 2;
  std::vector<float> inv(half);
  for (int64_t i = 0; i < half; ++i) {
    // As HF: 1 / theta^(2i/d) computed in f32 from an int64 arange.
    inv[i] = 1.0f / std::pow(rope_theta, static_cast<float>(2 * i) / static_cast<float>(head_dim));
  }
  if (rope_scaling.type == RopeScaling::Type::kLinear) {
    for (float& f : inv) f /= rope_scaling.factor;
  } else if (rope_scaling.type == RopeScaling::Type::kLlama3) {
    const float old_ctx = static_cast<float>(rope_scaling.original_max_position_embeddings);
    const float low_wavelen = old_ctx / rope_scaling.low_freq_factor;
    const float high_wavelen = old_ctx / rope_scaling.high_freq_factor;
    for (float& f : inv) {
      float wavelen = 2.0f * std::numbers::pi_v<float> / f;
      if (wavelen < high_wavelen) continue;
      if (wavelen > low_wavelen) {
        f = f / rope_scaling.factor;
        continue;
      }
      float smooth = (old_ctx / wavelen - rope_scaling.low_freq_factor) /
                     (rope_scaling.high_freq_factor - rope_scaling.low_freq_factor);
      f = (1.0f - smooth) * f / rope_scaling.factor + smooth * f;
    }
  }
  return inv;
}

absl::Status LlamaConfig::Validate() const {
  auto bad = [](const char* field, int64_t v) {
    return absl::InvalidArgumentError(
        absl::StrCat("model config: ", field, " = ", v, " is invalid"));
  };
  constexpr int64_t kMax = int64_t{1} << 24;
  if (hidden_size <= 0 || hidden_size > kMax) return bad("hidden_size", hidden_size);
  if (intermediate_size <= 0 || intermediate_size > kMax)
    return bad("intermediate_size", intermediate_size);
  if (num_layers <= 0 || num_layers > 1024) return bad("num_hidden_layers", num_layers);
  if (num_heads <= 0 || num_heads > 4096) return bad("num_attention_heads", num_heads);
  if (num_kv_heads <= 0 || num_kv_heads > num_heads || num_heads % num_kv_heads != 0) {
    return bad("num_key_value_heads", num_kv_heads);
  }
  if (head_dim <= 0 || head_dim % 2 != 0 || head_dim > 1024) return bad("head_dim", head_dim);
  if (vocab_size <= 0 || vocab_size > kMax) return bad("vocab_size", vocab_size);
  if (max_position_embeddings <= 0 || max_position_embeddings > kMax) {
    return bad("max_position_embeddings", max_position_embeddings);
  }
  if (!(rms_norm_eps > 0) || !std::isfinite(rms_norm_eps)) {
    return absl::InvalidArgumentError("model config: rms_norm_eps must be positive");
  }
  if (!(rope_theta > 0) || !std::isfinite(rope_theta)) {
    return absl::InvalidArgumentError("model config: rope_theta must be positive");
  }
  if (sliding_window < 0 || sliding_window > kMax) return bad("sliding_window", sliding_window);
  if (!(rope_scaling.factor > 0)) {
    return absl::InvalidArgumentError("model config: rope_scaling.factor must be positive");
  }
  return absl::OkStatus();
}

absl::StatusOr<LlamaConfig> LlamaConfig::FromHfJson(const std::string& path) {
  LP_ASSIGN_OR_RETURN(std::string text, ReadFileToString(path));
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  LlamaConfig c;
  c.architecture = j.value("model_type", std::string());
  if (!SupportedArchitecture(c.architecture)) {
    return absl::UnimplementedError(absl::StrCat(path, ": model_type '", c.architecture,
                                                 "' is not supported (llama, mistral, qwen2)"));
  }
  LP_ASSIGN_OR_RETURN(c.hidden_size, JsonInt(j, "hidden_size", path));
  LP_ASSIGN_OR_RETURN(c.intermediate_size, JsonInt(j, "intermediate_size", path));
  LP_ASSIGN_OR_RETURN(c.num_layers, JsonInt(j, "num_hidden_layers", path));
  LP_ASSIGN_OR_RETURN(c.num_heads, JsonInt(j, "num_attention_heads", path));
  LP_ASSIGN_OR_RETURN(c.num_kv_heads, JsonInt(j, "num_key_value_heads", path, c.num_heads));
  if (c.num_heads <= 0) return absl::InvalidArgumentError(path + ": num_attention_heads <= 0");
  LP_ASSIGN_OR_RETURN(c.head_dim, JsonInt(j, "head_dim", path, c.hidden_size / c.num_heads));
  LP_ASSIGN_OR_RETURN(c.vocab_size, JsonInt(j, "vocab_size", path));
  LP_ASSIGN_OR_RETURN(c.max_position_embeddings,
                      JsonInt(j, "max_position_embeddings", path, int64_t{2048}));
  LP_ASSIGN_OR_RETURN(double eps, JsonFloat(j, "rms_norm_eps", path, 1e-6));
  LP_ASSIGN_OR_RETURN(double theta, JsonFloat(j, "rope_theta", path, 10000.0));
  c.rms_norm_eps = static_cast<float>(eps);
  c.rope_theta = static_cast<float>(theta);
  c.tie_word_embeddings = j.value("tie_word_embeddings", false);
  c.attention_bias = c.architecture == "qwen2" ? true : j.value("attention_bias", false);
  if (j.value("mlp_bias", false)) {
    return absl::UnimplementedError(path + ": mlp_bias is not supported");
  }
  if (j.contains("hidden_act") && j["hidden_act"] != "silu") {
    return absl::UnimplementedError(path + ": hidden_act other than silu is not supported");
  }
  c.bos_token_id = FirstId(j, "bos_token_id");
  c.eos_token_id = FirstId(j, "eos_token_id");
  LP_RETURN_IF_ERROR(ReadSlidingWindow(j, path, &c));
  // transformers >= 5 writes "rope_parameters" (with rope_theta inside) instead of
  // "rope_theta" + "rope_scaling"; Hub checkpoints use the older keys.
  auto rope_it = j.find("rope_scaling");
  if (auto rp = j.find("rope_parameters"); rp != j.end() && rp->is_object()) {
    LP_ASSIGN_OR_RETURN(double rp_theta, JsonFloat(*rp, "rope_theta", path, c.rope_theta));
    c.rope_theta = static_cast<float>(rp_theta);
    rope_it = rp;
  }
  if (auto it = rope_it; it != j.end() && it->is_object()) {
    std::string type = it->value("rope_type", it->value("type", std::string("default")));
    LP_ASSIGN_OR_RETURN(double factor, JsonFloat(*it, "factor", path, 1.0));
    c.rope_scaling.factor = static_cast<float>(factor);
    if (type == "linear") {
      c.rope_scaling.type = RopeScaling::Type::kLinear;
    } else if (type == "llama3") {
      c.rope_scaling.type = RopeScaling::Type::kLlama3;
      LP_ASSIGN_OR_RETURN(double lo, JsonFloat(*it, "low_freq_factor", path, 1.0));
      LP_ASSIGN_OR_RETURN(double hi, JsonFloat(*it, "high_freq_factor", path, 4.0));
      LP_ASSIGN_OR_RETURN(int64_t orig,
                          JsonInt(*it, "original_max_position_embeddings", path, int64_t{8192}));
      c.rope_scaling.low_freq_factor = static_cast<float>(lo);
      c.rope_scaling.high_freq_factor = static_cast<float>(hi);
      c.rope_scaling.original_max_position_embeddings = orig;
    } else if (type != "default") {
      return absl::UnimplementedError(
          absl::StrCat(path, ": rope_scaling type '", type, "' is not supported (linear, llama3)"));
    }
  }
  LP_RETURN_IF_ERROR(Annotate(c.Validate(), path));
  return c;
}

absl::StatusOr<LlamaConfig> LlamaConfig::FromGguf(const formats::GgufFile& gguf) {
  const std::string& path = gguf.path();
  LlamaConfig c;
  auto arch = gguf.GetString("general.architecture");
  if (!arch.ok()) return Annotate(arch.status(), path);
  c.architecture = *arch;
  if (!SupportedArchitecture(c.architecture)) {
    return absl::UnimplementedError(absl::StrCat(path, ": architecture '", c.architecture,
                                                 "' is not supported (llama, mistral, qwen2)"));
  }
  const std::string a = c.architecture + ".";
  auto get_int = [&](const std::string& key) -> absl::StatusOr<int64_t> {
    auto v = gguf.GetInt(key);
    if (!v.ok()) return Annotate(v.status(), path);
    return v;
  };
  LP_ASSIGN_OR_RETURN(c.hidden_size, get_int(a + "embedding_length"));
  LP_ASSIGN_OR_RETURN(c.intermediate_size, get_int(a + "feed_forward_length"));
  LP_ASSIGN_OR_RETURN(c.num_layers, get_int(a + "block_count"));
  LP_ASSIGN_OR_RETURN(c.num_heads, get_int(a + "attention.head_count"));
  c.num_kv_heads = gguf.GetInt(a + "attention.head_count_kv").value_or(c.num_heads);
  if (c.num_heads <= 0) return absl::InvalidArgumentError(path + ": head_count <= 0");
  c.head_dim =
      gguf.GetInt(a + "attention.key_length")
          .value_or(gguf.GetInt(a + "rope.dimension_count").value_or(c.hidden_size / c.num_heads));
  c.max_position_embeddings = gguf.GetInt(a + "context_length").value_or(2048);
  c.rms_norm_eps =
      static_cast<float>(gguf.GetFloat(a + "attention.layer_norm_rms_epsilon").value_or(1e-5));
  c.rope_theta = static_cast<float>(gguf.GetFloat(a + "rope.freq_base").value_or(10000.0));
  auto tokens = gguf.GetStringArray("tokenizer.ggml.tokens");
  c.vocab_size = gguf.GetInt(a + "vocab_size").value_or(tokens.ok() ? tokens->size() : 0);
  if (const formats::TensorInfo* emb = gguf.Find("token_embd.weight"); emb && !emb->shape.empty()) {
    c.vocab_size = emb->shape[0];
  }
  c.tie_word_embeddings = gguf.Find("output.weight") == nullptr;
  c.attention_bias = gguf.Find("blk.0.attn_q.bias") != nullptr;
  // llama.cpp's key for the window. llama.cpp converts MistralForCausalLM as architecture
  // "llama"; a file that carries the key gets the window (tests/fixtures/tiny_llama/mistral_window/
  // model.gguf), one without it runs with full attention as in llama.cpp. qwen2 files are left
  // alone: transformers applies qwen2's window only with use_sliding_window, which GGUF has no key
  // for (and llama.cpp's qwen2 never uses one).
  if (c.architecture == "mistral" || c.architecture == "llama") {
    c.sliding_window = gguf.GetInt(a + "attention.sliding_window").value_or(0);
  }
  c.bos_token_id = static_cast<int32_t>(gguf.GetInt("tokenizer.ggml.bos_token_id").value_or(-1));
  c.eos_token_id = static_cast<int32_t>(gguf.GetInt("tokenizer.ggml.eos_token_id").value_or(-1));
  if (auto type = gguf.GetString(a + "rope.scaling.type"); type.ok() && *type != "none") {
    if (*type != "linear") {
      return absl::UnimplementedError(
          absl::StrCat(path, ": rope.scaling.type '", *type, "' is not supported"));
    }
    c.rope_scaling.type = RopeScaling::Type::kLinear;
    c.rope_scaling.factor =
        static_cast<float>(gguf.GetFloat(a + "rope.scaling.factor").value_or(1.0));
  }
  LP_RETURN_IF_ERROR(Annotate(c.Validate(), path));
  return c;
}

}  // namespace loraplex::model
