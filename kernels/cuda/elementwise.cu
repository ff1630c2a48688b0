// The row-wise and element-wise ops on CUDA: dtype conversion, residual add, SiLU-mul, RoPE
// (rotate-half) and the embedding gather. All are memory-bound one-thread-per-element kernels with
// a grid-stride loop; math is f32 whatever the storage dtype, with the same formulas as
// kernels/cpu/reference.cc (expf, sincosf: no fast-math intrinsics, so that the CPU reference
// bounds the error).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/cuda/dispatch.h"
#include "kernels/cuda/launch.h"

namespace loraplex::kernels::cuda::internal {
namespace {

constexpr int kThreads = 256;

template <typename D, typename S>
__global__ void ConvertKernel(D* dst, const S* src, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = FromF32<D>(ToF32(src[i]));
  }
}

template <typename T>
__global__ void AddKernel(T* y, const T* x, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    y[i] = FromF32<T>(ToF32(y[i]) + ToF32(x[i]));
  }
}

template <typename T>
__global__ void SiluMulKernel(T* out, const T* gate, const T* up, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const float g = ToF32(gate[i]);
    out[i] = FromF32<T>(g / (1.0f + expf(-g)) * ToF32(up[i]));
  }
}

// One thread per (token, head, i < head_dim / 2): the pair (i, i + half) of that head.
template <typename T>
__global__ void RopeKernel(T* x, const int32_t* positions, int64_t tokens, int64_t heads,
                           int64_t head_dim, const float* inv_freq) {
  const int64_t half = head_dim / 2;
  const int64_t n = tokens * heads * half;
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t i = e % half;
    const int64_t th = e / half;  // token * heads + head
    const int64_t t = th / heads;
    // The angle is rounded to f32 before sin/cos exactly as the reference does; sincosf then
    // reduces it with full precision (positions reach many thousands of radians).
    const float angle = static_cast<float>(positions[t]) * inv_freq[i];
    float s, c;
    sincosf(angle, &s, &c);
    T* v = x + th * head_dim;
    const float a = ToF32(v[i]);
    const float b = ToF32(v[i + half]);
    v[i] = FromF32<T>(a * c - b * s);
    v[i + half] = FromF32<T>(b * c + a * s);
  }
}

// One thread per output element. An id outside [0, rows) yields a zero row instead of reading out
// of bounds: ids are validated against the vocabulary before they reach the device (the CPU op
// LP_CHECKs the same condition), so this is only a guard against memory corruption.
template <typename O, typename W>
__global__ void EmbedKernel(O* out, const int32_t* ids, int64_t n, const W* table, int64_t rows,
                            int64_t cols) {
  for (int64_t e = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; e < n * cols;
       e += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = e / cols;
    const int64_t c = e % cols;
    const int32_t id = ids[t];
    out[e] = (id >= 0 && id < rows) ? FromF32<O>(ToF32(table[id * cols + c])) : FromF32<O>(0.0f);
  }
}

}  // namespace

cudaError_t LaunchConvert(void* dst, DType dst_dtype, const void* src, DType src_dtype, int64_t n,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return DispatchDType(dst_dtype, [&](auto d) {
    return DispatchDType(src_dtype, [&](auto s) {
      using D = decltype(d);
      using S = decltype(s);
      ConvertKernel<D, S><<<GridFor(n, kThreads), kThreads, 0, stream>>>(
          static_cast<D*>(dst), static_cast<const S*>(src), n);
      return cudaGetLastError();
    });
  });
}

cudaError_t LaunchAdd(void* y, const void* x, DType dtype, int64_t n, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return DispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    AddKernel<T><<<GridFor(n, kThreads), kThreads, 0, stream>>>(static_cast<T*>(y),
                                                                static_cast<const T*>(x), n);
    return cudaGetLastError();
  });
}

cudaError_t LaunchSiluMul(void* out, const void* gate, const void* up, DType dtype, int64_t n,
                          cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  return DispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    SiluMulKernel<T><<<GridFor(n, kThreads), kThreads, 0, stream>>>(
        static_cast<T*>(out), static_cast<const T*>(gate), static_cast<const T*>(up), n);
    return cudaGetLastError();
  });
}

cudaError_t LaunchRope(void* x, DType dtype, const int32_t* positions, int64_t tokens,
                       int64_t heads, int64_t head_dim, const float* inv_freq,
                       cudaStream_t stream) {
  const int64_t n = tokens * heads * (head_dim / 2);
  if (n == 0) return cudaSuccess;
  return DispatchDType(dtype, [&](auto tag) {
    using T = decltype(tag);
    RopeKernel<T><<<GridFor(n, kThreads), kThreads, 0, stream>>>(static_cast<T*>(x), positions,
                                                                 tokens, heads, head_dim, inv_freq);
    return cudaGetLastError();
  });
}

cudaError_t LaunchEmbed(void* out, DType out_dtype, const int32_t* ids, int64_t n,
                        const void* table, DType table_dtype, int64_t rows, int64_t cols,
                        cudaStream_t stream) {
  if (n == 0 || cols == 0) return cudaSuccess;
  return DispatchDType(out_dtype, [&](auto o) {
    return DispatchDType(table_dtype, [&](auto w) {
      using O = decltype(o);
      using W = decltype(w);
      EmbedKernel<O, W><<<GridFor(n * cols, kThreads), kThreads, 0, stream>>>(
          static_cast<O*>(out), ids, n, static_cast<const W*>(table), rows, cols);
      return cudaGetLastError();
    });
  });
}

}  // namespace loraplex::kernels::cuda::internal
