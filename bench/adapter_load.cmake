# LoadAdapter -> READY latency with its phase breakdown (bench/adapter_load_bench.cc; issue 5).
if(TARGET lp_adapter_registry)
  lp_binary(adapter_load_bench SRCS adapter_load_bench.cc
    DEPS lp_adapter_registry lp_formats lp_model nlohmann_json::nlohmann_json absl::strings
         absl::time)
endif()
