# The trained demo adapters of adapters/examples/ (tools/train_demo_adapters.py) on held-out prompts
# through SmolLM2-135M-Instruct; skipped when models/ lacks the GGUF. Included from CMakeLists.txt.
if(TARGET lp_adapters)
  lp_test(demo_adapters_test SRCS demo_adapters_test.cc DEPS lp_adapters lp_model LABELS "adapters")
endif()
