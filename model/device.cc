#include "model/device.h"

#include "absl/strings/str_cat.h"
#include "model/cuda_model.h"

#ifdef LP_HAVE_CUDA
#include "kernels/cuda/cuda_kernels.h"
#endif

namespace loraplex::model {

bool CudaBackendAvailable(std::string* why) {
#ifdef LP_HAVE_CUDA
  return kernels::cuda::CudaDeviceAvailable(why);
#else
  if (why != nullptr) *why = "this build has no CUDA backend (configured with LP_ENABLE_CUDA=OFF)";
  return false;
#endif
}

absl::StatusOr<Device> ResolveDevice(absl::string_view flag, std::string* reason) {
  std::string why;
  if (flag == "cpu") {
    if (reason != nullptr) *reason = "device cpu (asked for with --device cpu)";
    return Device::kCpu;
  }
  if (flag == "cuda") {
    if (!CudaBackendAvailable(&why)) {
      return absl::FailedPreconditionError(absl::StrCat(
          "no CUDA device found: ", why, " (--device cuda; use --device cpu or auto)"));
    }
    if (reason != nullptr) *reason = "device cuda (asked for with --device cuda)";
    return Device::kCuda;
  }
  if (flag == "auto") {
    if (CudaBackendAvailable(&why)) {
      if (reason != nullptr) *reason = "device cuda (--device auto: a CUDA device is available)";
      return Device::kCuda;
    }
    if (reason != nullptr) {
      *reason = absl::StrCat("device cpu (--device auto: no CUDA device found: ", why, ")");
    }
    return Device::kCpu;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--device must be auto, cpu or cuda, got \"", std::string(flag), "\""));
}

#ifndef LP_HAVE_CUDA
absl::StatusOr<std::unique_ptr<Backend>> CreateCudaBackend(const LlamaConfig&, LlamaWeights,
                                                           const std::vector<float>&,
                                                           const LoadOptions&) {
  return absl::UnavailableError(
      "no CUDA device found: this build has no CUDA backend (configured with LP_ENABLE_CUDA=OFF)");
}
#endif

}  // namespace loraplex::model
