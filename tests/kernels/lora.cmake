# LoRA kernels: fast SGMV/BGMV (AVX2 and scalar paths) against the readable reference on the grid;
# under TSan too, for the fused shrink+expand that shares one batch between the pool threads.
lp_test(kernels_lora_test SRCS lora_kernels_test.cc DEPS lp_kernels LABELS "kernels;tsan")
