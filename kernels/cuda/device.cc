// Host side of the CUDA backend: device discovery, buffers and streams, and the RmsNorm wrappers.
// The other ops' wrappers are in ops.cc (element-wise, attention, sampling), lora_ops.cc and
// gemm.cc.
#include <cuda_runtime_api.h>

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/cuda_status.h"
#include "kernels/cuda/launch.h"

namespace loraplex::kernels::cuda {
namespace {

absl::Status CheckRows(const char* op, const void* out, const void* x, const void* weight,
                       int64_t rows, int64_t dim) {
  if (rows < 0 || dim < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(op, ": negative shape rows=", rows, " dim=", dim));
  }
  if (rows > 0 && dim > 0 && (out == nullptr || x == nullptr || weight == nullptr)) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": null device pointer"));
  }
  if (rows > 0x7fffffff) {
    return absl::InvalidArgumentError(absl::StrCat(op, ": rows=", rows, " exceeds the grid"));
  }
  return absl::OkStatus();
}

}  // namespace

bool CudaDeviceAvailable(std::string* why) {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess) {
    if (why != nullptr) *why = absl::StrCat(cudaGetErrorName(err), ": ", cudaGetErrorString(err));
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return false;
  }
  if (count == 0) {
    if (why != nullptr) *why = "cudaGetDeviceCount returned 0 devices";
    return false;
  }
  return true;
}

absl::StatusOr<CudaBuffer> CudaBuffer::Allocate(size_t bytes) {
  CudaBuffer buffer;
  if (bytes == 0) return buffer;
  LP_CUDA_RETURN_IF_ERROR(cudaMalloc(&buffer.data_, bytes));
  buffer.bytes_ = bytes;
  return buffer;
}

CudaBuffer::CudaBuffer(CudaBuffer&& other) noexcept
    : data_(std::exchange(other.data_, nullptr)), bytes_(std::exchange(other.bytes_, 0)) {}

CudaBuffer& CudaBuffer::operator=(CudaBuffer&& other) noexcept {
  if (this != &other) {
    if (data_ != nullptr) cudaFree(data_);
    data_ = std::exchange(other.data_, nullptr);
    bytes_ = std::exchange(other.bytes_, 0);
  }
  return *this;
}

CudaBuffer::~CudaBuffer() {
  if (data_ != nullptr) cudaFree(data_);  // errors here have no one to report to
}

absl::Status CudaBuffer::CopyFromHost(const void* src, size_t bytes) {
  if (bytes > bytes_) {
    return absl::InvalidArgumentError(
        absl::StrCat("CopyFromHost of ", bytes, " bytes into a buffer of ", bytes_));
  }
  if (bytes == 0) return absl::OkStatus();
  LP_CUDA_RETURN_IF_ERROR(cudaMemcpy(data_, src, bytes, cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

absl::Status CudaBuffer::CopyToHost(void* dst, size_t bytes) const {
  if (bytes > bytes_) {
    return absl::InvalidArgumentError(
        absl::StrCat("CopyToHost of ", bytes, " bytes from a buffer of ", bytes_));
  }
  if (bytes == 0) return absl::OkStatus();
  LP_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst, data_, bytes, cudaMemcpyDeviceToHost));
  return absl::OkStatus();
}

absl::Status CudaBuffer::CopyFromHostAsync(const void* src, size_t bytes, void* stream) {
  if (bytes > bytes_) {
    return absl::InvalidArgumentError(
        absl::StrCat("CopyFromHostAsync of ", bytes, " bytes into a buffer of ", bytes_));
  }
  if (bytes == 0) return absl::OkStatus();
  LP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(data_, src, bytes, cudaMemcpyHostToDevice,
                                          static_cast<cudaStream_t>(stream)));
  return absl::OkStatus();
}

absl::Status CudaBuffer::CopyToHostAsync(void* dst, size_t bytes, void* stream) const {
  if (bytes > bytes_) {
    return absl::InvalidArgumentError(
        absl::StrCat("CopyToHostAsync of ", bytes, " bytes from a buffer of ", bytes_));
  }
  if (bytes == 0) return absl::OkStatus();
  LP_CUDA_RETURN_IF_ERROR(cudaMemcpyAsync(dst, data_, bytes, cudaMemcpyDeviceToHost,
                                          static_cast<cudaStream_t>(stream)));
  return absl::OkStatus();
}

absl::StatusOr<CudaStream> CudaStream::Create() {
  CudaStream stream;
  cudaStream_t s = nullptr;
  // Non-blocking: the stream does not serialise with the legacy default stream, so adapter uploads
  // on their own stream overlap the forward pass.
  LP_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  stream.stream_ = s;
  return stream;
}

CudaStream::CudaStream(CudaStream&& other) noexcept
    : stream_(std::exchange(other.stream_, nullptr)) {}

