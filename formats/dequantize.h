// Storage layout of every StoredType (block sizes) and conversion of stored tensors to f32: the one
// dequantizer of the tree (kernels::DequantizeRow and the model loader go through it).
//
// DequantizeToF32 (declared in formats/gguf.h) converts a whole tensor; the functions here add the
// byte-size arithmetic the readers share and a row-range variant for callers that need only a few
// rows of a large tensor (an embedding lookup on a quantized token_embd).
//
// The arithmetic mirrors gguf.quants.dequantize of the gguf Python package step by step (same
// products, same order, each rounded to f32), so results are bit-identical to it. dequantize.cc is
// built with -ffp-contract=off so that no compiler fuses `d * q + m` into one rounding.
//
// Thread-safety: all functions are pure; they may be called concurrently.
#pragma once

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "formats/tensor_info.h"

namespace loraplex::formats {

// A quantized type packs `block_elems` consecutive elements of one row into `block_bytes` bytes.
// Plain types have block_elems = 1 and block_bytes = sizeof(element).
struct BlockLayout {
  int64_t block_elems;
  int64_t block_bytes;
};
BlockLayout LayoutOf(StoredType t);

// Bytes taken by a tensor of type `t` and `shape` (outermost first). INVALID_ARGUMENT when a dim is
// negative, the element or byte count overflows int64, or the innermost dim is not a multiple of
// the block size of a quantized type. A scalar (empty shape) counts as one element.
absl::StatusOr<size_t> StoredByteSize(StoredType t, const int64_t* shape, size_t rank);

// Converts `num_blocks` consecutive blocks of type `t` at `src` (LayoutOf(t).block_bytes each)
// into num_blocks * LayoutOf(t).block_elems floats at `dst`. No checks: for callers that hold a
// validated tensor (kernels::DequantizeRow).
void DequantizeBlocks(StoredType t, const uint8_t* src, int64_t num_blocks, float* dst);

// Converts rows [first_row, first_row + num_rows) of `t` (rows of shape.back() elements) into
// `out` (num_rows * shape.back() floats, caller-owned). INVALID_ARGUMENT (naming the tensor) when
// t.nbytes does not match its shape and type, t.data is null, or the range is outside the tensor.
// Large conversions run on ThreadPool::Default().
absl::Status DequantizeRowsToF32(const TensorInfo& t, int64_t first_row, int64_t num_rows,
                                 float* out);

}  // namespace loraplex::formats
