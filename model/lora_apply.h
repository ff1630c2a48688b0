// LoRA in the CPU forward pass: after a group's base linears y = W x, adds to every token's row the
// deltas the step's LoraPlan (model/lora_plan.h) gives it, y[t] += s_j B_j (A_j x[t]) for its own
// adapter and, in mixed mode, y[t] -= s_M B_M (A_M x[t]) for the merged adapter M, with the batched
// multi-adapter kernels (kernels/lora.h). The modules of a group (q, k, v; o; gate, up; down) go in
// one call so the shrink reads each x row once for all of them. Each pass runs as SGMV or BGMV as
// the plan chose; both give the same bits.
//
// DoRA pairs (LoraPair::dora_scale) add a per-row rescale around the passes: a token of a DoRA
// adapter j ends with g_j (W x + B_j A_j x); while a DoRA adapter M is merged (W' = g_M (W + B_M
// A_M)), every other token first takes 1 / g_M, then the unmerge pass, then its own.
//
// Where the CPU forward pass calls it (model/cpu_backend.cc), per layer l, after the base GEMMs:
//   q,k,v:    ApplyLora(plan, LoraGroup::kQkv, l, x_normed, hidden, {q, k, v outputs}, &s)
//   o:        ApplyLora(plan, LoraGroup::kO, l, attn_out, q_dim, {o output}, &s)
//   gate,up:  ApplyLora(plan, LoraGroup::kGateUp, l, x_normed, hidden, {gate, up outputs}, &s)
//   down:     ApplyLora(plan, LoraGroup::kDown, l, act, intermediate, {down output}, &s)
// It returns at once when the plan is empty (no token takes a delta in this step).
//
// Thread-safety: like the kernels; one caller per scratch.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/lora.h"
#include "model/llama_model.h"
#include "model/lora_plan.h"

namespace loraplex::model {

// Reused buffers, so a step allocates nothing once warm. Owned by the caller (one per model).
struct LoraScratch {
  std::vector<kernels::WeightView> a, b;  // one pass's pairs for one layer and group
};

// x: [plan.num_tokens(), in] with row stride x_stride (in = the group's common input size).
// y[i]: where module i of the group (ModulesOf(group)) adds its output for token 0, with its row
// stride; ModulesOf(group).num_modules entries.
void ApplyLora(const LoraPlan& plan, LoraGroup group, int64_t layer, const float* x,
               int64_t x_stride, const kernels::LoraOutput* y, LoraScratch* scratch);

// The same with the outputs listed in place (one per module of the group).
void ApplyLora(const LoraPlan& plan, LoraGroup group, int64_t layer, const float* x,
               int64_t x_stride, std::initializer_list<kernels::LoraOutput> y,
               LoraScratch* scratch);

}  // namespace loraplex::model
