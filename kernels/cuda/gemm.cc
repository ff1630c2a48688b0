// CudaBlas: the base-model GEMMs through cublasGemmEx (cuda_gemm.h).
//
// Row-major y[m, n] = x[m, k] W^T is, read column-major, y^T[n, m] = W[n, k] x^T[k, m]: W's
// row-major [n, k] buffer is a column-major [k, n] matrix, so cuBLAS gets op(A) = T on W (lda = k),
// op(B) = N on x (ldb = k) and writes C column-major [n, m] with ldc = n, which is y row-major.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <climits>
#include <cstdint>
#include <memory>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "kernels/cuda/cublas_api.h"
#include "kernels/cuda/cuda_gemm.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/validate.h"

namespace loraplex::kernels::cuda {
namespace {

const char* Name(DType d) { return d == DType::kF32 ? "f32" : "bf16"; }
cudaDataType_t CudaType(DType d) { return d == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF; }

}  // namespace

absl::StatusOr<std::unique_ptr<CudaBlas>> CudaBlas::Create() {
  std::string why;
  if (!CudaDeviceAvailable(&why)) {
    return absl::UnavailableError(absl::StrCat("CudaBlas: no CUDA device: ", why));
  }
  LP_ASSIGN_OR_RETURN(const CublasApi* blas, LoadCublas());
  cublasHandle_t handle = nullptr;
  LP_CUBLAS_RETURN_IF_ERROR(blas->create(&handle));
  // Plain f32 GEMMs stay f32: no TF32 rounding of inputs behind the tests' backs.
  if (cublasStatus_t err = blas->set_math_mode(handle, CUBLAS_DEFAULT_MATH);
      err != CUBLAS_STATUS_SUCCESS) {
    blas->destroy(handle);
    return CublasErrorToStatus(err, "cublasSetMathMode", __FILE__, __LINE__);
  }
  return std::unique_ptr<CudaBlas>(new CudaBlas(handle));
}

absl::Status CudaBlas::UseFixedWorkspace(size_t bytes) {
  LP_ASSIGN_OR_RETURN(CudaBuffer workspace, CudaBuffer::Allocate(bytes));
  const CublasApi& blas = **LoadCublas();  // loaded: this object has a handle
  LP_CUBLAS_RETURN_IF_ERROR(blas.set_workspace(handle_, workspace.data(), bytes));
  workspace_ = std::move(workspace);
  return absl::OkStatus();
}

CudaBlas::~CudaBlas() {
  // A handle exists only after LoadCublas succeeded.
  if (handle_ != nullptr) (*LoadCublas())->destroy(handle_);
}

absl::Status CudaBlas::Gemm(void* d_y, DType y_dtype, const void* d_x, DType x_dtype, int64_t m,
                            const WeightView& w, bool accumulate, void* stream) {
  constexpr const char* kOp = "CudaBlas::Gemm";
  LP_RETURN_IF_ERROR(internal::CheckSizes(kOp, {{"m", m}, {"w.rows", w.rows}, {"w.cols", w.cols}}));
  LP_RETURN_IF_ERROR(internal::CheckDType(kOp, "y_dtype", y_dtype));
  LP_RETURN_IF_ERROR(internal::CheckDType(kOp, "x_dtype", x_dtype));
  LP_RETURN_IF_ERROR(internal::CheckDType(kOp, "w.dtype", w.dtype));
  for (int64_t v : {m, w.rows, w.cols}) {
    if (v > INT_MAX) {
      return absl::InvalidArgumentError(
          absl::StrCat(kOp, ": size ", v, " exceeds cuBLAS's int dimensions"));
    }
  }
  const bool bf16_weights = w.dtype == DType::kBF16;
  const bool supported = bf16_weights ? true : (x_dtype == DType::kF32 && y_dtype == DType::kF32);
  if (!supported) {
    return absl::UnimplementedError(absl::StrCat(kOp, ": W ", Name(w.dtype), ", x ", Name(x_dtype),
                                                 ", y ", Name(y_dtype),
                                                 " is not a supported combination"));
  }
  const int n = static_cast<int>(w.rows);
  const int k = static_cast<int>(w.cols);
  const int rows = static_cast<int>(m);
  if (rows == 0 || n == 0) return absl::OkStatus();
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (k == 0) {  // an empty sum; cuBLAS refuses lda = 0
    LP_RETURN_IF_ERROR(internal::CheckPointers(kOp, {{"d_y", d_y}}));
    if (!accumulate) {
      const size_t elem = y_dtype == DType::kF32 ? 4 : 2;
      LP_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(d_y, 0, static_cast<size_t>(m) * n * elem, s));
    }
    return absl::OkStatus();
  }
  LP_RETURN_IF_ERROR(
      internal::CheckPointers(kOp, {{"d_y", d_y}, {"d_x", d_x}, {"w.data", w.data}}));

  const CublasApi& blas = **LoadCublas();  // loaded: this object has a handle
  LP_CUBLAS_RETURN_IF_ERROR(blas.set_stream(handle_, s));
  const void* x = d_x;
  DType x_type = x_dtype;
  if (bf16_weights && x_dtype == DType::kF32) {
    // cuBLAS has no bf16 x f32 product: round the activations to bf16 once.
    const size_t bytes = static_cast<size_t>(m) * k * 2;
    if (scratch_.size() < bytes) {
      scratch_ = CudaBuffer();  // free first: the old and new buffers need not coexist
      LP_ASSIGN_OR_RETURN(scratch_, CudaBuffer::Allocate(bytes));
    }
    LP_RETURN_IF_ERROR(CudaConvert(scratch_.data(), DType::kBF16, d_x, DType::kF32, m * k, stream));
    x = scratch_.data();
    x_type = DType::kBF16;
  }
  const float alpha = 1.0f;
  const float beta = accumulate ? 1.0f : 0.0f;
  LP_CUBLAS_RETURN_IF_ERROR(blas.gemm_ex(handle_, CUBLAS_OP_T, CUBLAS_OP_N, n, rows, k, &alpha,
                                         w.data, CudaType(w.dtype), k, x, CudaType(x_type), k,
                                         &beta, d_y, CudaType(y_dtype), n, CUBLAS_COMPUTE_32F,
                                         CUBLAS_GEMM_DEFAULT));
  return absl::OkStatus();
}

}  // namespace loraplex::kernels::cuda
