#include "model/cuda_adapter_slots.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "kernels/cuda/cuda_types.h"

namespace loraplex::model {

namespace {

// Appends the n elements of `v` widened to f32 (negated when negate) to *out.
absl::Status AppendF32(const kernels::WeightView& v, int64_t n, bool negate,
                       std::vector<float>* out) {
  const float sign = negate ? -1.0f : 1.0f;
  if (v.dtype == kernels::DType::kF32) {
    const float* p = static_cast<const float*>(v.data);
    for (int64_t i = 0; i < n; ++i) out->push_back(sign * p[i]);
  } else if (v.dtype == kernels::DType::kBF16) {
    const uint16_t* p = static_cast<const uint16_t*>(v.data);
    for (int64_t i = 0; i < n; ++i) out->push_back(sign * Bf16ToF32(p[i]));
  } else {
    return absl::InvalidArgumentError("unknown dtype");
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<const CudaAdapterCopy*> CudaAdapterSlots::Acquire(const LoraWeightsView& view,
                                                                 bool negate, uint64_t step,
                                                                 void* upload_stream,
                                                                 bool* uploaded) {
  const auto key = std::make_pair(view.id, negate);
  if (auto it = copies_.find(key); it != copies_.end()) {
    it->second->last_step = step;
    return it->second.get();
  }
  if (static_cast<int64_t>(view.layers.size()) != config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("CUDA adapter upload: the adapter has ",
                                                   view.layers.size(), " layers, the model ",
                                                   config_.num_layers));
  }
  auto copy = std::make_unique<CudaAdapterCopy>();
  copy->layers.resize(config_.num_layers);
  // First pass: validate and lay out the host staging buffer; offsets[l][m] in floats.
  std::vector<std::array<int64_t, kNumLinearModules>> offsets(config_.num_layers);
  std::vector<std::array<bool, kNumLinearModules>> dora_at(config_.num_layers);  // has a scale
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    for (int m = 0; m < kNumLinearModules; ++m) {
      const LoraPair* p = view.layers[l][m];
      if (p == nullptr) continue;
      const LinearModule mod = static_cast<LinearModule>(m);
      const int64_t in = LinearInFeatures(config_, mod), out = LinearOutFeatures(config_, mod);
      if (p->rank < 1 || p->rank > kernels::cuda::kCudaMaxLoraRank || p->a.rows != p->rank ||
          p->a.cols != in || p->b.rows != out || p->b.cols != p->rank || p->a.data == nullptr ||
          p->b.data == nullptr) {
        return absl::InvalidArgumentError(
            absl::StrCat("CUDA adapter upload: layer ", l, " ", LinearModuleName(mod), ": rank ",
                         p->rank, ", A [", p->a.rows, ", ", p->a.cols, "], B [", p->b.rows, ", ",
                         p->b.cols, "] do not fit [rank, ", in, "] / [", out,
                         ", rank] with 1 <= rank <= ", kernels::cuda::kCudaMaxLoraRank));
      }
      const float* dora = negate ? p->dora_inv_scale : p->dora_scale;
      if ((p->dora_scale == nullptr) != (p->dora_inv_scale == nullptr)) {
        return absl::InvalidArgumentError(
            absl::StrCat("CUDA adapter upload: layer ", l, " ", LinearModuleName(mod),
                         ": a DoRA pair needs both dora_scale and dora_inv_scale"));
      }
      offsets[l][m] = static_cast<int64_t>(copy->staging.size());
      absl::Status s = AppendF32(p->a, p->rank * in, /*negate=*/false, &copy->staging);
      if (s.ok()) s = AppendF32(p->b, out * p->rank, negate, &copy->staging);
      if (!s.ok()) {
        return absl::InvalidArgumentError(absl::StrCat("CUDA adapter upload: layer ", l, " ",
                                                       LinearModuleName(mod), ": ", s.message()));
      }
      if (dora != nullptr) {
        // After B: g (or 1 / g for the unmerge pass), in f32 as the CPU applies it.
        copy->staging.insert(copy->staging.end(), dora, dora + out);
        dora_at[l][m] = true;
        copy->dora = true;
      }
      copy->layers[l][m].rank = static_cast<int32_t>(p->rank);
      copy->max_rank = std::max(copy->max_rank, p->rank);
    }
  }
  if (copy->staging.empty()) {
    return absl::InvalidArgumentError("CUDA adapter upload: the adapter has no LoRA pair");
  }
  copy->bytes = static_cast<int64_t>(copy->staging.size() * sizeof(float));

  while (num_copies() >= max_slots_ && EvictOne(step)) {
  }
  absl::StatusOr<kernels::cuda::CudaBuffer> buf = kernels::cuda::CudaBuffer::Allocate(copy->bytes);
  if (!buf.ok() && absl::IsResourceExhausted(buf.status())) {
    while (EvictOne(step)) {
    }
    buf = kernels::cuda::CudaBuffer::Allocate(copy->bytes);
  }
  if (!buf.ok()) {
    return absl::Status(buf.status().code(),
                        absl::StrCat("CUDA adapter upload of ", copy->bytes,
                                     " bytes: ", std::string(buf.status().message())));
  }
  copy->buffer = std::move(buf).value();
  LP_RETURN_IF_ERROR(
      copy->buffer.CopyFromHostAsync(copy->staging.data(), copy->bytes, upload_stream));
  const float* base = copy->buffer.as<const float>();
  for (int64_t l = 0; l < config_.num_layers; ++l) {
    for (int m = 0; m < kNumLinearModules; ++m) {
      CudaLoraModule& mod = copy->layers[l][m];
      if (mod.rank == 0) continue;
      const int64_t in = LinearInFeatures(config_, static_cast<LinearModule>(m));
      mod.a = base + offsets[l][m];
      mod.b = mod.a + mod.rank * in;
      if (dora_at[l][m]) {
        const int64_t out = LinearOutFeatures(config_, static_cast<LinearModule>(m));
        mod.dora_scale = mod.b + out * mod.rank;
      }
    }
  }
  copy->last_step = step;
  *uploaded = true;
  const CudaAdapterCopy* result = copy.get();
  copies_.emplace(key, std::move(copy));
  return result;
}

bool CudaAdapterSlots::EvictOne(uint64_t step) {
  auto victim = copies_.end();
  for (auto it = copies_.begin(); it != copies_.end(); ++it) {
    if (it->second->last_step == step) continue;
    if (victim == copies_.end() || it->second->last_step < victim->second->last_step) victim = it;
  }
  if (victim == copies_.end()) return false;
  copies_.erase(victim);
  return true;
}

void CudaAdapterSlots::ReleaseStaging() {
  for (auto& [key, copy] : copies_) {
    if (!copy->staging.empty()) std::vector<float>().swap(copy->staging);
  }
}

int64_t CudaAdapterSlots::device_bytes() const {
  int64_t total = 0;
  for (const auto& [key, copy] : copies_) total += copy->bytes;
  return total;
}

}  // namespace loraplex::model
