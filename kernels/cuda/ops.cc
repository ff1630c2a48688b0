// Host wrappers of the element-wise, attention and sampling ops: validate what the host can see
// (sizes, null pointers, dtype), then launch (launch.h) and turn the cudaError_t into a Status.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <initializer_list>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch.h"
#include "kernels/cuda/validate.h"

namespace loraplex::kernels::cuda {
namespace {

cudaStream_t AsStream(void* stream) { return static_cast<cudaStream_t>(stream); }

}  // namespace

absl::Status CudaAddRmsNorm(void* d_out, void* d_x, const void* d_residual, const void* d_weight,
                            DType dtype, int64_t rows, int64_t dim, float eps, void* stream) {
  LP_RETURN_IF_ERROR(internal::CheckSizes("CudaAddRmsNorm", {{"rows", rows}, {"dim", dim}}));
  LP_RETURN_IF_ERROR(internal::CheckDType("CudaAddRmsNorm", "dtype", dtype));
  LP_RETURN_IF_ERROR(internal::CheckGrid("CudaAddRmsNorm", "rows", rows));
  if (rows > 0 && dim > 0) {
    LP_RETURN_IF_ERROR(internal::CheckPointers(
        "CudaAddRmsNorm",
        {{"d_out", d_out}, {"d_x", d_x}, {"d_residual", d_residual}, {"d_weight", d_weight}}));
  }
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchAddRmsNorm(d_out, d_x, d_residual, d_weight, dtype, rows,
                                                     dim, eps, AsStream(stream)));
  return absl::OkStatus();
}

absl::Status CudaConvert(void* d_dst, DType dst_dtype, const void* d_src, DType src_dtype,
                         int64_t n, void* stream) {
  LP_RETURN_IF_ERROR(internal::CheckSizes("CudaConvert", {{"n", n}}));
  LP_RETURN_IF_ERROR(internal::CheckDType("CudaConvert", "dst_dtype", dst_dtype));
  LP_RETURN_IF_ERROR(internal::CheckDType("CudaConvert", "src_dtype", src_dtype));
  if (n > 0)
    LP_RETURN_IF_ERROR(
        internal::CheckPointers("CudaConvert", {{"d_dst", d_dst}, {"d_src", d_src}}));
  LP_CUDA_RETURN_IF_ERROR(
      internal::LaunchConvert(d_dst, dst_dtype, d_src, src_dtype, n, AsStream(stream)));
  return absl::OkStatus();
}

absl::Status CudaAdd(void* d_y, const void* d_x, DType dtype, int64_t n, void* stream) {
  LP_RETURN_IF_ERROR(internal::CheckSizes("CudaAdd", {{"n", n}}));
  LP_RETURN_IF_ERROR(internal::CheckDType("CudaAdd", "dtype", dtype));
  if (n > 0) LP_RETURN_IF_ERROR(internal::CheckPointers("CudaAdd", {{"d_y", d_y}, {"d_x", d_x}}));
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchAdd(d_y, d_x, dtype, n, AsStream(stream)));
  return absl::OkStatus();
}

absl::Status CudaSiluMul(void* d_out, const void* d_gate, const void* d_up, DType dtype, int64_t n,
                         void* stream) {
  LP_RETURN_IF_ERROR(internal::CheckSizes("CudaSiluMul", {{"n", n}}));
  LP_RETURN_IF_ERROR(internal::CheckDType("CudaSiluMul", "dtype", dtype));
  if (n > 0) {
    LP_RETURN_IF_ERROR(internal::CheckPointers(
        "CudaSiluMul", {{"d_out", d_out}, {"d_gate", d_gate}, {"d_up", d_up}}));
  }
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchSiluMul(d_out, d_gate, d_up, dtype, n, AsStream(stream)));
  return absl::OkStatus();
}

absl::Status CudaRope(void* d_x, DType dtype, const int32_t* d_positions, int64_t tokens,
                      int64_t heads, int64_t head_dim, const float* d_inv_freq, void* stream) {
  LP_RETURN_IF_ERROR(internal::CheckSizes(
      "CudaRope", {{"tokens", tokens}, {"heads", heads}, {"head_dim", head_dim}}));
  LP_RETURN_IF_ERROR(internal::CheckDType("CudaRope", "dtype", dtype));
  if (head_dim % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("CudaRope: head_dim=", head_dim, " must be even (rotate-half pairs)"));
  }
  if (tokens * heads * head_dim > 0) {
    LP_RETURN_IF_ERROR(internal::CheckPointers(
        "CudaRope", {{"d_x", d_x}, {"d_positions", d_positions}, {"d_inv_freq", d_inv_freq}}));
  }
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchRope(d_x, dtype, d_positions, tokens, heads, head_dim,
                                               d_inv_freq, AsStream(stream)));
  return absl::OkStatus();
}

absl::Status CudaEmbed(void* d_out, DType out_dtype, const int32_t* d_ids, int64_t n,
                       const WeightView& table, void* stream) {
  LP_RETURN_IF_ERROR(internal::CheckSizes(
      "CudaEmbed", {{"n", n}, {"table.rows", table.rows}, {"table.cols", table.cols}}));
  LP_RETURN_IF_ERROR(internal::CheckDType("CudaEmbed", "out_dtype", out_dtype));
  LP_RETURN_IF_ERROR(internal::CheckDType("CudaEmbed", "table.dtype", table.dtype));
  if (n > 0 && table.cols > 0) {
    LP_RETURN_IF_ERROR(internal::CheckPointers(
        "CudaEmbed", {{"d_out", d_out}, {"d_ids", d_ids}, {"table.data", table.data}}));
  }
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchEmbed(d_out, out_dtype, d_ids, n, table.data, table.dtype,
                                                table.rows, table.cols, AsStream(stream)));
  return absl::OkStatus();
}

