// The micro-kernel interface between the LoRA scheduler (lora_fast.cc) and its ISA-specific
// kernels (lora_fast_avx2.cc, and the portable one in lora_fast.cc). Internal to kernels/cpu.
//
// A tile is one small strided GEMM: for i < num_tokens and row_begin <= n < row_end,
//   out[i][n] (+)= sum_{k < w.cols} W[n, k] * input_i[k]
// where input_i is token i's input row *packed* by the same kernel's Pack for w.dtype: the
// kernel may reorder the elements (the AVX2 bf16 kernel stores each 16-block as its 8 even then
// its 8 odd elements, to match the in-register bf16 widening) and pads with zeros to
// PackedLength(w.cols) floats, so that no kernel needs a scalar tail on the input side.
//
// Determinism: every kernel computes each output element with one fixed sequence of operations
// that depends only on (dtype, w.cols), never on how tokens and rows were blocked into tiles. So
// SGMV and BGMV give the same bits, and so does any grouping of an adapter's tokens below
// kGemmMinTokens (lora_fast.cc); an adapter with more tokens in the call goes through the blocked
// Gemm instead, whose sums run in another order (as the base projections' do between decode and
// prefill shapes).
#pragma once

#include <cstdint>

#include "kernels/kernels.h"

namespace loraplex::kernels::lora_internal {

// Floats a packed input row of k elements takes (k rounded up to 8).
inline int64_t PackedLength(int64_t k) { return (k + 7) & ~int64_t{7}; }

struct Tile {
  const WeightView* w = nullptr;  // [rows, cols], f32 or bf16
  int64_t row_begin = 0, row_end = 0;
  const float* const* in = nullptr;  // [num_tokens] packed input rows
  float* const* out = nullptr;       // [num_tokens] output rows (indexed by weight row n)
  int64_t num_tokens = 0;
  bool accumulate = false;  // += instead of =
};

struct MicroKernel {
  // dst[PackedLength(k)] = src[k] in the layout Tile expects for weights of `dtype`.
  void (*pack)(float* dst, const float* src, int64_t k, DType dtype);
  void (*tile)(const Tile& tile);
  const char* name;
};

// lora_fast_avx2.cc; use only when the CPU has AVX2 and FMA.
const MicroKernel& Avx2Kernel();
// lora_fast.cc; any CPU.
const MicroKernel& ScalarKernel();

}  // namespace loraplex::kernels::lora_internal
