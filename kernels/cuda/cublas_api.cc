#include "kernels/cuda/cublas_api.h"

#include <dlfcn.h>

#include <string>
#include <type_traits>
#include <vector>

#include "absl/strings/str_cat.h"

// Stringifies after macro expansion: cublas_v2.h renames cublasCreate to cublasCreate_v2 etc.,
// and dlsym needs the exported name.
#define LP_CUBLAS_STR_(x) #x
#define LP_CUBLAS_STR(x) LP_CUBLAS_STR_(x)

namespace loraplex::kernels::cuda {
namespace {

absl::StatusOr<CublasApi> Load() {
  // The soname of the cuBLAS the headers came from; found through the binary's run path (the
  // CUDA library folder, from linking cudart) or LD_LIBRARY_PATH, else in the build's toolkit.
  const std::string soname = absl::StrCat("libcublas.so.", CUBLAS_VER_MAJOR);
  std::vector<std::string> candidates = {soname};
#ifdef LP_CUBLAS_DIR
  candidates.push_back(absl::StrCat(LP_CUBLAS_DIR, "/", soname));
#endif
  void* lib = nullptr;
  std::string errors;
  for (const std::string& name : candidates) {
    lib = dlopen(name.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (lib != nullptr) break;
    const char* e = dlerror();
    absl::StrAppend(&errors, errors.empty() ? "" : "; ", e != nullptr ? e : name);
  }
  if (lib == nullptr) return absl::UnavailableError(absl::StrCat("cannot load cuBLAS: ", errors));
  CublasApi api;
  std::string missing;
  auto resolve = [&](auto* fn, const char* symbol) {
    *fn = reinterpret_cast<std::remove_pointer_t<decltype(fn)>>(dlsym(lib, symbol));
    if (*fn == nullptr) absl::StrAppend(&missing, missing.empty() ? "" : ", ", symbol);
  };
  resolve(&api.create, LP_CUBLAS_STR(cublasCreate));
  resolve(&api.destroy, LP_CUBLAS_STR(cublasDestroy));
  resolve(&api.set_math_mode, LP_CUBLAS_STR(cublasSetMathMode));
  resolve(&api.set_stream, LP_CUBLAS_STR(cublasSetStream));
  resolve(&api.set_workspace, LP_CUBLAS_STR(cublasSetWorkspace));
  resolve(&api.gemm_ex, LP_CUBLAS_STR(cublasGemmEx));
  resolve(&api.get_status_name, LP_CUBLAS_STR(cublasGetStatusName));
  resolve(&api.get_status_string, LP_CUBLAS_STR(cublasGetStatusString));
  if (!missing.empty()) {
    // Kept loaded: other threads may hold nothing from it, but unloading buys nothing either.
    return absl::UnavailableError(
        absl::StrCat("cuBLAS (", soname, ") lacks the symbols ", missing));
  }
  return api;
}

const absl::StatusOr<CublasApi>& Loaded() {
  static const absl::StatusOr<CublasApi>* const api = new absl::StatusOr<CublasApi>(Load());
  return *api;
}

}  // namespace

absl::StatusOr<const CublasApi*> LoadCublas() {
  const absl::StatusOr<CublasApi>& api = Loaded();
  if (!api.ok()) return api.status();
  return &*api;
}

const char* CublasStatusName(cublasStatus_t status) {
  const absl::StatusOr<CublasApi>& api = Loaded();
  return api.ok() ? api->get_status_name(status) : "cuBLAS status";
}

const char* CublasStatusString(cublasStatus_t status) {
  const absl::StatusOr<CublasApi>& api = Loaded();
  return api.ok() ? api->get_status_string(status) : "cuBLAS not loaded";
}

}  // namespace loraplex::kernels::cuda
