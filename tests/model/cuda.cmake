# The CUDA model against the CPU model (cuda_model_test: skips without a device, with the reason;
# LP_REQUIRE_CUDA=1 makes it fail instead) and --device on every machine (cuda_device_test, which
# also runs the real loraplex-generate and loraplex-server binaries).
if(TARGET lp_model AND TARGET lp_adapters AND LP_ENABLE_CUDA)
  lp_test(cuda_model_test SRCS cuda_model_test.cc DEPS lp_adapters lp_model LABELS "model;cuda")
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