CudaStream& CudaStream::operator=(CudaStream&& other) noexcept {
  if (this != &other) {
    if (stream_ != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
    stream_ = std::exchange(other.stream_, nullptr);
  }
  return *this;
}

CudaStream::~CudaStream() {
  if (stream_ != nullptr) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

absl::Status CudaStream::Synchronize() const {
  LP_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(static_cast<cudaStream_t>(stream_)));
  return absl::OkStatus();
}

absl::StatusOr<CudaEvent> CudaEvent::Create() {
  CudaEvent event;
  cudaEvent_t e = nullptr;
  LP_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  event.event_ = e;
  return event;
}

CudaEvent::CudaEvent(CudaEvent&& other) noexcept : event_(std::exchange(other.event_, nullptr)) {}

CudaEvent& CudaEvent::operator=(CudaEvent&& other) noexcept {
  if (this != &other) {
    if (event_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
    event_ = std::exchange(other.event_, nullptr);
  }
  return *this;
}

CudaEvent::~CudaEvent() {
  if (event_ != nullptr) cudaEventDestroy(static_cast<cudaEvent_t>(event_));
}

absl::Status CudaEvent::Record(void* stream) {
  if (event_ == nullptr) return absl::FailedPreconditionError("CudaEvent::Record: no event");
  LP_CUDA_RETURN_IF_ERROR(
      cudaEventRecord(static_cast<cudaEvent_t>(event_), static_cast<cudaStream_t>(stream)));
  return absl::OkStatus();
}

absl::Status CudaEvent::StreamWait(void* stream) const {
  if (event_ == nullptr) return absl::FailedPreconditionError("CudaEvent::StreamWait: no event");
  LP_CUDA_RETURN_IF_ERROR(
      cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), static_cast<cudaEvent_t>(event_), 0));
  return absl::OkStatus();
}

absl::Status CudaGraph::BeginCapture(void* stream) {
  LP_CUDA_RETURN_IF_ERROR(
      cudaStreamBeginCapture(static_cast<cudaStream_t>(stream), cudaStreamCaptureModeThreadLocal));
  return absl::OkStatus();
}

absl::StatusOr<CudaGraph> CudaGraph::EndCapture(void* stream) {
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(static_cast<cudaStream_t>(stream), &graph);
  if (end != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    (void)cudaGetLastError();  // an invalidated capture's error is reported here, not left behind
    LP_CUDA_RETURN_IF_ERROR(end);
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  LP_CUDA_RETURN_IF_ERROR(inst);
  CudaGraph g;
  g.exec_ = exec;
  return g;
}

CudaGraph::CudaGraph(CudaGraph&& other) noexcept : exec_(std::exchange(other.exec_, nullptr)) {}

CudaGraph& CudaGraph::operator=(CudaGraph&& other) noexcept {
  if (this != &other) {
    if (exec_ != nullptr) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
    exec_ = std::exchange(other.exec_, nullptr);
  }
  return *this;
}

CudaGraph::~CudaGraph() {
  if (exec_ != nullptr) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
}

absl::Status CudaGraph::Launch(void* stream) const {
  if (exec_ == nullptr) return absl::FailedPreconditionError("CudaGraph::Launch: no graph");
  LP_CUDA_RETURN_IF_ERROR(
      cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), static_cast<cudaStream_t>(stream)));
  return absl::OkStatus();
}

absl::StatusOr<CudaMemoryInfo> GetCudaMemoryInfo() {
  CudaMemoryInfo info;
  LP_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&info.free_bytes, &info.total_bytes));
  return info;
}

absl::StatusOr<std::string> CudaDeviceName() {
  int device = 0;
  LP_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  cudaDeviceProp prop;
  LP_CUDA_RETURN_IF_ERROR(cudaGetDeviceProperties(&prop, device));
  return absl::StrCat(prop.name, " (sm_", prop.major, prop.minor, ")");
}

absl::Status CudaRmsNorm(float* d_out, const float* d_x, const float* d_weight, int64_t rows,
                         int64_t dim, float eps, void* stream) {
  if (absl::Status s = CheckRows("CudaRmsNorm", d_out, d_x, d_weight, rows, dim); !s.ok()) return s;
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchRmsNormF32(d_out, d_x, d_weight, rows, dim, eps,
                                                     static_cast<cudaStream_t>(stream)));
  return absl::OkStatus();
}

absl::Status CudaRmsNormBf16(uint16_t* d_out, const uint16_t* d_x, const uint16_t* d_weight,
                             int64_t rows, int64_t dim, float eps, void* stream) {
  if (absl::Status s = CheckRows("CudaRmsNormBf16", d_out, d_x, d_weight, rows, dim); !s.ok()) {
    return s;
  }
  LP_CUDA_RETURN_IF_ERROR(internal::LaunchRmsNormBf16(d_out, d_x, d_weight, rows, dim, eps,
                                                      static_cast<cudaStream_t>(stream)));
  return absl::OkStatus();
}

}  // namespace loraplex::kernels::cuda
