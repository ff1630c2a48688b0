#include "model/cuda_device_memory.h"

#include <algorithm>

#include "common/status.h"

namespace loraplex::model {

using kernels::DType;
using kernels::cuda::CudaBuffer;

absl::StatusOr<DeviceMatrix> UploadMatrix(const StoredMatrix& m) {
  DeviceMatrix d;
  d.dtype = m.dtype;
  d.rows = m.rows;
  d.cols = m.cols;
  LP_ASSIGN_OR_RETURN(d.buffer, CudaBuffer::Allocate(d.bytes()));
  const void* src = m.dtype == DType::kF32 ? static_cast<const void*>(m.f32.data())
                                           : static_cast<const void*>(m.bf16.data());
  LP_RETURN_IF_ERROR(d.buffer.CopyFromHost(src, d.bytes()));
  return d;
}

absl::StatusOr<CudaBuffer> UploadF32(const std::vector<float>& v) {
  LP_ASSIGN_OR_RETURN(CudaBuffer b, CudaBuffer::Allocate(v.size() * sizeof(float)));
  LP_RETURN_IF_ERROR(b.CopyFromHost(v.data(), v.size() * sizeof(float)));
  return b;
}

void ReleaseHost(StoredMatrix* m) {
  std::vector<float>().swap(m->f32);
  std::vector<uint16_t>().swap(m->bf16);
}

absl::Status Reserve(CudaBuffer* b, size_t bytes) {
  if (b->size() >= bytes) return absl::OkStatus();
  *b = CudaBuffer();  // free first: the old and new buffers need not coexist
  LP_ASSIGN_OR_RETURN(*b, CudaBuffer::Allocate(std::max<size_t>(bytes + bytes / 4, 256)));
  return absl::OkStatus();
}

}  // namespace loraplex::model
