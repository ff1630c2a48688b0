// The CUDA backend (cuda_model.h): device weights, the KV pools attached to the cache, the per-step
// metadata upload, and the forward pass as a sequence of kernels/cuda ops on one stream.
#include "model/cuda_model.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
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
#include "model/lora_plan.h"

namespace loraplex::model {
namespace {

using kernels::DType;
using kernels::WeightView;
using kernels::cuda::CudaBlas;
using kernels::cuda::CudaBuffer;
using kernels::cuda::CudaEvent;
using kernels::cuda::CudaLoraOutput;
using kernels::cuda::CudaLoraRowScales;
using kernels::cuda::CudaLoraSegments;
using kernels::cuda::CudaLoraSlice;
using kernels::cuda::CudaLoraWeights;
using kernels::cuda::CudaStream;

// Device memory left free after the weights and the KV pools: cuBLAS workspaces, step scratch and
// adapter copies come out of it.
constexpr int64_t kDeviceMemoryMargin = int64_t{256} << 20;
// The attention kernel holds one head in a warp.
constexpr int64_t kMaxHeadDim = 256;

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

// One LoRA pass of the plan as the device reads it. Offsets are into the step's metadata buffer.
struct DeviceLoraPass {
  bool active = false;
  int64_t num_adapters = 0;
  int64_t max_rank = 0;
  bool sgmv = false;
  size_t token_adapter_off = 0;  // int32 [n]
  size_t starts_off = 0;         // int64 [num_segments + 1]
  size_t seg_adapter_off = 0;    // int32 [num_segments]
  int64_t num_segments = 0;
  // Per layer and group: offset of the CudaLoraSlice array [num_adapters * group size], or
  // SIZE_MAX when no adapter of the pass touches the group in that layer.
  std::vector<std::array<size_t, kNumLoraGroups>> slices_off;
  // DoRA, the same way: offset of the per-(adapter, module) scale pointers (const float*
  // [num_adapters * group size], null where an adapter has none), or SIZE_MAX when no adapter of
  // the pass has a scale in that layer and group (then no rescale is launched).
  std::vector<std::array<size_t, kNumLoraGroups>> scales_off;
};

// The host values of one step that its launches use: sizes, where each metadata array lies in
// the metadata buffer, and the KV pools. All of them reach the step's graph key (the layout through
// kv and table_len).
struct StepMeta {
  int64_t n = 0;      // tokens
  int64_t rows = 0;   // logit rows
  int64_t top_k = 0;  // 0 = whole rows
  int64_t num_seqs = 0;
  int64_t table_len = 0;  // block table row length as uploaded (padded with graphs)
  bool merged = false;
  size_t tokens_off = 0, pos_off = 0, seq_off = 0, tables_off = 0, rows_off = 0;
  CudaKvStorage* kv = nullptr;
  kernels::KvLayout layout;
};

class CudaBackend : public Backend {
 public:
  CudaBackend(const LlamaConfig& config, int64_t adapter_slots, bool graphs)
      : c_(config), slots_(config, adapter_slots), graphs_(graphs) {}

  absl::Status Init(LlamaWeights* w, const std::vector<float>& inv_freq);

  absl::Status Forward(const ForwardBatch& batch, const LoraPlan& plan, KvCache* cache,
                       int64_t top_k, StepLogits* out) override {
    absl::Status s = Step(batch, plan, cache, top_k, out);
    if (!s.ok()) {
      // Leave nothing in flight, so the next step may again grow buffers and evict slots. The
      // errors of these waits would only repeat the first one.
      (void)compute_.Synchronize();
      (void)upload_.Synchronize();
    }
    slots_.ReleaseStaging();
    return s;
  }

