// The CUDA model (cuda_model.h): device weights, the KV pools attached to the cache, the per-step
// metadata upload, and the forward pass as a sequence of kernels/cuda ops on one stream.
#include "model/cuda_model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "kernels/cuda/cuda_gemm.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/cuda_lora.h"
#include "kernels/cuda/cuda_types.h"
#include "model/cuda_adapter_slots.h"
#include "model/cuda_device_memory.h"
#include "model/cuda_step_graphs.h"

namespace loraplex::model {
namespace {

using kernels::DType;
using kernels::WeightView;
using kernels::cuda::CudaBlas;
using kernels::cuda::CudaBuffer;
using kernels::cuda::CudaEvent;
using kernels::cuda::CudaLoraOutput;
using kernels::cuda::CudaLoraSegments;
using kernels::cuda::CudaLoraSlice;
using kernels::cuda::CudaLoraWeights;
using kernels::cuda::CudaStream;

// Device memory left free after the weights and the KV pools: cuBLAS workspaces, step scratch and
// adapter copies come out of it.
constexpr int64_t kDeviceMemoryMargin = int64_t{256} << 20;
// The attention kernel holds one head in a warp.
constexpr int64_t kMaxHeadDim = 256;

// The module groups that share an input, in forward order (as model/lora_apply.h groups them).
struct ModuleGroup {
  int num = 0;
  LinearModule modules[kernels::kMaxLoraSlices];
};
constexpr int kNumGroups = 4;
constexpr ModuleGroup kGroups[kNumGroups] = {
    {3, {LinearModule::kQ, LinearModule::kK, LinearModule::kV}},
    {1, {LinearModule::kO}},
    {2, {LinearModule::kGate, LinearModule::kUp}},
    {1, {LinearModule::kDown}},
};
enum GroupIndex { kGroupQkv = 0, kGroupO = 1, kGroupGateUp = 2, kGroupDown = 3 };

// Packs host arrays into one byte buffer for a single upload; each array starts 16-byte aligned.
class Packer {
 public:
  void Clear() { bytes_.clear(); }
  template <typename T>
  size_t Add(const T* data, size_t count) {
    const size_t off = (bytes_.size() + 15) & ~size_t{15};
    bytes_.resize(off + count * sizeof(T));
    if (count > 0) std::memcpy(bytes_.data() + off, data, count * sizeof(T));
    return off;
  }
  const uint8_t* data() const { return bytes_.data(); }
  size_t size() const { return bytes_.size(); }

 private:
  std::vector<uint8_t> bytes_;
};

// One LoRA pass of a step: the adapters' own deltas, or (mixed mode) the merged adapter's delta
// taken back out. Offsets are into the step's metadata buffer.
struct LoraPass {
  bool active = false;
  int64_t num_adapters = 0;
  int64_t max_rank = 0;
  bool sgmv = false;
  size_t token_adapter_off = 0;  // int32 [n]
  size_t starts_off = 0;         // int64 [num_segments + 1]
  size_t seg_adapter_off = 0;    // int32 [num_segments]
  int64_t num_segments = 0;
  // Per layer and group: offset of the CudaLoraSlice array [num_adapters * group.num], or
  // SIZE_MAX when no adapter of the pass touches the group in that layer.
  std::vector<std::array<size_t, kNumGroups>> slices_off;
};

class CudaModelImpl : public CudaModel {
 public:
  CudaModelImpl(const LlamaConfig& config, int64_t adapter_slots, bool graphs)
      : c_(config), slots_(config, adapter_slots), graphs_(graphs) {}

  absl::Status Init(LlamaWeights* w, const std::vector<float>& inv_freq);

  absl::Status Forward(const ForwardBatch& batch, KvCache* cache, const LoraWeightsView* merged,
                       int64_t top_k, StepLogits* out) override {
    absl::Status s = Step(batch, cache, merged, top_k, out);
    if (!s.ok()) {
      // Leave nothing in flight, so the next step may again grow buffers and evict slots. The
      // errors of these waits would only repeat the first one.
      (void)compute_.Synchronize();
      (void)upload_.Synchronize();
    }
    slots_.ReleaseStaging();
    return s;
  }

  absl::Status Merge(const LoraWeightsView& adapter) override;
  absl::Status MergeImpl(const LoraWeightsView& adapter);
  absl::Status Unmerge() override;
  int64_t weight_bytes() const override { return weight_bytes_; }
  CudaGraphStats graph_stats() const override { return graphs_.stats(); }

 private:
  struct Layer {
    std::array<DeviceMatrix, kNumLinearModules> linear;
    CudaBuffer attn_norm, ffn_norm, q_bias, k_bias, v_bias;  // f32; biases empty unless used
  };

