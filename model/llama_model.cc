#include "model/llama_model.h"

#include <atomic>
#include <cmath>
#include <filesystem>
#include <map>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/logging.h"
#include "common/status.h"
#include "formats/gguf.h"
#include "formats/safetensors.h"
#include "model/cuda_model.h"
#include "model/llama_weights.h"
#include "model/lora_apply.h"

namespace loraplex::model {

uint64_t NewLoraViewId() {
  static std::atomic<uint64_t> next{1};
  return next.fetch_add(1, std::memory_order_relaxed);
}

const char* DeviceName(Device d) { return d == Device::kCuda ? "cuda" : "cpu"; }

const char* LinearModuleName(LinearModule m) {
  switch (m) {
    case LinearModule::kQ:
      return "q_proj";
    case LinearModule::kK:
      return "k_proj";
    case LinearModule::kV:
      return "v_proj";
    case LinearModule::kO:
      return "o_proj";
    case LinearModule::kGate:
      return "gate_proj";
    case LinearModule::kUp:
      return "up_proj";
    case LinearModule::kDown:
      return "down_proj";
  }
  return "?";
}

struct LlamaModel::Impl {
  LlamaWeights w;
  std::vector<float> inv_freq;
  // Pristine copies of the matrices a merge changed, restored by Unmerge.
  std::map<std::pair<int64_t, int>, StoredMatrix> merge_backup;
  // Step scratch, reused across calls.
  std::vector<float> x, h, q, k, v, attn, proj, gate, up, sel;
  LoraScratch lora;
  // Their capacities summed, published after each CPU step for scratch_bytes(), which other
  // threads (metrics) read while a step may be resizing the vectors.
  std::atomic<int64_t> scratch_bytes{0};

  int64_t ScratchCapacityBytes() const;
};

LlamaModel::~LlamaModel() = default;

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& path,
                                                             const LoadOptions& options) {
  namespace fs = std::filesystem;
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  m->options_ = options;
  m->impl_ = std::make_unique<Impl>();
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    return absl::NotFoundError(absl::StrCat(path, ": no such model file or folder"));
  }
  if (fs::is_directory(path, ec)) {
    LP_ASSIGN_OR_RETURN(m->config_, LlamaConfig::FromHfJson(path + "/config.json"));
    LP_ASSIGN_OR_RETURN(auto st, formats::SafetensorsModel::Open(path));
    LP_ASSIGN_OR_RETURN(m->impl_->w,
                        LoadWeightsFromSafetensors(*st, path, m->config_, options.dtype));
  } else {
    LP_ASSIGN_OR_RETURN(auto gguf, formats::GgufFile::Open(path));
    LP_ASSIGN_OR_RETURN(m->config_, LlamaConfig::FromGguf(*gguf));
    LP_ASSIGN_OR_RETURN(m->impl_->w, LoadWeightsFromGguf(*gguf, m->config_, options.dtype));
    // A GGUF without tokenizer metadata loads token-ids-only when no tokenizer is required.
    const bool has_tokenizer = gguf->GetString("tokenizer.ggml.model").ok();
    if (options.tokenizer_path.empty() && (has_tokenizer || options.require_tokenizer)) {
      LP_ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::FromGguf(*gguf));
    }
    m->from_gguf_ = true;
  }
  if (!options.tokenizer_path.empty()) {
    const std::string& tp = options.tokenizer_path;
    if (fs::is_directory(tp, ec)) {
      LP_ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::FromHfDir(tp));
    } else {
      LP_ASSIGN_OR_RETURN(auto tok_gguf, formats::GgufFile::Open(tp));
      LP_ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::FromGguf(*tok_gguf));
    }
  } else if (m->tokenizer_ == nullptr) {
    if (fs::exists(path + "/tokenizer.json", ec)) {
      LP_ASSIGN_OR_RETURN(m->tokenizer_, Tokenizer::FromHfDir(path));
    } else if (options.require_tokenizer) {
      return absl::NotFoundError(absl::StrCat(
          path, "/tokenizer.json: missing; give a tokenizer with --tokenizer (GGUF or HF folder)"));
    }
  }
  if (m->tokenizer_ != nullptr && m->tokenizer_->vocab_size() > m->config_.vocab_size) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": tokenizer has ", m->tokenizer_->vocab_size(),
                     " tokens but the model only ", m->config_.vocab_size));
  }
  if (m->tokenizer_ != nullptr) {
    if (m->config_.bos_token_id < 0) m->config_.bos_token_id = m->tokenizer_->bos_id();
    if (m->config_.eos_token_id < 0) m->config_.eos_token_id = m->tokenizer_->eos_id();
  }
  m->impl_->inv_freq = m->config_.RopeInvFreq();
  if (options.device == Device::kCuda) {
    LP_ASSIGN_OR_RETURN(m->cuda_,
                        CreateCudaModel(m->config_, &m->impl_->w, m->impl_->inv_freq, options));
  }
  return m;
}

