#include "model/llama_model.h"

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <map>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/logging.h"
#include "common/status.h"
#include "formats/gguf.h"
#include "formats/safetensors.h"
#include "kernels/kernels.h"
#include "kernels/quant.h"
#include "model/backend.h"
#include "model/cpu_backend.h"
#include "model/cuda_model.h"
#include "model/llama_weights.h"
#include "model/lora_plan.h"

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
  std::unique_ptr<Backend> backend;  // chosen at load
  // The LoRA work of the current step, rebuilt by each Forward (its vectors are reused).
  LoraPlan plan;
  // Pristine copies of the matrices a merge changed, restored by Unmerge.
  std::map<std::pair<int64_t, int>, StoredMatrix> merge_backup;
  // The merged matrices an Unmerge took out, until FreeUnmerged.
  std::mutex unmerged_mu;
  std::vector<StoredMatrix> unmerged;  // under unmerged_mu
};

LlamaModel::~LlamaModel() = default;

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& path,
                                                             const LoadOptions& options) {
  namespace fs = std::filesystem;
  std::unique_ptr<LlamaModel> m(new LlamaModel());
  m->options_ = options;
  m->impl_ = std::make_unique<Impl>();
  using kernels::DType;
  if (options.dtype != DType::kF32 && options.dtype != DType::kBF16 &&
      options.dtype != DType::kQ8_0 && options.dtype != DType::kQ4_0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "weights can be stored f32, bf16, q8_0 or q4_0, not ", kernels::DTypeName(options.dtype)));
  }
  // The CUDA backend has no quantized kernels: there --dtype native stores what would stay
  // quantized as `dtype` (bf16) instead.
  const WeightStorage storage{options.dtype,
                              options.keep_quantized && options.device != Device::kCuda};
  LlamaWeights weights;
  std::error_code ec;
  if (!fs::exists(path, ec)) {
    return absl::NotFoundError(absl::StrCat(path, ": no such model file or folder"));
  }
  if (fs::is_directory(path, ec)) {
    LP_ASSIGN_OR_RETURN(m->config_, LlamaConfig::FromHfJson(path + "/config.json"));
    LP_ASSIGN_OR_RETURN(auto st, formats::SafetensorsModel::Open(path));
    LP_ASSIGN_OR_RETURN(weights, LoadWeightsFromSafetensors(*st, path, m->config_, storage));
  } else {
    LP_ASSIGN_OR_RETURN(std::shared_ptr<const formats::GgufFile> gguf,
                        formats::GgufFile::Open(path));
    LP_ASSIGN_OR_RETURN(m->config_, LlamaConfig::FromGguf(*gguf));
    LP_ASSIGN_OR_RETURN(weights, LoadWeightsFromGguf(gguf, m->config_, storage));
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
  m->weight_formats_ = weights.Formats();
  m->weight_mapped_bytes_ = weights.mapped_bytes();
  if (options.device == Device::kCuda && weights.AnyQuantized()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": the CUDA backend runs f32 or bf16 weights, not ", m->weight_formats_,
                     " (give --dtype bf16 or f32)"));
  }
  m->kv_dtype_ = options.kv_dtype.value_or(
      options.device == Device::kCpu && weights.AnyQuantized() ? KvDType::kF16 : KvDType::kF32);
  if (options.device == Device::kCuda && m->kv_dtype_ != KvDType::kF32) {
    return absl::InvalidArgumentError(
        "the CUDA backend keeps an f32 KV cache, not f16 (give --kv-dtype f32 or auto)");
  }
  // The one choice of backend; nothing below branches on the device.
  std::vector<float> inv_freq = m->config_.RopeInvFreq();
  if (options.device == Device::kCuda) {
    LP_ASSIGN_OR_RETURN(m->impl_->backend,
                        CreateCudaBackend(m->config_, std::move(weights), inv_freq, options));
  } else {
    m->impl_->backend = CreateCpuBackend(m->config_, std::move(weights), std::move(inv_freq));
  }
  return m;
}

