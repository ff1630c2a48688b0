# End-to-end tests of loraplex-server (a real process, real gRPC). Included from CMakeLists.txt.
if(TARGET loraplex-server)
  lp_test(server_e2e_test SRCS server_e2e_test.cc ${LP_E2E_TSAN_SRCS}
    DEPS lp_proto lp_kernels gRPC::grpc++ nlohmann_json::nlohmann_json absl::strings absl::time
    LABELS "e2e")
  # The TSan stage runs the cases below against a TSan-built server (tests/tsan.supp,
  # server/reactors.h); the others take minutes under TSan on two cores and add no
  # concurrency the first ones lack (SmolLM2 alone takes ~4 min).
  lp_tsan_subset(server_e2e_test "e2e"
    ServerE2eTest.GreedyStreamAndCompleteGiveTheGoldenStory
    ServerE2eTest.SixtyFourConcurrentStreamsEqualTheirSoloRuns
    ServerE2eTest.CancelAndDeadlineFreeBlocksAndSpareOthers
    ServerE2eTest.EveryBadInputGetsItsCode
    ServerE2eTest.FloodOfBadRequestsDoesNotHarmGoodOnes
    ServerE2eTest.TokenizeDetokenizeModelInfoHealthAndMetrics
    ServerAdapterE2eTest.SixtyFourMixedAdapterStreamsEqualTheirSoloRuns
    ServerE2eQueueTest.QueueFullIsResourceExhausted
    ServerE2eShutdownTest.SigtermFinishesInFlightRefusesNewAndExitsZero
    ServerE2eShutdownTest.IdleSigtermWithAConnectedClientExitsZero)
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