  absl::Status Step(const ForwardBatch& batch, KvCache* cache, const LoraWeightsView* merged,
                    int64_t top_k, StepLogits* out);
  absl::StatusOr<CudaKvStorage*> KvStorage(KvCache* cache);
  absl::Status PlanLora(const ForwardBatch& batch, const LoraWeightsView* merged, bool* uploaded);
  absl::Status BuildPass(const std::vector<const CudaAdapterCopy*>& copies,
                         const std::vector<int32_t>& token_adapter, LoraPass* pass);
  // y = W x for f32 x [m, W.cols] and f32 y; x_bf16 (when non-null) is x already rounded to bf16.
  absl::Status Linear(float* d_y, const float* d_x, const uint16_t* d_x_bf16, int64_t m,
                      const DeviceMatrix& w, bool accumulate = false);
  // Rounds d_x [m, k] to bf16 into the step's bf16 scratch (for bf16 weights) and returns it, or
  // null for f32 weights (cuBLAS takes f32 x directly then).
  absl::StatusOr<const uint16_t*> ToBf16(const float* d_x, int64_t m, int64_t k);
  absl::Status ApplyLora(int group, int64_t layer, const float* d_x, int64_t x_stride,
                         const CudaLoraOutput* y);
  uint8_t* meta() const { return meta_.as<uint8_t>(); }
  // Reserve() of a step buffer; a new allocation changes buffers_gen_ (graphs hold the old one).
  absl::Status Grow(CudaBuffer* b, size_t bytes);

  LlamaConfig c_;
  DType wdtype_ = DType::kBF16;
  int64_t weight_bytes_ = 0;
  DeviceMatrix embed_, lm_head_;  // lm_head_ empty when tied to embed_
  CudaBuffer final_norm_, inv_freq_;
  std::vector<Layer> layers_;
  std::unique_ptr<CudaBlas> blas_;
  CudaStream compute_, upload_;
  CudaEvent uploaded_event_;
  CudaAdapterSlots slots_;
  // Pristine host bits of the matrices a merge changed, restored by Unmerge.
  std::map<std::pair<int64_t, int>, StoredMatrix> merge_backup_;

  // Step state, reused across steps.
  uint64_t step_ = 0;
  int64_t n_ = 0;
  Packer packer_;
  CudaBuffer meta_;
  CudaBuffer x_, h_, q_, k_, v_, attn_, proj_, gate_, up_, sel_, logits_, xb_, lora_v_, ones_;
  CudaBuffer top_;  // [rows, k] ids, then logits, then log-probs of an on-device top-k
  std::vector<uint32_t> top_host_;  // top_'s bytes copied back
  std::vector<float> ones_host_;
  int64_t v_stride_ = 0;
  LoraPass own_, neg_;
  bool wait_for_upload_ = false;
  std::vector<int32_t> tables_;  // block tables padded to a power-of-two row length

  uint64_t buffers_gen_ = 0;
  CudaStepGraphs graphs_;
};

// Graphs only for steps of at most this many tokens (decode and small mixed steps): launching op
// by op costs the host the same whatever the batch, so the share it takes is largest there, and
// prefill steps of many tokens rarely repeat a shape.
constexpr int64_t kMaxGraphTokens = 256;

absl::Status CudaModelImpl::Grow(CudaBuffer* b, size_t bytes) {
  if (b->size() >= bytes) return absl::OkStatus();
  ++buffers_gen_;
  return Reserve(b, bytes);
}

absl::Status CudaModelImpl::Init(LlamaWeights* w, const std::vector<float>& inv_freq) {
  if (c_.head_dim % 2 != 0 || c_.head_dim > kMaxHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA model: head_dim ", c_.head_dim,
                                                   " must be even and at most ", kMaxHeadDim));
  }
  wdtype_ = w->embed.dtype;
  // One dtype for every matrix: the bf16 copy of a GEMM input is made once per input (ToBf16).
  for (const LayerWeights& lw : w->layers) {
    for (const StoredMatrix& m : lw.linear) {
      if (m.dtype != wdtype_) {
        return absl::InvalidArgumentError("CUDA model: matrices of mixed dtypes");
      }
    }
  }
  if (w->lm_head.rows > 0 && w->lm_head.dtype != wdtype_) {
    return absl::InvalidArgumentError("CUDA model: matrices of mixed dtypes");
  }
  const int64_t need = w->bytes();
  LP_ASSIGN_OR_RETURN(kernels::cuda::CudaMemoryInfo mem, kernels::cuda::GetCudaMemoryInfo());
  if (need + kDeviceMemoryMargin > static_cast<int64_t>(mem.free_bytes)) {
    return absl::ResourceExhaustedError(
        absl::StrCat("CUDA model: the weights take ", need >> 20, " MiB (+",
                     kDeviceMemoryMargin >> 20, " MiB margin) but the device has ",
                     mem.free_bytes >> 20, " MiB free of ", mem.total_bytes >> 20, " MiB"));
  }
  LP_ASSIGN_OR_RETURN(compute_, CudaStream::Create());
  LP_ASSIGN_OR_RETURN(upload_, CudaStream::Create());
  LP_ASSIGN_OR_RETURN(uploaded_event_, CudaEvent::Create());
  LP_ASSIGN_OR_RETURN(blas_, CudaBlas::Create());
  if (graphs_.enabled()) {
    if (absl::Status s = blas_->UseFixedWorkspace(size_t{32} << 20); !s.ok()) {
      LP_LOG(WARNING) << "CUDA graphs off: no fixed cuBLAS workspace: " << s.ToString();
      graphs_.Disable();
    }
  }