// Shape-based, so it stays right after the CUDA model released the host matrices.
int64_t LlamaModel::weight_bytes() const { return impl_->w.bytes(); }

namespace {

template <typename T>
int64_t CapacityBytes(const std::vector<T>& v) {
  return static_cast<int64_t>(v.capacity() * sizeof(T));
}

}  // namespace

int64_t LlamaModel::scratch_bytes() const {
  return impl_->scratch_bytes.load(std::memory_order_relaxed);
}

int64_t LlamaModel::Impl::ScratchCapacityBytes() const {
  const Impl& s = *this;
  int64_t total = 0;
  for (const std::vector<float>* v :
       {&s.x, &s.h, &s.q, &s.k, &s.v, &s.attn, &s.proj, &s.gate, &s.up, &s.sel}) {
    total += CapacityBytes(*v);
  }
  const LoraScratch& l = s.lora;
  return total + CapacityBytes(l.v) + CapacityBytes(l.a) + CapacityBytes(l.b) +
         CapacityBytes(l.token_adapter) + CapacityBytes(l.starts) + CapacityBytes(l.seg_adapter);
}

absl::StatusOr<KvCache> LlamaModel::CreateKvCache(int64_t num_blocks, int64_t block_size) const {
  return KvCache::Create(config_, num_blocks, block_size,
                         /*host_storage=*/options_.device == Device::kCpu);
}

kernels::WeightView LlamaModel::LinearWeight(int64_t layer, LinearModule m) const {
  return impl_->w.layers[layer].linear[static_cast<int>(m)].view();
}

int64_t LinearInFeatures(const LlamaConfig& c, LinearModule m) {
  switch (m) {
    case LinearModule::kO:
      return c.q_dim();
    case LinearModule::kDown:
      return c.intermediate_size;
    default:
      return c.hidden_size;
  }
}

int64_t LinearOutFeatures(const LlamaConfig& c, LinearModule m) {
  switch (m) {
    case LinearModule::kQ:
      return c.q_dim();
    case LinearModule::kK:
    case LinearModule::kV:
      return c.kv_dim();
    case LinearModule::kGate:
    case LinearModule::kUp:
      return c.intermediate_size;
    default:
      return c.hidden_size;
  }
}

int64_t LlamaModel::LinearInFeatures(LinearModule m) const {
  return model::LinearInFeatures(config_, m);
}

int64_t LlamaModel::LinearOutFeatures(LinearModule m) const {
  return model::LinearOutFeatures(config_, m);
}

