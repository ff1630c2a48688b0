# LoRA in the forward pass (model/lora_apply.h): per-layer SGMV/BGMV application and mixed mode.
target_sources(lp_model PRIVATE ${CMAKE_CURRENT_LIST_DIR}/lora_apply.cc)
