# End-to-end tests of loraplex-server (a real process, real gRPC). Included from CMakeLists.txt.
if(TARGET loraplex-server)
  lp_test(server_e2e_test SRCS server_e2e_test.cc
    DEPS lp_proto gRPC::grpc++ nlohmann_json::nlohmann_json absl::strings absl::time
    LABELS "e2e")
  target_compile_definitions(server_e2e_test PRIVATE
    LP_SERVER_BINARY="$<TARGET_FILE:loraplex-server>")
  add_dependencies(server_e2e_test loraplex-server)
  # The offline generator is the reference for adapter runs when it is built.
  if(TARGET loraplex-generate)
    target_compile_definitions(server_e2e_test PRIVATE
      LP_GENERATE_BINARY="$<TARGET_FILE:loraplex-generate>")
    add_dependencies(server_e2e_test loraplex-generate)
  endif()
endif()
