// cudaError_t and cublasStatus_t -> absl::Status, for host code inside kernels/cuda/ (the only
// folder that sees CUDA headers). LP_CUDA_RETURN_IF_ERROR(cudaMemcpy(...)) and its cuBLAS twin
// LP_CUBLAS_RETURN_IF_ERROR(cublasGemmEx(...)) return from the enclosing function with a status
// naming the failed call, the error and the source line.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "kernels/cuda/cublas_api.h"

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

// The same for cuBLAS: allocation failures RESOURCE_EXHAUSTED, a handle created without a device
// UNAVAILABLE, bad arguments INVALID_ARGUMENT, a type combination or GPU the library does not
// support UNIMPLEMENTED, everything else INTERNAL.
inline absl::StatusCode CublasErrorCode(cublasStatus_t err) {
  switch (err) {
    case CUBLAS_STATUS_SUCCESS:
      return absl::StatusCode::kOk;
    case CUBLAS_STATUS_ALLOC_FAILED:
      return absl::StatusCode::kResourceExhausted;
    case CUBLAS_STATUS_NOT_INITIALIZED:
      return absl::StatusCode::kUnavailable;
    case CUBLAS_STATUS_INVALID_VALUE:
      return absl::StatusCode::kInvalidArgument;
    case CUBLAS_STATUS_NOT_SUPPORTED:
    case CUBLAS_STATUS_ARCH_MISMATCH:
      return absl::StatusCode::kUnimplemented;
    default:
      return absl::StatusCode::kInternal;
  }
}

inline absl::Status CublasErrorToStatus(cublasStatus_t err, const char* what, const char* file,
                                        int line) {
  if (err == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::Status(CublasErrorCode(err),
                      absl::StrCat(what, " failed: ", CublasStatusName(err), " (",
                                   CublasStatusString(err), ") at ", file, ":", line));
}

}  // namespace loraplex::kernels::cuda

#define LP_CUBLAS_RETURN_IF_ERROR(expr)                                                      \
  do {                                                                                       \
    cublasStatus_t lp_cublas_err_ = (expr);                                                  \
    if (lp_cublas_err_ != CUBLAS_STATUS_SUCCESS) {                                           \
      return ::loraplex::kernels::cuda::CublasErrorToStatus(lp_cublas_err_, #expr, __FILE__, \
                                                            __LINE__);                       \
    }                                                                                        \
  } while (0)

#define LP_CUDA_RETURN_IF_ERROR(expr)                                                    \
  do {                                                                                   \
    cudaError_t lp_cuda_err_ = (expr);                                                   \
    if (lp_cuda_err_ != cudaSuccess) {                                                   \
      return ::loraplex::kernels::cuda::CudaErrorToStatus(lp_cuda_err_, #expr, __FILE__, \
                                                          __LINE__);                     \
    }                                                                                    \
  } while (0)
