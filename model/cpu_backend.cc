#include "model/cpu_backend.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <utility>

#include "common/logging.h"
#include "model/lora_apply.h"

namespace loraplex::model {

// kernels::Gemm and Embed serve every weight format (f32 and bf16 widened; the quantized blocks
// with integer dot products on int8 activations, kernels/quant.h).
void CpuLinear(float* y, const float* x, int64_t m, const kernels::WeightView& w) {
  kernels::Gemm(y, x, m, w);
}

void CpuLinearShared(const float* x, int64_t m,
                     std::initializer_list<kernels::GemmOutput> outputs) {
  kernels::GemmShared(x, m, outputs);
}

void CpuEmbed(float* out, const int32_t* ids, int64_t n, const kernels::WeightView& table) {
  kernels::Embed(out, ids, n, table);
}

namespace {

template <typename T>
int64_t CapacityBytes(const std::vector<T>& v) {
  return static_cast<int64_t>(v.capacity() * sizeof(T));
}

class CpuBackend : public Backend {
 public:
  CpuBackend(const LlamaConfig& config, LlamaWeights weights, std::vector<float> inv_freq)
      : c_(config), w_(std::move(weights)), inv_freq_(std::move(inv_freq)) {}

  absl::Status Forward(const ForwardBatch& batch, const LoraPlan& plan, KvCache* cache,
                       int64_t top_k, StepLogits* out) override;

  bool host_kv_storage() const override { return true; }

  kernels::WeightView LinearWeight(int64_t layer, LinearModule m) const override {
    return w_.layers[layer].linear[static_cast<int>(m)].view();
  }
  absl::StatusOr<StoredMatrix> ReadLinear(int64_t layer, LinearModule m) const override {
    return w_.layers[layer].linear[static_cast<int>(m)];
  }
  absl::Status WriteLinear(int64_t layer, LinearModule m, StoredMatrix&& w) override {
    w_.layers[layer].linear[static_cast<int>(m)] = std::move(w);
    return absl::OkStatus();
  }
  absl::StatusOr<StoredMatrix> ExchangeLinear(int64_t layer, LinearModule m,
                                              StoredMatrix&& w) override {
    StoredMatrix& current = w_.layers[layer].linear[static_cast<int>(m)];
    if (w.dtype != current.dtype || w.rows != current.rows || w.cols != current.cols) {
      return absl::InvalidArgumentError("CPU model: an exchanged matrix differs in shape or dtype");
    }
    std::swap(current, w);
    return std::move(w);
  }
  bool host_weights() const override { return true; }

  int64_t weight_bytes() const override { return w_.bytes(); }
  int64_t scratch_bytes() const override { return scratch_bytes_.load(std::memory_order_relaxed); }
  double lora_seconds() const override { return lora_seconds_; }

 private:
  // Capacities of the step scratch and of `plan`'s vectors, summed.
  int64_t ScratchCapacityBytes(const LoraPlan& plan) const;

  LlamaConfig c_;
  LlamaWeights w_;
  std::vector<float> inv_freq_;
  // Step scratch, reused across calls.
  std::vector<float> x_, h_, q_, k_, v_, attn_, proj_, gate_, up_, sel_;
  LoraScratch lora_;
  // ScratchCapacityBytes, published after each step for scratch_bytes(), which other threads
  // (metrics) read while a step may be resizing the vectors.
  std::atomic<int64_t> scratch_bytes_{0};
  double lora_seconds_ = 0;  // in ApplyLora, all steps (the thread running Forward only)
};

// Adds the seconds of its scope to *total (nothing when total is null).
class Stopwatch {
 public:
  explicit Stopwatch(double* total)
      : total_(total),
        t0_(total != nullptr ? std::chrono::steady_clock::now()
                             : std::chrono::steady_clock::time_point()) {}
  ~Stopwatch() {
    if (total_ == nullptr) return;
    *total_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0_).count();
  }
  Stopwatch(const Stopwatch&) = delete;
  Stopwatch& operator=(const Stopwatch&) = delete;