namespace {

absl::Status ValidateBatch(const ForwardBatch& b, const LlamaConfig& c, const KvCache& cache) {
  const int64_t n = b.num_tokens();
  if (n == 0) return absl::InvalidArgumentError("forward: empty batch");
  if (static_cast<int64_t>(b.positions.size()) != n ||
      static_cast<int64_t>(b.token_seq.size()) != n) {
    return absl::InvalidArgumentError("forward: tokens, positions and token_seq differ in length");
  }
  if (!b.adapter_slot.empty() && static_cast<int64_t>(b.adapter_slot.size()) != n) {
    return absl::InvalidArgumentError("forward: adapter_slot must be empty or one per token");
  }
  if (b.max_blocks_per_seq <= 0 || b.block_tables.size() % b.max_blocks_per_seq != 0) {
    return absl::InvalidArgumentError(
        "forward: block_tables is not [num_seqs, max_blocks_per_seq]");
  }
  const int64_t num_seqs = static_cast<int64_t>(b.block_tables.size()) / b.max_blocks_per_seq;
  for (int64_t t = 0; t < n; ++t) {
    if (b.tokens[t] < 0 || b.tokens[t] >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "token id ", b.tokens[t], " is outside the vocabulary [0, ", c.vocab_size, ")"));
    }
    if (b.token_seq[t] < 0 || b.token_seq[t] >= num_seqs) {
      return absl::InvalidArgumentError(absl::StrCat("forward: token_seq[", t, "] out of range"));
    }
    const int64_t pos = b.positions[t];
    if (pos < 0 || pos >= c.max_position_embeddings) {
      return absl::InvalidArgumentError(absl::StrCat(
          "position ", pos, " is outside the context [0, ", c.max_position_embeddings, ")"));
    }
    const int64_t blk_idx = pos / cache.block_size();
    if (blk_idx >= b.max_blocks_per_seq) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: position ", pos, " past the block table"));
    }
    const int32_t blk = b.block_tables[b.token_seq[t] * b.max_blocks_per_seq + blk_idx];
    if (!cache.block_in_use(blk)) {
      return absl::InvalidArgumentError(
          absl::StrCat("forward: token ", t, " maps to KV block ", blk, " which is not allocated"));
    }
    if (!b.adapter_slot.empty()) {
      int32_t s = b.adapter_slot[t];
      if (s < -1 || s >= static_cast<int32_t>(b.adapters.size()) ||
          (s >= 0 && b.adapters[s] == nullptr)) {
        return absl::InvalidArgumentError(
            absl::StrCat("forward: adapter_slot[", t, "] out of range"));
      }
    }
  }
  for (int32_t r : b.logit_rows) {
    if (r < 0 || r >= n) return absl::InvalidArgumentError("forward: logit row out of range");
  }
  return absl::OkStatus();
}

}  // namespace

namespace {

// f32 value of element i of a weight view.
inline float ViewAt(const kernels::WeightView& v, int64_t i) {
  return v.dtype == kernels::DType::kF32 ? static_cast<const float*>(v.data)[i]
                                         : Bf16ToF32(static_cast<const uint16_t*>(v.data)[i]);
}

}  // namespace

CudaGraphStats LlamaModel::cuda_graph_stats() const {
  return cuda_ != nullptr ? cuda_->graph_stats() : CudaGraphStats{};
}

absl::Status LlamaModel::Forward(const ForwardBatch& batch, KvCache* cache, int64_t top_k,
                                 StepLogits* out) {
  const int64_t vocab = config_.vocab_size;
  if (top_k < 0 || top_k > kMaxTopLogits) {
    return absl::InvalidArgumentError(
        absl::StrCat("forward: top_k=", top_k, " outside [0, ", kMaxTopLogits, "]"));
  }
  top_k = std::min(top_k, vocab);
  if (cuda_ != nullptr && top_k > 0) {
    LP_RETURN_IF_ERROR(ValidateBatch(batch, config_, *cache));
    return cuda_->Forward(batch, cache, merged_, top_k, out);
  }
  out->vocab = vocab;
  out->k = 0;
  out->ids.clear();
  out->logprobs.clear();
  return Forward(batch, cache, &out->logits);
}

