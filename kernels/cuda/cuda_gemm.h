// The base-model GEMMs on CUDA through cuBLAS: y[m, n] = x[m, k] W^T (+ y), W [n, k] row-major
// (nn.Linear layout, the WeightView of kernels.h with a device data pointer), f32 accumulation.
// Plain C++ (no CUDA headers).
//
// Supported dtypes (anything else is UNIMPLEMENTED, naming the combination):
//   W bf16, x bf16, y bf16 or f32   one cublasGemmEx (bf16 tensor cores, f32 compute)
//   W bf16, x f32,  y bf16 or f32   x is first rounded to bf16 in the handle's scratch buffer,
//                                   then as above: the products see bf16 activations
//   W f32,  x f32,  y f32           cublasGemmEx in plain f32 (no TF32), for tests
//
// Thread-safety: a CudaBlas is used by one thread at a time. Its scratch buffer is reused by every
// call, so calls on one CudaBlas must all go to the same stream (stream order then keeps the reuse
// safe) or be synchronised in between; give each stream its own CudaBlas.
#pragma once

#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/kernels.h"

struct cublasContext;  // cuBLAS's handle type, kept opaque so this header needs no CUDA include

namespace loraplex::kernels::cuda {

class CudaBlas {
 public:
  // UNAVAILABLE without a device; RESOURCE_EXHAUSTED when cuBLAS cannot allocate its state.
  static absl::StatusOr<std::unique_ptr<CudaBlas>> Create();
  ~CudaBlas();
  CudaBlas(const CudaBlas&) = delete;
  CudaBlas& operator=(const CudaBlas&) = delete;

  // d_y [m, w.rows] (y_dtype) = d_x [m, w.cols] (x_dtype) W^T, or += when accumulate. d_x and d_y
  // must not alias. INVALID_ARGUMENT for negative or over-int32 sizes and null pointers;
  // UNIMPLEMENTED for an unsupported dtype combination; RESOURCE_EXHAUSTED if the scratch buffer
  // (m * k bf16, only for f32 x with bf16 W) cannot grow.
  absl::Status Gemm(void* d_y, DType y_dtype, const void* d_x, DType x_dtype, int64_t m,
                    const WeightView& w, bool accumulate = false, void* stream = nullptr);

  // The raw cublasHandle_t, for benchmarks that compare against a plain cuBLAS call.
  cublasContext* handle() const { return handle_; }

  // Gives cuBLAS a workspace of `bytes` of its own (cublasSetWorkspace), so that no GEMM
  // allocates: needed before GEMMs are captured into CUDA graphs. 32 MiB is what cuBLAS documents
  // for Hopper; GEMMs that could use more pick other algorithms.
  absl::Status UseFixedWorkspace(size_t bytes);

 private:
  explicit CudaBlas(cublasContext* handle) : handle_(handle) {}

  cublasContext* handle_ = nullptr;
  CudaBuffer scratch_;    // bf16 copy of f32 activations, grown on demand
  CudaBuffer workspace_;  // UseFixedWorkspace's
};

}  // namespace loraplex::kernels::cuda