absl::Status ParseWeightStorage(const std::string& name, LoadOptions* options) {
  static const std::pair<const char*, kernels::DType> kNames[] = {{"native", kernels::DType::kBF16},
                                                                  {"bf16", kernels::DType::kBF16},
                                                                  {"f32", kernels::DType::kF32},
                                                                  {"q8_0", kernels::DType::kQ8_0},
                                                                  {"q4_0", kernels::DType::kQ4_0}};
  for (const auto& [n, dtype] : kNames) {
    if (name != n) continue;
    options->dtype = dtype;
    options->keep_quantized = name == "native";
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--dtype must be native, bf16, f32, q8_0 or q4_0, got '", name, "'"));
}

absl::Status ParseKvDType(const std::string& name, LoadOptions* options) {
  if (name == "auto") {
    options->kv_dtype.reset();
  } else if (name == "f32" || name == "f16") {
    options->kv_dtype = name == "f16" ? KvDType::kF16 : KvDType::kF32;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-dtype must be auto, f32 or f16, got '", name, "'"));
  }
  return absl::OkStatus();
}

int64_t LlamaModel::weight_bytes() const { return impl_->backend->weight_bytes(); }

int64_t LlamaModel::scratch_bytes() const { return impl_->backend->scratch_bytes(); }

absl::StatusOr<KvCache> LlamaModel::CreateKvCache(int64_t num_blocks, int64_t block_size) const {
  return KvCache::Create(config_, num_blocks, block_size,
                         /*host_storage=*/impl_->backend->host_kv_storage(), kv_dtype_);
}

kernels::WeightView LlamaModel::LinearWeight(int64_t layer, LinearModule m) const {
  return impl_->backend->LinearWeight(layer, m);
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
  if (!b.token_adapter.empty() && static_cast<int64_t>(b.token_adapter.size()) != n) {
    return absl::InvalidArgumentError("forward: token_adapter must be empty or one per token");
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
    if (!b.token_adapter.empty()) {
      const int32_t j = b.token_adapter[t];
      if (j < -1 || j >= static_cast<int32_t>(b.adapters.size()) ||
          (j >= 0 && b.adapters[j] == nullptr)) {
        return absl::InvalidArgumentError(
            absl::StrCat("forward: token_adapter[", t, "] out of range"));
      }
    }
  }
  for (int32_t r : b.logit_rows) {
    if (r < 0 || r >= n) return absl::InvalidArgumentError("forward: logit row out of range");
  }
  // Every table entry attention may read must name a block of the pool: for each sequence,
  // entries 0..p / block_size of its highest position p (the loop above checked each token's own
  // block). A device cannot report an out-of-range block id (and a fault would end its context).
  std::vector<int64_t> max_pos(num_seqs, -1);
  for (int64_t t = 0; t < n; ++t) {
    max_pos[b.token_seq[t]] = std::max<int64_t>(max_pos[b.token_seq[t]], b.positions[t]);
  }
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (max_pos[s] < 0) continue;
    for (int64_t blk_idx = 0; blk_idx <= max_pos[s] / cache.block_size(); ++blk_idx) {
      const int32_t blk = b.block_tables[s * b.max_blocks_per_seq + blk_idx];
      if (blk < 0 || blk >= cache.num_blocks()) {
        return absl::InvalidArgumentError(
            absl::StrCat("forward: sequence ", s, " block table entry ", blk_idx, " = ", blk,
                         " is outside the KV pool [0, ", cache.num_blocks(), ")"));
      }
    }
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

// W += B A for one pair, in f32 from the pristine value and rounded once to w's dtype (DoRA:
// g (W + B A)). The product is one GEMM of the kernels, B [out, rank] as its activations and A
// transposed [in, rank] as its weight rows, accumulated onto W widened to f32, on the kernels'
// threads. Both backends merge through it (on a host copy of the device bits for CUDA), so both
// give the same bits. A bf16 w is widened into *scratch, which one merge reuses for every matrix
// (a fresh buffer each time costs more in page faults than the arithmetic).
void MergePairInto(const LoraPair& pair, StoredMatrix* wp, std::vector<float>* scratch) {
  StoredMatrix& w = *wp;
  const int64_t rank = pair.rank, rows = w.rows, cols = w.cols;
  std::vector<float> b(rows * rank);
  for (int64_t i = 0; i < rows * rank; ++i) b[i] = ViewAt(pair.b, i);
  std::vector<float> a_t(cols * rank);
  for (int64_t r = 0; r < rank; ++r) {
    for (int64_t i = 0; i < cols; ++i) a_t[i * rank + r] = ViewAt(pair.a, r * cols + i);
  }
  const kernels::WeightView a_view{kernels::DType::kF32, a_t.data(), cols, rank};
  const bool f32 = w.dtype == kernels::DType::kF32;
  if (!f32) {
    scratch->resize(rows * cols);
    for (int64_t i = 0; i < rows * cols; ++i) (*scratch)[i] = Bf16ToF32(w.bf16[i]);
  }
  float* y = f32 ? w.f32.data() : scratch->data();
  kernels::Gemm(y, b.data(), rows, a_view, /*accumulate=*/true);
  if (pair.dora_scale != nullptr) {
    for (int64_t o = 0; o < rows; ++o) {
      for (int64_t i = 0; i < cols; ++i) y[o * cols + i] *= pair.dora_scale[o];
    }
  }
  if (!f32) {
    for (int64_t i = 0; i < rows * cols; ++i) w.bf16[i] = F32ToBf16(y[i]);
  }
}

// Writes the pristine matrices of a merge back and forgets them; on error the ones not yet written
// stay recorded. On a host backend the merged matrices they replace go to s->unmerged, for
// LlamaModel::FreeUnmerged.
absl::Status RestoreBackups(LlamaModel::Impl* s) {
  std::vector<StoredMatrix> displaced;
  absl::Status status;
  for (auto it = s->merge_backup.begin(); it != s->merge_backup.end();) {
    const auto& [layer, module] = it->first;
    const LinearModule m = static_cast<LinearModule>(module);
    if (s->backend->host_weights()) {
      absl::StatusOr<StoredMatrix> merged =
          s->backend->ExchangeLinear(layer, m, std::move(it->second));
      status = merged.status();
      if (merged.ok()) displaced.push_back(*std::move(merged));
    } else {
      status = s->backend->WriteLinear(layer, m, std::move(it->second));
    }
    if (!status.ok()) break;
    it = s->merge_backup.erase(it);
  }
  if (!displaced.empty()) {
    std::lock_guard<std::mutex> lock(s->unmerged_mu);
    for (StoredMatrix& w : displaced) s->unmerged.push_back(std::move(w));
  }
  return status;
}

}  // namespace

CudaGraphStats LlamaModel::cuda_graph_stats() const { return impl_->backend->graph_stats(); }

absl::Status LlamaModel::Forward(const ForwardBatch& batch, KvCache* cache, int64_t top_k,
                                 StepLogits* out) {
  if (top_k < 0 || top_k > kMaxTopLogits) {
    return absl::InvalidArgumentError(
        absl::StrCat("forward: top_k=", top_k, " outside [0, ", kMaxTopLogits, "]"));
  }
  top_k = std::min(top_k, config_.vocab_size);
  LP_RETURN_IF_ERROR(ValidateBatch(batch, config_, *cache));
  impl_->plan.Build(batch, merged_);
  for (const LoraPass* pass : {&impl_->plan.own(), &impl_->plan.unmerge()}) {
    if (!pass->active) continue;
    for (int32_t a : pass->token_adapter) lora_token_passes_ += a >= 0 ? 1 : 0;
  }
  return impl_->backend->Forward(batch, impl_->plan, cache, top_k, out);
}

LlamaModel::LoraCost LlamaModel::lora_cost() const {
  return {impl_->backend->lora_seconds(), lora_token_passes_};
}

absl::Status LlamaModel::Forward(const ForwardBatch& batch, KvCache* cache,
                                 std::vector<float>* logits) {
  StepLogits step;
  step.logits.swap(*logits);  // reuse the caller's buffer
  absl::Status s = Forward(batch, cache, /*top_k=*/0, &step);
  logits->swap(step.logits);
  return s;
}

struct LlamaModel::PreparedMerge::Matrices {
  struct Entry {
    int64_t layer;
    LinearModule module;
    StoredMatrix merged;
  };
  std::vector<Entry> entries;
};

LlamaModel::PreparedMerge::PreparedMerge() = default;
LlamaModel::PreparedMerge::PreparedMerge(PreparedMerge&&) = default;
LlamaModel::PreparedMerge& LlamaModel::PreparedMerge::operator=(PreparedMerge&&) = default;
LlamaModel::PreparedMerge::~PreparedMerge() = default;

bool LlamaModel::prepares_merge_anywhere() const { return impl_->backend->host_weights(); }

absl::StatusOr<LlamaModel::PreparedMerge> LlamaModel::PrepareMerge(
    const LoraWeightsView* adapter) const {
  FreeUnmerged();  // what an earlier Unmerge left, before this merge makes more
  const Impl& s = *impl_;
  // The base must be pristine: merged bits would give W + B'A' + B A.
  if (merged_ != nullptr) {
    return absl::FailedPreconditionError("an adapter is already merged; unmerge it first");
  }
  if (!s.merge_backup.empty()) {
    return absl::FailedPreconditionError(
        "merge: an earlier failed merge could not be rolled back; the base is not pristine");
  }
  if (adapter == nullptr || static_cast<int64_t>(adapter->layers.size()) != config_.num_layers) {
    return absl::InvalidArgumentError("merge: adapter does not have one entry per layer");
  }
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    for (int m = 0; m < kNumLinearModules; ++m) {
      const LoraPair* pair = adapter->layers[l][m];
      if (pair == nullptr) continue;
      const kernels::WeightView w = s.backend->LinearWeight(l, static_cast<LinearModule>(m));
      if (kernels::IsQuantized(w.dtype)) {
        return absl::FailedPreconditionError(absl::StrCat(
            "merge: the base weight of layer ", l, " ",
            LinearModuleName(static_cast<LinearModule>(m)), " is stored ",
            kernels::DTypeName(w.dtype),
            "; merging would round W + BA to that format again and change the base for every "
            "request, so this adapter is served unmerged (load the model with --dtype bf16 to "
            "merge)"));
      }
      if (pair->a.cols != w.cols || pair->b.rows != w.rows || pair->a.rows != pair->rank ||
          pair->b.cols != pair->rank) {
        return absl::FailedPreconditionError(
            absl::StrCat("merge: layer ", l, " ", LinearModuleName(static_cast<LinearModule>(m)),
                         " LoRA shapes do not match the base weight"));
      }
    }
  }
  PreparedMerge prepared;
  prepared.adapter_ = adapter;
  prepared.matrices_ = std::make_unique<PreparedMerge::Matrices>();
  std::vector<float> scratch;
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    for (int m = 0; m < kNumLinearModules; ++m) {
      const LoraPair* pair = adapter->layers[l][m];
      if (pair == nullptr) continue;
      const LinearModule module = static_cast<LinearModule>(m);
      LP_ASSIGN_OR_RETURN(StoredMatrix w, s.backend->ReadLinear(l, module));
      MergePairInto(*pair, &w, &scratch);
      prepared.matrices_->entries.push_back({l, module, std::move(w)});
    }
  }
  return prepared;
}

