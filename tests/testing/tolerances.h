// The one tolerance table. Every comparison of floating-point results in the tests takes its
// tolerance from here; each entry says why it is what it is. A check passes per element when
// |actual - expected| <= atol + rtol * |expected|.
#pragma once

namespace loraplex::testing {

struct Tolerance {
  float atol;
  float rtol;
};

// Bit-exact operations (dequantization that mirrors the reference arithmetic, copies).
inline constexpr Tolerance kExact{0.0f, 0.0f};

// Fast f32 kernel vs the readable f32 loop: the same products summed in a different order (SIMD
// lanes, blocking). Error grows like sqrt(K) * eps * |x||w|; with K <= 8192 and unit-scale inputs
// 1e-4 absolute / 1e-4 relative leaves a wide margin and still catches a wrong index.
inline constexpr Tolerance kF32KernelVsReference{1e-4f, 1e-4f};

// Fast bf16-weight kernel vs the readable loop over the same bf16 weights: both accumulate in f32,
// so this is again only summation order.
inline constexpr Tolerance kBf16KernelVsReference{1e-4f, 1e-4f};

// Full f32 forward pass vs HF transformers in f32 (logits). Different summation order in every
// matmul and in softmax over 30 layers; observed max errors are ~1e-5 on stories260K and ~1e-3 on
// SmolLM2 whose logits reach |30|.
inline constexpr Tolerance kF32ModelLogits{2e-3f, 1e-4f};

// bf16-stored weights vs an f32 reference: each weight carries up to 2^-9 relative rounding, which
// after a full model gives logit differences of a few tenths. Used only to check that bf16 stays
// close, never for exactness.
inline constexpr Tolerance kBf16ModelLogits{0.5f, 0.05f};

// CUDA (bf16 activations, f32 accumulation) vs the CPU f32 reference for a single op.
inline constexpr Tolerance kCudaBf16Op{2e-2f, 2e-2f};

// CUDA op in f32 (f32 or bf16-widened inputs, f32 math, f32 output) vs the CPU f32 reference:
// summation order (warp trees, cuBLAS blocking, online softmax) and CUDA's expf/sincosf, which are
// within 2 ulp of glibc's. The same budget as kF32KernelVsReference, for the same reasons; kept
// apart so that the two can be tuned independently if a device disagrees.
inline constexpr Tolerance kCudaF32Op{1e-4f, 1e-4f};

// The CUDA model with f32 weights vs the CPU model with the same weights (logits of a whole
// forward pass): both keep activations, KV cache and LoRA in f32, so they differ only in summation
// order (cuBLAS blocking, warp reductions, online softmax) compounded over the layers, the same
// kind of difference as kF32ModelLogits and given the same budget.
inline constexpr Tolerance kCudaF32ModelLogits{2e-3f, 1e-4f};

// The CUDA model with bf16 weights vs the CPU model with the same bf16 weights: cuBLAS has no
// bf16 x f32 product, so every GEMM input is rounded to bf16 on CUDA (2^-9 relative) while the CPU
// multiplies f32 activations. Over a full model that gives logit differences of a few tenths, as
// bf16 weights against f32 do (kBf16ModelLogits); a check that bf16 stays close, not exactness.
inline constexpr Tolerance kCudaBf16ModelLogits{0.5f, 0.05f};

}  // namespace loraplex::testing
