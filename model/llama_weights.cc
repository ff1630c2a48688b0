#include "model/llama_weights.h"

#include <cstring>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "formats/gguf.h"
#include "formats/safetensors.h"
#include "model/llama_model.h"

namespace loraplex::model {
namespace {

using formats::TensorInfo;

// Where a tensor comes from and how to turn it into f32 in HF layout.
struct Source {
  const TensorInfo* info = nullptr;
  std::string file;
  bool unpermute = false;
  int64_t heads = 0;
};

absl::StatusOr<std::vector<float>> ReadF32(const Source& src, const std::string& name,
                                           std::vector<int64_t> want_shape, int64_t head_dim) {
  if (src.info == nullptr) {
    return absl::NotFoundError(absl::StrCat(src.file, ": tensor '", name, "' is missing"));
  }
  if (src.info->shape != want_shape) {
    std::string got, want;
    for (int64_t d : src.info->shape) absl::StrAppend(&got, got.empty() ? "" : "x", d);
    for (int64_t d : want_shape) absl::StrAppend(&want, want.empty() ? "" : "x", d);
    return absl::InvalidArgumentError(absl::StrCat(src.file, ": tensor '", src.info->name,
                                                   "' has shape ", got, ", expected ", want));
  }
  auto data = formats::DequantizeToF32(*src.info);
  if (!data.ok()) return Annotate(data.status(), absl::StrCat(src.file, ": ", src.info->name));
  if (src.unpermute) {
    int64_t cols = want_shape.size() == 2 ? want_shape[1] : 1;
    UnpermuteGgufRows(data->data(), src.heads, head_dim, cols);
  }
  return std::move(data).value();
}

// Fills LlamaWeights given a function that maps an HF tensor name to its Source.
template <typename Lookup>
absl::StatusOr<LlamaWeights> LoadWith(const LlamaConfig& c, kernels::DType dtype, Lookup lookup) {
  LlamaWeights w;
  const int64_t h = c.hidden_size;
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols,
                    StoredMatrix* out) -> absl::Status {
    LP_ASSIGN_OR_RETURN(std::vector<float> data,
                        ReadF32(lookup(name), name, {rows, cols}, c.head_dim));
    out->Assign(dtype, rows, cols, data.data());
    return absl::OkStatus();
  };
  auto vec = [&](const std::string& name, int64_t n, std::vector<float>* out) -> absl::Status {
    LP_ASSIGN_OR_RETURN(*out, ReadF32(lookup(name), name, {n}, c.head_dim));
    return absl::OkStatus();
  };
  LP_RETURN_IF_ERROR(matrix("model.embed_tokens.weight", c.vocab_size, h, &w.embed));
  LP_RETURN_IF_ERROR(vec("model.norm.weight", h, &w.final_norm));
  if (!c.tie_word_embeddings) {
    LP_RETURN_IF_ERROR(matrix("lm_head.weight", c.vocab_size, h, &w.lm_head));
  }
  w.layers.resize(c.num_layers);
  for (int64_t l = 0; l < c.num_layers; ++l) {
    LayerWeights& lw = w.layers[l];
    const std::string p = absl::StrCat("model.layers.", l, ".");
    LP_RETURN_IF_ERROR(vec(p + "input_layernorm.weight", h, &lw.attn_norm));
    LP_RETURN_IF_ERROR(vec(p + "post_attention_layernorm.weight", h, &lw.ffn_norm));
    for (int m = 0; m < kNumLinearModules; ++m) {
      auto mod = static_cast<LinearModule>(m);
      const bool attn = mod == LinearModule::kQ || mod == LinearModule::kK ||
                        mod == LinearModule::kV || mod == LinearModule::kO;
      const std::string name =
          absl::StrCat(p, attn ? "self_attn." : "mlp.", LinearModuleName(mod), ".weight");
      int64_t rows = 0, cols = h;
      switch (mod) {
        case LinearModule::kQ:
          rows = c.q_dim();
          break;
        case LinearModule::kK:
        case LinearModule::kV:
          rows = c.kv_dim();
          break;
        case LinearModule::kO:
          rows = h;
          cols = c.q_dim();
          break;
        case LinearModule::kGate:
        case LinearModule::kUp:
          rows = c.intermediate_size;
          break;
        case LinearModule::kDown:
          rows = h;
          cols = c.intermediate_size;
          break;
      }
      LP_RETURN_IF_ERROR(matrix(name, rows, cols, &lw.linear[m]));
    }
    if (c.attention_bias) {
      LP_RETURN_IF_ERROR(vec(p + "self_attn.q_proj.bias", c.q_dim(), &lw.q_bias));
      LP_RETURN_IF_ERROR(vec(p + "self_attn.k_proj.bias", c.kv_dim(), &lw.k_bias));
      LP_RETURN_IF_ERROR(vec(p + "self_attn.v_proj.bias", c.kv_dim(), &lw.v_bias));
    }
  }
  return w;
}

// HF name -> GGUF name for the llama.cpp naming scheme.
std::string GgufName(const std::string& hf) {
  if (hf == "model.embed_tokens.weight") return "token_embd.weight";
  if (hf == "model.norm.weight") return "output_norm.weight";
  if (hf == "lm_head.weight") return "output.weight";
  // model.layers.N.<rest>
  const std::string prefix = "model.layers.";
  size_t dot = hf.find('.', prefix.size());
  std::string layer = hf.substr(prefix.size(), dot - prefix.size());
  std::string rest = hf.substr(dot + 1);
  static const std::pair<const char*, const char*> kMap[] = {
      {"input_layernorm.weight", "attn_norm.weight"},
      {"post_attention_layernorm.weight", "ffn_norm.weight"},
      {"self_attn.q_proj.weight", "attn_q.weight"},
      {"self_attn.k_proj.weight", "attn_k.weight"},
      {"self_attn.v_proj.weight", "attn_v.weight"},
      {"self_attn.o_proj.weight", "attn_output.weight"},
      {"self_attn.q_proj.bias", "attn_q.bias"},
      {"self_attn.k_proj.bias", "attn_k.bias"},
      {"self_attn.v_proj.bias", "attn_v.bias"},
      {"mlp.gate_proj.weight", "ffn_gate.weight"},
      {"mlp.up_proj.weight", "ffn_up.weight"},
      {"mlp.down_proj.weight", "ffn_down.weight"},
  };
  for (const auto& [from, to] : kMap) {
    if (rest == from) return absl::StrCat("blk.", layer, ".", to);
  }
  return hf;
}

}  // namespace

