# Multi-adapter LoRA ops (kernels/lora.h): readable reference, threaded fast version, and its
# AVX2/FMA micro-kernel in a file of its own so only it gets the ISA flags; lora_fast.cc checks the
# CPU at runtime before calling it.
target_sources(lp_kernels PRIVATE cpu/lora_reference.cc cpu/lora_fast.cc)
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  target_sources(lp_kernels PRIVATE cpu/lora_fast_avx2.cc)
  set_source_files_properties(cpu/lora_fast_avx2.cc PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma")
endif()
