// Internal to kernels/cuda/: the host-side launchers defined in the .cu files. They return the raw
// cudaError_t of the launch so that the .cu files need no Abseil (nvcc never sees absl headers);
// device.cc turns them into absl::Status. Arguments are validated by the caller (device.cc).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace loraplex::kernels::cuda::internal {

cudaError_t LaunchRmsNormF32(float* out, const float* x, const float* weight, int64_t rows,
                             int64_t dim, float eps, cudaStream_t stream);
// bf16 tensors as uint16_t bit patterns.
cudaError_t LaunchRmsNormBf16(uint16_t* out, const uint16_t* x, const uint16_t* weight,
                              int64_t rows, int64_t dim, float eps, cudaStream_t stream);

}  // namespace loraplex::kernels::cuda::internal
