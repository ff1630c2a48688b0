// Host wrappers of the CUDA SGMV/BGMV ops and the DoRA row scale (cuda_lora.h): check what the
// host can see, then launch.
#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_lora.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/validate.h"

namespace loraplex::kernels::cuda {
namespace {

absl::Status CheckWeights(const char* op, const CudaLoraWeights& w) {
  LP_RETURN_IF_ERROR(internal::CheckSizes(
      op, {{"w.num_adapters", w.num_adapters}, {"w.in_features", w.in_features}}));
  LP_RETURN_IF_ERROR(internal::CheckDType(op, "w.dtype", w.dtype));
  if (w.num_slices < 1 || w.num_slices > kMaxLoraSlices) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": w.num_slices=", w.num_slices, " outside 1..", kMaxLoraSlices));
  }
  for (int64_t s = 0; s < w.num_slices; ++s) {
    if (w.out_features[s] < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": w.out_features[", s, "]=", w.out_features[s], " is negative"));
    }
  }
  if (w.num_adapters > 0) {
    if (w.max_rank < 1 || w.max_rank > kCudaMaxLoraRank) {
      return absl::InvalidArgumentError(
          absl::StrCat(op, ": w.max_rank=", w.max_rank, " outside 1..", kCudaMaxLoraRank));
    }
    LP_RETURN_IF_ERROR(internal::CheckPointers(op, {{"w.d_slices", w.d_slices}}));
  }
  return absl::OkStatus();
}

// Shared by shrink and expand: the token count, v, and who says which adapter a token uses.
absl::Status CheckBatch(const char* op, int64_t num_tokens, const float* d_v, int64_t v_stride,
                        const int32_t* d_token_adapter, const CudaLoraSegments* segments,
                        const CudaLoraWeights& w) {
  LP_RETURN_IF_ERROR(internal::CheckSizes(op, {{"num_tokens", num_tokens}}));
  LP_RETURN_IF_ERROR(CheckWeights(op, w));
  // A chunk of 4 tokens per block: num_tokens / 4 blocks must fit gridDim.x.
  LP_RETURN_IF_ERROR(internal::CheckGrid(op, "num_tokens / 4", num_tokens / 4));
  if (num_tokens == 0 || w.num_adapters == 0) return absl::OkStatus();
  // v_offset + rank <= v_stride per slice is the slot manager's contract (cuda_lora.h): the ranks
  // live on the device, so the host can only refuse a negative stride.
  LP_RETURN_IF_ERROR(internal::CheckSizes(op, {{"v_stride", v_stride}}));
  LP_RETURN_IF_ERROR(internal::CheckPointers(op, {{"d_v", d_v}}));
  if (segments == nullptr) {
    return internal::CheckPointers(op, {{"d_token_adapter", d_token_adapter}});
  }
  LP_RETURN_IF_ERROR(internal::CheckSizes(op, {{"segments.num_segments", segments->num_segments}}));
  if (segments->num_segments > 0) {
    LP_RETURN_IF_ERROR(internal::CheckPointers(op, {{"segments.d_starts", segments->d_starts},
                                                    {"segments.d_adapter", segments->d_adapter}}));
  }
  return absl::OkStatus();
}

absl::Status CheckShrink(const char* op, float* d_v, int64_t v_stride, const void* d_x,
                         DType act_dtype, int64_t x_stride, int64_t num_tokens,
                         const int32_t* d_token_adapter, const CudaLoraSegments* segments,
                         const CudaLoraWeights& w) {
  LP_RETURN_IF_ERROR(internal::CheckDType(op, "act_dtype", act_dtype));
  LP_RETURN_IF_ERROR(CheckBatch(op, num_tokens, d_v, v_stride, d_token_adapter, segments, w));
  if (num_tokens == 0 || w.num_adapters == 0) return absl::OkStatus();
  if (x_stride < w.in_features) {
    return absl::InvalidArgumentError(absl::StrCat(
        op, ": x_stride=", x_stride, " is smaller than w.in_features=", w.in_features));
  }
  return internal::CheckPointers(op, {{"d_x", d_x}});
}

absl::Status CheckExpand(const char* op, const CudaLoraOutput* y, DType act_dtype, const float* d_v,
                         int64_t v_stride, int64_t num_tokens, const int32_t* d_token_adapter,
                         const CudaLoraSegments* segments, const CudaLoraWeights& w) {
  LP_RETURN_IF_ERROR(internal::CheckDType(op, "act_dtype", act_dtype));
  LP_RETURN_IF_ERROR(CheckBatch(op, num_tokens, d_v, v_stride, d_token_adapter, segments, w));
  if (num_tokens == 0 || w.num_adapters == 0) return absl::OkStatus();
  if (y == nullptr) return absl::InvalidArgumentError(absl::StrCat(op, ": null output array y"));
  for (int64_t s = 0; s < w.num_slices; ++s) {
    if (w.out_features[s] == 0) continue;
    if (y[s].data == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": null device pointer y[", s, "].data"));
    }
    if (y[s].stride < w.out_features[s]) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": y[", s, "].stride=", y[s].stride,
                                                     " is smaller than w.out_features[", s,
                                                     "]=", w.out_features[s]));
    }
  }
  return absl::OkStatus();
}

