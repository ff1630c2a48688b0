// Internal to the .cu files of kernels/cuda/: the ONE place where runtime values become template
// constants, and the small device helpers every kernel shares.
//
// Dispatched values (everything else stays a runtime argument):
// - DType -> element type: kF32 -> float, kBF16 -> __nv_bfloat16.
// - head_dim -> elements per lane of a warp that holds one head: ceil(head_dim / 32) rounded up to
//   1, 2, 4 or 8, i.e. head_dim <= 256. Larger heads are refused by the host wrapper
//   (INVALID_ARGUMENT naming head_dim) before a launch is attempted; a miss here returns
//   cudaErrorInvalidValue.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <type_traits>

#include "kernels/kernels.h"

namespace loraplex::kernels::cuda::internal {

inline constexpr int kMaxHeadDim = 256;

// f(tag) with tag a value of the element type of `dtype`; returns f's cudaError_t.
template <typename F>
cudaError_t DispatchDType(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kF32:
      return f(float{});
    case DType::kBF16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

// f(std::integral_constant<int, N>) with N elements per lane, N * 32 >= head_dim.
template <typename F>
cudaError_t DispatchHeadDim(int64_t head_dim, F&& f) {
  if (head_dim <= 32) return f(std::integral_constant<int, 1>{});
  if (head_dim <= 64) return f(std::integral_constant<int, 2>{});
  if (head_dim <= 128) return f(std::integral_constant<int, 4>{});
  if (head_dim <= kMaxHeadDim) return f(std::integral_constant<int, 8>{});
  return cudaErrorInvalidValue;
}

__device__ __forceinline__ float ToF32(float v) { return v; }
__device__ __forceinline__ float ToF32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T FromF32(float v);
template <>
__device__ __forceinline__ float FromF32<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __nv_bfloat16 FromF32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// Sum over the 32 lanes of a warp; every lane gets the result.
__device__ __forceinline__ float WarpSum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Blocks of `threads` over n elements, capped so that gridDim.x stays in range; kernels loop with
// a grid stride.
inline unsigned GridFor(int64_t n, int threads) {
  int64_t blocks = (n + threads - 1) / threads;
  if (blocks > 65535 * 16) blocks = 65535 * 16;
  return static_cast<unsigned>(blocks < 1 ? 1 : blocks);
}

}  // namespace loraplex::kernels::cuda::internal
