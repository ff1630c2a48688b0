// The CUDA backend's ops, callable from plain C++ (no CUDA headers here, so model/ and tests can
// include it without nvcc). Pointers named d_* are device pointers; `stream` is a cudaStream_t
// passed as void* (nullptr = the legacy default stream). Ops are asynchronous on their stream:
// an OK status means the launch succeeded, not that the kernel finished; errors of the kernel
// itself surface at the next synchronising call (e.g. CudaBuffer::CopyToHost).
//
// Shapes and dtypes follow kernels/kernels.h: row-major, one row per token. On CUDA activations and
// weights are bf16 (uint16_t bit patterns, as in common/half.h) with f32 accumulation; the f32
// variants exist for testing and for callers that keep f32 activations. Ops that take more than one
// dtype name each with a kernels::DType beside a void* pointer; every combination of f32 and bf16
// is supported unless the op says otherwise. Math inside every op is f32.
//
// Errors: INVALID_ARGUMENT for negative shapes, null pointers with non-empty shapes, or sizes over
// the documented limits (the message names the argument); UNAVAILABLE when there is no usable
// device/driver; RESOURCE_EXHAUSTED when device memory runs out; INTERNAL for other CUDA failures.
// Index arrays that live on the device (token ids, positions, block tables, adapter indices) cannot
// be checked by the host; their contracts are stated per op, and the kernels never read through an
// out-of-range token id or adapter index (see each op). Thread-safety: ops on different streams may
// run concurrently; a CudaBuffer or CudaStream is not synchronised (one owner at a time).
//
// The multi-adapter LoRA ops are in cuda_lora.h, the cuBLAS GEMMs in cuda_gemm.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "kernels/kernels.h"

namespace loraplex::kernels::cuda {

// True when a CUDA device can be used by this process. Otherwise false, and *why (when non-null)
// says what is missing ("no CUDA-capable device is detected", driver too old, ...).
bool CudaDeviceAvailable(std::string* why);

// A device allocation owned by this object (freed in the destructor). Move-only.
class CudaBuffer {
 public:
  // RESOURCE_EXHAUSTED when the device is out of memory, UNAVAILABLE without a device.
  static absl::StatusOr<CudaBuffer> Allocate(size_t bytes);

  CudaBuffer() = default;
  CudaBuffer(CudaBuffer&& other) noexcept;
  CudaBuffer& operator=(CudaBuffer&& other) noexcept;
  CudaBuffer(const CudaBuffer&) = delete;
  CudaBuffer& operator=(const CudaBuffer&) = delete;
  ~CudaBuffer();

  void* data() const { return data_; }
  size_t size() const { return bytes_; }

  // Synchronous copies of `bytes` (<= size(), else INVALID_ARGUMENT) from/to host memory.
  absl::Status CopyFromHost(const void* src, size_t bytes);
  absl::Status CopyToHost(void* dst, size_t bytes) const;
  // Asynchronous copies on `stream`: the host memory must stay valid (and, for a true overlap,
  // be pinned) until the stream reaches the copy. INVALID_ARGUMENT when bytes > size().
  absl::Status CopyFromHostAsync(const void* src, size_t bytes, void* stream);
  absl::Status CopyToHostAsync(void* dst, size_t bytes, void* stream) const;

  // Typed views of the allocation, for passing to the ops.
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

// A non-blocking CUDA stream owned by this object (destroyed in the destructor). Move-only.
class CudaStream {
 public:
  // UNAVAILABLE without a device.
  static absl::StatusOr<CudaStream> Create();

  CudaStream() = default;
  CudaStream(CudaStream&& other) noexcept;
  CudaStream& operator=(CudaStream&& other) noexcept;
  CudaStream(const CudaStream&) = delete;
  CudaStream& operator=(const CudaStream&) = delete;
  ~CudaStream();

  // The cudaStream_t, as the ops take it.
  void* get() const { return stream_; }
  // Waits for everything queued so far; returns the first error of a kernel on this stream.
  absl::Status Synchronize() const;

