// Greedy argmax and top-k over logits on the device, so that sampling copies k (id, logit,
// logprob) triples per row to the host instead of the whole vocabulary.
//
// One thread block per row. The order is total and deterministic: a before b when a's logit is
// larger, or equal with a smaller id (NaN counts as -inf). Selection i finds the first element
// after selection i - 1 in that order with one block-wide arg-max pass, so top-k costs k passes
// over the row: k <= kCudaMaxTopK keeps that cheap next to the lm_head GEMM that produced the row.
// Log-probs are logit - logsumexp(row), with the sum taken after subtracting the row max.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/launch.h"

namespace loraplex::kernels::cuda::internal {
namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

struct Candidate {
  float value;
  int32_t id;  // -1 = none
};

// a comes before b in the selection order.
__device__ __forceinline__ bool Before(const Candidate& a, const Candidate& b) {
  if (a.id < 0) return false;
  if (b.id < 0) return true;
  return a.value > b.value || (a.value == b.value && a.id < b.id);
}

__device__ __forceinline__ float Logit(float v) { return v != v ? -INFINITY : v; }

__device__ Candidate WarpBest(Candidate c) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    Candidate other{__shfl_xor_sync(0xffffffffu, c.value, offset),
                    __shfl_xor_sync(0xffffffffu, c.id, offset)};
    if (Before(other, c)) c = other;
  }
  return c;
}

// Block-wide best; every thread gets it. `scratch` holds kWarps candidates.
__device__ Candidate BlockBest(Candidate c, Candidate* scratch) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  c = WarpBest(c);
  if (lane == 0) scratch[warp] = c;
  __syncthreads();
  Candidate best = scratch[0];
  for (int w = 1; w < kWarps; ++w) {
    if (Before(scratch[w], best)) best = scratch[w];
  }
  __syncthreads();  // scratch is reused by the next call
  return best;
}

__device__ float BlockReduce(float v, float* scratch, bool is_max) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  for (int offset = 16; offset > 0; offset >>= 1) {
    const float other = __shfl_xor_sync(0xffffffffu, v, offset);
    v = is_max ? fmaxf(v, other) : v + other;
  }
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float r = scratch[0];
  for (int w = 1; w < kWarps; ++w) r = is_max ? fmaxf(r, scratch[w]) : r + scratch[w];
  __syncthreads();
  return r;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) TopKKernel(int32_t* ids, float* values, float* logprobs,
                                                       const T* logits, int64_t vocab, int64_t k) {
  __shared__ Candidate s_best[kWarps];
  __shared__ float s_sum[kWarps];
  const T* row = logits + blockIdx.x * vocab;
  float log_denom = 0.0f;
  if (logprobs != nullptr) {
    float m = -INFINITY;
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) m = fmaxf(m, Logit(ToF32(row[i])));
    m = BlockReduce(m, s_sum, /*is_max=*/true);
    float sum = 0.0f;
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) sum += expf(Logit(ToF32(row[i])) - m);
    sum = BlockReduce(sum, s_sum, /*is_max=*/false);
    log_denom = m + logf(sum);
  }
  Candidate prev{INFINITY, -1};  // nothing selected yet: every element comes after it
  for (int64_t sel = 0; sel < k; ++sel) {
    Candidate best{0.0f, -1};
    for (int64_t i = threadIdx.x; i < vocab; i += kThreads) {
      const Candidate c{Logit(ToF32(row[i])), static_cast<int32_t>(i)};
      const bool after_prev = prev.id < 0 || Before(prev, c);
      if (after_prev && Before(c, best)) best = c;
    }
    best = BlockBest(best, s_best);
    if (threadIdx.x == 0) {
      const int64_t out = blockIdx.x * k + sel;
      ids[out] = best.id;
      values[out] = best.value;
      if (logprobs != nullptr) logprobs[out] = best.value - log_denom;
    }
    prev = best;
  }
}

}  // namespace

cudaError_t LaunchTopK(int32_t* ids, float* values, float* logprobs, const void* logits,
                       DType dtype, int64_t rows, int64_t vocab, int64_t k, cudaStream_t stream) {
  if (rows == 0 || k == 0) return cudaSuccess;
  return DispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    TopKKernel<T><<<static_cast<unsigned>(rows), kThreads, 0, stream>>>(
        ids, values, logprobs, static_cast<const T*>(logits), vocab, k);
    return cudaGetLastError();
  });
}

}  // namespace loraplex::kernels::cuda::internal
