# Merge/unmerge cycles restore the base bit for bit.
if(TARGET lp_adapters)
  lp_test(merge_cycles_test SRCS merge_cycles_test.cc DEPS lp_adapters lp_model LABELS "adapters")
endif()
