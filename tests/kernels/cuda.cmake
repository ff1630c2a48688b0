# CUDA op tests: every op of kernels/cuda/ against its CPU reference. Built only with
# LP_ENABLE_CUDA; without a device each test skips with "no CUDA device found: <reason>", and with
# LP_REQUIRE_CUDA=1 (scripts/gpu-check.sh) it fails instead.
if(LP_ENABLE_CUDA)
  lp_test(cuda_kernels_test
    SRCS cuda_ops_test.cc cuda_attention_test.cc cuda_lora_test.cc cuda_gemm_test.cc
         cuda_cublas_load_test.cc
    DEPS lp_kernels lp_kernels_cuda
    LABELS "kernels;cuda")
endif()
