// Multi-adapter LoRA ops: one batch, many adapters, the low-rank delta of each token's own adapter.
//
//   shrink:  v[t, :]  = A_j x[t]          A_j [r, in]   (one pass over x for up to 3 fused slices)
//   expand:  y[t, :] += B_j v[t, :]       B_j [out, r]  (the LoRA scale is already folded into B)
//
// where j is the token's adapter index into the batch's adapter list, or -1 for none (the token's
// rows of v and y are then not touched). Two ways of saying which token uses which adapter:
// - SGMV ("segmented gather matrix-vector"), for prefill: runs of consecutive tokens that share an
//   adapter form segments; each segment is one small GEMM with good weight reuse.
// - BGMV ("batched gather matrix-vector"), for decode: an adapter index per token.
// The names follow punica/vLLM (shrink/expand, sgmv/bgmv).
//
// Fused slices: a linear whose outputs are the concatenation of several modules (q, k, v) passes
// num_slices > 1. Slice s of adapter j has its own A [r_js, in] and B [out_s, r_js]; r_js = 0 (a
// view with rows == 0) when adapter j does not target that module. The shrink reads each x row once
// for all slices; v[t] holds the slices' ranks packed: slice 0's r_j0 values, then slice 1's, ...
// so v_stride must be >= max_j sum_s r_js. Expand writes slice s into its own output (pointer +
// row stride), so q, k, v may live in one fused buffer at column offsets or in separate buffers.
//
// Shapes are runtime values (any rank >= 1, any sizes); weights are f32 or bf16 (per view),
// accumulation is f32. Shapes that do not fit are programmer errors (LP_CHECK). x, v and y must not
// alias. Thread-safety: like kernels.h, the fast ops run on ThreadPool::Default(); call them from
// one thread at a time per output.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"

namespace loraplex::kernels {

inline constexpr int kMaxLoraSlices = 3;

// The LoRA weights of the batch's adapters for one (possibly fused) linear layer. Not owned.
struct LoraSliceWeights {
  int64_t num_adapters = 0;
  int64_t num_slices = 1;  // 1..kMaxLoraSlices
  // [num_adapters * num_slices], adapter j slice s at j * num_slices + s. a.rows == b.cols == r_js,
  // a.cols == in features (same for all), b.rows == out_s (same for all adapters of slice s).
  // A view with rows == 0 (a) / cols == 0 (b) means "slice not targeted by this adapter".
  const WeightView* a = nullptr;
  const WeightView* b = nullptr;
};

// Where expand adds slice s: y[s].data + t * y[s].stride + o, for o < out_s.
struct LoraOutput {
  float* data = nullptr;
  int64_t stride = 0;
};

// Segments for SGMV: segment i covers tokens [starts[i], starts[i+1]) and uses adapter
// adapter[i] (-1 = none). starts has num_segments + 1 ascending entries; empty segments are
// allowed.
struct LoraSegments {
  int64_t num_segments = 0;
  const int64_t* starts = nullptr;
  const int32_t* adapter = nullptr;
};

// x [num_tokens, in] with row stride x_stride; v [num_tokens, >= sum of ranks] with row stride
// v_stride. Only rows of tokens that have an adapter are written.
void SgmvShrink(float* v, int64_t v_stride, const float* x, int64_t x_stride,
                const LoraSegments& segments, const LoraSliceWeights& w);
// y[s] rows of tokens that have an adapter get += B v. `y` has w.num_slices entries.
void SgmvExpand(const LoraOutput* y, const float* v, int64_t v_stride, const LoraSegments& segments,
                const LoraSliceWeights& w);

// token_adapter [num_tokens]: adapter index per token, -1 = none.
void BgmvShrink(float* v, int64_t v_stride, const float* x, int64_t x_stride,
                const int32_t* token_adapter, int64_t num_tokens, const LoraSliceWeights& w);
void BgmvExpand(const LoraOutput* y, const float* v, int64_t v_stride, const int32_t* token_adapter,
                int64_t num_tokens, const LoraSliceWeights& w);

// Both in one call: y[s] rows of tokens that have an adapter get += B (A x), or -= when `negate`
// (v negated between the two, as a caller of the two ops would). The same bits as the two ops in
// turn where every adapter has fewer than 16 tokens (to the last bit otherwise only within the
// kernels' tolerance: the GEMMs of adapters with more run in another order). The fast version
// fuses them when the call has at least max(8, 2 x threads) tasks (an adapter of few tokens, or
// 32 tokens of one of many): one parallel region whose tasks shrink into a v of their own and
// expand at once, with no serial packing between.
void SgmvShrinkExpand(const LoraOutput* y, const float* x, int64_t x_stride,
                      const LoraSegments& segments, const LoraSliceWeights& w, bool negate);
void BgmvShrinkExpand(const LoraOutput* y, const float* x, int64_t x_stride,
                      const int32_t* token_adapter, int64_t num_tokens, const LoraSliceWeights& w,
                      bool negate);
// How many ShrinkExpand calls took the fused path in this process (tests check they cover it).
int64_t LoraFusedCallsForTesting();

// Packed offset of slice s in v for adapter j (sum of the ranks of slices before s), and the total.
int64_t LoraSliceOffset(const LoraSliceWeights& w, int64_t adapter, int64_t slice);
int64_t LoraTotalRank(const LoraSliceWeights& w, int64_t adapter);

// Which fast path the LoRA ops dispatch to ("avx2" or "scalar").
const char* LoraKernelIsa();
// Forces the portable scalar micro-kernel even on AVX2 machines (tests and benchmarks use it to
// cover the fallback). Process-wide; do not flip it while an op runs.
void SetLoraForceScalar(bool force);

// The readable twins: plain loops, same contract.
namespace ref {
void SgmvShrink(float* v, int64_t v_stride, const float* x, int64_t x_stride,
                const LoraSegments& segments, const LoraSliceWeights& w);
void SgmvExpand(const LoraOutput* y, const float* v, int64_t v_stride, const LoraSegments& segments,
                const LoraSliceWeights& w);
void BgmvShrink(float* v, int64_t v_stride, const float* x, int64_t x_stride,
                const int32_t* token_adapter, int64_t num_tokens, const LoraSliceWeights& w);
void BgmvExpand(const LoraOutput* y, const float* v, int64_t v_stride, const int32_t* token_adapter,
                int64_t num_tokens, const LoraSliceWeights& w);
void SgmvShrinkExpand(const LoraOutput* y, const float* x, int64_t x_stride,
                      const LoraSegments& segments, const LoraSliceWeights& w, bool negate);
void BgmvShrinkExpand(const LoraOutput* y, const float* x, int64_t x_stride,
                      const int32_t* token_adapter, int64_t num_tokens, const LoraSliceWeights& w,
                      bool negate);
}  // namespace ref

}  // namespace loraplex::kernels
