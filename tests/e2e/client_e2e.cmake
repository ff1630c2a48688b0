# End-to-end tests of the `loraplex` client against a real loraplex-server. Included from
# tests/e2e/CMakeLists.txt.
if(TARGET loraplex-server AND TARGET loraplex)
  lp_test(client_e2e_test SRCS client_e2e_test.cc
    DEPS nlohmann_json::nlohmann_json absl::strings absl::time LABELS "e2e")
  target_compile_definitions(client_e2e_test PRIVATE
    LP_SERVER_BINARY="$<TARGET_FILE:loraplex-server>" LP_CLIENT_BINARY="$<TARGET_FILE:loraplex>")
  add_dependencies(client_e2e_test loraplex-server loraplex)
endif()