  LP_ASSIGN_OR_RETURN(embed_, UploadMatrix(w->embed));
  if (w->lm_head.rows > 0) {
    LP_ASSIGN_OR_RETURN(lm_head_, UploadMatrix(w->lm_head));
  }
  LP_ASSIGN_OR_RETURN(final_norm_, UploadF32(w->final_norm));
  LP_ASSIGN_OR_RETURN(inv_freq_, UploadF32(inv_freq));
  layers_.resize(c_.num_layers);
  for (int64_t l = 0; l < c_.num_layers; ++l) {
    LayerWeights& lw = w->layers[l];
    Layer& d = layers_[l];
    for (int m = 0; m < kNumLinearModules; ++m) {
      LP_ASSIGN_OR_RETURN(d.linear[m], UploadMatrix(lw.linear[m]));
      ReleaseHost(&lw.linear[m]);
    }
    LP_ASSIGN_OR_RETURN(d.attn_norm, UploadF32(lw.attn_norm));
    LP_ASSIGN_OR_RETURN(d.ffn_norm, UploadF32(lw.ffn_norm));
    if (c_.attention_bias) {
      LP_ASSIGN_OR_RETURN(d.q_bias, UploadF32(lw.q_bias));
      LP_ASSIGN_OR_RETURN(d.k_bias, UploadF32(lw.k_bias));
      LP_ASSIGN_OR_RETURN(d.v_bias, UploadF32(lw.v_bias));
    }
  }
  weight_bytes_ = need;
  ReleaseHost(&w->embed);
  ReleaseHost(&w->lm_head);
  return absl::OkStatus();
}

absl::StatusOr<CudaKvStorage*> CudaModelImpl::KvStorage(KvCache* cache) {
  if (auto* kv = dynamic_cast<CudaKvStorage*>(cache->device_storage()); kv != nullptr) {
    if (kv->num_layers != c_.num_layers || kv->n_kv_heads != c_.num_kv_heads ||
        kv->head_dim != c_.head_dim || kv->num_blocks != cache->num_blocks() ||
        kv->block_size != cache->block_size()) {
      return absl::InvalidArgumentError(
          "forward: this KV cache's device pools were made for another model");
    }
    return kv;
  }
  auto kv = std::make_unique<CudaKvStorage>();
  kv->num_layers = c_.num_layers;
  kv->num_blocks = cache->num_blocks();
  kv->block_size = cache->block_size();
  kv->n_kv_heads = c_.num_kv_heads;
  kv->head_dim = c_.head_dim;
  const size_t bytes = static_cast<size_t>(kv->layer_elems()) * c_.num_layers * sizeof(float);
  LP_ASSIGN_OR_RETURN(kernels::cuda::CudaMemoryInfo mem, kernels::cuda::GetCudaMemoryInfo());
  if (static_cast<int64_t>(2 * bytes) + kDeviceMemoryMargin >
      static_cast<int64_t>(mem.free_bytes)) {
    return absl::ResourceExhaustedError(absl::StrCat(
        "CUDA KV cache: ", cache->num_blocks(), " blocks of ", cache->block_size(), " tokens take ",
        (2 * bytes) >> 20, " MiB (+", kDeviceMemoryMargin >> 20, " MiB margin) but the device has ",
        mem.free_bytes >> 20, " MiB free; lower --kv-memory or --kv-blocks"));
  }
  LP_ASSIGN_OR_RETURN(kv->k, CudaBuffer::Allocate(bytes));
  LP_ASSIGN_OR_RETURN(kv->v, CudaBuffer::Allocate(bytes));
  CudaKvStorage* result = kv.get();
  cache->set_device_storage(std::move(kv));
  LP_LOG(DEBUG) << "CUDA KV cache: " << cache->num_blocks() << " blocks of " << cache->block_size()
                << " tokens, " << ((2 * bytes) >> 20) << " MiB on the device";
  return result;
}

absl::Status CudaModelImpl::BuildPass(const std::vector<const CudaAdapterCopy*>& copies,
                                      const std::vector<int32_t>& token_adapter, LoraPass* pass) {
  *pass = LoraPass();
  const int64_t n = static_cast<int64_t>(token_adapter.size());
  // Runs of equal indices, as model/lora_apply.cc forms them.
  std::vector<int64_t> starts;
  std::vector<int32_t> seg_adapter;
  int64_t active = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (t == 0 || token_adapter[t] != token_adapter[t - 1]) {
      starts.push_back(t);
      seg_adapter.push_back(token_adapter[t]);
    }
    active += token_adapter[t] >= 0;
  }
  if (active == 0) return absl::OkStatus();
  starts.push_back(n);
  pass->active = true;
  pass->num_adapters = static_cast<int64_t>(copies.size());
  pass->num_segments = static_cast<int64_t>(seg_adapter.size());
  // Segments pay off when each reuses its weights over a few tokens (the CPU's rule).
  pass->sgmv = n >= 4 * pass->num_segments;
  pass->token_adapter_off = packer_.Add(token_adapter.data(), token_adapter.size());
  pass->starts_off = packer_.Add(starts.data(), starts.size());
  pass->seg_adapter_off = packer_.Add(seg_adapter.data(), seg_adapter.size());
  for (const CudaAdapterCopy* copy : copies) {
    if (copy != nullptr) pass->max_rank = std::max(pass->max_rank, copy->max_rank);
  }
  pass->slices_off.assign(c_.num_layers, {});
  std::vector<CudaLoraSlice> slices;
  for (int64_t l = 0; l < c_.num_layers; ++l) {
    for (int g = 0; g < kNumGroups; ++g) {
      const ModuleGroup& group = kGroups[g];
      slices.assign(copies.size() * group.num, CudaLoraSlice{});
      bool any = false;
      for (size_t j = 0; j < copies.size(); ++j) {
        if (copies[j] == nullptr) continue;
        int32_t offset = 0;
        for (int s = 0; s < group.num; ++s) {
          const CudaLoraModule& mod = copies[j]->layers[l][static_cast<int>(group.modules[s])];
          if (mod.rank == 0) continue;
          CudaLoraSlice& slice = slices[j * group.num + s];
          slice.a = mod.a;
          slice.b = mod.b;
          slice.rank = mod.rank;
          slice.v_offset = offset;
          offset += mod.rank;
          any = true;
        }
        v_stride_ = std::max<int64_t>(v_stride_, offset);
      }
      pass->slices_off[l][g] = any ? packer_.Add(slices.data(), slices.size()) : SIZE_MAX;
    }
  }
  return absl::OkStatus();
}

