# Model-level benchmarks (scenario S1).
if(TARGET lp_model)
  lp_binary(decode_bench SRCS decode_bench.cc DEPS lp_model benchmark::benchmark)
endif()
