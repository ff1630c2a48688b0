// cuBLAS is dlopen'ed, not linked (kernels/cuda/cublas_api.h). Loading the library and resolving
// its entry points needs no GPU, so this runs everywhere the CUDA build runs: a renamed symbol or
// a library the binary cannot find fails here in CI instead of on the first GPU machine.
#include <gtest/gtest.h>

#include <string>

#include "kernels/cuda/cublas_api.h"
#include "tests/testing/testing.h"

namespace loraplex::kernels::cuda {
namespace {

TEST(CublasLoadTest, LoadsWithoutADeviceAndResolvesEveryEntryPoint) {
  ASSERT_OK_AND_ASSIGN(const CublasApi* api, LoadCublas());
  ASSERT_NE(api, nullptr);
  EXPECT_NE(api->create, nullptr);
  EXPECT_NE(api->destroy, nullptr);
  EXPECT_NE(api->set_math_mode, nullptr);
  EXPECT_NE(api->set_stream, nullptr);
  EXPECT_NE(api->gemm_ex, nullptr);
  ASSERT_NE(api->get_status_name, nullptr);
  ASSERT_NE(api->get_status_string, nullptr);
  // Host-only functions of the loaded library answer for real.
  EXPECT_EQ(std::string(api->get_status_name(CUBLAS_STATUS_NOT_INITIALIZED)),
            "CUBLAS_STATUS_NOT_INITIALIZED");
  EXPECT_EQ(std::string(CublasStatusName(CUBLAS_STATUS_INVALID_VALUE)),
            "CUBLAS_STATUS_INVALID_VALUE");
  EXPECT_FALSE(std::string(CublasStatusString(CUBLAS_STATUS_INVALID_VALUE)).empty());
  // Loaded once: the second call hands back the same table.
  ASSERT_OK_AND_ASSIGN(const CublasApi* again, LoadCublas());
  EXPECT_EQ(again, api);
}

}  // namespace
}  // namespace loraplex::kernels::cuda