absl::Status LlamaModel::Forward(const ForwardBatch& batch, KvCache* cache,
                                 std::vector<float>* logits) {
  const LlamaConfig& c = config_;
  LP_RETURN_IF_ERROR(ValidateBatch(batch, c, *cache));
  if (cuda_ != nullptr) {
    StepLogits step;
    step.logits.swap(*logits);  // reuse the caller's buffer
    absl::Status s = cuda_->Forward(batch, cache, merged_, /*top_k=*/0, &step);
    logits->swap(step.logits);
    return s;
  }
  if (!cache->has_host_storage()) {
    return absl::FailedPreconditionError(
        "forward: the KV cache has no host storage (made for a CUDA model)");
  }
  Impl& s = *impl_;
  const int64_t n = batch.num_tokens();
  const int64_t hid = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), ff = c.intermediate_size;
  s.x.resize(n * hid);
  s.h.resize(n * hid);
  s.q.resize(n * qd);
  s.k.resize(n * kvd);
  s.v.resize(n * kvd);
  s.attn.resize(n * qd);
  s.proj.resize(n * hid);
  s.gate.resize(n * ff);
  s.up.resize(n * ff);

  kernels::AttentionBatch ab;
  ab.num_tokens = n;
  ab.token_seq = batch.token_seq.data();
  ab.token_pos = batch.positions.data();
  ab.block_tables = batch.block_tables.data();
  const kernels::KvLayout layout = cache->layout(batch.max_blocks_per_seq);
  const float attn_scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));

  // y = W x for one base linear layer; the LoRA deltas are added per group of modules that read
  // the same input (ApplyLora fuses their shrink).
  auto base = [&](float* y, const float* x, int64_t layer, LinearModule m) {
    kernels::Gemm(y, x, n, s.w.layers[layer].linear[static_cast<int>(m)].view());
  };
  using M = LinearModule;

  kernels::Embed(s.x.data(), batch.tokens.data(), n, s.w.embed.view());
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& lw = s.w.layers[l];
    kernels::RmsNorm(s.h.data(), s.x.data(), lw.attn_norm.data(), n, hid, c.rms_norm_eps);
    base(s.q.data(), s.h.data(), l, M::kQ);
    base(s.k.data(), s.h.data(), l, M::kK);
    base(s.v.data(), s.h.data(), l, M::kV);
    ApplyLora({M::kQ, M::kK, M::kV}, l, s.h.data(), hid,
              {{s.q.data(), qd}, {s.k.data(), kvd}, {s.v.data(), kvd}}, batch, merged_, &s.lora);
    if (c.attention_bias) {
      for (int64_t t = 0; t < n; ++t) {
        kernels::Add(s.q.data() + t * qd, lw.q_bias.data(), qd);
        kernels::Add(s.k.data() + t * kvd, lw.k_bias.data(), kvd);
        kernels::Add(s.v.data() + t * kvd, lw.v_bias.data(), kvd);
      }
    }
    kernels::Rope(s.q.data(), batch.positions.data(), n, c.num_heads, c.head_dim,
                  s.inv_freq.data());
    kernels::Rope(s.k.data(), batch.positions.data(), n, c.num_kv_heads, c.head_dim,
                  s.inv_freq.data());
    kernels::WriteKv(cache->k(l), cache->v(l), s.k.data(), s.v.data(), ab, layout);
    kernels::PagedAttention(s.attn.data(), s.q.data(), cache->k(l), cache->v(l), ab, layout,
                            c.num_heads, attn_scale, c.sliding_window);
    base(s.proj.data(), s.attn.data(), l, M::kO);
    ApplyLora({M::kO}, l, s.attn.data(), qd, {{s.proj.data(), hid}}, batch, merged_, &s.lora);
    kernels::Add(s.x.data(), s.proj.data(), n * hid);

    kernels::RmsNorm(s.h.data(), s.x.data(), lw.ffn_norm.data(), n, hid, c.rms_norm_eps);
    base(s.gate.data(), s.h.data(), l, M::kGate);
    base(s.up.data(), s.h.data(), l, M::kUp);
    ApplyLora({M::kGate, M::kUp}, l, s.h.data(), hid, {{s.gate.data(), ff}, {s.up.data(), ff}},
              batch, merged_, &s.lora);
    kernels::SiluMul(s.gate.data(), s.gate.data(), s.up.data(), n * ff);
    base(s.proj.data(), s.gate.data(), l, M::kDown);
    ApplyLora({M::kDown}, l, s.gate.data(), ff, {{s.proj.data(), hid}}, batch, merged_, &s.lora);
    kernels::Add(s.x.data(), s.proj.data(), n * hid);
  }

  const int64_t rows = static_cast<int64_t>(batch.logit_rows.size());
  s.sel.resize(rows * hid);
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = s.x.data() + static_cast<int64_t>(batch.logit_rows[r]) * hid;
    std::copy(src, src + hid, s.sel.data() + r * hid);
  }
  kernels::RmsNorm(s.sel.data(), s.sel.data(), s.w.final_norm.data(), rows, hid, c.rms_norm_eps);
  logits->resize(rows * c.vocab_size);
  if (rows > 0) kernels::Gemm(logits->data(), s.sel.data(), rows, s.w.output().view());
  s.scratch_bytes.store(s.ScratchCapacityBytes(), std::memory_order_relaxed);
  return absl::OkStatus();
}

