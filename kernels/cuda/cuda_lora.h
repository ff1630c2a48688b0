// The multi-adapter LoRA ops of kernels/lora.h on CUDA: SGMV (segments, prefill) and BGMV (an
// adapter index per token, decode), shrink v = A_j x and expand y += B_j v (scale folded into B),
// and DoRA's per-row rescale of each token's outputs by its adapter's scales.
// Plain C++ (no CUDA headers); pointers named d_* are device pointers, `stream` a cudaStream_t as
// void* (nullptr = legacy default stream). Launches are asynchronous (see cuda_kernels.h).
//
// Which adapter a token uses: BGMV's d_token_adapter [num_tokens], or SGMV's segments (tokens
// outside every segment have none). -1 means no adapter: that token's rows of v and y are left
// untouched. Indices live on the device, so the host cannot check them; an index outside
// [-1, w.num_adapters) is treated as -1 (never dereferenced).
//
// Weights: CudaLoraWeights (cuda_types.h) points at a device array of per-(adapter, slice) A/B
// pointers and ranks; nothing is specialised per rank or size. Ranks must be <= w.max_rank <=
// kCudaMaxLoraRank; v_offset and rank of every slice must fit v_stride (v_offset + rank <=
// v_stride), which the CUDA backend guarantees when it fills the array.
//
// dtypes: x and y (act_dtype) f32 or bf16; A and B (w.dtype) f32 or bf16; v is always f32 (it is
// tiny, and keeping it f32 avoids a second rounding between shrink and expand); sums in f32; y is
// read, added to, and rounded once. x, v and y must not alias.
//
// Errors (host-side checks only): INVALID_ARGUMENT naming the argument for negative sizes, null
// pointers with non-empty shapes, num_slices outside 1..kMaxLoraSlices, max_rank outside
// 1..kCudaMaxLoraRank, strides smaller than a row; INTERNAL/UNAVAILABLE for CUDA launch failures.
// Thread-safety: as cuda_kernels.h.
#pragma once

#include <cstdint>

#include "absl/status/status.h"
#include "kernels/cuda/cuda_types.h"
#include "kernels/kernels.h"

namespace loraplex::kernels::cuda {

// d_x [num_tokens, in] (row stride x_stride, act_dtype) -> d_v [num_tokens, v_stride] f32.
// SGMV: segments cover tokens of [0, num_tokens).
absl::Status CudaSgmvShrink(float* d_v, int64_t v_stride, const void* d_x, DType act_dtype,
                            int64_t x_stride, int64_t num_tokens, const CudaLoraSegments& segments,
                            const CudaLoraWeights& w, void* stream = nullptr);
// y[s] rows (w.num_slices entries, host array of device pointers + strides) += B v.
absl::Status CudaSgmvExpand(const CudaLoraOutput* y, DType act_dtype, const float* d_v,
                            int64_t v_stride, int64_t num_tokens, const CudaLoraSegments& segments,
                            const CudaLoraWeights& w, void* stream = nullptr);

absl::Status CudaBgmvShrink(float* d_v, int64_t v_stride, const void* d_x, DType act_dtype,
                            int64_t x_stride, const int32_t* d_token_adapter, int64_t num_tokens,
                            const CudaLoraWeights& w, void* stream = nullptr);
absl::Status CudaBgmvExpand(const CudaLoraOutput* y, DType act_dtype, const float* d_v,
                            int64_t v_stride, const int32_t* d_token_adapter, int64_t num_tokens,
                            const CudaLoraWeights& w, void* stream = nullptr);

// DoRA's per-row rescale (model/lora_apply.h ScaleDoraRows): for each token t whose adapter j =
// d_token_adapter[t] has a scale for slice s (scales.d_scales[j * num_slices + s] non-null),
// y[s][t, c] *= scale[c] for c in [0, scales.out_features[s]): one f32 product per element,
// rounded once to act_dtype. Tokens whose index is -1 (or outside [0, scales.num_adapters)) are
// left untouched. The CUDA backend calls it with g after a DoRA adapter's passes and with 1 / g
// before the unmerge pass of a merged DoRA adapter.
absl::Status CudaLoraScaleRows(const CudaLoraOutput* y, DType act_dtype,
                               const int32_t* d_token_adapter, int64_t num_tokens,
                               const CudaLoraRowScales& scales, void* stream = nullptr);

}  // namespace loraplex::kernels::cuda
