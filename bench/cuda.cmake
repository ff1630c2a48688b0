# CUDA kernel benchmarks (bench/cuda_bench.cc): SGMV/BGMV bandwidth against a device-to-device copy,
# GEMM TFLOP/s of CudaBlas against a plain cublasGemmEx. Run by scripts/gpu-check.sh.
if(LP_ENABLE_CUDA)
  lp_binary(cuda_bench SRCS cuda_bench.cc
            DEPS lp_kernels_cuda CUDA::cudart CUDA::cublas benchmark::benchmark)
endif()
