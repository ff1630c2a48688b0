// Internal to kernels/cuda/: the host-side launchers defined in the .cu files. They return the raw
// cudaError_t of the launch so that the .cu files need no Abseil (nvcc never sees absl headers);
// device.cc turns them into absl::Status. Arguments are validated by the caller (device.cc).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "kernels/cuda/cuda_types.h"
#include "kernels/kernels.h"

namespace loraplex::kernels::cuda::internal {

cudaError_t LaunchRmsNormF32(float* out, const float* x, const float* weight, int64_t rows,
                             int64_t dim, float eps, cudaStream_t stream);
// bf16 tensors as uint16_t bit patterns.
cudaError_t LaunchRmsNormBf16(uint16_t* out, const uint16_t* x, const uint16_t* weight,
                              int64_t rows, int64_t dim, float eps, cudaStream_t stream);

// x += residual, then out = RmsNorm(x) (rmsnorm.cu); all of dtype.
cudaError_t LaunchAddRmsNorm(void* out, void* x, const void* residual, const void* weight,
                             DType dtype, int64_t rows, int64_t dim, float eps,
                             cudaStream_t stream);

// elementwise.cu. Activations of `dtype` (f32, or bf16 as uint16_t bits).
cudaError_t LaunchConvert(void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n,
                          cudaStream_t stream);
cudaError_t LaunchAdd(void* y, const void* x, DType dtype, int64_t n, cudaStream_t stream);
cudaError_t LaunchSiluMul(void* out, const void* gate, const void* up, DType dtype, int64_t n,
                          cudaStream_t stream);
cudaError_t LaunchRope(void* x, DType dtype, const int32_t* positions, int64_t tokens,
                       int64_t heads, int64_t head_dim, const float* inv_freq, cudaStream_t stream);
cudaError_t LaunchEmbed(void* out, DType out_dtype, const int32_t* ids, int64_t n,
                        const void* table, DType table_dtype, int64_t rows, int64_t cols,
                        cudaStream_t stream);

// attention.cu. batch's pointers are device pointers.
cudaError_t LaunchWriteKv(void* k_cache, void* v_cache, DType cache_dtype, const void* k,
                          const void* v, DType act_dtype, const AttentionBatch& batch,
                          const KvLayout& layout, cudaStream_t stream);
cudaError_t LaunchPagedAttention(void* out, const void* q, DType act_dtype, const void* k_cache,
                                 const void* v_cache, DType cache_dtype,
                                 const AttentionBatch& batch, const KvLayout& layout,
                                 int64_t n_heads, float scale, int64_t sliding_window,
                                 cudaStream_t stream);

// lora.cu. Exactly one of token_adapter (BGMV) and segments (SGMV, when token_adapter is null)
// says which adapter each of the num_tokens tokens uses. x and y have dtype act_dtype.
cudaError_t LaunchLoraShrink(float* v, int64_t v_stride, const void* x, DType act_dtype,
                             int64_t x_stride, int64_t num_tokens, const int32_t* token_adapter,
                             const CudaLoraSegments& segments, const CudaLoraWeights& w,
                             cudaStream_t stream);
cudaError_t LaunchLoraExpand(const CudaLoraOutput* y, DType act_dtype, const float* v,
                             int64_t v_stride, int64_t num_tokens, const int32_t* token_adapter,
                             const CudaLoraSegments& segments, const CudaLoraWeights& w,
                             cudaStream_t stream);
// DoRA: y[s][t, :] *= the scales of token t's adapter for slice s (cuda_lora.h CudaLoraScaleRows).
cudaError_t LaunchLoraScaleRows(const CudaLoraOutput* y, DType act_dtype,
                                const int32_t* token_adapter, int64_t num_tokens,
                                const CudaLoraRowScales& scales, cudaStream_t stream);

// sampling.cu. logprobs may be null.
cudaError_t LaunchTopK(int32_t* ids, float* values, float* logprobs, const void* logits,
                       DType dtype, int64_t rows, int64_t vocab, int64_t k, cudaStream_t stream);

}  // namespace loraplex::kernels::cuda::internal
