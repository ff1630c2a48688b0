# The adapter registry (adapters/registry.h): versions, leases, eviction, persistence. Included
# from CMakeLists.txt. Labelled tsan: its concurrency test is what the TSan build runs.
if(TARGET lp_adapter_registry)
  lp_test(registry_test SRCS registry_test.cc DEPS lp_adapter_registry LABELS "adapters;tsan")
  # CMake 3.25's gtest_discover_tests flattens a label list (see tests/formats/CMakeLists.txt):
  # re-apply both labels after discovery.
  set(_lp_registry_labels "${CMAKE_CURRENT_BINARY_DIR}/registry_test_labels.cmake")
  file(WRITE "${_lp_registry_labels}"
       "if(DEFINED registry_test_TESTS)\n"
       "  set_tests_properties(\${registry_test_TESTS} PROPERTIES LABELS \"adapters;tsan\")\n"
       "endif()\n")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES "${_lp_registry_labels}")
endif()
