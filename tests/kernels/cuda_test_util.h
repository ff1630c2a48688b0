// Helpers of the CUDA op tests: a fixture that skips without a device ("no CUDA device found: ...")
// unless LP_REQUIRE_CUDA=1 (scripts/gpu-check.sh sets it, so a GPU machine that cannot see its GPU
// fails instead of passing with every test skipped), and f32 <-> device copies in either dtype.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/half.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/kernels.h"

namespace loraplex::kernels::cuda::testing {

inline bool RequireCuda() {
  const char* v = std::getenv("LP_REQUIRE_CUDA");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

class CudaTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!CudaDeviceAvailable(&why)) {
      if (RequireCuda()) FAIL() << "LP_REQUIRE_CUDA=1 but no CUDA device found: " << why;
      GTEST_SKIP() << "no CUDA device found: " << why;
    }
  }
};

inline const char* DTypeName(DType d) { return d == DType::kF32 ? "f32" : "bf16"; }
inline size_t DTypeBytes(DType d) { return d == DType::kF32 ? 4 : 2; }

// v rounded to what `dtype` can hold (bf16: round to nearest even), still as f32.
inline std::vector<float> RoundTo(const std::vector<float>& v, DType dtype) {
  if (dtype == DType::kF32) return v;
  std::vector<float> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = Bf16ToF32(F32ToBf16(v[i]));
  return out;
}

// A device copy of v stored as `dtype` (at least one byte, so empty tensors still get a pointer).
inline absl::StatusOr<CudaBuffer> Upload(const std::vector<float>& v, DType dtype) {
  const size_t bytes = v.size() * DTypeBytes(dtype);
  absl::StatusOr<CudaBuffer> buf = CudaBuffer::Allocate(bytes > 0 ? bytes : 1);
  if (!buf.ok()) return buf.status();
  if (dtype == DType::kF32) {
    if (absl::Status s = buf->CopyFromHost(v.data(), bytes); !s.ok()) return s;
  } else {
    std::vector<uint16_t> bits(v.size());
    for (size_t i = 0; i < v.size(); ++i) bits[i] = F32ToBf16(v[i]);
    if (absl::Status s = buf->CopyFromHost(bits.data(), bytes); !s.ok()) return s;
  }
  return buf;
}

// Any trivially copyable host array (ids, positions, tables, descriptors).
template <typename T>
absl::StatusOr<CudaBuffer> UploadRaw(const std::vector<T>& v) {
  const size_t bytes = v.size() * sizeof(T);
  absl::StatusOr<CudaBuffer> buf = CudaBuffer::Allocate(bytes > 0 ? bytes : 1);
  if (!buf.ok()) return buf.status();
  if (absl::Status s = buf->CopyFromHost(v.data(), bytes); !s.ok()) return s;
  return buf;
}

// n elements of `dtype` from the device, widened to f32. Synchronises (and so reports errors of
// kernels queued before it).
inline absl::StatusOr<std::vector<float>> Download(const CudaBuffer& buf, DType dtype, size_t n) {
  std::vector<float> out(n);
  if (dtype == DType::kF32) {
    if (absl::Status s = buf.CopyToHost(out.data(), n * 4); !s.ok()) return s;
  } else {
    std::vector<uint16_t> bits(n);
    if (absl::Status s = buf.CopyToHost(bits.data(), n * 2); !s.ok()) return s;
    for (size_t i = 0; i < n; ++i) out[i] = Bf16ToF32(bits[i]);
  }
  return out;
}

template <typename T>
absl::StatusOr<std::vector<T>> DownloadRaw(const CudaBuffer& buf, size_t n) {
  std::vector<T> out(n);
  if (absl::Status s = buf.CopyToHost(out.data(), n * sizeof(T)); !s.ok()) return s;
  return out;
}

}  // namespace loraplex::kernels::cuda::testing