absl::Status LlamaModel::Merge(const LoraWeightsView* adapter) {
  LP_ASSIGN_OR_RETURN(PreparedMerge prepared, PrepareMerge(adapter));
  return Merge(std::move(prepared));
}

absl::Status LlamaModel::Merge(PreparedMerge prepared) {
  if (merged_ != nullptr) {
    return absl::FailedPreconditionError("an adapter is already merged; unmerge it first");
  }
  Impl& s = *impl_;
  if (!s.merge_backup.empty()) {
    return absl::FailedPreconditionError(
        "merge: an earlier failed merge could not be rolled back; the base is not pristine");
  }
  if (prepared.adapter_ == nullptr || prepared.matrices_ == nullptr) {
    return absl::InvalidArgumentError("merge: the prepared merge is empty (moved from?)");
  }
  // Each merged matrix takes the place of the pristine one, which is kept for Unmerge (and put
  // back here if a later exchange fails, so the base stays pristine on failure).
  for (PreparedMerge::Matrices::Entry& e : prepared.matrices_->entries) {
    absl::StatusOr<StoredMatrix> pristine =
        s.backend->ExchangeLinear(e.layer, e.module, std::move(e.merged));
    if (!pristine.ok()) {
      if (absl::Status restore = RestoreBackups(&s); !restore.ok()) {
        LP_LOG(ERROR) << "merge rollback: " << restore.ToString();
      }
      return pristine.status();
    }
    s.merge_backup.emplace(std::make_pair(e.layer, static_cast<int>(e.module)),
                           *std::move(pristine));
  }
  merged_ = prepared.adapter_;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> LlamaModel::BaseLinearF32(int64_t layer, LinearModule m) const {
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layer ", layer, " of ", config_.num_layers));
  }
  const auto backup = impl_->merge_backup.find(std::make_pair(layer, static_cast<int>(m)));
  if (backup != impl_->merge_backup.end()) return backup->second.ToF32();
  LP_ASSIGN_OR_RETURN(StoredMatrix w, impl_->backend->ReadLinear(layer, m));
  return w.ToF32();
}

absl::Status LlamaModel::Unmerge() {
  if (merged_ == nullptr) return absl::FailedPreconditionError("no adapter is merged");
  LP_RETURN_IF_ERROR(RestoreBackups(impl_.get()));
  merged_ = nullptr;
  return absl::OkStatus();
}

int64_t LlamaModel::FreeUnmerged() const {
  std::vector<StoredMatrix> unmerged;
  {
    std::lock_guard<std::mutex> lock(impl_->unmerged_mu);
    unmerged.swap(impl_->unmerged);
  }
  int64_t bytes = 0;
  for (const StoredMatrix& w : unmerged) bytes += w.bytes();
  return bytes;  // freed here, on the caller's thread
}

}  // namespace loraplex::model
