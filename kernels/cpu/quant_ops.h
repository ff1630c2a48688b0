// Internal to kernels/cpu: the per-ISA loops behind Gemm on quantized weights (kernels/quant.h).
//
// y = x W^T with W in a GGUF block format is computed on integers: each row of x is first
// quantized to int8 in blocks that line up with W's ("activation blocks"), then every output is a
// sum over blocks of integer dot products times the two blocks' float scales:
//
//   Q8_0, Q4_0, Q4_1 (32-value blocks b): activation scale da[b] = max|x_b| / 127,
//     qa = round_to_nearest_even(x * 127 / max|x_b|), sa[b] = da[b] * sum(qa over b).
//     y = sum_b dw[b] da[b] sum(qw qa) + cw[b] sa[b]. vpdpbusd and vpmaddubsw multiply unsigned
//     by signed bytes, so the SIMD tables take the weight codes qw unsigned (the nibble q; for
//     Q8_0 on AVX-512 q8 + 128) and put the formats' offsets into the second product: cw = -8 dw
//     (Q4_0), m (Q4_1), -128 dw (Q8_0 on AVX-512; AVX2 multiplies |q8| by sign(qa, q8) instead,
//     and the scalar table keeps signed codes). The integer sums are the same either way.
//   Q4_K, Q5_K, Q6_K (256-value super-blocks, ggml's Q8_K idea): one activation scale per
//     super-block and the sums of qa over each 16 values (bsums), so that the 6-bit sub-block
//     scales multiply integer sums and only one float product per super-block remains:
//     Q4_K/Q5_K: y = sum_sb d da sum_s sc[s] sum(q qa) - dmin da sum_s mn[s] sum(qa over s)
//     Q6_K:      y = sum_sb d da sum_s sc[s] (sum(q qa) - 32 sum(qa over s)), q = 0..63.
//
// Every table quantizes activations to the same int8 values and scales (same formula, round to
// nearest even), so the tables differ only in the order of the float sums; each stores them in the
// layout its loops want (act_row_bytes / quantize_act), so a buffer is only read by the table that
// wrote it. The integer sums are exact (Q6_K's may exceed 2^24 before their one conversion to
// f32); the error against W dequantized times f32 x is the rounding of x to int8: at most
// max|x_block| / 254 per value.
//
// As with CpuOps, each instruction set is its own translation unit with its own flags
// (quant_ops_avx2.cc: -mavx2 -mfma -mf16c; quant_ops_avx512.cc: AVX-512 F/BW/VL/DQ + VNNI), reached
// only through ActiveQuantOps() after the runtime CPU check.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"

namespace loraplex::kernels::cpu {

// BatchInvariant() (kernels.h): weight rows per panel whose one-token loops run for every token
// of the call before the next panel, about 64 KiB of rows of `row_bytes` (so the panel is read
// from memory once per call, then from L2), a multiple of `multiple`.
int64_t InvariantPanelRows(int64_t row_bytes, int64_t multiple);

struct QuantOps {
  const char* name;  // "amx", "avx512vnni", "avx2", "scalar"

  // Bytes of one quantized activation row of k values for weights of type t (a multiple of 64).
  int64_t (*act_row_bytes)(DType t, int64_t k);
  // Quantizes rows [i_begin, i_end) of x [*, k] into xq, act_row_bytes(t, k) bytes per row (row i
  // at xq + i * act_row_bytes).
  void (*quantize_act)(DType t, const float* x, int64_t k, int64_t i_begin, int64_t i_end,
                       uint8_t* xq);
  // y[i, j] (+)= activation row i . weight row j for i < m and j in [j_begin, j_end).
  // xq: m rows written by this table's quantize_act; w: n rows of RowBytes(t, k) bytes; y: [m, n].
  void (*gemm)(DType t, float* y, const uint8_t* xq, int64_t m, const uint8_t* w, int64_t n,
               int64_t k, int64_t j_begin, int64_t j_end, bool accumulate);
};

// The portable loops, always available.
const QuantOps& ScalarQuantOps();
// The AVX2 loops (vpmaddubsw), or nullptr when this build has none. Callable when Avx2Supported().
const QuantOps* Avx2QuantOps();
// The AVX-512 VNNI loops (vpdpbusd, vpdpwssd), or nullptr when this build has none. Callable when
// Avx512VnniSupported().
const QuantOps* Avx512VnniQuantOps();
// Avx512Supported() and the CPU has AVX512-VNNI.
bool Avx512VnniSupported();
// The AMX loops (tile multiplies of 16 tokens x 16 weight rows over one 32-value block) for Q8_0,
// Q4_0, Q4_1, Q4_K and Q5_K (not Q6_K, whose scales cover 16 values), or nullptr when this build
// has none. Callable when AmxSupported().
const QuantOps* AmxQuantOps();
// Avx512VnniSupported(), the build has the AMX table, the CPU has AMX-TILE and AMX-INT8, the OS
// saves the tile state, and the kernel granted this process its use (arch_prctl
// ARCH_REQ_XCOMP_PERM, asked once, on the first call).
bool AmxSupported();
// Whether the active choice (LP_CPU_ISA, SetActiveCpuOpsForTesting, or the automatic one: "amx"
// where AmxSupported()) runs the AMX table where it applies (see QuantOpsFor).
bool AmxEnabled();
// The fewest tokens a call needs for the AMX table (8): below, the tiles (16 tokens each) are
// mostly empty, and the VNNI loops are as fast (measured with quant_gemm_bench, m = 4, 8, 16).
int64_t AmxMinTokens();
// The formats the AMX table has loops for: Q8_0, Q4_0, Q4_1, Q4_K, Q5_K.
bool AmxFormat(DType t);

// The table for the active CpuOps table (ActiveCpuOps()): avx512 -> avx512vnni when the CPU has
// VNNI, else avx2; avx2 -> avx2; scalar -> scalar. So LP_CPU_ISA and SetActiveCpuOpsForTesting
// choose both tables together.
const QuantOps& ActiveQuantOps();
// The table one call of m tokens on weights of type t runs: AmxQuantOps() when AmxEnabled(), t is
// one of its formats (all but Q6_K) and m >= AmxMinTokens(); else ActiveQuantOps(). Activation
// buffers hold a multiple of 16 rows (the AMX table reads whole 16-token tiles; the rows past m
// are never used in a result).
const QuantOps& QuantOpsFor(DType t, int64_t m);

// The fast Gemm's quantized branch (kernels::Gemm calls it for IsQuantized(w.dtype)): quantizes x,
// then splits the output features across ThreadPool::Default().
void QuantGemm(float* y, const float* x, int64_t m, const WeightView& w, bool accumulate);
// GemmShared's quantized branch: every output's weights have one quantized dtype and x's columns;
// x is quantized once, and the rows of all outputs are split across the threads together.
void QuantGemmShared(const float* x, int64_t m, const GemmOutput* outputs, int count,
                     bool accumulate);

}  // namespace loraplex::kernels::cpu
