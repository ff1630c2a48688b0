#include "model/llama_weights.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "formats/gguf.h"
#include "formats/safetensors.h"
#include "kernels/quant.h"
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
  // The GGUF mapping that info->data points into (nullptr for safetensors, whose tensors are
  // always converted): a quantized matrix kept as stored is used in place.
  const MappedFile* mapping = nullptr;

  // The tensor's pages, read once for a copy or conversion, leave the resident set.
  void Release() const {
    if (mapping != nullptr && info != nullptr) mapping->DontNeed(info->data, info->nbytes);
  }
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

// The kernel format of a stored quantized type, or false for the plain types.
bool KernelQuantType(formats::StoredType t, kernels::DType* out) {
  switch (t) {
    case formats::StoredType::kQ8_0:
      *out = kernels::DType::kQ8_0;
      return true;
    case formats::StoredType::kQ4_0:
      *out = kernels::DType::kQ4_0;
      return true;
    case formats::StoredType::kQ4_1:
      *out = kernels::DType::kQ4_1;
      return true;
    case formats::StoredType::kQ4_K:
      *out = kernels::DType::kQ4_K;
      return true;
    case formats::StoredType::kQ5_K:
      *out = kernels::DType::kQ5_K;
      return true;
    case formats::StoredType::kQ6_K:
      *out = kernels::DType::kQ6_K;
      return true;
    case formats::StoredType::kF32:
    case formats::StoredType::kF16:
    case formats::StoredType::kBF16:
      return false;
  }
  return false;
}