  bool host_kv_storage() const override { return false; }
  kernels::WeightView LinearWeight(int64_t layer, LinearModule m) const override {
    const DeviceMatrix& d = layers_[layer].linear[static_cast<int>(m)];
    return {d.dtype, nullptr, d.rows, d.cols};
  }
  absl::StatusOr<StoredMatrix> ReadLinear(int64_t layer, LinearModule m) const override;
  absl::Status WriteLinear(int64_t layer, LinearModule m, StoredMatrix&& w) override;
  int64_t weight_bytes() const override { return weight_bytes_; }
  int64_t scratch_bytes() const override { return 0; }  // the scratch lives on the device
  CudaGraphStats graph_stats() const override { return graphs_.stats(); }

 private:
  struct Layer {
    std::array<DeviceMatrix, kNumLinearModules> linear;
    CudaBuffer attn_norm, ffn_norm, q_bias, k_bias, v_bias;  // f32; biases empty unless used
  };

  // One step, in order: the named parts below.
  absl::Status Step(const ForwardBatch& batch, const LoraPlan& plan, KvCache* cache, int64_t top_k,
                    StepLogits* out);
  // The cache's device KV pools, allocated and attached at its first step.
  absl::StatusOr<CudaKvStorage*> KvStorage(KvCache* cache);
  // Metadata upload, host half: packs tokens, positions, block tables, logit rows and the LoRA
  // plan into packer_ and fills *m; acquires the plan's adapter copies (queuing their uploads).
  absl::Status PackMetadata(const ForwardBatch& batch, const LoraPlan& plan, int64_t top_k,
                            StepMeta* m);
  // The plan's passes: adapter copies, their index arrays and per-layer slice tables.
  absl::Status PackLora(const LoraPlan& plan, bool* uploaded);
  absl::Status PackPass(const std::vector<const CudaAdapterCopy*>& copies, const LoraPass& pass,
                        DeviceLoraPass* out);
  // Grows every step buffer to what the step needs (before any of the step's work is queued).
  absl::Status GrowBuffers(const StepMeta& m);
  // Metadata upload, device half: one asynchronous copy of the packed metadata.
  absl::Status UploadMetadata();
  // Queues the step's launches, replayed from a CUDA graph when one fits (graph capture/replay).
  absl::Status EnqueueStep(const StepMeta& m);
  // The graph key of a step: every host value that reaches one of its launches.
  std::vector<int64_t> GraphKey(const StepMeta& m) const;
  // The step's launches, from the embedding to the logits (or their top k): what a graph holds.
  absl::Status EnqueueForward(const StepMeta& m);
  // Copies the logits (or the top-k triples) back and waits for the step to finish.
  absl::Status CopyLogitsBack(const StepMeta& m, StepLogits* out);

  // y = W x for f32 x [m, W.cols] and f32 y; x_bf16 (when non-null) is x already rounded to bf16.
  absl::Status Linear(float* d_y, const float* d_x, const uint16_t* d_x_bf16, int64_t m,
                      const DeviceMatrix& w, bool accumulate = false);
  // Rounds d_x [m, k] to bf16 into the step's bf16 scratch (for bf16 weights) and returns it, or
  // null for f32 weights (cuBLAS takes f32 x directly then).
  absl::StatusOr<const uint16_t*> ToBf16(const float* d_x, int64_t m, int64_t k);
  absl::Status ApplyLora(LoraGroup group, int64_t layer, const float* d_x, int64_t x_stride,
                         const CudaLoraOutput* y);
  // DoRA: y rows of the tokens of `pass` times their adapter's scale (the copies hold g for the
  // own pass and 1 / g for the unmerge pass); nothing when no adapter of it has one here.
  absl::Status ScaleDoraRows(const DeviceLoraPass& pass, LoraGroup group, int64_t layer,
                             const CudaLoraOutput* y);
  // Before the first kernel that reads adapter copies: the compute stream waits for their upload.
  absl::Status WaitForAdapterUpload();
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
  DeviceLoraPass own_, neg_;  // the plan's own and unmerge passes
  bool wait_for_upload_ = false;
  std::vector<int32_t> tables_;  // block tables padded to a power-of-two row length

