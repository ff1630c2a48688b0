#include "adapters/lora_mix.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "adapters/lora_adapter.h"
#include "common/half.h"
#include "model/lora_plan.h"

namespace loraplex::adapters {

absl::StatusOr<std::unique_ptr<LoraMix>> LoraMix::Build(const std::vector<MixPart>& parts,
                                                        const model::LlamaConfig& config,
                                                        int64_t max_rank) {
  if (parts.empty() || parts.size() > kMaxMixParts) {
    return absl::InvalidArgumentError(
        absl::StrCat("a mix names 1 to ", kMaxMixParts, " adapters, got ", parts.size()));
  }
  bool have_dtype = false;
  kernels::DType dtype = kernels::DType::kF32;
  for (size_t i = 0; i < parts.size(); ++i) {
    const MixPart& p = parts[i];
    if (p.view == nullptr)
      return absl::InvalidArgumentError(absl::StrCat("mix part ", i, " is null"));
    if (!std::isfinite(p.weight)) {
      return absl::InvalidArgumentError(
          absl::StrCat("mix part ", i, ": weight ", p.weight, " is not finite"));
    }
    if (p.view->dora) {
      return absl::InvalidArgumentError(absl::StrCat(
          "mix part ", i,
          " is a DoRA adapter: its per-row magnitude rescales the whole output of a module, so it "
          "is not a delta that can be summed with others; serve it alone"));
    }
    if (static_cast<int64_t>(p.view->layers.size()) != config.num_layers) {
      return absl::InvalidArgumentError(absl::StrCat("mix part ", i, " has ", p.view->layers.size(),
                                                     " layers, the model ", config.num_layers));
    }
    for (const auto& layer : p.view->layers) {
      for (const model::LoraPair* pair : layer) {
        if (pair == nullptr) continue;
        if (have_dtype && (pair->a.dtype != dtype || pair->b.dtype != dtype)) {
          return absl::InvalidArgumentError("the mixed adapters differ in storage dtype");
        }
        have_dtype = true;
        dtype = pair->a.dtype;
        if (pair->b.dtype != dtype ||
            (dtype != kernels::DType::kF32 && dtype != kernels::DType::kBF16)) {
          return absl::InvalidArgumentError("a mixed adapter is neither f32 nor bf16");
        }
      }
    }
  }
  const int64_t elem = dtype == kernels::DType::kF32 ? 4 : 2;

  // Ranks first, then one allocation (as LoraAdapter does).
  std::vector<std::array<int64_t, model::kNumLinearModules>> ranks(config.num_layers);
  auto mix = std::unique_ptr<LoraMix>(new LoraMix());
  for (int64_t l = 0; l < config.num_layers; ++l) {
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      const auto kind = static_cast<model::LinearModule>(m);
      const int64_t in = model::LinearInFeatures(config, kind);
      const int64_t out = model::LinearOutFeatures(config, kind);
      int64_t r = 0;
      for (const MixPart& p : parts) {
        const model::LoraPair* pair = p.view->layers[l][m];
        if (pair == nullptr) continue;
        if (pair->a.rows != pair->rank || pair->a.cols != in || pair->b.rows != out ||
            pair->b.cols != pair->rank) {
          return absl::InvalidArgumentError(
              absl::StrCat(ModuleKey(l, kind), ": a mixed adapter does not fit the model"));
        }
        r += pair->rank;
      }
      if (r > max_rank) {
        return absl::FailedPreconditionError(
            absl::StrCat(ModuleKey(l, kind), ": the mix's summed rank ", r,
                         " exceeds the maximum LoRA rank ", max_rank, " (--max-lora-rank)"));
      }
      ranks[l][m] = r;
      mix->max_rank_ = std::max(mix->max_rank_, r);
    }
  }
  if (mix->max_rank_ == 0) {
    return absl::FailedPreconditionError("no adapter of the mix touches any module");
  }
  // A and B in the order a decode step reads them (model::LoraStorageKey), as LoraAdapter does;
  // slots in the order of the loop below, each module's A then its B.
  std::vector<model::LoraMatrixSlot> slots;
  for (int64_t l = 0; l < config.num_layers; ++l) {
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      const int64_t r = ranks[l][m];
      if (r == 0) continue;
      const auto kind = static_cast<model::LinearModule>(m);
      slots.push_back({model::LoraStorageKey(l, kind, false),
                       r * model::LinearInFeatures(config, kind) * elem});
      slots.push_back({model::LoraStorageKey(l, kind, true),
                       model::LinearOutFeatures(config, kind) * r * elem});
    }
  }
  int64_t storage_bytes = 0;
  const std::vector<int64_t> offset = model::PlaceLoraMatrices(slots, &storage_bytes);
  mix->storage_.reset(new uint8_t[storage_bytes]);
  uint8_t* const storage = mix->storage_.get();
  size_t slot = 0;
  mix->view_.layers.assign(config.num_layers, {});
  for (int64_t l = 0; l < config.num_layers; ++l) {
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      const int64_t r = ranks[l][m];
      if (r == 0) continue;
      const auto kind = static_cast<model::LinearModule>(m);
      const int64_t in = model::LinearInFeatures(config, kind);
      const int64_t out = model::LinearOutFeatures(config, kind);
      uint8_t* a = storage + offset[slot++];
      uint8_t* b = storage + offset[slot++];
      int64_t col = 0;  // first row of A, column of B, of the current part
      for (const MixPart& p : parts) {
        const model::LoraPair* pair = p.view->layers[l][m];
        if (pair == nullptr) continue;
        const int64_t pr = pair->rank;
        std::memcpy(a + col * in * elem, pair->a.data, pr * in * elem);
        for (int64_t o = 0; o < out; ++o) {
          for (int64_t k = 0; k < pr; ++k) {
            const int64_t src = o * pr + k, dst = o * r + col + k;
            if (dtype == kernels::DType::kF32) {
              reinterpret_cast<float*>(b)[dst] =
                  p.weight * static_cast<const float*>(pair->b.data)[src];
            } else {
              reinterpret_cast<uint16_t*>(b)[dst] =
                  F32ToBf16(p.weight * Bf16ToF32(static_cast<const uint16_t*>(pair->b.data)[src]));
            }
          }
        }
        col += pr;
      }
      auto pair = std::make_unique<model::LoraPair>();
      pair->rank = r;
      pair->a = {dtype, a, r, in};
      pair->b = {dtype, b, out, r};
      mix->bytes_ += (r * in + out * r) * elem;
      mix->view_.layers[l][m] = pair.get();
      mix->pairs_.push_back(std::move(pair));
    }
  }
  return mix;
}

}  // namespace loraplex::adapters