 private:
  void* stream_ = nullptr;
};

// A CUDA event owned by this object (timing disabled), for ordering one stream after another on
// the device without blocking the host: Record on the producer stream, then StreamWait on the
// consumer (the adapter uploads and the forward pass use it). Move-only.
class CudaEvent {
 public:
  // UNAVAILABLE without a device.
  static absl::StatusOr<CudaEvent> Create();

  CudaEvent() = default;
  CudaEvent(CudaEvent&& other) noexcept;
  CudaEvent& operator=(CudaEvent&& other) noexcept;
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;
  ~CudaEvent();

  // Captures the work queued on `stream` so far (cudaEventRecord).
  absl::Status Record(void* stream);
  // Work queued on `stream` after this call waits for the last Record (cudaStreamWaitEvent).
  absl::Status StreamWait(void* stream) const;

 private:
  void* event_ = nullptr;
};

// A sequence of launches captured from a stream and instantiated (a CUDA graph), replayed with one
// launch: the same kernels with the same arguments, reading whatever the memory they point at
// holds at replay time. Capture is per thread (cudaStreamCaptureModeThreadLocal): other threads'
// CUDA calls are unaffected, and this thread must not allocate or synchronise until EndCapture.
// Move-only.
class CudaGraph {
 public:
  // Starts capturing `stream`: the ops queued on it from now on are recorded, not run.
  static absl::Status BeginCapture(void* stream);
  // Ends the capture begun on `stream` and instantiates what was recorded. Always ends it, so the
  // stream is usable again even when an op failed in between (the capture is then discarded).
  static absl::StatusOr<CudaGraph> EndCapture(void* stream);

  CudaGraph() = default;
  CudaGraph(CudaGraph&& other) noexcept;
  CudaGraph& operator=(CudaGraph&& other) noexcept;
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;
  ~CudaGraph();

  // Queues one replay on `stream`.
  absl::Status Launch(void* stream) const;

