// The LoRA work of one step, planned once from the batch (LlamaModel::Forward builds it after
// validating the batch) and read by both backends: the CPU's ApplyLora (model/lora_apply.h) and the
// CUDA model's metadata upload (model/cuda_model.cc). It holds everything about the batch that
// decides how LoRA deltas are applied; the weights of each pass are gathered by the backend per
// layer and module group.
//
// Passes. A step applies at most two shrink + expand passes after each group's base GEMMs:
// - own: every token takes the delta of its own adapter, y[t] += B_j (A_j x[t]); tokens of the
//   base model and tokens of the merged adapter (whose delta is already in W) take none;
// - unmerge (mixed mode, DESIGN.md section 3): while adapter M is merged into W, every token not of
//   M, base-model ones included, takes M's delta back out, y[t] -= B_M (A_M x[t]).
//
// Grouping. Within a pass, runs of consecutive tokens with the same adapter index (a run of -1
// included) are its segments. A pass goes to SGMV (segments) when the segments are long enough to
// reuse their weights over a few tokens (prefill chunks), else to BGMV (an index per token; decode,
// one token per sequence). Both give the same bits.
//
// Module groups. Modules that read the same input are applied together, so the shrink reads each
// input row once for all of them: q,k,v; o; gate,up; down (LoraGroup, in forward order).
//
// Thread-safety: a plan is built and read by the one thread that runs the step.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "kernels/lora.h"
#include "model/llama_model.h"

namespace loraplex::model {

// The module groups of a decoder block, in forward order.
enum class LoraGroup : int { kQkv = 0, kO = 1, kGateUp = 2, kDown = 3 };
inline constexpr int kNumLoraGroups = 4;

// The modules of one group; module i of the group is slice i of its fused LoRA application.
struct LoraModuleGroup {
  int num_modules = 0;
  LinearModule modules[kernels::kMaxLoraSlices] = {};
};

inline constexpr LoraModuleGroup kLoraModuleGroups[kNumLoraGroups] = {
    {3, {LinearModule::kQ, LinearModule::kK, LinearModule::kV}},
    {1, {LinearModule::kO}},
    {2, {LinearModule::kGate, LinearModule::kUp}},
    {1, {LinearModule::kDown}},
};

inline const LoraModuleGroup& ModulesOf(LoraGroup g) {
  return kLoraModuleGroups[static_cast<int>(g)];
}

// The group of module m.
inline LoraGroup LoraGroupOf(LinearModule m) {
  for (int g = 0; g < kNumLoraGroups; ++g) {
    for (int i = 0; i < kLoraModuleGroups[g].num_modules; ++i) {
      if (kLoraModuleGroups[g].modules[i] == m) return static_cast<LoraGroup>(g);
    }
  }
  return LoraGroup::kQkv;  // unreachable: every module is in a group
}

// Where an adapter's A and B matrices go in its one buffer (adapters/, and the benchmarks' random
// adapters): in ascending order of this key, that is per layer, per group, the group's A matrices
// and then its B matrices. It is the order in which one task of a decode step's fused shrink +
// expand reads an adapter (kernels/cpu/lora_fast.cc), so the task streams forward through one
// block of memory, and the micro-kernel's prefetch, running a fixed distance ahead, lands on the
// next matrix it reads instead of on one read later or not at all. From DRAM, one layer of 32
// q,k,v,o adapters takes 0.76x / 0.90x / 0.96x the time of A and B interleaved per module at rank
// 8 / 16 / 64 (lora_bench BM_LayerLora; docs/benchmarks.md).
inline int64_t LoraStorageKey(int64_t layer, LinearModule m, bool is_b) {
  const int64_t group = static_cast<int64_t>(LoraGroupOf(m));
  return ((layer * kNumLoraGroups + group) * 2 + (is_b ? 1 : 0)) * kNumLinearModules +
         static_cast<int64_t>(m);
}

// One matrix of an adapter's buffer: its LoraStorageKey and its bytes.
struct LoraMatrixSlot {
  int64_t key = 0;
  int64_t bytes = 0;
};

// Byte offsets of `slots` in one buffer laid out in LoraStorageKey order, each slot 64 bytes apart
// from the next (its bytes rounded up); returned in the order given. *total: the buffer's bytes.
inline std::vector<int64_t> PlaceLoraMatrices(const std::vector<LoraMatrixSlot>& slots,
                                              int64_t* total) {
  std::vector<size_t> order(slots.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::sort(order.begin(), order.end(),
            [&](size_t x, size_t y) { return slots[x].key < slots[y].key; });
  std::vector<int64_t> offset(slots.size());
  int64_t next = 0;
  for (size_t i : order) {
    offset[i] = next;
    next += (slots[i].bytes + 63) / 64 * 64;
  }
  *total = next;
  return offset;
}

// SGMV when num_tokens >= kSgmvMinTokensPerSegment * num_segments: segments pay off when each
// reuses its weights over a few tokens.
inline constexpr int64_t kSgmvMinTokensPerSegment = 4;
inline bool UseSgmv(int64_t num_tokens, int64_t num_segments) {
  return num_tokens >= kSgmvMinTokensPerSegment * num_segments;
}

// One shrink + expand pass over the batch. The arrays are meaningful only when `active`.
struct LoraPass {
  // The pass's adapter list; token_adapter and seg_adapter index into it.
  std::vector<const LoraWeightsView*> adapters;
  // [num_tokens]: the adapter each token takes in this pass, -1 = none.
  std::vector<int32_t> token_adapter;
  // Runs of equal token_adapter values: segment i covers tokens [starts[i], starts[i + 1]) and
  // takes adapter seg_adapter[i] (-1 = none). starts has num_segments + 1 entries, the last
  // num_tokens.
  std::vector<int64_t> starts;
  std::vector<int32_t> seg_adapter;
  bool active = false;  // at least one token takes an adapter
  bool sgmv = false;    // UseSgmv(num_tokens, num_segments()): segments, else an index per token
  bool negate = false;  // the delta is subtracted (the unmerge pass)

  int64_t num_segments() const { return static_cast<int64_t>(seg_adapter.size()); }
  kernels::LoraSegments segments() const {
    return {num_segments(), starts.data(), seg_adapter.data()};
  }
};

class LoraPlan {
 public:
  // Plans `batch` (already validated: token_adapter empty or one valid index per token) with
  // `merged` the adapter merged into the base weights, or null. Reuses the vectors' capacity, so a
  // warm plan allocates nothing.
  void Build(const ForwardBatch& batch, const LoraWeightsView* merged);

  int64_t num_tokens() const { return num_tokens_; }
  const LoraWeightsView* merged() const { return merged_; }
  // Each token's own adapter: adapters = the batch's, token_adapter = the batch's with the merged
  // adapter's tokens set to -1.
  const LoraPass& own() const { return own_; }
  // Mixed mode: adapters = {merged}, token_adapter 0 for every token not of the merged adapter and
  // -1 for its tokens; negate. Never active without a merged adapter.
  const LoraPass& unmerge() const { return unmerge_; }
  // No pass is active: the step applies no LoRA at all.
  bool empty() const { return !own_.active && !unmerge_.active; }

  // Host bytes the plan's vectors hold (part of the CPU model's scratch_bytes).
  int64_t capacity_bytes() const;

 private:
  int64_t num_tokens_ = 0;
  const LoraWeightsView* merged_ = nullptr;
  LoraPass own_, unmerge_;
};

}  // namespace loraplex::model
