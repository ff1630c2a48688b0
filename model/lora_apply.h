// LoRA in the forward pass: after a base linear y = W x, adds to every token's row the delta of the
// token's own adapter, y[t] += s_j B_j (A_j x[t]), with the batched multi-adapter kernels
// (kernels/lora.h). Modules that read the same x (q, k, v; or gate, up) go in one call so the
// shrink reads each x row once for all of them.
//
// Mixed mode (DESIGN.md section 3): while adapter M is merged into W, a token of M gets nothing
// (its delta is in W), and every other token, base-model ones included, also gets -s_M B_M A_M x.
//
// Grouping: when consecutive tokens share an adapter (prefill chunks) the tokens go to SGMV as
// segments; when runs are short (decode, one token per sequence) to BGMV. Both give the same bits.
//
// Where the forward pass calls it (model/llama_model.cc), per layer l, after the base GEMMs:
//   q,k,v:    ApplyLora({kQ, kK, kV}, l, x_normed, hidden, {q, k, v outputs}, batch, merged_, &s)
//   o:        ApplyLora({kO}, l, attn_out, q_dim, {o output}, ...)
//   gate,up:  ApplyLora({kGate, kUp}, l, x_normed, hidden, {gate, up outputs}, ...)
//   down:     ApplyLora({kDown}, l, act, intermediate, {down output}, ...)
// It returns at once when no token has an adapter and nothing is merged.
//
// Thread-safety: like the kernels; one caller per scratch.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <vector>

#include "kernels/kernels.h"
#include "kernels/lora.h"
#include "model/llama_model.h"

namespace loraplex::model {

// Reused buffers, so a step allocates nothing once warm. Owned by the caller (one per model).
struct LoraScratch {
  std::vector<float> v;
  std::vector<kernels::WeightView> a, b;
  std::vector<int32_t> token_adapter;
  std::vector<int64_t> starts;
  std::vector<int32_t> seg_adapter;
};

// x: [batch.num_tokens(), in] with row stride x_stride (in = the modules' common input size).
// y[i]: where module modules[i] adds its output for token 0, with its row stride.
// batch.adapter_slot (empty = all base) and batch.adapters say each token's adapter; `merged` is
// the adapter merged into W, or null. 1..kernels::kMaxLoraSlices modules.
void ApplyLora(std::initializer_list<LinearModule> modules, int64_t layer, const float* x,
               int64_t x_stride, std::initializer_list<kernels::LoraOutput> y,
               const ForwardBatch& batch, const LoraWeightsView* merged, LoraScratch* scratch);

// The same with arrays (modules[i] -> y[i], i < num_modules).
void ApplyLora(const LinearModule* modules, int num_modules, int64_t layer, const float* x,
               int64_t x_stride, const kernels::LoraOutput* y, const ForwardBatch& batch,
               const LoraWeightsView* merged, LoraScratch* scratch);

}  // namespace loraplex::model
