// Paged attention on CUDA over the cache layout of kernels/kernels.h: per layer two pools K and V,
// [num_blocks, block_size, n_kv_heads, head_dim], f32 or bf16; a sequence's position p lives in
// block table[p / block_size], slot p % block_size.
//
// One kernel serves prefill and decode, because the contract is per token: token t attends to
// positions 0..token_pos[t] of its own sequence. One thread block of kWarps warps per (token, query
// head). A warp holds the head in registers (head_dim split over its 32 lanes, kPerLane each, the
// dispatch of dispatch.h), walks every kWarps-th position with an online softmax (running max m,
// denominator l, accumulator acc), and the warps' partial states are merged through shared memory
// at the end. Scores, softmax and accumulation are f32 whatever the storage dtype.
//
// This is the plain version: prefill re-reads K/V per query token from L2 instead of tiling queries
// (flash-attention style); GQA heads of one kv head re-read it too. Correct for any lengths; the
// tiled prefill is future work (docs/cuda.md).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/launch.h"

namespace loraplex::kernels::cuda::internal {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;

struct Layout {
  int64_t block_size, n_kv_heads, head_dim, max_blocks_per_seq;
};

__device__ __forceinline__ int64_t CacheOffset(const int32_t* table, int64_t pos, int64_t kv_head,
                                               const Layout& l) {
  const int64_t block = table[pos / l.block_size];
  const int64_t slot = pos % l.block_size;
  return ((block * l.block_size + slot) * l.n_kv_heads + kv_head) * l.head_dim;
}

// One thread per element of k and v [num_tokens, n_kv_heads, head_dim].
template <typename C, typename A>
__global__ void WriteKvKernel(C* k_cache, C* v_cache, const A* k, const A* v,
                              const int32_t* token_seq, const int32_t* token_pos,
                              const int32_t* block_tables, int64_t num_tokens, Layout l) {
  const int64_t per_token = l.n_kv_heads * l.head_dim;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < num_tokens * per_token;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = e / per_token;
    const int64_t h = (e % per_token) / l.head_dim;
    const int64_t i = e % l.head_dim;
    const int32_t* table = block_tables + token_seq[t] * l.max_blocks_per_seq;
    const int64_t dst = CacheOffset(table, token_pos[t], h, l) + i;
    k_cache[dst] = FromF32<C>(ToF32(k[e]));
    v_cache[dst] = FromF32<C>(ToF32(v[e]));
  }
}

template <typename A, typename C, int kPerLane>
__global__ void __launch_bounds__(kThreads)
    PagedAttentionKernel(A* out, const A* q, const C* k_cache, const C* v_cache,
                         const int32_t* token_seq, const int32_t* token_pos,
                         const int32_t* block_tables, Layout l, int64_t n_heads, float scale,
                         int64_t window) {
  const int64_t t = blockIdx.x;
  const int64_t h = blockIdx.y;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t hd = l.head_dim;
  const int64_t kv_head = h / (n_heads / l.n_kv_heads);
  const int32_t* table = block_tables + token_seq[t] * l.max_blocks_per_seq;
  const int64_t len = int64_t{token_pos[t]} + 1;
  // Sliding window W > 0: the last W positions (own included), as kernels::PagedAttention.
  const int64_t first = window > 0 && len > window ? len - window : 0;

  float qv[kPerLane];
  float acc[kPerLane];
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) {
    const int64_t i = lane + 32 * e;
    qv[e] = i < hd ? ToF32(q[(t * n_heads + h) * hd + i]) : 0.0f;
    acc[e] = 0.0f;
  }
  float m = -INFINITY;  // running max of this warp's scores
  float denom = 0.0f;   // running sum of exp(score - m)
  for (int64_t p = first + warp; p < len; p += kWarps) {
    const int64_t base = CacheOffset(table, p, kv_head, l);
    float dot = 0.0f;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int64_t i = lane + 32 * e;
      if (i < hd) dot += qv[e] * ToF32(k_cache[base + i]);
    }
    const float score = WarpSum(dot) * scale;
    const float m_new = fmaxf(m, score);
    const float correction = expf(m - m_new);  // 0 on the first position (m = -inf)
    const float weight = expf(score - m_new);
    denom = denom * correction + weight;
