# End-to-end reliability cases (impatient clients, cancelled uploads, a merge held up while other
# adapter calls come) against a real loraplex-server; loraplex-generate is the reference for
# outputs. Included from CMakeLists.txt. All of it also runs under TSan.
if(TARGET loraplex-server AND TARGET loraplex-generate)
  lp_test(reliability_e2e_test SRCS reliability_e2e_test.cc ${LP_E2E_TSAN_SRCS}
    DEPS lp_proto lp_adapter_registry gRPC::grpc++ absl::strings absl::time absl::statusor
    LABELS "e2e;tsan")
  target_compile_definitions(reliability_e2e_test PRIVATE
    LP_SERVER_BINARY="$<TARGET_FILE:loraplex-server>"
    LP_GENERATE_BINARY="$<TARGET_FILE:loraplex-generate>")
  add_dependencies(reliability_e2e_test loraplex-server loraplex-generate)
endif()
