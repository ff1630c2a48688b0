// Internal to kernels/cuda/: the argument checks the host wrappers share. Each returns
// INVALID_ARGUMENT with a message naming the op and the argument, so a caller's bug reads as
// "CudaRope: head_dim=-1 is negative" rather than as a CUDA launch error.
#pragma once

#include <cstdint>
#include <initializer_list>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/kernels.h"

namespace loraplex::kernels::cuda::internal {

// Mirrors dispatch.h's kMaxHeadDim (which nvcc sees); one warp holds a head of up to 8 x 32.
inline constexpr int64_t kCudaMaxHeadDim = 256;

inline absl::Status CheckSizes(const char* op,
                               std::initializer_list<std::pair<const char*, int64_t>> sizes) {
  for (const auto& [name, value] : sizes) {
    if (value < 0) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": ", name, "=", value, " is negative"));
    }
  }
  return absl::OkStatus();
}

inline absl::Status CheckPointers(const char* op,
                                  std::initializer_list<std::pair<const char*, const void*>> ptrs) {
  for (const auto& [name, ptr] : ptrs) {
    if (ptr == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": null device pointer ", name));
    }
  }
  return absl::OkStatus();
}

inline absl::Status CheckDType(const char* op, const char* name, DType dtype) {
  if (dtype != DType::kF32 && dtype != DType::kBF16) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": ", name, " is not f32 or bf16"));
  }
  return absl::OkStatus();
}

// A size that becomes gridDim.x (one block per row or token): at most 2^31 - 1.
inline absl::Status CheckGrid(const char* op, const char* name, int64_t value) {
  if (value > 0x7fffffff) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": ", name, "=", value, " exceeds the launch grid (2^31 - 1)"));
  }
  return absl::OkStatus();
}

}  // namespace loraplex::kernels::cuda::internal
