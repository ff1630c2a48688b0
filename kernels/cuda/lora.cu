// SGMV and BGMV (kernels/lora.h) on CUDA. Shrink v = A_j x and expand y += B_j v, where each
// token's adapter j comes from a per-token index (BGMV) or from the segment that contains it
// (SGMV, a binary search over the segment starts); the weight pointers and ranks of (j, slice) are
// gathered from the device array CudaLoraWeights::d_slices. Nothing about ranks or sizes is a
// compile-time value: the two dtypes (activations, weights) and the chunk length (SGMV or BGMV)
// are dispatched.
//
// Both ops cut the batch into chunks of consecutive tokens: 4 for SGMV, 1 for BGMV (decode: one
// adapter per token is common, so blocks per token give the parallelism, and the small weights are
// re-read from L2). Within a chunk, a run of tokens that share an adapter (the whole chunk, in
// prefill) is computed together, so each weight element is read once per run rather than once per
// token; that is the "segmented" reuse of SGMV. Tokens whose adapter is -1 (or outside
// [0, num_adapters), which the kernels treat the same way instead of reading through a bad
// pointer) are skipped: their rows of v and y are not touched.
//
// Shrink: a warp per (chunk, slice, row r of A): lanes stride over in_features (8 elements per
//   16-byte load when the rows are aligned, else one), f32 sums for the run's tokens, warp
//   reduction, v[t, v_offset + r] = sum.
// Expand: a thread per (chunk, slice, output o): the run's v rows are staged in shared memory, the
//   thread reads B row o (rank elements, 8 per load when aligned) once for the run and adds to
//   y[t, o] for each token.
// Row scale (DoRA): a thread per (token, slice, output column c): y[t, c] *= scale_j[c], the f32
//   product rounded once, as the CPU's ScaleDoraRows computes it.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/launch.h"

namespace loraplex::kernels::cuda::internal {
namespace {

// Tokens per chunk: SGMV (prefill, long runs of one adapter) reads each weight row once for 4
// tokens; BGMV (decode, often one adapter per token) gives each token its own blocks, since there
// is little to share and the parallelism matters more (its weights are small and stay in L2).
constexpr int kSgmvChunk = 4;
constexpr int kBgmvChunk = 1;
constexpr int kShrinkWarps = 8;
constexpr int kExpandThreads = 256;

// Which adapter a token uses: the BGMV index array, or the SGMV segment containing the token.
struct AdapterOf {
  const int32_t* token_adapter;  // BGMV when non-null
  const int64_t* starts;         // SGMV: num_segments + 1 ascending entries
  const int32_t* seg_adapter;
  int64_t num_segments;
  int64_t num_adapters;