namespace {

absl::Status CheckAttention(const char* op, const AttentionBatch& batch, const KvLayout& layout) {
  LP_RETURN_IF_ERROR(
      internal::CheckSizes(op, {{"batch.num_tokens", batch.num_tokens},
                                {"layout.n_kv_heads", layout.n_kv_heads},
                                {"layout.head_dim", layout.head_dim},
                                {"layout.max_blocks_per_seq", layout.max_blocks_per_seq}}));
  if (layout.block_size <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": layout.block_size=", layout.block_size, " must be positive"));
  }
  if (layout.head_dim < 1 || layout.head_dim > internal::kCudaMaxHeadDim) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": layout.head_dim=", layout.head_dim,
                                                   " outside the supported 1..",
                                                   internal::kCudaMaxHeadDim));
  }
  if (layout.n_kv_heads < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": layout.n_kv_heads=", layout.n_kv_heads, " must be positive"));
  }
  if (batch.num_tokens > 0) {
    LP_RETURN_IF_ERROR(internal::CheckPointers(op, {{"batch.token_seq", batch.token_seq},
                                                    {"batch.token_pos", batch.token_pos},
                                                    {"batch.block_tables", batch.block_tables}}));
  }
  return internal::CheckGrid(op, "batch.num_tokens", batch.num_tokens);
}

}  // namespace

absl::Status CudaWriteKv(void* d_k_cache, void* d_v_cache, DType cache_dtype, const void* d_k,
                         const void* d_v, DType act_dtype, const AttentionBatch& batch,
                         const KvLayout& layout, void* stream) {
  LP_RETURN_IF_ERROR(CheckAttention("CudaWriteKv", batch, layout));
  LP_RETURN_IF_ERROR(internal::CheckDType("CudaWriteKv", "cache_dtype", cache_dtype));
  LP_RETURN_IF_ERROR(internal::CheckDType("CudaWriteKv", "act_dtype", act_dtype));
  if (batch.num_tokens > 0) {
    LP_RETURN_IF_ERROR(internal::CheckPointers(
        "CudaWriteKv",
        {{"d_k_cache", d_k_cache}, {"d_v_cache", d_v_cache}, {"d_k", d_k}, {"d_v", d_v}}));
  }
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchWriteKv(d_k_cache, d_v_cache, cache_dtype, d_k, d_v,
                                                  act_dtype, batch, layout, AsStream(stream)));
  return absl::OkStatus();
}

absl::Status CudaPagedAttention(void* d_out, const void* d_q, DType act_dtype,
                                const void* d_k_cache, const void* d_v_cache, DType cache_dtype,
                                const AttentionBatch& batch, const KvLayout& layout,
                                int64_t n_heads, float scale, int64_t sliding_window,
                                void* stream) {
  constexpr const char* kOp = "CudaPagedAttention";
  if (sliding_window < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(kOp, ": sliding_window=", sliding_window, " must be >= 0 (0 = none)"));
  }
  LP_RETURN_IF_ERROR(CheckAttention(kOp, batch, layout));
  LP_RETURN_IF_ERROR(internal::CheckDType(kOp, "act_dtype", act_dtype));
  LP_RETURN_IF_ERROR(internal::CheckDType(kOp, "cache_dtype", cache_dtype));
  if (n_heads < 1 || n_heads % layout.n_kv_heads != 0 || n_heads > 65535) {
    return absl::InvalidArgumentError(absl::StrCat(
        kOp, ": n_heads=", n_heads, " must be a positive multiple of layout.n_kv_heads=",
        layout.n_kv_heads, " and at most 65535"));
  }
  if (batch.num_tokens > 0) {
    LP_RETURN_IF_ERROR(internal::CheckPointers(
        kOp, {{"d_out", d_out}, {"d_q", d_q}, {"d_k_cache", d_k_cache}, {"d_v_cache", d_v_cache}}));
  }
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchPagedAttention(
      d_out, d_q, act_dtype, d_k_cache, d_v_cache, cache_dtype, batch, layout, n_heads, scale,
      sliding_window, AsStream(stream)));
  return absl::OkStatus();
}

absl::Status CudaTopK(int32_t* d_ids, float* d_values, float* d_logprobs, const void* d_logits,
                      DType dtype, int64_t rows, int64_t vocab, int64_t k, void* stream) {
  LP_RETURN_IF_ERROR(internal::CheckSizes("CudaTopK", {{"rows", rows}, {"vocab", vocab}}));
  LP_RETURN_IF_ERROR(internal::CheckDType("CudaTopK", "dtype", dtype));
  if (k < 1 || k > vocab || k > kCudaMaxTopK) {
    return absl::InvalidArgumentError(
        absl::StrCat("CudaTopK: k=", k, " outside 1..min(vocab=", vocab, ", ", kCudaMaxTopK, ")"));
  }
  if (vocab > INT32_MAX) {
    return absl::InvalidArgumentError(
        absl::StrCat("CudaTopK: vocab=", vocab, " does not fit the int32 ids"));
  }
  LP_RETURN_IF_ERROR(internal::CheckGrid("CudaTopK", "rows", rows));
  if (rows > 0) {
    LP_RETURN_IF_ERROR(internal::CheckPointers(
        "CudaTopK", {{"d_ids", d_ids}, {"d_values", d_values}, {"d_logits", d_logits}}));
  }
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchTopK(d_ids, d_values, d_logprobs, d_logits, dtype, rows,
                                               vocab, k, AsStream(stream)));
  return absl::OkStatus();
}

}  // namespace loraplex::kernels::cuda