#pragma unroll
    for (int e = 0; e < kPerLane; ++e) {
      const int64_t i = lane + 32 * e;
      const float vv = i < hd ? ToF32(v_cache[base + i]) : 0.0f;
      acc[e] = acc[e] * correction + weight * vv;
    }
    m = m_new;
  }

  // Merge the warps: out = sum_w acc_w * exp(m_w - M) / sum_w denom_w * exp(m_w - M).
  __shared__ float s_m[kWarps];
  __shared__ float s_denom[kWarps];
  __shared__ float s_acc[kWarps][kPerLane * 32];
  if (lane == 0) {
    s_m[warp] = m;
    s_denom[warp] = denom;
  }
#pragma unroll
  for (int e = 0; e < kPerLane; ++e) s_acc[warp][lane + 32 * e] = acc[e];
  __syncthreads();
  float max_m = -INFINITY;
  for (int w = 0; w < kWarps; ++w) max_m = fmaxf(max_m, s_m[w]);
  float total = 0.0f;
  float factor[kWarps];
  for (int w = 0; w < kWarps; ++w) {
    // A warp that saw no position (fewer than kWarps positions) has m = -inf: contributes nothing.
    factor[w] = s_m[w] == -INFINITY ? 0.0f : expf(s_m[w] - max_m);
    total += s_denom[w] * factor[w];
  }
  A* o = out + (t * n_heads + h) * hd;
  for (int64_t i = threadIdx.x; i < hd; i += kThreads) {
    float sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) sum += s_acc[w][i] * factor[w];
    // len <= 0 (a position before the sequence start) has nothing to attend to: zeros, not NaN.
    o[i] = FromF32<A>(total > 0.0f ? sum / total : 0.0f);
  }
}

Layout ToLayout(const KvLayout& layout) {
  return Layout{layout.block_size, layout.n_kv_heads, layout.head_dim, layout.max_blocks_per_seq};
}

}  // namespace

cudaError_t LaunchWriteKv(void* k_cache, void* v_cache, DType cache_dtype, const void* k,
                          const void* v, DType act_dtype, const AttentionBatch& batch,
                          const KvLayout& layout, cudaStream_t stream) {
  const int64_t n = batch.num_tokens * layout.n_kv_heads * layout.head_dim;
  if (n == 0) return cudaSuccess;
  return DispatchDType(cache_dtype, [&](auto c) {
    return DispatchDType(act_dtype, [&](auto a) {
      using C = decltype(c);
      using A = decltype(a);
      WriteKvKernel<C, A><<<GridFor(n, 256), 256, 0, stream>>>(
          static_cast<C*>(k_cache), static_cast<C*>(v_cache), static_cast<const A*>(k),
          static_cast<const A*>(v), batch.token_seq, batch.token_pos, batch.block_tables,
          batch.num_tokens, ToLayout(layout));
      return cudaGetLastError();
    });
  });
}

cudaError_t LaunchPagedAttention(void* out, const void* q, DType act_dtype, const void* k_cache,
                                 const void* v_cache, DType cache_dtype,
                                 const AttentionBatch& batch, const KvLayout& layout,
                                 int64_t n_heads, float scale, int64_t sliding_window,
                                 cudaStream_t stream) {
  if (batch.num_tokens == 0 || n_heads == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(batch.num_tokens), static_cast<unsigned>(n_heads));
  return DispatchHeadDim(layout.head_dim, [&](auto per_lane) {
    return DispatchDType(act_dtype, [&](auto a) {
      return DispatchDType(cache_dtype, [&](auto c) {
        using A = decltype(a);
        using C = decltype(c);
        PagedAttentionKernel<A, C, decltype(per_lane)::value><<<grid, kThreads, 0, stream>>>(
            static_cast<A*>(out), static_cast<const A*>(q), static_cast<const C*>(k_cache),
            static_cast<const C*>(v_cache), batch.token_seq, batch.token_pos, batch.block_tables,
            ToLayout(layout), n_heads, scale, sliding_window);
        return cudaGetLastError();
      });
    });
  });
}

}  // namespace loraplex::kernels::cuda::internal