  __device__ int32_t operator()(int64_t t) const {
    int32_t j = -1;
    if (token_adapter != nullptr) {
      j = token_adapter[t];
    } else if (num_segments > 0 && t >= starts[0] && t < starts[num_segments]) {
      // The last segment whose start is <= t contains t (empty segments before it have the same
      // start and lose to it).
      int64_t lo = 0, hi = num_segments - 1;
      while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (starts[mid] <= t) {
          lo = mid;
        } else {
          hi = mid - 1;
        }
      }
      j = seg_adapter[lo];
    }
    return (j >= 0 && j < num_adapters) ? j : -1;
  }
};

// The adapters of the chunk starting at t0; -1 past num_tokens.
template <int Chunk>
__device__ __forceinline__ void ChunkAdapters(const AdapterOf& adapter_of, int64_t t0,
                                              int64_t num_tokens, int32_t (&adapters)[Chunk]) {
#pragma unroll
  for (int u = 0; u < Chunk; ++u) adapters[u] = t0 + u < num_tokens ? adapter_of(t0 + u) : -1;
}

// Length of the run of equal adapters starting at u (>= 1).
template <int Chunk>
__device__ __forceinline__ int RunLength(const int32_t (&adapters)[Chunk], int u) {
  int n = 1;
  while (u + n < Chunk && adapters[u + n] == adapters[u]) ++n;
  return n;
}

template <typename T>
__device__ __forceinline__ bool Aligned16(const T* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

// 8 consecutive elements from a 16-byte aligned address, widened to f32: one 16-byte load for
// bf16, two for f32.
__device__ __forceinline__ void Load8(const float* p, float (&f)[8]) {
  const float4 lo = reinterpret_cast<const float4*>(p)[0];
  const float4 hi = reinterpret_cast<const float4*>(p)[1];
  f[0] = lo.x, f[1] = lo.y, f[2] = lo.z, f[3] = lo.w;
  f[4] = hi.x, f[5] = hi.y, f[6] = hi.z, f[7] = hi.w;
}
__device__ __forceinline__ void Load8(const __nv_bfloat16* p, float (&f)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __bfloat1622float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

template <typename X, typename W, int Chunk>
__global__ void __launch_bounds__(kShrinkWarps * 32)
    ShrinkKernel(float* v, int64_t v_stride, const X* x, int64_t x_stride, int64_t num_tokens,
                 AdapterOf adapter_of, const CudaLoraSlice* slices, int64_t num_slices,
                 int64_t in) {
  const int64_t t0 = int64_t{blockIdx.x} * Chunk;
  const int64_t s = blockIdx.y;
  const int lane = threadIdx.x % 32;
  const int64_t r = int64_t{blockIdx.z} * kShrinkWarps + threadIdx.x / 32;
  int32_t adapters[Chunk];
  ChunkAdapters<Chunk>(adapter_of, t0, num_tokens, adapters);
  for (int u = 0; u < Chunk;) {
    const int n = RunLength<Chunk>(adapters, u);
    const int32_t j = adapters[u];
    if (j >= 0) {
      const CudaLoraSlice slice = slices[j * num_slices + s];
      if (r < slice.rank) {
        const W* a = static_cast<const W*>(slice.a) + r * in;  // row r of A [rank, in]
        const X* xt = x + (t0 + u) * x_stride;
        float acc[Chunk] = {};
        // Warp-uniform: 8 elements per lane and load when every row read starts 16-byte aligned.
        if (in % 8 == 0 && x_stride % 8 == 0 && Aligned16(a) && Aligned16(xt)) {
          for (int64_t i = int64_t{lane} * 8; i < in; i += 32 * 8) {
            float av[8];
            Load8(a + i, av);
#pragma unroll
            for (int k = 0; k < Chunk; ++k) {
              if (k < n) {
                float xv[8];
                Load8(xt + k * x_stride + i, xv);
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[k] += av[e] * xv[e];
              }
            }
          }
        } else {
          for (int64_t i = lane; i < in; i += 32) {
            const float av = ToF32(a[i]);
#pragma unroll
            for (int k = 0; k < Chunk; ++k) {
              if (k < n) acc[k] += av * ToF32(xt[k * x_stride + i]);
            }
          }
        }
#pragma unroll
        for (int k = 0; k < Chunk; ++k) {
          const float sum = WarpSum(acc[k]);
          if (k < n && lane == 0) v[(t0 + u + k) * v_stride + slice.v_offset + r] = sum;
        }
      }
    }
    u += n;
  }
}

struct Outputs {
  CudaLoraOutput y[kMaxLoraSlices];
  int64_t out_features[kMaxLoraSlices];
};

template <typename Y, typename W, int Chunk>
__global__ void __launch_bounds__(kExpandThreads)
    ExpandKernel(Outputs outputs, const float* v, int64_t v_stride, int64_t num_tokens,
                 AdapterOf adapter_of, const CudaLoraSlice* slices, int64_t num_slices,
                 int64_t max_rank) {
  extern __shared__ float s_v[];  // [Chunk][max_rank]: the run's rows of v for this slice
  const int64_t t0 = int64_t{blockIdx.x} * Chunk;
  const int64_t s = blockIdx.y;
  const int64_t o = int64_t{blockIdx.z} * kExpandThreads + threadIdx.x;
  const int64_t out_features = outputs.out_features[s];
  int32_t adapters[Chunk];
  ChunkAdapters<Chunk>(adapter_of, t0, num_tokens, adapters);
  // Control flow up to each __syncthreads() depends only on block-uniform values (adapters, n,
  // rank), never on o, so every thread reaches every barrier.
  for (int u = 0; u < Chunk;) {
    const int n = RunLength<Chunk>(adapters, u);
    const int32_t j = adapters[u];
    if (j >= 0) {
      const CudaLoraSlice slice = slices[j * num_slices + s];
      const int64_t rank = slice.rank < max_rank ? slice.rank : max_rank;
      if (rank > 0) {
        for (int64_t e = threadIdx.x; e < n * rank; e += kExpandThreads) {
          const int64_t k = e / rank;
          s_v[k * max_rank + e % rank] = v[(t0 + u + k) * v_stride + slice.v_offset + e % rank];
        }
        __syncthreads();
        if (o < out_features) {
          const W* b = static_cast<const W*>(slice.b) + o * slice.rank;  // row o of B [out, rank]
          float acc[Chunk] = {};
          int64_t c = 0;
          if (Aligned16(b)) {  // 8 elements per load while they last
            for (; c + 8 <= rank; c += 8) {
              float bv[8];
              Load8(b + c, bv);
#pragma unroll
              for (int k = 0; k < Chunk; ++k) {
                const float* sv = s_v + (k < n ? k : 0) * max_rank + c;
#pragma unroll
                for (int e = 0; e < 8; ++e) acc[k] += bv[e] * sv[e];
              }
            }
          }
          for (; c < rank; ++c) {
            const float bv = ToF32(b[c]);
#pragma unroll
            for (int k = 0; k < Chunk; ++k) acc[k] += bv * s_v[(k < n ? k : 0) * max_rank + c];
          }
          Y* y = static_cast<Y*>(outputs.y[s].data);
          for (int k = 0; k < n; ++k) {
            Y* yo = y + (t0 + u + k) * outputs.y[s].stride + o;
            *yo = FromF32<Y>(ToF32(*yo) + acc[k]);
          }
        }
        __syncthreads();  // s_v is reused by the next run
      }
    }
    u += n;
  }
}

template <typename Y>
__global__ void __launch_bounds__(kExpandThreads)
    ScaleRowsKernel(Outputs outputs, const int32_t* token_adapter, int64_t num_adapters,
                    const float* const* scales, int64_t num_slices) {
  const int64_t t = blockIdx.x;
  const int64_t s = blockIdx.y;
  const int64_t c = int64_t{blockIdx.z} * kExpandThreads + threadIdx.x;
  if (c >= outputs.out_features[s]) return;
  const int32_t j = token_adapter[t];
  if (j < 0 || j >= num_adapters) return;
  const float* g = scales[j * num_slices + s];
  if (g == nullptr) return;
  Y* y = static_cast<Y*>(outputs.y[s].data) + t * outputs.y[s].stride + c;
  *y = FromF32<Y>(ToF32(*y) * g[c]);
}

AdapterOf MakeAdapterOf(const int32_t* token_adapter, const CudaLoraSegments& segments,
                        const CudaLoraWeights& w) {
  return AdapterOf{token_adapter, segments.d_starts, segments.d_adapter, segments.num_segments,
                   w.num_adapters};
}

// f(std::integral_constant<int, Chunk>): BGMV (a per-token index) or SGMV chunks.
template <typename F>
cudaError_t DispatchChunk(const int32_t* token_adapter, F&& f) {
  if (token_adapter != nullptr) return f(std::integral_constant<int, kBgmvChunk>{});
  return f(std::integral_constant<int, kSgmvChunk>{});
}

unsigned ChunksOf(int64_t num_tokens, int chunk) {
  return static_cast<unsigned>((num_tokens + chunk - 1) / chunk);
}

}  // namespace

cudaError_t LaunchLoraShrink(float* v, int64_t v_stride, const void* x, DType act_dtype,
                             int64_t x_stride, int64_t num_tokens, const int32_t* token_adapter,
                             const CudaLoraSegments& segments, const CudaLoraWeights& w,
                             cudaStream_t stream) {
  if (num_tokens == 0 || w.num_adapters == 0) return cudaSuccess;
  const AdapterOf adapter_of = MakeAdapterOf(token_adapter, segments, w);
  return DispatchChunk(token_adapter, [&](auto chunk) {
    constexpr int kChunk = decltype(chunk)::value;
    const dim3 grid(ChunksOf(num_tokens, kChunk), static_cast<unsigned>(w.num_slices),
                    static_cast<unsigned>((w.max_rank + kShrinkWarps - 1) / kShrinkWarps));
    return DispatchDType(act_dtype, [&](auto xt) {
      return DispatchDType(w.dtype, [&](auto wt) {
        using X = decltype(xt);
        using W = decltype(wt);
        ShrinkKernel<X, W, kChunk><<<grid, kShrinkWarps * 32, 0, stream>>>(
            v, v_stride, static_cast<const X*>(x), x_stride, num_tokens, adapter_of, w.d_slices,
            w.num_slices, w.in_features);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t LaunchLoraExpand(const CudaLoraOutput* y, DType act_dtype, const float* v,
                             int64_t v_stride, int64_t num_tokens, const int32_t* token_adapter,
                             const CudaLoraSegments& segments, const CudaLoraWeights& w,
                             cudaStream_t stream) {
  if (num_tokens == 0 || w.num_adapters == 0) return cudaSuccess;
  Outputs outputs{};
  int64_t max_out = 0;
  for (int64_t s = 0; s < w.num_slices; ++s) {
    outputs.y[s] = y[s];
    outputs.out_features[s] = w.out_features[s];
    if (w.out_features[s] > max_out) max_out = w.out_features[s];
  }
  if (max_out == 0) return cudaSuccess;
  const AdapterOf adapter_of = MakeAdapterOf(token_adapter, segments, w);
  return DispatchChunk(token_adapter, [&](auto chunk) {
    constexpr int kChunk = decltype(chunk)::value;
    const dim3 grid(ChunksOf(num_tokens, kChunk), static_cast<unsigned>(w.num_slices),
                    static_cast<unsigned>((max_out + kExpandThreads - 1) / kExpandThreads));
    const size_t shared = sizeof(float) * kChunk * static_cast<size_t>(w.max_rank);
    return DispatchDType(act_dtype, [&](auto yt) {
      return DispatchDType(w.dtype, [&](auto wt) {
        using Y = decltype(yt);
        using W = decltype(wt);
        ExpandKernel<Y, W, kChunk><<<grid, kExpandThreads, shared, stream>>>(
            outputs, v, v_stride, num_tokens, adapter_of, w.d_slices, w.num_slices, w.max_rank);
        return cudaGetLastError();
      });
    });
  });
}

cudaError_t LaunchLoraScaleRows(const CudaLoraOutput* y, DType act_dtype,
                                const int32_t* token_adapter, int64_t num_tokens,
                                const CudaLoraRowScales& scales, cudaStream_t stream) {
  if (num_tokens == 0 || scales.num_adapters == 0) return cudaSuccess;
  Outputs outputs{};
  int64_t max_out = 0;
  for (int64_t s = 0; s < scales.num_slices; ++s) {
    outputs.y[s] = y[s];
    outputs.out_features[s] = scales.out_features[s];
    if (scales.out_features[s] > max_out) max_out = scales.out_features[s];
  }
  if (max_out == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(num_tokens), static_cast<unsigned>(scales.num_slices),
                  static_cast<unsigned>((max_out + kExpandThreads - 1) / kExpandThreads));
  return DispatchDType(act_dtype, [&](auto yt) {
    using Y = decltype(yt);
    ScaleRowsKernel<Y><<<grid, kExpandThreads, 0, stream>>>(
        outputs, token_adapter, scales.num_adapters, scales.d_scales, scales.num_slices);
    return cudaGetLastError();
  });
}

}  // namespace loraplex::kernels::cuda::internal
