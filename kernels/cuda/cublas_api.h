// cuBLAS, loaded with dlopen on first use instead of linked: a process that never creates a
// CudaBlas (every CPU run of the server and tools) does not map libcublas and libcublasLt at all.
// Linked, libcublasLt's static initialisers alone made ~84 MiB of its .bss/.lbss resident and its
// loading another ~61 MiB of file-backed pages, in every binary, GPU or not (measured with
// /proc/PID/smaps on loraplex-server, docs/benchmarks.md "resident memory").
//
// Only the entry points CudaBlas and the status messages need are resolved; their types come
// from cublas_v2.h, so a prototype change fails to compile rather than at run time.
#pragma once

#include <cublas_v2.h>

#include "absl/status/statusor.h"

namespace loraplex::kernels::cuda {

struct CublasApi {
  decltype(&cublasCreate) create = nullptr;
  decltype(&cublasDestroy) destroy = nullptr;
  decltype(&cublasSetMathMode) set_math_mode = nullptr;
  decltype(&cublasSetStream) set_stream = nullptr;
  decltype(&cublasSetWorkspace) set_workspace = nullptr;
  // The exported overload (computeType a cublasComputeType_t); cublas_api.h adds an inline C++
  // one taking cudaDataType.
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int, int, int,
                            const void*, const void*, cudaDataType, int, const void*, cudaDataType,
                            int, const void*, void*, cudaDataType, int, cublasComputeType_t,
                            cublasGemmAlgo_t) = nullptr;
  decltype(&cublasGetStatusName) get_status_name = nullptr;
  decltype(&cublasGetStatusString) get_status_string = nullptr;
};

// The library's entry points, loaded once (thread-safe; later calls return the same result).
// UNAVAILABLE naming the library and dlerror() when it cannot be loaded or lacks a symbol.
absl::StatusOr<const CublasApi*> LoadCublas();

// A status's name and description for messages: from the library when it is loaded, else a
// placeholder (a cuBLAS status can only come from a loaded library, so that is a fallback only).
const char* CublasStatusName(cublasStatus_t status);
const char* CublasStatusString(cublasStatus_t status);

}  // namespace loraplex::kernels::cuda