absl::Status CudaModelImpl::PlanLora(const ForwardBatch& batch, const LoraWeightsView* merged,
                                     bool* uploaded) {
  const int64_t n = batch.num_tokens();
  own_ = LoraPass();
  neg_ = LoraPass();
  v_stride_ = 0;
  // The adapters' own deltas: every token with an adapter other than the merged one.
  std::vector<int32_t> token_adapter(n, -1);
  std::vector<const CudaAdapterCopy*> copies(batch.adapters.size(), nullptr);
  bool any = false;
  for (int64_t t = 0; t < static_cast<int64_t>(batch.adapter_slot.size()); ++t) {
    const int32_t slot = batch.adapter_slot[t];
    if (slot < 0 || batch.adapters[slot] == merged) continue;
    token_adapter[t] = slot;
    any = true;
    if (copies[slot] == nullptr) {
      LP_ASSIGN_OR_RETURN(copies[slot], slots_.Acquire(*batch.adapters[slot], /*negate=*/false,
                                                       step_, upload_.get(), uploaded));
    }
  }
  if (any) LP_RETURN_IF_ERROR(BuildPass(copies, token_adapter, &own_));
  // Mixed mode: every token not of the merged adapter takes its delta back out (-B copy).
  if (merged != nullptr) {
    std::vector<int32_t> neg_adapter(n, 0);
    bool any_neg = false;
    for (int64_t t = 0; t < n; ++t) {
      const int32_t slot = batch.adapter_slot.empty() ? -1 : batch.adapter_slot[t];
      if (slot >= 0 && batch.adapters[slot] == merged) {
        neg_adapter[t] = -1;
      } else {
        any_neg = true;
      }
    }
    if (any_neg) {
      LP_ASSIGN_OR_RETURN(const CudaAdapterCopy* copy,
                          slots_.Acquire(*merged, /*negate=*/true, step_, upload_.get(), uploaded));
      LP_RETURN_IF_ERROR(BuildPass({copy}, neg_adapter, &neg_));
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<const uint16_t*> CudaModelImpl::ToBf16(const float* d_x, int64_t m, int64_t k) {
  if (wdtype_ != DType::kBF16) return nullptr;
  LP_RETURN_IF_ERROR(kernels::cuda::CudaConvert(xb_.data(), DType::kBF16, d_x, DType::kF32, m * k,
                                                compute_.get()));
  return xb_.as<const uint16_t>();
}

absl::Status CudaModelImpl::Linear(float* d_y, const float* d_x, const uint16_t* d_x_bf16,
                                   int64_t m, const DeviceMatrix& w, bool accumulate) {
  if (w.dtype == DType::kBF16) {
    // cuBLAS has no bf16 x f32 product: the activations are rounded to bf16 once per input (by
    // ToBf16), which is what CudaBlas would do per call, without its mid-step scratch growth.
    if (d_x_bf16 == nullptr) {
      LP_ASSIGN_OR_RETURN(d_x_bf16, ToBf16(d_x, m, w.cols));
    }
    return blas_->Gemm(d_y, DType::kF32, d_x_bf16, DType::kBF16, m, w.view(), accumulate,
                       compute_.get());
  }
  return blas_->Gemm(d_y, DType::kF32, d_x, DType::kF32, m, w.view(), accumulate, compute_.get());
}

absl::Status CudaModelImpl::ApplyLora(int group, int64_t layer, const float* d_x, int64_t x_stride,
                                      const CudaLoraOutput* y) {
  for (LoraPass* pass : {&own_, &neg_}) {
    if (!pass->active || pass->slices_off[layer][group] == SIZE_MAX) continue;
    if (wait_for_upload_) {
      // The copies queued on the upload stream must land before the first kernel reads them.
      LP_RETURN_IF_ERROR(uploaded_event_.StreamWait(compute_.get()));
      wait_for_upload_ = false;
    }
    const ModuleGroup& g = kGroups[group];
    CudaLoraWeights w;
    w.num_adapters = pass->num_adapters;
    w.num_slices = g.num;
    w.dtype = DType::kF32;
    w.in_features = LinearInFeatures(c_, g.modules[0]);
    for (int s = 0; s < g.num; ++s) w.out_features[s] = LinearOutFeatures(c_, g.modules[s]);
    w.max_rank = pass->max_rank;
    w.d_slices = reinterpret_cast<const CudaLoraSlice*>(meta() + pass->slices_off[layer][group]);
    float* v = lora_v_.as<float>();
    if (pass->sgmv) {
      CudaLoraSegments seg;
      seg.num_segments = pass->num_segments;
      seg.d_starts = reinterpret_cast<const int64_t*>(meta() + pass->starts_off);
      seg.d_adapter = reinterpret_cast<const int32_t*>(meta() + pass->seg_adapter_off);
      LP_RETURN_IF_ERROR(kernels::cuda::CudaSgmvShrink(v, v_stride_, d_x, DType::kF32, x_stride, n_,
                                                       seg, w, compute_.get()));
      LP_RETURN_IF_ERROR(
          kernels::cuda::CudaSgmvExpand(y, DType::kF32, v, v_stride_, n_, seg, w, compute_.get()));
    } else {
      const int32_t* ta = reinterpret_cast<const int32_t*>(meta() + pass->token_adapter_off);
      LP_RETURN_IF_ERROR(kernels::cuda::CudaBgmvShrink(v, v_stride_, d_x, DType::kF32, x_stride, ta,
                                                       n_, w, compute_.get()));
      LP_RETURN_IF_ERROR(
          kernels::cuda::CudaBgmvExpand(y, DType::kF32, v, v_stride_, ta, n_, w, compute_.get()));
    }
  }
  return absl::OkStatus();
}

absl::Status CudaModelImpl::Step(const ForwardBatch& batch, KvCache* cache,
                                 const LoraWeightsView* merged, int64_t top_k, StepLogits* out) {
  namespace cu = kernels::cuda;
  static_assert(LlamaModel::kMaxTopLogits == cu::kCudaMaxTopK);
  const int64_t n = batch.num_tokens();
  const int64_t rows = static_cast<int64_t>(batch.logit_rows.size());
  const int64_t hid = c_.hidden_size, qd = c_.q_dim(), kvd = c_.kv_dim(), ff = c_.intermediate_size;
  const int64_t vocab = c_.vocab_size;
  const int64_t num_seqs =
      static_cast<int64_t>(batch.block_tables.size()) / batch.max_blocks_per_seq;
  n_ = n;
  ++step_;

  // The device cannot report an out-of-range block id (and a fault would end the CUDA context), so
  // every table entry attention may read is checked here: for each sequence, entries 0..p / bs of
  // its highest position p. (ValidateBatch checked each token's own block.)
  std::vector<int64_t> max_pos(num_seqs, -1);
  for (int64_t t = 0; t < n; ++t) {
    max_pos[batch.token_seq[t]] =
        std::max<int64_t>(max_pos[batch.token_seq[t]], batch.positions[t]);
  }
  for (int64_t s = 0; s < num_seqs; ++s) {
    if (max_pos[s] < 0) continue;
    for (int64_t b = 0; b <= max_pos[s] / cache->block_size(); ++b) {
      const int32_t blk = batch.block_tables[s * batch.max_blocks_per_seq + b];
      if (blk < 0 || blk >= cache->num_blocks()) {
        return absl::InvalidArgumentError(
            absl::StrCat("forward: sequence ", s, " block table entry ", b, " = ", blk,
                         " is outside the KV pool [0, ", cache->num_blocks(), ")"));
      }
    }
  }

  // Everything that allocates or frees device memory happens here, before any work is queued.
  LP_ASSIGN_OR_RETURN(CudaKvStorage * kv, KvStorage(cache));
  packer_.Clear();
  const size_t tokens_off = packer_.Add(batch.tokens.data(), n);
  const size_t pos_off = packer_.Add(batch.positions.data(), n);
  const size_t seq_off = packer_.Add(batch.token_seq.data(), n);
  // With graphs, block tables padded to a power-of-two row length (attention reads a sequence's
  // entries only up to its own length): a decode batch's metadata layout then changes only when
  // the longest table doubles, so the graph of its steps stays valid across many steps.
  int64_t table_len = batch.max_blocks_per_seq;
  if (graphs_.enabled()) {
    table_len = 1;
    while (table_len < batch.max_blocks_per_seq) table_len *= 2;
  }
  tables_.assign(num_seqs * table_len, 0);
  for (int64_t s = 0; s < num_seqs; ++s) {
    std::copy_n(batch.block_tables.begin() + s * batch.max_blocks_per_seq, batch.max_blocks_per_seq,
                tables_.begin() + s * table_len);
  }
  const size_t tables_off = packer_.Add(tables_.data(), tables_.size());
  const size_t rows_off = packer_.Add(batch.logit_rows.data(), rows);
  bool uploaded = false;
  LP_RETURN_IF_ERROR(PlanLora(batch, merged, &uploaded));
  if (uploaded) LP_RETURN_IF_ERROR(uploaded_event_.Record(upload_.get()));
  wait_for_upload_ = uploaded;

  const int64_t widest = std::max({hid, qd, ff});
  LP_RETURN_IF_ERROR(Grow(&meta_, packer_.size()));
  LP_RETURN_IF_ERROR(Grow(&x_, n * hid * 4));
  LP_RETURN_IF_ERROR(Grow(&h_, n * hid * 4));
  LP_RETURN_IF_ERROR(Grow(&q_, n * qd * 4));
  LP_RETURN_IF_ERROR(Grow(&k_, n * kvd * 4));
  LP_RETURN_IF_ERROR(Grow(&v_, n * kvd * 4));
  LP_RETURN_IF_ERROR(Grow(&attn_, n * qd * 4));
  LP_RETURN_IF_ERROR(Grow(&proj_, n * hid * 4));
  LP_RETURN_IF_ERROR(Grow(&gate_, n * ff * 4));
  LP_RETURN_IF_ERROR(Grow(&up_, n * ff * 4));
  LP_RETURN_IF_ERROR(Grow(&sel_, std::max<int64_t>(rows, 1) * hid * 4));
  LP_RETURN_IF_ERROR(Grow(&logits_, std::max<int64_t>(rows, 1) * vocab * 4));
  if (top_k > 0) LP_RETURN_IF_ERROR(Grow(&top_, std::max<int64_t>(rows, 1) * top_k * 12));
  // The bf16 copy of a GEMM input: any [n, <= widest] activation, or the [rows, hid] logit rows
  // (rows may exceed n: a row can be asked for twice).
  if (wdtype_ == DType::kBF16) {
    LP_RETURN_IF_ERROR(Grow(&xb_, std::max(n * widest, rows * hid) * 2));
  }
  if (v_stride_ > 0) LP_RETURN_IF_ERROR(Grow(&lora_v_, n * v_stride_ * 4));
  if (c_.attention_bias && static_cast<int64_t>(ones_host_.size()) < n) {
    ones_host_.assign(n + n / 4 + 16, 1.0f);
    ones_ = CudaBuffer();
    ++buffers_gen_;
    LP_ASSIGN_OR_RETURN(ones_, CudaBuffer::Allocate(ones_host_.size() * 4));
    LP_RETURN_IF_ERROR(
        ones_.CopyFromHostAsync(ones_host_.data(), ones_host_.size() * 4, compute_.get()));
  }
  // packer_ stays unchanged until the step's final synchronisation, so the host source of this
  // asynchronous copy outlives it.
  LP_RETURN_IF_ERROR(meta_.CopyFromHostAsync(packer_.data(), packer_.size(), compute_.get()));

  void* st = compute_.get();
  float* x = x_.as<float>();
  float* h = h_.as<float>();
  float* q = q_.as<float>();
  float* k = k_.as<float>();
  float* v = v_.as<float>();
  float* attn = attn_.as<float>();
  float* proj = proj_.as<float>();
  float* gate = gate_.as<float>();
  float* up = up_.as<float>();
  const int32_t* d_tokens = reinterpret_cast<const int32_t*>(meta() + tokens_off);
  const int32_t* d_pos = reinterpret_cast<const int32_t*>(meta() + pos_off);

  kernels::AttentionBatch ab;
  ab.num_tokens = n;
  ab.token_seq = reinterpret_cast<const int32_t*>(meta() + seq_off);
  ab.token_pos = d_pos;
  ab.block_tables = reinterpret_cast<const int32_t*>(meta() + tables_off);
  const kernels::KvLayout layout = cache->layout(table_len);
  const float attn_scale = 1.0f / std::sqrt(static_cast<float>(c_.head_dim));
  const float eps = c_.rms_norm_eps;
  const float* inv_freq = inv_freq_.as<const float>();

  // The step's launches, from the embedding to the logits (or their top k): what a CUDA graph
  // holds. Host values they use all go into `key` below.
  auto launches = [&]() -> absl::Status {
    LP_RETURN_IF_ERROR(cu::CudaEmbed(x, DType::kF32, d_tokens, n, embed_.view(), st));
    LP_RETURN_IF_ERROR(
        cu::CudaRmsNorm(h, x, layers_[0].attn_norm.as<const float>(), n, hid, eps, st));
    for (int64_t l = 0; l < c_.num_layers; ++l) {
      const Layer& lw = layers_[l];
      auto W = [&](LinearModule m) -> const DeviceMatrix& {
        return lw.linear[static_cast<int>(m)];
      };
      // q, k, v read the same normed input: round it to bf16 once.
      LP_ASSIGN_OR_RETURN(const uint16_t* hb, ToBf16(h, n, hid));
      LP_RETURN_IF_ERROR(Linear(q, h, hb, n, W(LinearModule::kQ)));
      LP_RETURN_IF_ERROR(Linear(k, h, hb, n, W(LinearModule::kK)));
      LP_RETURN_IF_ERROR(Linear(v, h, hb, n, W(LinearModule::kV)));
      const CudaLoraOutput qkv_out[3] = {{q, qd}, {k, kvd}, {v, kvd}};
      LP_RETURN_IF_ERROR(ApplyLora(kGroupQkv, l, h, hid, qkv_out));
      if (c_.attention_bias) {
        // y[t] += bias as a rank-1 product ones[n, 1] bias[1, out], exact in f32 (one product by
        // 1).
        const float* ones = ones_.as<const float>();
        const std::pair<float*, const CudaBuffer*> biases[3] = {
            {q, &lw.q_bias}, {k, &lw.k_bias}, {v, &lw.v_bias}};
        const int64_t outs[3] = {qd, kvd, kvd};
        for (int i = 0; i < 3; ++i) {
          const WeightView bias{DType::kF32, biases[i].second->data(), outs[i], 1};
          LP_RETURN_IF_ERROR(blas_->Gemm(biases[i].first, DType::kF32, ones, DType::kF32, n, bias,
                                         /*accumulate=*/true, st));
        }
      }
      LP_RETURN_IF_ERROR(
          cu::CudaRope(q, DType::kF32, d_pos, n, c_.num_heads, c_.head_dim, inv_freq, st));
      LP_RETURN_IF_ERROR(
          cu::CudaRope(k, DType::kF32, d_pos, n, c_.num_kv_heads, c_.head_dim, inv_freq, st));
      LP_RETURN_IF_ERROR(cu::CudaWriteKv(kv->k_layer(l), kv->v_layer(l), DType::kF32, k, v,
                                         DType::kF32, ab, layout, st));
      LP_RETURN_IF_ERROR(cu::CudaPagedAttention(attn, q, DType::kF32, kv->k_layer(l),
                                                kv->v_layer(l), DType::kF32, ab, layout,
                                                c_.num_heads, attn_scale, c_.sliding_window, st));
      LP_RETURN_IF_ERROR(Linear(proj, attn, nullptr, n, W(LinearModule::kO)));
      const CudaLoraOutput o_out[1] = {{proj, hid}};
      LP_RETURN_IF_ERROR(ApplyLora(kGroupO, l, attn, qd, o_out));
      // x += proj; h = RmsNorm(x) * ffn_norm
      LP_RETURN_IF_ERROR(
          cu::CudaAddRmsNorm(h, x, proj, lw.ffn_norm.data(), DType::kF32, n, hid, eps, st));

      LP_ASSIGN_OR_RETURN(hb, ToBf16(h, n, hid));
      LP_RETURN_IF_ERROR(Linear(gate, h, hb, n, W(LinearModule::kGate)));
      LP_RETURN_IF_ERROR(Linear(up, h, hb, n, W(LinearModule::kUp)));
      const CudaLoraOutput gu_out[2] = {{gate, ff}, {up, ff}};
      LP_RETURN_IF_ERROR(ApplyLora(kGroupGateUp, l, h, hid, gu_out));
      LP_RETURN_IF_ERROR(cu::CudaSiluMul(gate, gate, up, DType::kF32, n * ff, st));
      LP_RETURN_IF_ERROR(Linear(proj, gate, nullptr, n, W(LinearModule::kDown)));
      const CudaLoraOutput down_out[1] = {{proj, hid}};
      LP_RETURN_IF_ERROR(ApplyLora(kGroupDown, l, gate, ff, down_out));
      if (l + 1 < c_.num_layers) {
        // x += proj; h = RmsNorm(x) * the next layer's attn_norm
        LP_RETURN_IF_ERROR(cu::CudaAddRmsNorm(h, x, proj, layers_[l + 1].attn_norm.data(),
                                              DType::kF32, n, hid, eps, st));
      } else {
        LP_RETURN_IF_ERROR(cu::CudaAdd(x, proj, DType::kF32, n * hid, st));
      }
    }
    if (wait_for_upload_) {
      // Uploads that no op ended up reading (cannot happen with a planned pass, but the staging
      // copies are released after this step, so the compute stream must still cover them).
      LP_RETURN_IF_ERROR(uploaded_event_.StreamWait(st));
      wait_for_upload_ = false;
    }
    if (rows > 0) {
      float* sel = sel_.as<float>();
      // Gather the logit rows: CudaEmbed with the residual stream as an f32 "table".
      const WeightView xs{DType::kF32, x, n, hid};
      LP_RETURN_IF_ERROR(cu::CudaEmbed(
          sel, DType::kF32, reinterpret_cast<const int32_t*>(meta() + rows_off), rows, xs, st));
      LP_RETURN_IF_ERROR(
          cu::CudaRmsNorm(sel, sel, final_norm_.as<const float>(), rows, hid, eps, st));
      const DeviceMatrix& head = lm_head_.rows > 0 ? lm_head_ : embed_;
      LP_RETURN_IF_ERROR(Linear(logits_.as<float>(), sel, nullptr, rows, head));
      if (top_k > 0) {
        // Sampling needs only each row's best top_k entries: select them here and copy back
        // [rows, top_k] triples instead of [rows, vocab] logits.
        int32_t* ids = top_.as<int32_t>();
        float* values = reinterpret_cast<float*>(ids + rows * top_k);
        LP_RETURN_IF_ERROR(cu::CudaTopK(ids, values, values + rows * top_k, logits_.data(),
                                        DType::kF32, rows, vocab, top_k, st));
      }
    }
    return absl::OkStatus();
  };
  // No graph for a step that waits for adapter uploads (an event wait inside) or that is large.
  if (!graphs_.enabled() || wait_for_upload_ || n > kMaxGraphTokens) {
    LP_RETURN_IF_ERROR(launches());
  } else {
    std::vector<int64_t> key = {n,
                                rows,
                                top_k,
                                num_seqs,
                                table_len,
                                static_cast<int64_t>(reinterpret_cast<intptr_t>(kv)),
                                static_cast<int64_t>(buffers_gen_),
                                static_cast<int64_t>(tokens_off),
                                static_cast<int64_t>(pos_off),
                                static_cast<int64_t>(seq_off),
                                static_cast<int64_t>(tables_off),
                                static_cast<int64_t>(rows_off),
                                v_stride_,
                                merged != nullptr};
    for (const LoraPass* p : {&own_, &neg_}) {
      key.insert(key.end(),
                 {p->active, p->num_adapters, p->max_rank, p->sgmv, p->num_segments,
                  static_cast<int64_t>(p->token_adapter_off), static_cast<int64_t>(p->starts_off),
                  static_cast<int64_t>(p->seg_adapter_off)});
      if (!p->active) continue;
      for (const auto& groups : p->slices_off) {
        for (size_t off : groups) key.push_back(static_cast<int64_t>(off));
      }
    }
    LP_RETURN_IF_ERROR(graphs_.Run(std::move(key), st, launches));
  }

  out->vocab = vocab;
  out->k = top_k;
  out->logits.resize(rows * (top_k > 0 ? top_k : vocab));
  out->ids.resize(rows * top_k);
  out->logprobs.resize(rows * top_k);
  if (rows > 0) {
    if (top_k == 0) {
      LP_RETURN_IF_ERROR(logits_.CopyToHostAsync(out->logits.data(), rows * vocab * 4, st));
    } else {
      // One copy of the three arrays, which lie back to back in top_, through a host staging
      // vector; split below after the synchronisation.
      top_host_.resize(rows * top_k * 3);
      LP_RETURN_IF_ERROR(top_.CopyToHostAsync(top_host_.data(), rows * top_k * 12, st));
    }
  }
  LP_RETURN_IF_ERROR(compute_.Synchronize());
  LP_RETURN_IF_ERROR(upload_.Synchronize());
  if (top_k > 0 && rows > 0) {
    const int64_t k = rows * top_k;
    std::memcpy(out->ids.data(), top_host_.data(), k * 4);
    std::memcpy(out->logits.data(), top_host_.data() + k, k * 4);
    std::memcpy(out->logprobs.data(), top_host_.data() + 2 * k, k * 4);
  }
  return absl::OkStatus();
}

absl::Status CudaModelImpl::Merge(const LoraWeightsView& adapter) {
  // Nothing is in flight between steps (Forward synchronises), so plain synchronous copies are
  // ordered after every earlier kernel.
  if (!merge_backup_.empty()) return absl::FailedPreconditionError("CUDA merge: already merged");
  absl::Status s = MergeImpl(adapter);
  if (!s.ok()) {
    // Put back whatever was already replaced; the base stays pristine on failure.
    absl::Status restore = Unmerge();
    if (!restore.ok()) LP_LOG(ERROR) << "CUDA merge rollback: " << restore.ToString();
  }
  return s;
}

absl::Status CudaModelImpl::MergeImpl(const LoraWeightsView& adapter) {
  std::vector<std::pair<std::pair<int64_t, int>, StoredMatrix>> merged, backups;
  for (int64_t l = 0; l < c_.num_layers; ++l) {
    for (int m = 0; m < kNumLinearModules; ++m) {
      const LoraPair* pair = adapter.layers[l][m];
      if (pair == nullptr) continue;
      const DeviceMatrix& d = layers_[l].linear[m];
      StoredMatrix w;
      w.dtype = d.dtype;
      w.rows = d.rows;
      w.cols = d.cols;
      if (d.dtype == DType::kF32) {
        w.f32.resize(d.rows * d.cols);
        LP_RETURN_IF_ERROR(d.buffer.CopyToHost(w.f32.data(), d.bytes()));
      } else {
        w.bf16.resize(d.rows * d.cols);
        LP_RETURN_IF_ERROR(d.buffer.CopyToHost(w.bf16.data(), d.bytes()));
      }
      StoredMatrix updated = w;
      MergePairInto(*pair, &updated);
      merged.emplace_back(std::make_pair(l, m), std::move(updated));
      backups.emplace_back(std::make_pair(l, m), std::move(w));
    }
  }
  for (size_t i = 0; i < merged.size(); ++i) {
    const auto& [key, w] = merged[i];
    // Recorded before the upload, so a failed upload is rolled back too.
    merge_backup_.insert(std::move(backups[i]));
    DeviceMatrix& d = layers_[key.first].linear[key.second];
    const void* src = w.dtype == DType::kF32 ? static_cast<const void*>(w.f32.data())
                                             : static_cast<const void*>(w.bf16.data());
    LP_RETURN_IF_ERROR(d.buffer.CopyFromHost(src, d.bytes()));
  }
  return absl::OkStatus();
}

absl::Status CudaModelImpl::Unmerge() {
  for (auto& [key, w] : merge_backup_) {
    DeviceMatrix& d = layers_[key.first].linear[key.second];
    const void* src = w.dtype == DType::kF32 ? static_cast<const void*>(w.f32.data())
                                             : static_cast<const void*>(w.bf16.data());
    LP_RETURN_IF_ERROR(d.buffer.CopyFromHost(src, d.bytes()));
  }
  merge_backup_.clear();
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<CudaModel>> CreateCudaModel(const LlamaConfig& config,
                                                           LlamaWeights* weights,
                                                           const std::vector<float>& inv_freq,
                                                           const LoadOptions& options) {
  std::string why;
  if (!kernels::cuda::CudaDeviceAvailable(&why)) {
    return absl::UnavailableError(absl::StrCat("no CUDA device found: ", why));
  }
  const char* env = std::getenv("LP_CUDA_GRAPHS");
  bool graphs = options.cuda_graphs;
  if (env != nullptr && (std::string(env) == "0" || std::string(env) == "1")) {
    graphs = std::string(env) == "1";
  }
  auto m = std::make_unique<CudaModelImpl>(config, options.cuda_adapter_slots, graphs);
  LP_RETURN_IF_ERROR(m->Init(weights, inv_freq));
  absl::StatusOr<std::string> name = kernels::cuda::CudaDeviceName();
  LP_LOG(DEBUG) << "CUDA model on " << (name.ok() ? *name : "an unnamed device") << ": "
                << (m->weight_bytes() >> 20) << " MiB of weights";
  return m;
}

}  // namespace loraplex::model