 private:
  void* exec_ = nullptr;
};

// Device memory in bytes: free and total (cudaMemGetInfo), for sizing the KV pool and adapter
// slots.
struct CudaMemoryInfo {
  size_t free_bytes = 0;
  size_t total_bytes = 0;
};
absl::StatusOr<CudaMemoryInfo> GetCudaMemoryInfo();

// The name and compute capability of the current device, e.g. "NVIDIA H200 (sm_90)".
absl::StatusOr<std::string> CudaDeviceName();

// d_out[rows, dim] = d_x / sqrt(mean(d_x^2) + eps) * d_weight per row (f32 sums). d_out may alias
// d_x. Same definition as kernels::RmsNorm.
absl::Status CudaRmsNorm(float* d_out, const float* d_x, const float* d_weight, int64_t rows,
                         int64_t dim, float eps, void* stream = nullptr);
absl::Status CudaRmsNormBf16(uint16_t* d_out, const uint16_t* d_x, const uint16_t* d_weight,
                             int64_t rows, int64_t dim, float eps, void* stream = nullptr);

// The residual add fused with the norm after it: d_x[r] += d_residual[r] (rounded to dtype, as
// CudaAdd would), then d_out[r] = RmsNorm(d_x[r]) * d_weight, for rows x dim of dtype. d_x keeps
// the new residual stream; d_out may alias d_x. Same result as CudaAdd followed by CudaRmsNorm.
absl::Status CudaAddRmsNorm(void* d_out, void* d_x, const void* d_residual, const void* d_weight,
                            DType dtype, int64_t rows, int64_t dim, float eps,
                            void* stream = nullptr);

// ---- element-wise and row-wise ops (kernels.h twins)
// ----------------------------------------------

// d_dst[i] = d_src[i] converted (bf16 rounding is to nearest even), i < n.
absl::Status CudaConvert(void* d_dst, DType dst_dtype, const void* d_src, DType src_dtype,
                         int64_t n, void* stream = nullptr);

// d_y[i] += d_x[i], i < n (the residual add). Sums in f32, rounded once to dtype.
absl::Status CudaAdd(void* d_y, const void* d_x, DType dtype, int64_t n, void* stream = nullptr);

// d_out[i] = silu(d_gate[i]) * d_up[i], i < n. d_out may alias d_gate or d_up.
absl::Status CudaSiluMul(void* d_out, const void* d_gate, const void* d_up, DType dtype, int64_t n,
                         void* stream = nullptr);

// Rotate-half RoPE in place on d_x [tokens, heads, head_dim] (dtype), token t at d_positions[t];
// d_inv_freq has head_dim / 2 f32 entries. head_dim must be even (INVALID_ARGUMENT).
absl::Status CudaRope(void* d_x, DType dtype, const int32_t* d_positions, int64_t tokens,
                      int64_t heads, int64_t head_dim, const float* d_inv_freq,
                      void* stream = nullptr);

// d_out[t, :] = table[d_ids[t], :] for t < n; table is a WeightView whose data is a device pointer.
// An id outside [0, table.rows) gives a zero row (ids are validated against the vocabulary before
// they reach the device; the guard only keeps a bad id from reading foreign memory).
absl::Status CudaEmbed(void* d_out, DType out_dtype, const int32_t* d_ids, int64_t n,
                       const WeightView& table, void* stream = nullptr);

// ---- paged KV cache and attention (kernels.h twins)
// -----------------------------------------------
//
// The cache pools have the layout of kernels.h, [num_blocks, block_size, n_kv_heads, head_dim], in
// cache_dtype (f32 or bf16). batch's three arrays are DEVICE pointers; token_pos[t] must be
// < layout.max_blocks_per_seq * block_size and the block ids in the tables must lie inside the
// pools (the engine's block manager guarantees both; the device cannot report a violation).
// head_dim must be in [1, 256] (INVALID_ARGUMENT otherwise; one warp holds a head).

// Writes d_k, d_v [num_tokens, n_kv_heads, head_dim] (act_dtype) into their cache slots.
absl::Status CudaWriteKv(void* d_k_cache, void* d_v_cache, DType cache_dtype, const void* d_k,
                         const void* d_v, DType act_dtype, const AttentionBatch& batch,
                         const KvLayout& layout, void* stream = nullptr);

// Causal attention of each token over positions 0..token_pos[t] of its sequence (prefill and decode
// alike; CudaWriteKv must run first), or with sliding_window = W > 0 over the last W of them,
// max(0, p - W + 1)..p as kernels::PagedAttention (Mistral); older blocks are never read. d_q
// [num_tokens, n_heads, head_dim] and d_out [num_tokens, n_heads * head_dim] have act_dtype;
// n_heads must be a multiple of n_kv_heads (GQA). Softmax and sums in f32.
absl::Status CudaPagedAttention(void* d_out, const void* d_q, DType act_dtype,
                                const void* d_k_cache, const void* d_v_cache, DType cache_dtype,
                                const AttentionBatch& batch, const KvLayout& layout,
                                int64_t n_heads, float scale, int64_t sliding_window = 0,
                                void* stream = nullptr);

// ---- sampling on the device
// -------------------------------------------------------------------------

inline constexpr int64_t kCudaMaxTopK = 256;

// For each row of d_logits [rows, vocab] (dtype): the k best entries in descending order of logit,
// ties broken by the smaller id (NaN ranks as -inf). d_ids and d_values are [rows, k]; d_logprobs
// (nullable) [rows, k] gets logit - logsumexp(row). 1 <= k <= min(vocab, kCudaMaxTopK), else
// INVALID_ARGUMENT. Greedy decoding is k = 1.
absl::Status CudaTopK(int32_t* d_ids, float* d_values, float* d_logprobs, const void* d_logits,
                      DType dtype, int64_t rows, int64_t vocab, int64_t k, void* stream = nullptr);

}  // namespace loraplex::kernels::cuda
