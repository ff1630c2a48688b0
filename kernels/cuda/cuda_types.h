// Plain structs that describe the CUDA ops' device-resident arguments. No CUDA and no Abseil here:
// both the host wrappers (cuda_kernels.h, compiled as C++20 with Abseil) and the .cu launchers
// (compiled by nvcc as C++17, never seeing Abseil) include this file.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"
#include "kernels/lora.h"

namespace loraplex::kernels::cuda {

// One (adapter, slice) of a layer's LoRA weights, as the kernels read it from DEVICE memory. The
// CUDA backend fills an array of these per step and module group from the step's LoRA plan
// (model/cuda_model.cc PackPass), pointing into the adapters' device copies; kernels gather the
// pointers per token or segment, so neither ranks nor sizes are baked into the code (no shape
// lists).
struct CudaLoraSlice {
  const void* a = nullptr;  // device, A [rank, in_features] row-major, dtype of CudaLoraWeights
  const void* b = nullptr;  // device, B [out_features[s], rank] row-major (scale folded in)
  int32_t rank = 0;         // 0 = this adapter does not target the slice (a, b unused)
  int32_t v_offset = 0;     // packed offset of the slice in a row of v (sum of earlier ranks)
};

// A (possibly fused q/k/v) linear's LoRA weights for one batch. Host struct; d_slices points to
// device memory [num_adapters * num_slices], adapter j slice s at j * num_slices + s.
struct CudaLoraWeights {
  int64_t num_adapters = 0;
  int64_t num_slices = 1;      // 1..kMaxLoraSlices
  DType dtype = DType::kBF16;  // of every A and B (bf16 in serving; f32 for tests)
  int64_t in_features = 0;
  int64_t out_features[kMaxLoraSlices] = {};
  // An upper bound of every slice's rank (sizes the launch grid and shared memory; a larger bound
  // costs idle threads, never wrong results). 1..kCudaMaxLoraRank.
  int64_t max_rank = 0;
  const CudaLoraSlice* d_slices = nullptr;
};

inline constexpr int64_t kCudaMaxLoraRank = 1024;

// SGMV segments in DEVICE memory: segment i covers tokens [d_starts[i], d_starts[i+1]) and uses
// adapter d_adapter[i] (-1 = none). d_starts has num_segments + 1 ascending entries, all within
// [0, num_tokens] of the op; empty segments are allowed.
struct CudaLoraSegments {
  int64_t num_segments = 0;
  const int64_t* d_starts = nullptr;
  const int32_t* d_adapter = nullptr;
};

// Where expand adds slice s: data + t * stride + o (elements of the op's activation dtype).
struct CudaLoraOutput {
  void* data = nullptr;
  int64_t stride = 0;
};

// DoRA's per-output-column scales of a (possibly fused q/k/v) linear for one batch. Host struct;
// d_scales points to device memory [num_adapters * num_slices] of device pointers, adapter j slice
// s at j * num_slices + s: each null (that adapter has no scale for the slice: its rows are left
// alone) or a float array [out_features[s]]. The CUDA backend fills it per step and module group
// (model/cuda_model.cc PackPass) from the adapters' device copies.
struct CudaLoraRowScales {
  int64_t num_adapters = 0;
  int64_t num_slices = 1;  // 1..kMaxLoraSlices
  int64_t out_features[kMaxLoraSlices] = {};
  const float* const* d_scales = nullptr;
};

}  // namespace loraplex::kernels::cuda
