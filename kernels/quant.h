// GGUF's quantized weight formats as kernel operands: block geometry, conversion of one row to and
// from f32, and the name of the integer-dot-product table the fast Gemm uses for them.
//
// A quantized WeightView (kernels.h) points at the blocks exactly as ggml stores them (and as a
// GGUF file holds them): rows * cols / BlockSize(dtype) blocks, row-major, cols a multiple of the
// block size. The layouts, values given per element e of a block:
//   Q8_0 (32 values, 34 bytes):  f16 d | int8 qs[32]                   x = qs[e] * d
//   Q4_0 (32 values, 18 bytes):  f16 d | uint8 qs[16]                  x = d * (q - 8)
//   Q4_1 (32 values, 20 bytes):  f16 d | f16 m | uint8 qs[16]          x = d * q + m
//     where q = qs[e] & 15 for e < 16 and qs[e - 16] >> 4 for e >= 16.
//   Q4_K (256 values, 144 bytes): f16 d | f16 dmin | scales[12] | qs[128]
//     eight sub-blocks of 32 with 6-bit scale sc[s] and min mn[s] packed in `scales` (bytes 0..3
//     sc[0..3] and the top 2 bits of sc[4..7]; bytes 4..7 the same for mn; bytes 8..11 the low 4
//     bits of sc[4..7] | mn[4..7] << 4). Sub-block 2c holds the low nibbles of qs[32c .. 32c+31],
//     sub-block 2c+1 their high nibbles. x = (d * sc[s]) * q - (dmin * mn[s]).
//   Q5_K (256 values, 176 bytes): f16 d | f16 dmin | scales[12] | qh[32] | qs[128]
//     as Q4_K with a fifth bit: element l of sub-block s adds 16 when bit s of qh[l] is set.
//   Q6_K (256 values, 210 bytes): ql[128] | qh[64] | int8 scales[16] | f16 d
//     element 128h + 32c + l (h < 2, c < 4, l < 32) takes its low 4 bits from ql[64h + 32(c % 2)
//     + l] (low nibble for c < 2, high for c >= 2) and its top 2 bits from bits 2c..2c+1 of
//     qh[32h + l]; x = (d * scales[e / 16]) * (q - 32).
//
// DequantizeRow follows ggml's dequantize_row_* and the gguf Python package's dequantize (same
// products in the same order, each rounded to f32), so its results are bit-identical to both;
// QuantizeRow follows ggml's quantize_row_q8_0_ref / quantize_row_q4_0_ref, which the gguf package
// reproduces bit for bit. tests/kernels/quant_test.cc checks both against fixtures made by gguf.
//
// Thread-safety: all functions are pure; they may be called concurrently.
#pragma once

#include <cstdint>

#include "kernels/kernels.h"

namespace loraplex::kernels {

// True for the GGUF block formats (every DType but kF32 and kBF16).
bool IsQuantized(DType t);

// Values per block: 32 (Q8_0, Q4_0, Q4_1), 256 (the K-quants), 1 (f32, bf16).
int64_t BlockSize(DType t);
// Bytes per block (4 for f32, 2 for bf16).
int64_t BytesPerBlock(DType t);
// Bytes of one row of `cols` values; cols must be a multiple of BlockSize(t).
int64_t RowBytes(DType t, int64_t cols);

// "f32", "bf16", "q8_0", "q4_0", "q4_1", "q4_K", "q5_K", "q6_K" (ggml's spelling).
const char* DTypeName(DType t);

// out[0, cols) = one row of `t` widened to f32 (any DType; f32 and bf16 are copied / widened).
// cols must be a multiple of BlockSize(t); `row` needs no alignment.
void DequantizeRow(DType t, const void* row, float* out, int64_t cols);

// Quantizes x[0, cols) into one row of blocks of `t`, which must be kQ8_0 or kQ4_0 (the formats
// with a deterministic reference quantizer in ggml; the K-quants' quantizers search scales and are
// not reproduced here). cols must be a multiple of 32. For building quantized weights from an f32
// or bf16 checkpoint at load (widen bf16 rows to f32 first).
void QuantizeRow(DType t, const float* x, void* row, int64_t cols);

// The integer-dot-product table the fast Gemm runs quantized weights on: "amx" (AMX tile multiplies
// for all formats but Q6_K at 8 tokens or more, the VNNI loops for the rest, when CpuKernelIsa()
// is "amx"), "avx512vnni" (vpdpbusd, when it is avx512 and the CPU has AVX512-VNNI), "avx2"
// (vpmaddubsw, also for an avx512 CPU without VNNI) or "scalar". Follows LP_CPU_ISA and the
// CpuOps test override.
const char* QuantKernelIsa();

}  // namespace loraplex::kernels
