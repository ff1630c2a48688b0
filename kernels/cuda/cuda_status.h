// cudaError_t -> absl::Status, for code inside kernels/cuda/ (the only folder that sees CUDA
// headers). LP_CUDA_RETURN_IF_ERROR(cudaMemcpy(...)) returns from the enclosing function with a
// status naming the failed call, the CUDA error and the source line.
#pragma once

#include <cuda_runtime_api.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"

namespace loraplex::kernels::cuda {

// The most specific absl code for a CUDA runtime error: allocation failures are
// RESOURCE_EXHAUSTED, a missing device or driver UNAVAILABLE, bad arguments INVALID_ARGUMENT, and
// everything else (launch failures, illegal addresses: our bugs) INTERNAL.
inline absl::StatusCode CudaErrorCode(cudaError_t err) {
  switch (err) {
    case cudaSuccess:
      return absl::StatusCode::kOk;
    case cudaErrorMemoryAllocation:
      return absl::StatusCode::kResourceExhausted;
    case cudaErrorNoDevice:
    case cudaErrorInsufficientDriver:
    case cudaErrorInitializationError:
    case cudaErrorDevicesUnavailable:
    case cudaErrorSystemDriverMismatch:
    case cudaErrorCompatNotSupportedOnDevice:
      return absl::StatusCode::kUnavailable;
    case cudaErrorInvalidValue:
    case cudaErrorInvalidDevicePointer:
    case cudaErrorInvalidConfiguration:
      return absl::StatusCode::kInvalidArgument;
    default:
      return absl::StatusCode::kInternal;
  }
}

inline absl::Status CudaErrorToStatus(cudaError_t err, const char* what, const char* file,
                                      int line) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::Status(CudaErrorCode(err),
                      absl::StrCat(what, " failed: ", cudaGetErrorName(err), " (",
                                   cudaGetErrorString(err), ") at ", file, ":", line));
}

}  // namespace loraplex::kernels::cuda

#define LP_CUDA_RETURN_IF_ERROR(expr)                                                   \
  do {                                                                                  \
    cudaError_t lp_cuda_err_ = (expr);                                                  \
    if (lp_cuda_err_ != cudaSuccess) {                                                  \
      return ::loraplex::kernels::cuda::CudaErrorToStatus(lp_cuda_err_, #expr, __FILE__, \
                                                          __LINE__);                    \
    }                                                                                   \
  } while (0)
