# LoRA in the forward pass: the step's plan (model/lora_plan.h: segments, SGMV/BGMV choice,
# mixed-mode passes) and its per-layer application on the CPU (model/lora_apply.h).
target_sources(lp_model PRIVATE ${CMAKE_CURRENT_LIST_DIR}/lora_plan.cc
                                ${CMAKE_CURRENT_LIST_DIR}/lora_apply.cc)
