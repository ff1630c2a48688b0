# The CUDA model against the CPU model (cuda_model_test: skips without a device, with the reason;
# LP_REQUIRE_CUDA=1 makes it fail instead) and --device on every machine (cuda_device_test, which
# also runs the real loraplex-generate and loraplex-server binaries).
if(TARGET lp_model AND TARGET lp_adapters AND LP_ENABLE_CUDA)
  lp_test(cuda_model_test SRCS cuda_model_test.cc
    DEPS lp_adapters lp_model nlohmann_json::nlohmann_json LABELS "model;cuda")
endif()
# The server half of the no-device check needs loraplex-server built beside it (CI builds all);
# scripts/gpu-check.sh builds only loraplex-generate, and on its GPU machine that half is skipped.
if(TARGET lp_model AND TARGET loraplex-generate AND TARGET loraplex-server)
  lp_test(cuda_device_test SRCS cuda_device_test.cc
    DEPS lp_model nlohmann_json::nlohmann_json LABELS "model;cuda")
  target_compile_definitions(cuda_device_test PRIVATE
    LP_GENERATE_BIN="$<TARGET_FILE:loraplex-generate>"
    LP_SERVER_BIN="$<TARGET_FILE:loraplex-server>")
  add_dependencies(cuda_device_test loraplex-generate)
endif()

# The CUDA model's own logic on every machine, GPU or not: model/ and adapters/ compiled a second
# time into one test with a host emulation of kernels/cuda (cuda_emulation.cc) instead of the real
# backend, running cuda_model_test's checks. It covers buffer sizing, metadata packing, LoRA slice
# tables and passes, mixed mode, merge/unmerge and slot eviction; the real kernels are covered by
# tests/kernels/cuda_*_test.cc and, on a GPU, by cuda_model_test itself.
if(TARGET lp_model AND TARGET lp_adapters)
  # The CUDA model's sources are listed here too: in a build without LP_ENABLE_CUDA lp_model lacks
  # them (model/cuda.cmake), and this test must link there (CI's sanitizer and CUDA-off builds).
  set(_lp_emulated_srcs cuda_model_test.cc cuda_emulation.cc
      ${PROJECT_SOURCE_DIR}/model/cuda_model.cc ${PROJECT_SOURCE_DIR}/model/cuda_adapter_slots.cc
      ${PROJECT_SOURCE_DIR}/model/cuda_step_graphs.cc
      ${PROJECT_SOURCE_DIR}/model/cuda_device_memory.cc)
  foreach(_lp_tgt lp_model lp_adapters)
    get_target_property(_lp_srcs ${_lp_tgt} SOURCES)
    get_target_property(_lp_dir ${_lp_tgt} SOURCE_DIR)
    foreach(_lp_src ${_lp_srcs})
      if(NOT IS_ABSOLUTE "${_lp_src}")
        set(_lp_src "${_lp_dir}/${_lp_src}")
      endif()
      list(APPEND _lp_emulated_srcs "${_lp_src}")
    endforeach()
  endforeach()
  list(REMOVE_DUPLICATES _lp_emulated_srcs)
  lp_test(cuda_model_emulated_test SRCS ${_lp_emulated_srcs}
    DEPS lp_tokenizer lp_formats lp_kernels lp_common Eigen3::Eigen nlohmann_json::nlohmann_json
         re2::re2 absl::strings absl::status absl::statusor
    LABELS "model")
  target_compile_definitions(cuda_model_emulated_test PRIVATE LP_HAVE_CUDA=1 LP_CUDA_EMULATED=1)
endif()
