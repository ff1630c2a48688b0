// RmsNorm on CUDA: one thread block per row. Each thread sums the squares of a strided slice of the
// row in f32, the block reduces them (warp shuffles, then one value per warp in shared memory), and
// every thread scales its slice. Rows of any length work; the row is read twice (the second read
// usually hits L2 for hidden sizes of a few thousand).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/launch.h"

namespace loraplex::kernels::cuda::internal {
namespace {

constexpr int kThreads = 256;

// Sum of v over the block; every thread gets the result.
__device__ float BlockSum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  __shared__ float total;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kThreads / 32 ? warp_sums[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    RmsNormKernel(T* out, const T* x, const T* weight, int64_t dim, float eps) {
  const T* xr = x + blockIdx.x * dim;
  T* o = out + blockIdx.x * dim;
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    const float v = ToF32(xr[i]);
    sum_sq += v * v;
  }
  sum_sq = BlockSum(sum_sq);
  // 1/sqrtf (correctly rounded division and sqrt) rather than rsqrtf, to stay close to the CPU
  // reference: the cost is once per row.
  const float inv_rms = 1.0f / sqrtf(sum_sq / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    o[i] = FromF32<T>(ToF32(xr[i]) * inv_rms * ToF32(weight[i]));
  }
}

// The residual add fused into the norm that follows it (every layer has two): x += residual,
// rounded to T as a separate CudaAdd would, then out = RmsNorm(x). Saves a launch and a pass over
// x. Each thread re-reads in the second loop exactly the elements it wrote in the first, so no
// barrier is needed between them, and out may alias x.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    AddRmsNormKernel(T* out, T* x, const T* residual, const T* weight, int64_t dim, float eps) {
  T* xr = x + blockIdx.x * dim;
  const T* rr = residual + blockIdx.x * dim;
  T* o = out + blockIdx.x * dim;
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    const T sum = FromF32<T>(ToF32(xr[i]) + ToF32(rr[i]));
    xr[i] = sum;
    const float v = ToF32(sum);
    sum_sq += v * v;
  }
  sum_sq = BlockSum(sum_sq);
  const float inv_rms = 1.0f / sqrtf(sum_sq / static_cast<float>(dim) + eps);
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) {
    o[i] = FromF32<T>(ToF32(xr[i]) * inv_rms * ToF32(weight[i]));
  }
}

template <typename T>
cudaError_t Launch(T* out, const T* x, const T* weight, int64_t rows, int64_t dim, float eps,
                   cudaStream_t stream) {
  if (rows == 0 || dim == 0) return cudaSuccess;
  // gridDim.x allows 2^31 - 1 rows, far more than any batch.
  RmsNormKernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(out, x, weight, dim, eps);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchAddRmsNorm(void* out, void* x, const void* residual, const void* weight,
                             DType dtype, int64_t rows, int64_t dim, float eps,
                             cudaStream_t stream) {
  if (rows == 0 || dim == 0) return cudaSuccess;
  return DispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    AddRmsNormKernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        static_cast<T*>(out), static_cast<T*>(x), static_cast<const T*>(residual),
        static_cast<const T*>(weight), dim, eps);
    return cudaGetLastError();
  });
}

cudaError_t LaunchRmsNormF32(float* out, const float* x, const float* weight, int64_t rows,
                             int64_t dim, float eps, cudaStream_t stream) {
  return Launch(out, x, weight, rows, dim, eps, stream);
}

cudaError_t LaunchRmsNormBf16(uint16_t* out, const uint16_t* x, const uint16_t* weight,
                              int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
  return Launch(reinterpret_cast<__nv_bfloat16*>(out), reinterpret_cast<const __nv_bfloat16*>(x),
                reinterpret_cast<const __nv_bfloat16*>(weight), rows, dim, eps, stream);
}

}  // namespace loraplex::kernels::cuda::internal
