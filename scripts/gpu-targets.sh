# Sourced by scripts/gpu-check.sh and scripts/gpu-pack.sh: the targets the GPU check builds or
# packs, and where each one's binary lies inside a build folder.
LP_GPU_TARGETS=(cuda_kernels_test cuda_rmsnorm_test cuda_model_test cuda_device_test cuda_bench
                loraplex-generate decode_bench s2_bench loraplex-server loraplex)
declare -A LP_GPU_TARGET_PATH=(
  [cuda_kernels_test]=tests/kernels/cuda_kernels_test
  [cuda_rmsnorm_test]=tests/kernels/cuda_rmsnorm_test
  [cuda_model_test]=tests/model/cuda_model_test
  [cuda_device_test]=tests/model/cuda_device_test
  [cuda_bench]=bench/cuda_bench
  [loraplex-generate]=client/loraplex-generate
  [decode_bench]=bench/decode_bench
  [s2_bench]=bench/s2_bench
  [loraplex-server]=server/loraplex-server
  [loraplex]=client/loraplex
)
