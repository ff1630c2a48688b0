// Internal to kernels/cpu: the per-ISA inner loops behind the fast ops of kernels.h.
//
// Each instruction set lives in its own translation unit compiled with its own flags
// (cpu_ops_avx2.cc with -mavx2 -mfma -mf16c, cpu_ops_avx512.cc with -mavx512f -mavx512bw
// -mavx512vl -mavx512dq -mfma -mf16c); nothing compiled with those flags may run before the
// runtime check in cpu_ops.cc has picked that table, which is why the tables are reached only
// through ActiveCpuOps(). The threading and blocking live in the op files (gemm.cc, attention.cc,
// ...), once for all ISAs; the tables hold single-threaded loops.
#pragma once

#include <cstdint>

namespace loraplex::kernels::cpu {

// exp(x) as the SIMD tables compute it (one definition of the constants for all of them): Cephes'
// single-precision range reduction x = n ln2 + r (ln2 split in a hi and lo part) and degree-5
// polynomial in r, on x clamped to +-clamp (about 2 ulp).
struct ExpPolyConstants {
  float clamp = 88.3762626647949f;
  float log2e = 1.44269504088896341f;
  float ln2_hi = 0.693359375f;
  float ln2_lo = -2.12194440e-4f;
  float p[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
};
inline constexpr ExpPolyConstants kExpPoly{};

struct CpuOps {
  const char* name;  // "avx512", "avx2", "scalar"

  // y[i, j] (+)= sum_c x[i, c] * w[j, c] for i < m and j in [j_begin, j_end).
  // x: [m, k] row-major, w: [n, k] row-major (only rows j_begin..j_end-1 are read), y: [m, n].
  void (*gemm_f32)(float* y, const float* x, int64_t m, const float* w, int64_t n, int64_t k,
                   int64_t j_begin, int64_t j_end, bool accumulate);
  void (*gemm_bf16)(float* y, const float* x, int64_t m, const uint16_t* w, int64_t n, int64_t k,
                    int64_t j_begin, int64_t j_end, bool accumulate);

  // sum_i a[i] * b[i]
  float (*dot)(const float* a, const float* b, int64_t n);
  // y[i] += alpha * x[i]
  void (*axpy)(float* y, float alpha, const float* x, int64_t n);
  // y[i] *= alpha
  void (*scale)(float* y, float alpha, int64_t n);
  // s[i] = exp(s[i] - shift); returns the sum of the new s[i].
  float (*exp_shift_sum)(float* s, float shift, int64_t n);
  // Attention over `count` cached positions whose rows of `dim` floats are `stride` floats apart
  // (the slots of one KV block). scores[c] = scale * q . k[c * stride + 0..dim)
  void (*attn_scores)(float* scores, const float* q, const float* k, int64_t stride, int64_t count,
                      int64_t dim, float scale);
  // out[0..dim) += sum_c p[c] * v[c * stride + 0..dim)
  void (*attn_accumulate)(float* out, const float* p, const float* v, int64_t stride, int64_t count,
                          int64_t dim);
  // The same two on an f16 pool (IEEE half bits), each value widened to f32 as it is read.
  void (*attn_scores_f16)(float* scores, const float* q, const uint16_t* k, int64_t stride,
                          int64_t count, int64_t dim, float scale);
  void (*attn_accumulate_f16)(float* out, const float* p, const uint16_t* v, int64_t stride,
                              int64_t count, int64_t dim);
  // out[i] = silu(gate[i]) * up[i]; out may alias gate or up.
  void (*silu_mul)(float* out, const float* gate, const float* up, int64_t n);
};

// The portable loops, always available.
const CpuOps& ScalarOps();
// The AVX2+FMA loops, or nullptr when this build has none. Callable only when the CPU has AVX2,
// FMA and F16C (see Avx2Supported()).
const CpuOps* Avx2Ops();
bool Avx2Supported();
// The AVX-512 loops (same numerics as AVX2, 16 lanes), or nullptr when this build has none (a
// non-x86 build, or a compiler without the flags). Callable only when Avx512Supported(): the CPU
// has AVX-512 F/BW/VL/DQ, FMA and F16C and the OS saves the zmm registers.
const CpuOps* Avx512Ops();
bool Avx512Supported();

// The table the fast ops use: the best one this CPU and build support (amx > avx512 > avx2 >
// scalar), chosen once; the environment variable LP_CPU_ISA=scalar|avx2|avx512|amx asks for
// another (a request the CPU or build cannot serve, or an unknown name, falls back to the best
// supported). "amx" is the avx512 table plus the AMX tiles for quantized GEMMs of many tokens
// (quant_ops.h: AmxEnabled); "avx512" keeps those on the VNNI loops.
const CpuOps& ActiveCpuOps();

// Tests only: makes `name` (as LP_CPU_ISA) the active choice. Returns false (and changes nothing)
// when that ISA is not available on this CPU/build. Not thread-safe with concurrent kernel calls.
bool SetActiveCpuOpsForTesting(const char* name);

}  // namespace loraplex::kernels::cpu