 private:
  double* total_;
  std::chrono::steady_clock::time_point t0_;
};

int64_t CpuBackend::ScratchCapacityBytes(const LoraPlan& plan) const {
  int64_t total = 0;
  for (const std::vector<float>* v :
       {&x_, &h_, &q_, &k_, &v_, &attn_, &proj_, &gate_, &up_, &sel_}) {
    total += CapacityBytes(*v);
  }
  return total + CapacityBytes(lora_.a) + CapacityBytes(lora_.b) + plan.capacity_bytes();
}

absl::Status CpuBackend::Forward(const ForwardBatch& batch, const LoraPlan& plan, KvCache* cache,
                                 int64_t /*top_k*/, StepLogits* out) {
  // The rows are in host memory anyway: whole rows whatever top_k allows.
  out->vocab = c_.vocab_size;
  out->k = 0;
  out->ids.clear();
  out->logprobs.clear();
  if (!cache->has_host_storage()) {
    return absl::FailedPreconditionError(
        "forward: the KV cache has no host storage (made for a CUDA model)");
  }
  const LlamaConfig& c = c_;
  const int64_t n = batch.num_tokens();
  const int64_t hid = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), ff = c.intermediate_size;
  x_.resize(n * hid);
  h_.resize(n * hid);
  q_.resize(n * qd);
  k_.resize(n * kvd);
  v_.resize(n * kvd);
  attn_.resize(n * qd);
  proj_.resize(n * hid);
  gate_.resize(n * ff);
  up_.resize(n * ff);

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
    CpuLinear(y, x, n, w_.layers[layer].linear[static_cast<int>(m)].view());
  };
  // One output of the modules that read the same input (CpuLinearShared).
  auto output = [&](float* y, int64_t layer, LinearModule m) {
    return kernels::GemmOutput{y, w_.layers[layer].linear[static_cast<int>(m)].view()};
  };
  using M = LinearModule;
  using G = LoraGroup;

  // Only steps that apply some delta are timed (the merge policy's cost of a LoRA pass).
  double* const lora_timer = plan.empty() ? nullptr : &lora_seconds_;
  CpuEmbed(x_.data(), batch.tokens.data(), n, w_.embed.view());
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& lw = w_.layers[l];
    kernels::RmsNorm(h_.data(), x_.data(), lw.attn_norm.data(), n, hid, c.rms_norm_eps);
    CpuLinearShared(
        h_.data(), n,
        {output(q_.data(), l, M::kQ), output(k_.data(), l, M::kK), output(v_.data(), l, M::kV)});
    {
      Stopwatch timed(lora_timer);
      ApplyLora(plan, G::kQkv, l, h_.data(), hid,
                {{q_.data(), qd}, {k_.data(), kvd}, {v_.data(), kvd}}, &lora_);
    }
    if (c.attention_bias) {
      for (int64_t t = 0; t < n; ++t) {
        kernels::Add(q_.data() + t * qd, lw.q_bias.data(), qd);
        kernels::Add(k_.data() + t * kvd, lw.k_bias.data(), kvd);
        kernels::Add(v_.data() + t * kvd, lw.v_bias.data(), kvd);
      }
    }
    kernels::Rope(q_.data(), batch.positions.data(), n, c.num_heads, c.head_dim, inv_freq_.data());
    kernels::Rope(k_.data(), batch.positions.data(), n, c.num_kv_heads, c.head_dim,
                  inv_freq_.data());
    if (cache->dtype() == KvDType::kF16) {
      kernels::WriteKv(cache->k16(l), cache->v16(l), k_.data(), v_.data(), ab, layout);
      kernels::PagedAttention(attn_.data(), q_.data(), cache->k16(l), cache->v16(l), ab, layout,
                              c.num_heads, attn_scale, c.sliding_window);
    } else {
      kernels::WriteKv(cache->k(l), cache->v(l), k_.data(), v_.data(), ab, layout);
      kernels::PagedAttention(attn_.data(), q_.data(), cache->k(l), cache->v(l), ab, layout,
                              c.num_heads, attn_scale, c.sliding_window);
    }
    base(proj_.data(), attn_.data(), l, M::kO);
    {
      Stopwatch timed(lora_timer);
      ApplyLora(plan, G::kO, l, attn_.data(), qd, {{proj_.data(), hid}}, &lora_);
    }
    kernels::Add(x_.data(), proj_.data(), n * hid);

    kernels::RmsNorm(h_.data(), x_.data(), lw.ffn_norm.data(), n, hid, c.rms_norm_eps);
    CpuLinearShared(h_.data(), n,
                    {output(gate_.data(), l, M::kGate), output(up_.data(), l, M::kUp)});
    {
      Stopwatch timed(lora_timer);
      ApplyLora(plan, G::kGateUp, l, h_.data(), hid, {{gate_.data(), ff}, {up_.data(), ff}},
                &lora_);
    }
    kernels::SiluMul(gate_.data(), gate_.data(), up_.data(), n * ff);
    base(proj_.data(), gate_.data(), l, M::kDown);
    {
      Stopwatch timed(lora_timer);
      ApplyLora(plan, G::kDown, l, gate_.data(), ff, {{proj_.data(), hid}}, &lora_);
    }
    kernels::Add(x_.data(), proj_.data(), n * hid);
  }

  const int64_t rows = static_cast<int64_t>(batch.logit_rows.size());
  sel_.resize(rows * hid);
  for (int64_t r = 0; r < rows; ++r) {
    const float* src = x_.data() + static_cast<int64_t>(batch.logit_rows[r]) * hid;
    std::copy(src, src + hid, sel_.data() + r * hid);
  }
  kernels::RmsNorm(sel_.data(), sel_.data(), w_.final_norm.data(), rows, hid, c.rms_norm_eps);
  out->logits.resize(rows * c.vocab_size);
  if (rows > 0) CpuLinear(out->logits.data(), sel_.data(), rows, w_.output().view());
  scratch_bytes_.store(ScratchCapacityBytes(plan), std::memory_order_relaxed);
  return absl::OkStatus();
}

}  // namespace

std::unique_ptr<Backend> CreateCpuBackend(const LlamaConfig& config, LlamaWeights weights,
                                          std::vector<float> inv_freq) {
  return std::make_unique<CpuBackend>(config, std::move(weights), std::move(inv_freq));
}

}  // namespace loraplex::model