// Fills LlamaWeights given a function that maps an HF tensor name to its Source.
template <typename Lookup>
absl::StatusOr<LlamaWeights> LoadWith(const LlamaConfig& c, WeightStorage storage, Lookup lookup) {
  LlamaWeights w;
  const int64_t h = c.hidden_size;
  auto matrix = [&](const std::string& name, int64_t rows, int64_t cols,
                    StoredMatrix* out) -> absl::Status {
    const Source src = lookup(name);
    kernels::DType quant;
    if (storage.keep_quantized && src.info != nullptr && KernelQuantType(src.info->type, &quant) &&
        src.info->shape == std::vector<int64_t>{rows, cols}) {
      // Kept as stored: the blocks copied (whole rows reordered for q/k).
      const int64_t row_bytes = kernels::RowBytes(quant, cols);
      if (static_cast<int64_t>(src.info->nbytes) != rows * row_bytes) {
        return absl::InvalidArgumentError(absl::StrCat(src.file, ": tensor '", src.info->name,
                                                       "' has ", src.info->nbytes, " bytes, ",
                                                       "expected ", rows * row_bytes));
      }
      out->dtype = quant;
      out->rows = rows;
      out->cols = cols;
      if (src.mapping != nullptr && !src.unpermute) {
        out->mapped = src.info->data;  // in place; its pages are read in ahead of the first step
        src.mapping->WillNeed(src.info->data, src.info->nbytes);
        return absl::OkStatus();
      }
      out->blocks.assign(src.info->data, src.info->data + src.info->nbytes);
      if (src.unpermute)
        UnpermuteGgufRowBytes(out->blocks.data(), src.heads, c.head_dim, row_bytes);
      src.Release();
      return absl::OkStatus();
    }
    LP_ASSIGN_OR_RETURN(std::vector<float> data, ReadF32(src, name, {rows, cols}, c.head_dim));
    src.Release();
    kernels::DType dtype = storage.dtype;
    if (kernels::IsQuantized(dtype) && cols % kernels::BlockSize(dtype) != 0) {
      dtype = kernels::DType::kBF16;  // rows that do not split into blocks
    }
    out->Assign(dtype, rows, cols, data.data());
    return absl::OkStatus();
  };
  auto vec = [&](const std::string& name, int64_t n, std::vector<float>* out) -> absl::Status {
    const Source src = lookup(name);
    LP_ASSIGN_OR_RETURN(*out, ReadF32(src, name, {n}, c.head_dim));
    src.Release();
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
  if (dtype == kernels::DType::kF32) {
    v.data = f32.data();
  } else if (dtype == kernels::DType::kBF16) {
    v.data = bf16.data();
  } else {
    v.data = block_data();
  }
  return v;
}

void StoredMatrix::Assign(kernels::DType d, int64_t r, int64_t c, const float* src) {
  dtype = d;
  rows = r;
  cols = c;
  const int64_t n = r * c;
  f32.clear();
  bf16.clear();
  blocks.clear();
  mapped = nullptr;
  if (d == kernels::DType::kF32) {
    f32.assign(src, src + n);
  } else if (d == kernels::DType::kBF16) {
    bf16.resize(n);
    for (int64_t i = 0; i < n; ++i) bf16[i] = F32ToBf16(src[i]);
  } else {
    const int64_t row_bytes = kernels::RowBytes(d, c);
    blocks.resize(r * row_bytes);
    for (int64_t i = 0; i < r; ++i) {
      kernels::QuantizeRow(d, src + i * c, blocks.data() + i * row_bytes, c);
    }
  }
}

float StoredMatrix::At(int64_t r, int64_t c) const {
  const int64_t i = r * cols + c;
  if (dtype == kernels::DType::kF32) return f32[i];
  if (dtype == kernels::DType::kBF16) return Bf16ToF32(bf16[i]);
  std::vector<float> row(cols);
  kernels::DequantizeRow(dtype, block_data() + r * kernels::RowBytes(dtype, cols), row.data(),
                         cols);
  return row[c];
}

std::vector<float> StoredMatrix::ToF32() const {
  if (dtype == kernels::DType::kF32) return f32;
  std::vector<float> out(rows * cols);
  if (dtype == kernels::DType::kBF16) {
    for (size_t i = 0; i < out.size(); ++i) out[i] = Bf16ToF32(bf16[i]);
    return out;
  }
  const int64_t row_bytes = kernels::RowBytes(dtype, cols);
  for (int64_t r = 0; r < rows; ++r) {
    kernels::DequantizeRow(dtype, block_data() + r * row_bytes, out.data() + r * cols, cols);
  }
  return out;
}

int64_t StoredMatrix::bytes() const {
  if (kernels::IsQuantized(dtype)) return rows * kernels::RowBytes(dtype, cols);
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

namespace {
template <typename Fn>
void ForEachMatrix(const LlamaWeights& w, Fn fn) {
  fn(w.embed);
  if (w.lm_head.rows > 0) fn(w.lm_head);
  for (const auto& l : w.layers) {
    for (const auto& m : l.linear) fn(m);
  }
}
}  // namespace

int64_t LlamaWeights::mapped_bytes() const {
  int64_t total = 0;
  ForEachMatrix(*this, [&](const StoredMatrix& m) { total += m.mapped_bytes(); });
  return total;
}

std::string LlamaWeights::Formats() const {
  std::map<std::string, int> count;
  ForEachMatrix(*this, [&](const StoredMatrix& m) { ++count[kernels::DTypeName(m.dtype)]; });
  if (count.size() == 1) return count.begin()->first;
  std::vector<std::pair<int, std::string>> order;
  for (const auto& [name, n] : count) order.push_back({-n, name});
  std::sort(order.begin(), order.end());
  std::string out;
  for (const auto& [n, name] : order)
    absl::StrAppend(&out, out.empty() ? "" : ", ", name, " x", -n);
  return out;
}

bool LlamaWeights::AnyQuantized() const {
  bool any = false;
  ForEachMatrix(*this, [&](const StoredMatrix& m) { any |= kernels::IsQuantized(m.dtype); });
  return any;
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

void UnpermuteGgufRowBytes(uint8_t* data, int64_t n_heads, int64_t head_dim, int64_t row_bytes) {
  const int64_t half = head_dim / 2;
  std::vector<uint8_t> head(head_dim * row_bytes);
  for (int64_t h = 0; h < n_heads; ++h) {
    uint8_t* base = data + h * head_dim * row_bytes;
    std::memcpy(head.data(), base, head.size());
    for (int64_t i = 0; i < half; ++i) {
      for (int64_t j = 0; j < 2; ++j) {
        std::memcpy(base + (j * half + i) * row_bytes, head.data() + (2 * i + j) * row_bytes,
                    row_bytes);
      }
    }
  }
}

absl::StatusOr<LlamaWeights> LoadWeightsFromGguf(std::shared_ptr<const formats::GgufFile> gguf,
                                                 const LlamaConfig& config, WeightStorage storage) {
  // llama.cpp permutes q/k rows only for architectures it runs with adjacent-pair (normal) RoPE.
  const bool permuted = config.architecture == "llama" || config.architecture == "mistral";
  auto weights = LoadWith(config, storage, [&](const std::string& hf) {
    Source s;
    s.file = gguf->path();
    s.info = gguf->Find(GgufName(hf));
    s.mapping = &gguf->mapping();
    if (permuted && (hf.find("self_attn.q_proj.") != std::string::npos)) {
      s.unpermute = true;
      s.heads = config.num_heads;
    } else if (permuted && hf.find("self_attn.k_proj.") != std::string::npos) {
      s.unpermute = true;
      s.heads = config.num_kv_heads;
    }
    return s;
  });
  if (weights.ok() && weights->mapped_bytes() > 0) weights->mapping = std::move(gguf);
  return weights;
}

absl::StatusOr<LlamaWeights> LoadWeightsFromSafetensors(const formats::SafetensorsModel& st,
                                                        const std::string& path,
                                                        const LlamaConfig& config,
                                                        WeightStorage storage) {
  storage.keep_quantized = false;  // safetensors hold no ggml blocks
  return LoadWith(config, storage, [&](const std::string& hf) {
    Source s;
    s.file = path;
    s.info = st.Find(hf);
    return s;
  });
}

}  // namespace loraplex::model