kernels::WeightView StoredMatrix::view() const {
  kernels::WeightView v;
  v.dtype = dtype;
  v.rows = rows;
  v.cols = cols;
  v.data = dtype == kernels::DType::kF32 ? static_cast<const void*>(f32.data())
                                         : static_cast<const void*>(bf16.data());
  return v;
}

void StoredMatrix::Assign(kernels::DType d, int64_t r, int64_t c, const float* src) {
  dtype = d;
  rows = r;
  cols = c;
  const int64_t n = r * c;
  if (d == kernels::DType::kF32) {
    f32.assign(src, src + n);
    bf16.clear();
  } else {
    bf16.resize(n);
    for (int64_t i = 0; i < n; ++i) bf16[i] = F32ToBf16(src[i]);
    f32.clear();
  }
}

float StoredMatrix::At(int64_t r, int64_t c) const {
  const int64_t i = r * cols + c;
  return dtype == kernels::DType::kF32 ? f32[i] : Bf16ToF32(bf16[i]);
}

int64_t StoredMatrix::bytes() const {
  return rows * cols * (dtype == kernels::DType::kF32 ? 4 : 2);
}

int64_t LlamaWeights::bytes() const {
  int64_t total = embed.bytes() + lm_head.bytes() + final_norm.size() * 4;
  for (const auto& l : layers) {
    for (const auto& m : l.linear) total += m.bytes();
    total += (l.attn_norm.size() + l.ffn_norm.size() + l.q_bias.size() + l.k_bias.size() +
              l.v_bias.size()) *
             4;
  }
  return total;
}

void UnpermuteGgufRows(float* data, int64_t n_heads, int64_t head_dim, int64_t cols) {
  // GGUF row h*hd + 2*i + j holds HF row h*hd + j*(hd/2) + i.
  const int64_t half = head_dim / 2;
  std::vector<float> head(head_dim * cols);
  for (int64_t h = 0; h < n_heads; ++h) {
    float* base = data + h * head_dim * cols;
    std::memcpy(head.data(), base, head.size() * sizeof(float));
    for (int64_t i = 0; i < half; ++i) {
      for (int64_t j = 0; j < 2; ++j) {
        std::memcpy(base + (j * half + i) * cols, head.data() + (2 * i + j) * cols,
                    cols * sizeof(float));
      }
    }
  }
}

absl::StatusOr<LlamaWeights> LoadWeightsFromGguf(const formats::GgufFile& gguf,
                                                 const LlamaConfig& config, kernels::DType dtype) {
  // llama.cpp permutes q/k rows only for architectures it runs with adjacent-pair (normal) RoPE.
  const bool permuted = config.architecture == "llama" || config.architecture == "mistral";
  return LoadWith(config, dtype, [&](const std::string& hf) {
    Source s;
    s.file = gguf.path();
    s.info = gguf.Find(GgufName(hf));
    if (permuted && (hf.find("self_attn.q_proj.") != std::string::npos)) {
      s.unpermute = true;
      s.heads = config.num_heads;
    } else if (permuted && hf.find("self_attn.k_proj.") != std::string::npos) {
      s.unpermute = true;
      s.heads = config.num_kv_heads;
    }
    return s;
  });
}

absl::StatusOr<LlamaWeights> LoadWeightsFromSafetensors(const formats::SafetensorsModel& st,
                                                        const std::string& path,
                                                        const LlamaConfig& config,
                                                        kernels::DType dtype) {
  return LoadWith(config, dtype, [&](const std::string& hf) {
    Source s;
    s.file = path;
    s.info = st.Find(hf);
    return s;
  });
}

}  // namespace loraplex::model
