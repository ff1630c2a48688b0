// The CUDA backend's ops, callable from plain C++ (no CUDA headers here, so model/ and tests can
// include it without nvcc). Pointers named d_* are device pointers; `stream` is a cudaStream_t
// passed as void* (nullptr = the legacy default stream). Ops are asynchronous on their stream:
// an OK status means the launch succeeded, not that the kernel finished; errors of the kernel itself
// surface at the next synchronising call (e.g. CudaBuffer::CopyToHost).
//
// Shapes and dtypes follow kernels/kernels.h: row-major, one row per token. On CUDA activations and
// weights are bf16 (uint16_t bit patterns, as in common/half.h) with f32 accumulation; the f32
// variants exist for testing and for callers that keep f32 activations.
//
// Errors: INVALID_ARGUMENT for negative shapes or null pointers with non-empty shapes;
// UNAVAILABLE when there is no usable device/driver; RESOURCE_EXHAUSTED when device memory runs
// out; INTERNAL for other CUDA failures. Thread-safety: ops on different streams may run
// concurrently; a CudaBuffer is not synchronised (one owner at a time).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace loraplex::kernels::cuda {

// True when a CUDA device can be used by this process. Otherwise false, and *why (when non-null)
// says what is missing ("no CUDA-capable device is detected", driver too old, ...).
bool CudaDeviceAvailable(std::string* why);

// A device allocation owned by this object (freed in the destructor). Move-only.
class CudaBuffer {
 public:
  // RESOURCE_EXHAUSTED when the device is out of memory, UNAVAILABLE without a device.
  static absl::StatusOr<CudaBuffer> Allocate(size_t bytes);

  CudaBuffer() = default;
  CudaBuffer(CudaBuffer&& other) noexcept;
  CudaBuffer& operator=(CudaBuffer&& other) noexcept;
  CudaBuffer(const CudaBuffer&) = delete;
  CudaBuffer& operator=(const CudaBuffer&) = delete;
  ~CudaBuffer();

  void* data() const { return data_; }
  size_t size() const { return bytes_; }

  // Synchronous copies of `bytes` (<= size(), else INVALID_ARGUMENT) from/to host memory.
  absl::Status CopyFromHost(const void* src, size_t bytes);
  absl::Status CopyToHost(void* dst, size_t bytes) const;

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// d_out[rows, dim] = d_x / sqrt(mean(d_x^2) + eps) * d_weight per row (f32 sums). d_out may alias
// d_x. Same definition as kernels::RmsNorm.
absl::Status CudaRmsNorm(float* d_out, const float* d_x, const float* d_weight, int64_t rows,
                         int64_t dim, float eps, void* stream = nullptr);
absl::Status CudaRmsNormBf16(uint16_t* d_out, const uint16_t* d_x, const uint16_t* d_weight,
                             int64_t rows, int64_t dim, float eps, void* stream = nullptr);

}  // namespace loraplex::kernels::cuda
