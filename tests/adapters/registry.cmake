# The adapter registry (adapters/registry.h): versions, leases, eviction, persistence. Included
# from CMakeLists.txt. Labelled tsan: its concurrency test is what the TSan build runs.
if(TARGET lp_adapter_registry)
  lp_test(registry_test SRCS registry_test.cc DEPS lp_adapter_registry LABELS "adapters;tsan")
endif()
