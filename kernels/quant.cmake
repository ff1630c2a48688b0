# Quantized weights (kernels/quant.h): block geometry and row conversion, the threaded quantized
# Gemm, and its per-ISA integer dot-product loops. As in kernels/CMakeLists.txt, only the per-ISA
# files get ISA flags, and quant_gemm.cc picks one after a runtime CPU check.
target_sources(lp_kernels PRIVATE
  cpu/quant.cc
  cpu/quant_gemm.cc
  cpu/quant_ops_scalar.cc
  # Always compiled: without the flags below each returns a null table.
  cpu/quant_ops_avx2.cc
  cpu/quant_ops_avx512.cc
  cpu/quant_ops_amx.cc)
# DequantizeRow must match ggml and the gguf package bit for bit: every product and sum rounded on
# its own, never fused.
set_source_files_properties(cpu/quant.cc PROPERTIES COMPILE_OPTIONS "-ffp-contract=off")
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  set_source_files_properties(cpu/quant_ops_avx2.cc PROPERTIES COMPILE_OPTIONS
                              "-mavx2;-mfma;-mf16c")
  include(CheckCXXCompilerFlag)
  set(LP_AVX512_VNNI_FLAGS -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512vnni -mfma -mf16c)
  string(REPLACE ";" " " lp_avx512_vnni_flags_str "${LP_AVX512_VNNI_FLAGS}")
  check_cxx_compiler_flag("${lp_avx512_vnni_flags_str}" LP_HAVE_AVX512_VNNI_FLAGS)
  if(LP_HAVE_AVX512_VNNI_FLAGS)
    set_source_files_properties(cpu/quant_ops_avx512.cc PROPERTIES COMPILE_OPTIONS
                                "${LP_AVX512_VNNI_FLAGS}")
  endif()
  set(LP_AMX_FLAGS -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c -mamx-tile -mamx-int8)
  string(REPLACE ";" " " lp_amx_flags_str "${LP_AMX_FLAGS}")
  check_cxx_compiler_flag("${lp_amx_flags_str}" LP_HAVE_AMX_FLAGS)
  if(LP_HAVE_AMX_FLAGS)
    set_source_files_properties(cpu/quant_ops_amx.cc PROPERTIES COMPILE_OPTIONS "${LP_AMX_FLAGS}")
  endif()
endif()
