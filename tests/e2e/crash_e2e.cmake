# Crash consistency of the state directory against a real loraplex-server: kill -9 at random
# points of uploads, replaces, loads, unloads and merges (crash_e2e_test); a state directory that
# runs out of space (a small tmpfs when mount is permitted) or whose writes, fsyncs, renames and
# creations fail (an LD_PRELOAD interposer, no privileges needed; disk_fault_e2e_test). What both
# share is crash_e2e_util.h. Included from CMakeLists.txt.
if(TARGET loraplex-server AND TARGET loraplex-generate AND LP_BUILD_TESTS)
  # The interposer is preloaded into the server; it stays free of sanitizers so that it can sit in
  # front of a sanitized server's runtime.
  add_library(lp_fault_inject SHARED fault_inject.cc)
  target_compile_options(lp_fault_inject PRIVATE -fno-sanitize=all)
  target_link_options(lp_fault_inject PRIVATE -fno-sanitize=all)
  target_link_libraries(lp_fault_inject PRIVATE ${CMAKE_DL_LIBS})
  foreach(test crash_e2e_test disk_fault_e2e_test)
    lp_test(${test} SRCS ${test}.cc ${LP_E2E_TSAN_SRCS}
      DEPS lp_proto lp_adapter_registry gRPC::grpc++ nlohmann_json::nlohmann_json absl::strings
           absl::time
      LABELS "e2e")
    target_compile_definitions(${test} PRIVATE
      LP_SERVER_BINARY="$<TARGET_FILE:loraplex-server>"
      LP_GENERATE_BINARY="$<TARGET_FILE:loraplex-generate>")
    add_dependencies(${test} loraplex-server loraplex-generate)
  endforeach()
  # Only the disk faults preload the interposer.
  target_compile_definitions(disk_fault_e2e_test PRIVATE
    LP_FAULT_LIB="$<TARGET_FILE:lp_fault_inject>")
  add_dependencies(disk_fault_e2e_test lp_fault_inject)
endif()
