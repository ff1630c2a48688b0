// Device-memory pieces of the CUDA model (model/cuda_model.cc): base matrices uploaded in their
// load dtype, f32 vectors, the step buffers' growth rule, and the KV pools a KvCache owns.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/kernels.h"
#include "model/kv_cache.h"
#include "model/llama_weights.h"

namespace loraplex::model {

inline size_t DTypeBytes(kernels::DType d) { return d == kernels::DType::kF32 ? 4 : 2; }

// One base matrix on the device, in its load dtype.
struct DeviceMatrix {
  kernels::cuda::CudaBuffer buffer;
  kernels::DType dtype = kernels::DType::kBF16;
  int64_t rows = 0, cols = 0;
  kernels::WeightView view() const { return {dtype, buffer.data(), rows, cols}; }
  size_t bytes() const { return static_cast<size_t>(rows) * cols * DTypeBytes(dtype); }
};

absl::StatusOr<DeviceMatrix> UploadMatrix(const StoredMatrix& m);
absl::StatusOr<kernels::cuda::CudaBuffer> UploadF32(const std::vector<float>& v);

// Drops the host storage of a matrix that now lives on the device; the shape stays.
void ReleaseHost(StoredMatrix* m);

// Grows *b to at least `bytes` (never shrinks; a quarter more than asked). Only called at the
// start of a step, when nothing queued on the device can still read the old buffer.
absl::Status Reserve(kernels::cuda::CudaBuffer* b, size_t bytes);

// The device K/V pools of one KvCache: f32, per layer [num_blocks, block_size, n_kv_heads,
// head_dim], all layers in one buffer each for K and V.
struct CudaKvStorage : KvCache::DeviceStorage {
  kernels::cuda::CudaBuffer k, v;
  int64_t num_layers = 0, num_blocks = 0, block_size = 0, n_kv_heads = 0, head_dim = 0;
  int64_t layer_elems() const { return num_blocks * block_size * n_kv_heads * head_dim; }
  float* k_layer(int64_t l) const { return k.as<float>() + l * layer_elems(); }
  float* v_layer(int64_t l) const { return v.as<float>() + l * layer_elems(); }
};

}  // namespace loraplex::model
