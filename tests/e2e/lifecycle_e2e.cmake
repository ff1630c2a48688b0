# End-to-end tests of the adapter lifecycle (Adapters service, registry, auth, TLS) against a real
# loraplex-server; loraplex-generate is the reference for outputs. Included from CMakeLists.txt.
if(TARGET loraplex-server AND TARGET loraplex-generate)
  # All of it also runs under TSan (about 20 s there): uploads, loads, merges, restarts and TLS
  # against a TSan-built server.
  lp_test(lifecycle_e2e_test SRCS lifecycle_e2e_test.cc ${LP_E2E_TSAN_SRCS}
    DEPS lp_proto lp_adapter_registry gRPC::grpc++ nlohmann_json::nlohmann_json absl::strings
         absl::time
    LABELS "e2e;tsan")
  target_compile_definitions(lifecycle_e2e_test PRIVATE
    LP_SERVER_BINARY="$<TARGET_FILE:loraplex-server>"
    LP_GENERATE_BINARY="$<TARGET_FILE:loraplex-generate>")
  add_dependencies(lifecycle_e2e_test loraplex-server loraplex-generate)
endif()
