# SGMV/BGMV against a naive per-adapter GEMM loop (bench/lora_bench.cc).
lp_binary(lora_bench SRCS lora_bench.cc DEPS lp_kernels benchmark::benchmark)
