// A host emulation of the kernels/cuda API, for testing the CUDA model's own logic on machines
// without a GPU (cuda_model_emulated_test). "Device" memory is host memory, streams and events do
// nothing (every op runs at once, in call order), and every op is written from its header's
// contract with plain loops or the CPU reference (kernels::ref). So what it checks is everything
// model/cuda_model.cc and model/cuda_adapter_slots.cc decide: buffer sizes, metadata packing and
// offsets, LoRA slice tables and passes, mixed mode, merge and unmerge, KV pool attachment. It says
// nothing about the real kernels (tests/kernels/cuda_*_test.cc compare those with the CPU) nor
// about stream ordering (there is no concurrency here).
//
// To catch reads of memory the model never wrote, every allocation starts filled with 0xFF bytes
// (a NaN in f32 and bf16), and the LoRA ops refuse slice tables that a real kernel would read past
// (v_offset + rank > v_stride, rank > max_rank) with INTERNAL, as a device fault would end the
// step.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "kernels/cuda/cuda_gemm.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/cuda_lora.h"
#include "kernels/kernels.h"
#include "tests/testing/top_logits.h"

namespace loraplex::kernels::cuda {
namespace {

float Load(const void* p, DType d, int64_t i) {
  return d == DType::kF32 ? static_cast<const float*>(p)[i]
                          : Bf16ToF32(static_cast<const uint16_t*>(p)[i]);
}

void Store(void* p, DType d, int64_t i, float v) {
  if (d == DType::kF32) {
    static_cast<float*>(p)[i] = v;
  } else {
    static_cast<uint16_t*>(p)[i] = F32ToBf16(v);
  }
}

absl::Status F32Only(const char* op, DType d) {
  if (d == DType::kF32) return absl::OkStatus();
  return absl::UnimplementedError(absl::StrCat(op, ": the host emulation only does f32 here"));
}

int token_marker = 0;  // the address streams and events point at (never dereferenced)

}  // namespace

bool CudaDeviceAvailable(std::string* why) { return true; }

absl::StatusOr<CudaBuffer> CudaBuffer::Allocate(size_t bytes) {
  CudaBuffer buffer;
  if (bytes == 0) return buffer;
  buffer.data_ = std::malloc(bytes);
  if (buffer.data_ == nullptr) return absl::ResourceExhaustedError("emulated cudaMalloc failed");
  std::memset(buffer.data_, 0xFF, bytes);
  buffer.bytes_ = bytes;
  return buffer;
}

CudaBuffer::CudaBuffer(CudaBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

CudaBuffer& CudaBuffer::operator=(CudaBuffer&& other) noexcept {
  if (this != &other) {
    std::free(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

CudaBuffer::~CudaBuffer() { std::free(data_); }

absl::Status CudaBuffer::CopyFromHost(const void* src, size_t bytes) {
  if (bytes > bytes_) return absl::InvalidArgumentError("CopyFromHost past the buffer");
  if (bytes > 0) std::memcpy(data_, src, bytes);
  return absl::OkStatus();
}

absl::Status CudaBuffer::CopyToHost(void* dst, size_t bytes) const {
  if (bytes > bytes_) return absl::InvalidArgumentError("CopyToHost past the buffer");
  if (bytes > 0) std::memcpy(dst, data_, bytes);
  return absl::OkStatus();
}

absl::Status CudaBuffer::CopyFromHostAsync(const void* src, size_t bytes, void* stream) {
  return CopyFromHost(src, bytes);
}

absl::Status CudaBuffer::CopyToHostAsync(void* dst, size_t bytes, void* stream) const {
  return CopyToHost(dst, bytes);
}

absl::StatusOr<CudaStream> CudaStream::Create() {
  CudaStream s;
  s.stream_ = &token_marker;
  return s;
}
CudaStream::CudaStream(CudaStream&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)) {}
CudaStream& CudaStream::operator=(CudaStream&& other) noexcept {
  stream_ = std::exchange(other.stream_, nullptr);
  return *this;
}
CudaStream::~CudaStream() = default;
absl::Status CudaStream::Synchronize() const { return absl::OkStatus(); }

absl::StatusOr<CudaEvent> CudaEvent::Create() {
  CudaEvent e;
  e.event_ = &token_marker;
  return e;
}
CudaEvent::CudaEvent(CudaEvent&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}
CudaEvent& CudaEvent::operator=(CudaEvent&& other) noexcept {
  event_ = std::exchange(other.event_, nullptr);
  return *this;
}
CudaEvent::~CudaEvent() = default;
// No graphs here: the model falls back to launching op by op (every op runs at its call anyway).
absl::Status CudaGraph::BeginCapture(void* stream) {
  return absl::UnimplementedError("the host emulation has no CUDA graphs");
}
absl::StatusOr<CudaGraph> CudaGraph::EndCapture(void* stream) {
  return absl::UnimplementedError("the host emulation has no CUDA graphs");
}
CudaGraph::CudaGraph(CudaGraph&& other) noexcept : exec_(std::exchange(other.exec_, nullptr)) {}
CudaGraph& CudaGraph::operator=(CudaGraph&& other) noexcept {
  exec_ = std::exchange(other.exec_, nullptr);
  return *this;
}
CudaGraph::~CudaGraph() = default;
absl::Status CudaGraph::Launch(void* stream) const {
  return absl::UnimplementedError("the host emulation has no CUDA graphs");
}

absl::Status CudaEvent::Record(void* stream) {
  return event_ != nullptr ? absl::OkStatus() : absl::FailedPreconditionError("no event");
}
absl::Status CudaEvent::StreamWait(void* stream) const {
  return event_ != nullptr ? absl::OkStatus() : absl::FailedPreconditionError("no event");
}

absl::StatusOr<CudaMemoryInfo> GetCudaMemoryInfo() {
  return CudaMemoryInfo{size_t{64} << 30, size_t{80} << 30};
}

absl::StatusOr<std::string> CudaDeviceName() { return std::string("host emulation"); }

absl::Status CudaRmsNorm(float* d_out, const float* d_x, const float* d_weight, int64_t rows,
                         int64_t dim, float eps, void* stream) {
  ref::RmsNorm(d_out, d_x, d_weight, rows, dim, eps);
  return absl::OkStatus();
}

absl::Status CudaAddRmsNorm(void* d_out, void* d_x, const void* d_residual, const void* d_weight,
                            DType dtype, int64_t rows, int64_t dim, float eps, void* stream) {
  if (absl::Status s = F32Only("CudaAddRmsNorm", dtype); !s.ok()) return s;
  ref::Add(static_cast<float*>(d_x), static_cast<const float*>(d_residual), rows * dim);
  ref::RmsNorm(static_cast<float*>(d_out), static_cast<const float*>(d_x),
               static_cast<const float*>(d_weight), rows, dim, eps);
  return absl::OkStatus();
}

absl::Status CudaConvert(void* d_dst, DType dst_dtype, const void* d_src, DType src_dtype,
                         int64_t n, void* stream) {
  for (int64_t i = 0; i < n; ++i) Store(d_dst, dst_dtype, i, Load(d_src, src_dtype, i));
  return absl::OkStatus();
}

absl::Status CudaAdd(void* d_y, const void* d_x, DType dtype, int64_t n, void* stream) {
  for (int64_t i = 0; i < n; ++i) Store(d_y, dtype, i, Load(d_y, dtype, i) + Load(d_x, dtype, i));
  return absl::OkStatus();
}

absl::Status CudaSiluMul(void* d_out, const void* d_gate, const void* d_up, DType dtype, int64_t n,
                         void* stream) {
  if (absl::Status s = F32Only("CudaSiluMul", dtype); !s.ok()) return s;
  ref::SiluMul(static_cast<float*>(d_out), static_cast<const float*>(d_gate),
               static_cast<const float*>(d_up), n);
  return absl::OkStatus();
}

absl::Status CudaRope(void* d_x, DType dtype, const int32_t* d_positions, int64_t tokens,
                      int64_t heads, int64_t head_dim, const float* d_inv_freq, void* stream) {
  if (absl::Status s = F32Only("CudaRope", dtype); !s.ok()) return s;
  if (head_dim % 2 != 0) return absl::InvalidArgumentError("CudaRope: odd head_dim");
  ref::Rope(static_cast<float*>(d_x), d_positions, tokens, heads, head_dim, d_inv_freq);
  return absl::OkStatus();
}

absl::Status CudaEmbed(void* d_out, DType out_dtype, const int32_t* d_ids, int64_t n,
                       const WeightView& table, void* stream) {
  for (int64_t t = 0; t < n; ++t) {
    const int32_t id = d_ids[t];
    for (int64_t c = 0; c < table.cols; ++c) {
      const float v =
          id >= 0 && id < table.rows ? Load(table.data, table.dtype, id * table.cols + c) : 0.0f;
      Store(d_out, out_dtype, t * table.cols + c, v);
    }
  }
  return absl::OkStatus();
}

absl::Status CudaWriteKv(void* d_k_cache, void* d_v_cache, DType cache_dtype, const void* d_k,
                         const void* d_v, DType act_dtype, const AttentionBatch& batch,
                         const KvLayout& layout, void* stream) {
  if (absl::Status s = F32Only("CudaWriteKv", cache_dtype); !s.ok()) return s;
  if (absl::Status s = F32Only("CudaWriteKv", act_dtype); !s.ok()) return s;
  ref::WriteKv(static_cast<float*>(d_k_cache), static_cast<float*>(d_v_cache),
               static_cast<const float*>(d_k), static_cast<const float*>(d_v), batch, layout);
  return absl::OkStatus();
}

absl::Status CudaPagedAttention(void* d_out, const void* d_q, DType act_dtype,
                                const void* d_k_cache, const void* d_v_cache, DType cache_dtype,
                                const AttentionBatch& batch, const KvLayout& layout,
                                int64_t n_heads, float scale, int64_t sliding_window,
                                void* stream) {
  if (absl::Status s = F32Only("CudaPagedAttention", cache_dtype); !s.ok()) return s;
  if (absl::Status s = F32Only("CudaPagedAttention", act_dtype); !s.ok()) return s;
  ref::PagedAttention(static_cast<float*>(d_out), static_cast<const float*>(d_q),
                      static_cast<const float*>(d_k_cache), static_cast<const float*>(d_v_cache),
                      batch, layout, n_heads, scale, sliding_window);
  return absl::OkStatus();
}

// ---- cuBLAS

absl::StatusOr<std::unique_ptr<CudaBlas>> CudaBlas::Create() {
  return std::unique_ptr<CudaBlas>(new CudaBlas(nullptr));
}

CudaBlas::~CudaBlas() = default;
absl::Status CudaBlas::UseFixedWorkspace(size_t bytes) { return absl::OkStatus(); }

absl::Status CudaBlas::Gemm(void* d_y, DType y_dtype, const void* d_x, DType x_dtype, int64_t m,
                            const WeightView& w, bool accumulate, void* stream) {
  const bool bf16_w = w.dtype == DType::kBF16;
  if (!bf16_w && (x_dtype != DType::kF32 || y_dtype != DType::kF32)) {
    return absl::UnimplementedError("CudaBlas::Gemm: unsupported dtype combination");
  }
  if (m > 0 && w.rows > 0 && w.cols > 0 &&
      (d_y == nullptr || d_x == nullptr || w.data == nullptr)) {
    return absl::InvalidArgumentError("CudaBlas::Gemm: null pointer");
  }
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t o = 0; o < w.rows; ++o) {
      float sum = 0.0f;
      for (int64_t k = 0; k < w.cols; ++k) {
        float x = Load(d_x, x_dtype, i * w.cols + k);
        // cuBLAS has no bf16 x f32 product: CudaBlas rounds f32 activations to bf16 first.
        if (bf16_w && x_dtype == DType::kF32) x = Bf16ToF32(F32ToBf16(x));
        sum += x * Load(w.data, w.dtype, o * w.cols + k);
      }
      const int64_t at = i * w.rows + o;
      Store(d_y, y_dtype, at, accumulate ? Load(d_y, y_dtype, at) + sum : sum);
    }
  }
  return absl::OkStatus();
}

// ---- SGMV / BGMV

namespace {

// The adapter of token t: BGMV's per-token index, or the SGMV segment holding t; -1 = none.
int64_t AdapterOf(int64_t t, const int32_t* token_adapter, const CudaLoraSegments* seg,
                  int64_t num_adapters) {
  int64_t a = -1;
  if (seg == nullptr) {
    a = token_adapter[t];
  } else {
    for (int64_t i = 0; i < seg->num_segments; ++i) {
      if (seg->d_starts[i] <= t && t < seg->d_starts[i + 1]) a = seg->d_adapter[i];
    }
  }
  return a >= 0 && a < num_adapters ? a : -1;
}

absl::Status CheckSlice(const char* op, const CudaLoraSlice& s, int64_t v_stride,
                        const CudaLoraWeights& w) {
  if (s.rank == 0) return absl::OkStatus();
  if (s.rank < 0 || s.rank > w.max_rank || s.v_offset < 0 || s.v_offset + s.rank > v_stride ||
      s.a == nullptr || s.b == nullptr) {
    return absl::InternalError(absl::StrCat(op, ": a slice the kernel would read past: rank ",
                                            s.rank, ", v_offset ", s.v_offset, ", v_stride ",
                                            v_stride, ", max_rank ", w.max_rank));
  }
  return absl::OkStatus();
}

absl::Status Shrink(const char* op, float* v, int64_t v_stride, const void* x, DType act,
                    int64_t x_stride, const int32_t* token_adapter, const CudaLoraSegments* seg,
                    int64_t num_tokens, const CudaLoraWeights& w) {
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t a = AdapterOf(t, token_adapter, seg, w.num_adapters);
    if (a < 0) continue;
    for (int64_t s = 0; s < w.num_slices; ++s) {
      const CudaLoraSlice& sl = w.d_slices[a * w.num_slices + s];
      if (absl::Status st = CheckSlice(op, sl, v_stride, w); !st.ok()) return st;
      for (int32_t r = 0; r < sl.rank; ++r) {
        float sum = 0.0f;
        for (int64_t k = 0; k < w.in_features; ++k) {
          sum += Load(sl.a, w.dtype, r * w.in_features + k) * Load(x, act, t * x_stride + k);
        }
        v[t * v_stride + sl.v_offset + r] = sum;
      }
    }
  }
  return absl::OkStatus();
}

absl::Status Expand(const char* op, const CudaLoraOutput* y, DType act, const float* v,
                    int64_t v_stride, const int32_t* token_adapter, const CudaLoraSegments* seg,
                    int64_t num_tokens, const CudaLoraWeights& w) {
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t a = AdapterOf(t, token_adapter, seg, w.num_adapters);
    if (a < 0) continue;
    for (int64_t s = 0; s < w.num_slices; ++s) {
      const CudaLoraSlice& sl = w.d_slices[a * w.num_slices + s];
      if (absl::Status st = CheckSlice(op, sl, v_stride, w); !st.ok()) return st;
      for (int64_t o = 0; o < w.out_features[s] && sl.rank > 0; ++o) {
        float sum = 0.0f;
        for (int32_t r = 0; r < sl.rank; ++r) {
          sum += Load(sl.b, w.dtype, o * sl.rank + r) * v[t * v_stride + sl.v_offset + r];
        }
        const int64_t at = t * y[s].stride + o;
        Store(y[s].data, act, at, Load(y[s].data, act, at) + sum);
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status CudaSgmvShrink(float* d_v, int64_t v_stride, const void* d_x, DType act_dtype,
                            int64_t x_stride, int64_t num_tokens, const CudaLoraSegments& segments,
                            const CudaLoraWeights& w, void* stream) {
  return Shrink("CudaSgmvShrink", d_v, v_stride, d_x, act_dtype, x_stride, nullptr, &segments,
                num_tokens, w);
}

absl::Status CudaSgmvExpand(const CudaLoraOutput* y, DType act_dtype, const float* d_v,
                            int64_t v_stride, int64_t num_tokens, const CudaLoraSegments& segments,
                            const CudaLoraWeights& w, void* stream) {
  return Expand("CudaSgmvExpand", y, act_dtype, d_v, v_stride, nullptr, &segments, num_tokens, w);
}

absl::Status CudaBgmvShrink(float* d_v, int64_t v_stride, const void* d_x, DType act_dtype,
                            int64_t x_stride, const int32_t* d_token_adapter, int64_t num_tokens,
                            const CudaLoraWeights& w, void* stream) {
  return Shrink("CudaBgmvShrink", d_v, v_stride, d_x, act_dtype, x_stride, d_token_adapter, nullptr,
                num_tokens, w);
}

absl::Status CudaBgmvExpand(const CudaLoraOutput* y, DType act_dtype, const float* d_v,
                            int64_t v_stride, const int32_t* d_token_adapter, int64_t num_tokens,
                            const CudaLoraWeights& w, void* stream) {
  return Expand("CudaBgmvExpand", y, act_dtype, d_v, v_stride, d_token_adapter, nullptr, num_tokens,
                w);
}

absl::Status CudaLoraScaleRows(const CudaLoraOutput* y, DType act_dtype,
                               const int32_t* d_token_adapter, int64_t num_tokens,
                               const CudaLoraRowScales& scales, void* stream) {
  if (num_tokens == 0 || scales.num_adapters == 0) return absl::OkStatus();
  if (d_token_adapter == nullptr || scales.d_scales == nullptr || y == nullptr ||
      scales.num_slices < 1 || scales.num_slices > kMaxLoraSlices) {
    return absl::InvalidArgumentError("CudaLoraScaleRows: null table or bad num_slices");
  }
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t a = AdapterOf(t, d_token_adapter, nullptr, scales.num_adapters);
    if (a < 0) continue;
    for (int64_t s = 0; s < scales.num_slices; ++s) {
      const float* g = scales.d_scales[a * scales.num_slices + s];
      if (g == nullptr) continue;
      for (int64_t c = 0; c < scales.out_features[s]; ++c) {
        const int64_t at = t * y[s].stride + c;
        Store(y[s].data, act_dtype, at, Load(y[s].data, act_dtype, at) * g[c]);
      }
    }
  }
  return absl::OkStatus();
}

absl::Status CudaTopK(int32_t* d_ids, float* d_values, float* d_logprobs, const void* d_logits,
                      DType dtype, int64_t rows, int64_t vocab, int64_t k, void* stream) {
  LP_RETURN_IF_ERROR(F32Only("CudaTopK", dtype));
  if (k < 1 || k > vocab || k > kCudaMaxTopK) {
    return absl::InvalidArgumentError(
        absl::StrCat("CudaTopK: k=", k, " outside 1..min(vocab=", vocab, ", ", kCudaMaxTopK, ")"));
  }
  for (int64_t r = 0; r < rows; ++r) {
    const ::loraplex::testing::HostTopLogits top = ::loraplex::testing::SelectTopLogits(
        static_cast<const float*>(d_logits) + r * vocab, vocab, k);
    std::copy(top.ids.begin(), top.ids.end(), d_ids + r * k);
    std::copy(top.logits.begin(), top.logits.end(), d_values + r * k);
    if (d_logprobs != nullptr)
      std::copy(top.logprobs.begin(), top.logprobs.end(), d_logprobs + r * k);
  }
  return absl::OkStatus();
}

}  // namespace loraplex::kernels::cuda
