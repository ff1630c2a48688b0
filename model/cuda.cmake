# Device choice (model/device.h) for every build, and with LP_ENABLE_CUDA the CUDA backend
# (model/cuda_model.h, model/cuda_adapter_slots.h) behind LoadOptions.device = kCuda. These files
# include only kernels/cuda's plain C++ headers; LP_HAVE_CUDA tells device.cc the backend exists.
target_sources(lp_model PRIVATE ${CMAKE_CURRENT_LIST_DIR}/device.cc)
if(LP_ENABLE_CUDA)
  target_sources(lp_model PRIVATE ${CMAKE_CURRENT_LIST_DIR}/cuda_model.cc
                                  ${CMAKE_CURRENT_LIST_DIR}/cuda_adapter_slots.cc
                                  ${CMAKE_CURRENT_LIST_DIR}/cuda_step_graphs.cc
                                  ${CMAKE_CURRENT_LIST_DIR}/cuda_device_memory.cc)
  target_compile_definitions(lp_model PUBLIC LP_HAVE_CUDA=1)
  target_link_libraries(lp_model PUBLIC lp_kernels_cuda)
endif()
