// The CPU backend (model/backend.h; internal to model/): the base weights in host memory and the
// batched forward pass as a sequence of kernels/kernels.h ops, with LoRA applied per module group
// by ApplyLora (model/lora_apply.h) from the step's plan.
//
// Weight formats. Every product with a stored matrix (the seven linears of each layer and the LM
// head) goes through CpuLinear (or CpuLinearShared, for the modules that read one input: q, k, v;
// gate, up), and every row lookup (the token embedding) through CpuEmbed; they switch on the
// matrix's storage format (kernels::DType: f32, bf16, or GGUF's quantized blocks, which
// kernels::Gemm multiplies with integer dot products). A new CPU storage format is another case of
// these functions plus its storage in StoredMatrix; the forward pass does not change.
//
// KV cache: f32 or f16 pools (KvCache::dtype()), each with its own kernels::WriteKv and
// PagedAttention.
//
// Scratch: activations of the largest step so far and the LoRA buffers, kept between steps and
// reported (with the LoRA plan's vectors) through scratch_bytes().
//
// Not thread-safe (one engine thread owns the model), except scratch_bytes().
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "kernels/kernels.h"
#include "model/backend.h"
#include "model/llama_config.h"
#include "model/llama_weights.h"

namespace loraplex::model {

// y[m, w.rows] = x[m, w.cols] W^T for a stored matrix in any CPU weight format; x and y f32.
void CpuLinear(float* y, const float* x, int64_t m, const kernels::WeightView& w);
// The same for several matrices that read one x, in one call: for quantized weights x is quantized
// once and all the outputs' rows are split across the threads together (kernels::GemmShared).
void CpuLinearShared(const float* x, int64_t m, std::initializer_list<kernels::GemmOutput> outputs);
// out[t, :] = table[ids[t], :] widened to f32, for a table in any CPU weight format.
void CpuEmbed(float* out, const int32_t* ids, int64_t n, const kernels::WeightView& table);

// Takes the host weights and the RoPE inverse frequencies (LlamaConfig::RopeInvFreq).
std::unique_ptr<Backend> CreateCpuBackend(const LlamaConfig& config, LlamaWeights weights,
                                          std::vector<float> inv_freq);

}  // namespace loraplex::model