  uint64_t buffers_gen_ = 0;
  CudaStepGraphs graphs_;
};

// Graphs only for steps of at most this many tokens (decode and small mixed steps): launching op
// by op costs the host the same whatever the batch, so the share it takes is largest there, and
// prefill steps of many tokens rarely repeat a shape.
constexpr int64_t kMaxGraphTokens = 256;

absl::Status CudaBackend::Grow(CudaBuffer* b, size_t bytes) {
  if (b->size() >= bytes) return absl::OkStatus();
  ++buffers_gen_;
  return Reserve(b, bytes);
}

absl::Status CudaBackend::Init(LlamaWeights* w, const std::vector<float>& inv_freq) {
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

absl::StatusOr<CudaKvStorage*> CudaBackend::KvStorage(KvCache* cache) {
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

absl::Status CudaBackend::PackPass(const std::vector<const CudaAdapterCopy*>& copies,
                                   const LoraPass& pass, DeviceLoraPass* out) {
  *out = DeviceLoraPass();
  out->active = true;
  out->num_adapters = static_cast<int64_t>(copies.size());
  out->num_segments = pass.num_segments();
  out->sgmv = pass.sgmv;
  out->token_adapter_off = packer_.Add(pass.token_adapter.data(), pass.token_adapter.size());
  out->starts_off = packer_.Add(pass.starts.data(), pass.starts.size());
  out->seg_adapter_off = packer_.Add(pass.seg_adapter.data(), pass.seg_adapter.size());
  for (const CudaAdapterCopy* copy : copies) {
    if (copy != nullptr) out->max_rank = std::max(out->max_rank, copy->max_rank);
  }
  out->slices_off.assign(c_.num_layers, {});
  out->scales_off.assign(c_.num_layers, {});
  const bool dora = std::any_of(copies.begin(), copies.end(),
                                [](const CudaAdapterCopy* c) { return c != nullptr && c->dora; });
  std::vector<CudaLoraSlice> slices;
  std::vector<const float*> scales;
  for (int64_t l = 0; l < c_.num_layers; ++l) {
    for (int g = 0; g < kNumLoraGroups; ++g) {
      const LoraModuleGroup& group = kLoraModuleGroups[g];
      slices.assign(copies.size() * group.num_modules, CudaLoraSlice{});
      scales.assign(dora ? copies.size() * group.num_modules : 0, nullptr);
      bool any = false, any_scale = false;
      for (size_t j = 0; j < copies.size(); ++j) {
        if (copies[j] == nullptr) continue;
        int32_t offset = 0;
        for (int s = 0; s < group.num_modules; ++s) {
          const CudaLoraModule& mod = copies[j]->layers[l][static_cast<int>(group.modules[s])];
          if (mod.rank == 0) continue;
          CudaLoraSlice& slice = slices[j * group.num_modules + s];
          slice.a = mod.a;
          slice.b = mod.b;
          slice.rank = mod.rank;
          slice.v_offset = offset;
          offset += mod.rank;
          any = true;
          if (mod.dora_scale != nullptr) {
            scales[j * group.num_modules + s] = mod.dora_scale;
            any_scale = true;
          }
        }
        v_stride_ = std::max<int64_t>(v_stride_, offset);
      }
      out->slices_off[l][g] = any ? packer_.Add(slices.data(), slices.size()) : SIZE_MAX;
      out->scales_off[l][g] = any_scale ? packer_.Add(scales.data(), scales.size()) : SIZE_MAX;
    }
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::PackLora(const LoraPlan& plan, bool* uploaded) {
  own_ = DeviceLoraPass();
  neg_ = DeviceLoraPass();
  v_stride_ = 0;
  // The own pass with each adapter's copy; the unmerge pass with the merged adapter's -B copy.
  const std::pair<const LoraPass*, DeviceLoraPass*> passes[2] = {{&plan.own(), &own_},
                                                                 {&plan.unmerge(), &neg_}};
  std::vector<const CudaAdapterCopy*> copies;
  for (const auto& [pass, device_pass] : passes) {
    if (!pass->active) continue;
    // Only the adapters some token takes, in token order.
    copies.assign(pass->adapters.size(), nullptr);
    for (const int32_t j : pass->token_adapter) {
      if (j < 0 || copies[j] != nullptr) continue;
      LP_ASSIGN_OR_RETURN(copies[j], slots_.Acquire(*pass->adapters[j], pass->negate, step_,
                                                    upload_.get(), uploaded));
    }
    LP_RETURN_IF_ERROR(PackPass(copies, *pass, device_pass));
  }
  return absl::OkStatus();
}

absl::StatusOr<const uint16_t*> CudaBackend::ToBf16(const float* d_x, int64_t m, int64_t k) {
  if (wdtype_ != DType::kBF16) return nullptr;
  LP_RETURN_IF_ERROR(kernels::cuda::CudaConvert(xb_.data(), DType::kBF16, d_x, DType::kF32, m * k,
                                                compute_.get()));
  return xb_.as<const uint16_t>();
}

absl::Status CudaBackend::Linear(float* d_y, const float* d_x, const uint16_t* d_x_bf16, int64_t m,
                                 const DeviceMatrix& w, bool accumulate) {
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

absl::Status CudaBackend::WaitForAdapterUpload() {
  if (wait_for_upload_) {
    // The copies queued on the upload stream must land before the first kernel reads them.
    LP_RETURN_IF_ERROR(uploaded_event_.StreamWait(compute_.get()));
    wait_for_upload_ = false;
  }
  return absl::OkStatus();
}

absl::Status CudaBackend::ScaleDoraRows(const DeviceLoraPass& pass, LoraGroup group, int64_t layer,
                                        const CudaLoraOutput* y) {
  const int g = static_cast<int>(group);
  if (!pass.active || pass.scales_off[layer][g] == SIZE_MAX) return absl::OkStatus();
  LP_RETURN_IF_ERROR(WaitForAdapterUpload());
  const LoraModuleGroup& modules = ModulesOf(group);
  CudaLoraRowScales scales;
  scales.num_adapters = pass.num_adapters;
  scales.num_slices = modules.num_modules;
  for (int s = 0; s < modules.num_modules; ++s) {
    scales.out_features[s] = LinearOutFeatures(c_, modules.modules[s]);
  }
  scales.d_scales = reinterpret_cast<const float* const*>(meta() + pass.scales_off[layer][g]);
  // The plan gives every pass an index per token, SGMV or not.
  const int32_t* ta = reinterpret_cast<const int32_t*>(meta() + pass.token_adapter_off);
  return kernels::cuda::CudaLoraScaleRows(y, DType::kF32, ta, n_, scales, compute_.get());
}

absl::Status CudaBackend::ApplyLora(LoraGroup group, int64_t layer, const float* d_x,
                                    int64_t x_stride, const CudaLoraOutput* y) {
  const int g = static_cast<int>(group);
  // The order of the CPU's ApplyLora (model/lora_apply.cc): a merged DoRA adapter M left
  // g_M (W + B_M A_M) x in the other tokens' rows, so they take 1 / g_M first, then the deltas of
  // both passes, then each DoRA token takes its own g.
  LP_RETURN_IF_ERROR(ScaleDoraRows(neg_, group, layer, y));
  for (const DeviceLoraPass* pass : {&own_, &neg_}) {
    if (!pass->active || pass->slices_off[layer][g] == SIZE_MAX) continue;
    LP_RETURN_IF_ERROR(WaitForAdapterUpload());
    const LoraModuleGroup& modules = ModulesOf(group);
    CudaLoraWeights w;
    w.num_adapters = pass->num_adapters;
    w.num_slices = modules.num_modules;
    w.dtype = DType::kF32;
    w.in_features = LinearInFeatures(c_, modules.modules[0]);
    for (int s = 0; s < modules.num_modules; ++s) {
      w.out_features[s] = LinearOutFeatures(c_, modules.modules[s]);
    }
    w.max_rank = pass->max_rank;
    w.d_slices = reinterpret_cast<const CudaLoraSlice*>(meta() + pass->slices_off[layer][g]);
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
  return ScaleDoraRows(own_, group, layer, y);
}

absl::Status CudaBackend::Step(const ForwardBatch& batch, const LoraPlan& plan, KvCache* cache,
                               int64_t top_k, StepLogits* out) {
  static_assert(LlamaModel::kMaxTopLogits == kernels::cuda::kCudaMaxTopK);
  n_ = batch.num_tokens();
  ++step_;
  // Everything that allocates or frees device memory happens first, before any work is queued.
  LP_ASSIGN_OR_RETURN(CudaKvStorage * kv, KvStorage(cache));
  StepMeta m;
  LP_RETURN_IF_ERROR(PackMetadata(batch, plan, top_k, &m));
  m.kv = kv;
  m.layout = cache->layout(m.table_len);
  LP_RETURN_IF_ERROR(GrowBuffers(m));
  LP_RETURN_IF_ERROR(UploadMetadata());
  LP_RETURN_IF_ERROR(EnqueueStep(m));
  return CopyLogitsBack(m, out);
}

absl::Status CudaBackend::PackMetadata(const ForwardBatch& batch, const LoraPlan& plan,
                                       int64_t top_k, StepMeta* m) {
  const int64_t n = batch.num_tokens();
  m->n = n;
  m->rows = static_cast<int64_t>(batch.logit_rows.size());
  m->top_k = top_k;
  m->num_seqs = static_cast<int64_t>(batch.block_tables.size()) / batch.max_blocks_per_seq;
  m->merged = plan.merged() != nullptr;
  packer_.Clear();
  m->tokens_off = packer_.Add(batch.tokens.data(), n);
  m->pos_off = packer_.Add(batch.positions.data(), n);
  m->seq_off = packer_.Add(batch.token_seq.data(), n);
  // With graphs, block tables padded to a power-of-two row length (attention reads a sequence's
  // entries only up to its own length): a decode batch's metadata layout then changes only when
  // the longest table doubles, so the graph of its steps stays valid across many steps.
  m->table_len = batch.max_blocks_per_seq;
  if (graphs_.enabled()) {
    m->table_len = 1;
    while (m->table_len < batch.max_blocks_per_seq) m->table_len *= 2;
  }
  tables_.assign(m->num_seqs * m->table_len, 0);
  for (int64_t s = 0; s < m->num_seqs; ++s) {
    std::copy_n(batch.block_tables.begin() + s * batch.max_blocks_per_seq, batch.max_blocks_per_seq,
                tables_.begin() + s * m->table_len);
  }
  m->tables_off = packer_.Add(tables_.data(), tables_.size());
  m->rows_off = packer_.Add(batch.logit_rows.data(), m->rows);
  bool uploaded = false;
  LP_RETURN_IF_ERROR(PackLora(plan, &uploaded));
  if (uploaded) LP_RETURN_IF_ERROR(uploaded_event_.Record(upload_.get()));
  wait_for_upload_ = uploaded;
  return absl::OkStatus();
}

absl::Status CudaBackend::GrowBuffers(const StepMeta& m) {
  const int64_t n = m.n, rows = m.rows;
  const int64_t hid = c_.hidden_size, qd = c_.q_dim(), kvd = c_.kv_dim(), ff = c_.intermediate_size;
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
  LP_RETURN_IF_ERROR(Grow(&logits_, std::max<int64_t>(rows, 1) * c_.vocab_size * 4));
  if (m.top_k > 0) LP_RETURN_IF_ERROR(Grow(&top_, std::max<int64_t>(rows, 1) * m.top_k * 12));
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
  return absl::OkStatus();
}

absl::Status CudaBackend::UploadMetadata() {
  // packer_ stays unchanged until the step's final synchronisation, so the host source of this
  // asynchronous copy outlives it.
  return meta_.CopyFromHostAsync(packer_.data(), packer_.size(), compute_.get());
}

std::vector<int64_t> CudaBackend::GraphKey(const StepMeta& m) const {
  std::vector<int64_t> key = {m.n,
                              m.rows,
                              m.top_k,
                              m.num_seqs,
                              m.table_len,
                              static_cast<int64_t>(reinterpret_cast<intptr_t>(m.kv)),
                              static_cast<int64_t>(buffers_gen_),
                              static_cast<int64_t>(m.tokens_off),
                              static_cast<int64_t>(m.pos_off),
                              static_cast<int64_t>(m.seq_off),
                              static_cast<int64_t>(m.tables_off),
                              static_cast<int64_t>(m.rows_off),
                              v_stride_,
                              m.merged};
  for (const DeviceLoraPass* p : {&own_, &neg_}) {
    key.insert(key.end(),
               {p->active, p->num_adapters, p->max_rank, p->sgmv, p->num_segments,
                static_cast<int64_t>(p->token_adapter_off), static_cast<int64_t>(p->starts_off),
                static_cast<int64_t>(p->seg_adapter_off)});
    if (!p->active) continue;
    for (const auto* table : {&p->slices_off, &p->scales_off}) {
      for (const auto& groups : *table) {
        for (size_t off : groups) key.push_back(static_cast<int64_t>(off));
      }
    }
  }
  return key;
}

absl::Status CudaBackend::EnqueueStep(const StepMeta& m) {
  // No graph for a step that waits for adapter uploads (an event wait inside) or that is large.
  if (!graphs_.enabled() || wait_for_upload_ || m.n > kMaxGraphTokens) return EnqueueForward(m);
  return graphs_.Run(GraphKey(m), compute_.get(), [&] { return EnqueueForward(m); });
}

absl::Status CudaBackend::EnqueueForward(const StepMeta& m) {
  namespace cu = kernels::cuda;
  const int64_t n = m.n, rows = m.rows, top_k = m.top_k;
  const int64_t hid = c_.hidden_size, qd = c_.q_dim(), kvd = c_.kv_dim(), ff = c_.intermediate_size;
  const int64_t vocab = c_.vocab_size;
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
  const int32_t* d_tokens = reinterpret_cast<const int32_t*>(meta() + m.tokens_off);
  const int32_t* d_pos = reinterpret_cast<const int32_t*>(meta() + m.pos_off);
  const CudaKvStorage* kv = m.kv;

  kernels::AttentionBatch ab;
  ab.num_tokens = n;
  ab.token_seq = reinterpret_cast<const int32_t*>(meta() + m.seq_off);
  ab.token_pos = d_pos;
  ab.block_tables = reinterpret_cast<const int32_t*>(meta() + m.tables_off);
  const kernels::KvLayout& layout = m.layout;
  const float attn_scale = 1.0f / std::sqrt(static_cast<float>(c_.head_dim));
  const float eps = c_.rms_norm_eps;
  const float* inv_freq = inv_freq_.as<const float>();

  LP_RETURN_IF_ERROR(cu::CudaEmbed(x, DType::kF32, d_tokens, n, embed_.view(), st));
  LP_RETURN_IF_ERROR(
      cu::CudaRmsNorm(h, x, layers_[0].attn_norm.as<const float>(), n, hid, eps, st));
  for (int64_t l = 0; l < c_.num_layers; ++l) {
    const Layer& lw = layers_[l];
    auto W = [&](LinearModule module) -> const DeviceMatrix& {
      return lw.linear[static_cast<int>(module)];
    };
    // q, k, v read the same normed input: round it to bf16 once.
    LP_ASSIGN_OR_RETURN(const uint16_t* hb, ToBf16(h, n, hid));
    LP_RETURN_IF_ERROR(Linear(q, h, hb, n, W(LinearModule::kQ)));
    LP_RETURN_IF_ERROR(Linear(k, h, hb, n, W(LinearModule::kK)));
    LP_RETURN_IF_ERROR(Linear(v, h, hb, n, W(LinearModule::kV)));
    const CudaLoraOutput qkv_out[3] = {{q, qd}, {k, kvd}, {v, kvd}};
    LP_RETURN_IF_ERROR(ApplyLora(LoraGroup::kQkv, l, h, hid, qkv_out));
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
    LP_RETURN_IF_ERROR(cu::CudaPagedAttention(attn, q, DType::kF32, kv->k_layer(l), kv->v_layer(l),
                                              DType::kF32, ab, layout, c_.num_heads, attn_scale,
                                              c_.sliding_window, st));
    LP_RETURN_IF_ERROR(Linear(proj, attn, nullptr, n, W(LinearModule::kO)));
    const CudaLoraOutput o_out[1] = {{proj, hid}};
    LP_RETURN_IF_ERROR(ApplyLora(LoraGroup::kO, l, attn, qd, o_out));
    // x += proj; h = RmsNorm(x) * ffn_norm
    LP_RETURN_IF_ERROR(
        cu::CudaAddRmsNorm(h, x, proj, lw.ffn_norm.data(), DType::kF32, n, hid, eps, st));

    LP_ASSIGN_OR_RETURN(hb, ToBf16(h, n, hid));
    LP_RETURN_IF_ERROR(Linear(gate, h, hb, n, W(LinearModule::kGate)));
    LP_RETURN_IF_ERROR(Linear(up, h, hb, n, W(LinearModule::kUp)));
    const CudaLoraOutput gu_out[2] = {{gate, ff}, {up, ff}};
    LP_RETURN_IF_ERROR(ApplyLora(LoraGroup::kGateUp, l, h, hid, gu_out));
    LP_RETURN_IF_ERROR(cu::CudaSiluMul(gate, gate, up, DType::kF32, n * ff, st));
    LP_RETURN_IF_ERROR(Linear(proj, gate, nullptr, n, W(LinearModule::kDown)));
    const CudaLoraOutput down_out[1] = {{proj, hid}};
    LP_RETURN_IF_ERROR(ApplyLora(LoraGroup::kDown, l, gate, ff, down_out));
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
        sel, DType::kF32, reinterpret_cast<const int32_t*>(meta() + m.rows_off), rows, xs, st));
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
}

absl::Status CudaBackend::CopyLogitsBack(const StepMeta& m, StepLogits* out) {
  const int64_t rows = m.rows, top_k = m.top_k, vocab = c_.vocab_size;
  void* st = compute_.get();
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

absl::StatusOr<StoredMatrix> CudaBackend::ReadLinear(int64_t layer, LinearModule m) const {
  // Nothing is in flight between steps (Forward synchronises), so plain synchronous copies are
  // ordered after every earlier kernel.
  const DeviceMatrix& d = layers_[layer].linear[static_cast<int>(m)];
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
  return w;
}

absl::Status CudaBackend::WriteLinear(int64_t layer, LinearModule m, StoredMatrix&& w) {
  DeviceMatrix& d = layers_[layer].linear[static_cast<int>(m)];
  if (w.dtype != d.dtype || w.rows != d.rows || w.cols != d.cols) {
    return absl::InvalidArgumentError("CUDA model: a written matrix differs in shape or dtype");
  }
  const void* src = w.dtype == DType::kF32 ? static_cast<const void*>(w.f32.data())
                                           : static_cast<const void*>(w.bf16.data());
  return d.buffer.CopyFromHost(src, d.bytes());
}

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const LlamaConfig& config,
                                                           LlamaWeights weights,
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
  auto m = std::make_unique<CudaBackend>(config, options.cuda_adapter_slots, graphs);
  LP_RETURN_IF_ERROR(m->Init(&weights, inv_freq));
  absl::StatusOr<std::string> name = kernels::cuda::CudaDeviceName();
  LP_LOG(DEBUG) << "CUDA model on " << (name.ok() ? *name : "an unnamed device") << ": "
                << (m->weight_bytes() >> 20) << " MiB of weights";
  return m;
}

}  // namespace loraplex::model