void MergePairInto(const LoraPair& pair, StoredMatrix* wp) {
  StoredMatrix& w = *wp;
  // W' = W + B A, each element computed in f32 from the pristine value and rounded once.
  std::vector<float> a(pair.rank * w.cols);
  for (int64_t i = 0; i < static_cast<int64_t>(a.size()); ++i) a[i] = ViewAt(pair.a, i);
  std::vector<float> row(w.cols);
  for (int64_t o = 0; o < w.rows; ++o) {
    for (int64_t i = 0; i < w.cols; ++i) row[i] = w.At(o, i);
    for (int64_t r = 0; r < pair.rank; ++r) {
      const float b = ViewAt(pair.b, o * pair.rank + r);
      const float* arow = a.data() + r * w.cols;
      for (int64_t i = 0; i < w.cols; ++i) row[i] += b * arow[i];
    }
    if (w.dtype == kernels::DType::kF32) {
      std::copy(row.begin(), row.end(), w.f32.begin() + o * w.cols);
    } else {
      for (int64_t i = 0; i < w.cols; ++i) w.bf16[o * w.cols + i] = F32ToBf16(row[i]);
    }
  }
}

absl::Status LlamaModel::Merge(const LoraWeightsView* adapter) {
  if (merged_ != nullptr) {
    return absl::FailedPreconditionError("an adapter is already merged; unmerge it first");
  }
  if (adapter == nullptr || static_cast<int64_t>(adapter->layers.size()) != config_.num_layers) {
    return absl::InvalidArgumentError("merge: adapter does not have one entry per layer");
  }
  Impl& s = *impl_;
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    for (int m = 0; m < kNumLinearModules; ++m) {
      const LoraPair* pair = adapter->layers[l][m];
      if (pair == nullptr) continue;
      StoredMatrix& w = s.w.layers[l].linear[m];
      if (pair->a.cols != w.cols || pair->b.rows != w.rows || pair->a.rows != pair->rank ||
          pair->b.cols != pair->rank) {
        return absl::FailedPreconditionError(
            absl::StrCat("merge: layer ", l, " ", LinearModuleName(static_cast<LinearModule>(m)),
                         " LoRA shapes do not match the base weight"));
      }
    }
  }
  if (cuda_ != nullptr) {
    LP_RETURN_IF_ERROR(cuda_->Merge(*adapter));
    merged_ = adapter;
    return absl::OkStatus();
  }
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    for (int m = 0; m < kNumLinearModules; ++m) {
      const LoraPair* pair = adapter->layers[l][m];
      if (pair == nullptr) continue;
      StoredMatrix& w = s.w.layers[l].linear[m];
      s.merge_backup.emplace(std::make_pair(l, m), w);
      MergePairInto(*pair, &w);
    }
  }
  merged_ = adapter;
  return absl::OkStatus();
}

absl::Status LlamaModel::Unmerge() {
  if (merged_ == nullptr) return absl::FailedPreconditionError("no adapter is merged");
  if (cuda_ != nullptr) {
    LP_RETURN_IF_ERROR(cuda_->Unmerge());
    merged_ = nullptr;
    return absl::OkStatus();
  }
  Impl& s = *impl_;
  for (auto& [key, backup] : s.merge_backup) {
    s.w.layers[key.first].linear[key.second] = std::move(backup);
  }
  s.merge_backup.clear();
  merged_ = nullptr;
  return absl::OkStatus();
}

}  // namespace loraplex::model