absl::Status CheckScaleRows(const char* op, const CudaLoraOutput* y, DType act_dtype,
                            const int32_t* d_token_adapter, int64_t num_tokens,
                            const CudaLoraRowScales& scales) {
  LP_RETURN_IF_ERROR(internal::CheckDType(op, "act_dtype", act_dtype));
  LP_RETURN_IF_ERROR(internal::CheckSizes(
      op, {{"num_tokens", num_tokens}, {"scales.num_adapters", scales.num_adapters}}));
  if (scales.num_slices < 1 || scales.num_slices > kMaxLoraSlices) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": scales.num_slices=", scales.num_slices,
                                                   " outside 1..", kMaxLoraSlices));
  }
  for (int64_t s = 0; s < scales.num_slices; ++s) {
    if (scales.out_features[s] < 0) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": scales.out_features[", s,
                                                     "]=", scales.out_features[s], " is negative"));
    }
  }
  // One block row per token.
  LP_RETURN_IF_ERROR(internal::CheckGrid(op, "num_tokens", num_tokens));
  if (num_tokens == 0 || scales.num_adapters == 0) return absl::OkStatus();
  LP_RETURN_IF_ERROR(internal::CheckPointers(
      op, {{"d_token_adapter", d_token_adapter}, {"scales.d_scales", scales.d_scales}}));
  if (y == nullptr) return absl::InvalidArgumentError(absl::StrCat(op, ": null output array y"));
  for (int64_t s = 0; s < scales.num_slices; ++s) {
    if (scales.out_features[s] == 0) continue;
    if (y[s].data == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": null device pointer y[", s, "].data"));
    }
    if (y[s].stride < scales.out_features[s]) {
      return absl::InvalidArgumentError(absl::StrCat(op, ": y[", s, "].stride=", y[s].stride,
                                                     " is smaller than scales.out_features[", s,
                                                     "]=", scales.out_features[s]));
    }
  }
  return absl::OkStatus();
}

cudaStream_t AsStream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace

absl::Status CudaSgmvShrink(float* d_v, int64_t v_stride, const void* d_x, DType act_dtype,
                            int64_t x_stride, int64_t num_tokens, const CudaLoraSegments& segments,
                            const CudaLoraWeights& w, void* stream) {
  LP_RETURN_IF_ERROR(CheckShrink("CudaSgmvShrink", d_v, v_stride, d_x, act_dtype, x_stride,
                                 num_tokens, nullptr, &segments, w));
  if (segments.num_segments == 0) return absl::OkStatus();
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchLoraShrink(
      d_v, v_stride, d_x, act_dtype, x_stride, num_tokens, nullptr, segments, w, AsStream(stream)));
  return absl::OkStatus();
}

absl::Status CudaSgmvExpand(const CudaLoraOutput* y, DType act_dtype, const float* d_v,
                            int64_t v_stride, int64_t num_tokens, const CudaLoraSegments& segments,
                            const CudaLoraWeights& w, void* stream) {
  LP_RETURN_IF_ERROR(CheckExpand("CudaSgmvExpand", y, act_dtype, d_v, v_stride, num_tokens, nullptr,
                                 &segments, w));
  if (segments.num_segments == 0) return absl::OkStatus();
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchLoraExpand(y, act_dtype, d_v, v_stride, num_tokens,
                                                     nullptr, segments, w, AsStream(stream)));
  return absl::OkStatus();
}

absl::Status CudaBgmvShrink(float* d_v, int64_t v_stride, const void* d_x, DType act_dtype,
                            int64_t x_stride, const int32_t* d_token_adapter, int64_t num_tokens,
                            const CudaLoraWeights& w, void* stream) {
  LP_RETURN_IF_ERROR(CheckShrink("CudaBgmvShrink", d_v, v_stride, d_x, act_dtype, x_stride,
                                 num_tokens, d_token_adapter, nullptr, w));
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchLoraShrink(d_v, v_stride, d_x, act_dtype, x_stride,
                                                     num_tokens, d_token_adapter,
                                                     CudaLoraSegments{}, w, AsStream(stream)));
  return absl::OkStatus();
}

absl::Status CudaBgmvExpand(const CudaLoraOutput* y, DType act_dtype, const float* d_v,
                            int64_t v_stride, const int32_t* d_token_adapter, int64_t num_tokens,
                            const CudaLoraWeights& w, void* stream) {
  LP_RETURN_IF_ERROR(CheckExpand("CudaBgmvExpand", y, act_dtype, d_v, v_stride, num_tokens,
                                 d_token_adapter, nullptr, w));
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchLoraExpand(y, act_dtype, d_v, v_stride, num_tokens,
                                                     d_token_adapter, CudaLoraSegments{}, w,
                                                     AsStream(stream)));
  return absl::OkStatus();
}

absl::Status CudaLoraScaleRows(const CudaLoraOutput* y, DType act_dtype,
                               const int32_t* d_token_adapter, int64_t num_tokens,
                               const CudaLoraRowScales& scales, void* stream) {
  LP_RETURN_IF_ERROR(
      CheckScaleRows("CudaLoraScaleRows", y, act_dtype, d_token_adapter, num_tokens, scales));
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchLoraScaleRows(y, act_dtype, d_token_adapter, num_tokens,
                                                        scales, AsStream(stream)));
  return absl::OkStatus();
}

}  // namespace loraplex::kernels::cuda
