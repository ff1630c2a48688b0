# Model-level benchmarks (scenario S1).
if(TARGET lp_model)
  lp_binary(decode_bench SRCS decode_bench.cc DEPS lp_model benchmark::benchmark)
endif()
if(TARGET lp_model)
  lp_binary(s2_bench SRCS s2_bench.cc DEPS lp_model benchmark::benchmark)
endif()
