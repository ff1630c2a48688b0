// CUDA kernel benchmarks (Google Benchmark, times from CUDA events):
// - SGMV/BGMV bandwidth against a measured device-to-device cudaMemcpy: the LoRA ops of a decode
//   step read every adapter's A and B once, so the bound is memory bandwidth; "vs_copy" is the
//   op's bytes/s over the copy's (read + write) bytes/s measured in the same process.
// - GEMM TFLOP/s of CudaBlas::Gemm against a plain cublasGemmEx on a large square bf16 product
//   (the wrapper's cost: argument checks, the stream set, and for f32 activations the bf16 copy).
// After the benchmarks, a short table of the headline figures is printed (scripts/gpu-check.sh
// shows it last). Without a device the binary prints "no CUDA device found: ..." and exits 0, or 1
// with LP_REQUIRE_CUDA=1.
//
// This file includes CUDA headers, the one place outside kernels/cuda/ that does: the baselines
// are raw CUDA calls by definition.
#include <benchmark/benchmark.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "kernels/cuda/cuda_gemm.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/cuda_lora.h"

namespace loraplex::kernels::cuda {
namespace {

// Headline figures for the closing table, by row name (the last, longest run of a benchmark wins).
std::map<std::string, std::string>& Summary() {
  static auto* summary = new std::map<std::string, std::string>();
  return *summary;
}
double g_copy_bytes_per_s = 0.0;  // set by BM_DeviceCopy, which runs first

#define BENCH_CHECK(expr)                                             \
  do {                                                                \
    if (auto lp_status_ = (expr); !lp_status_.ok()) {                 \
      state.SkipWithError(std::string(lp_status_.message()).c_str()); \
      return;                                                         \
    }                                                                 \
  } while (0)
#define BENCH_CUDA(expr)                                                                      \
  do {                                                                                        \
    if (cudaError_t lp_err_ = (expr); lp_err_ != cudaSuccess) {                               \
      state.SkipWithError((std::string(#expr) + ": " + cudaGetErrorString(lp_err_)).c_str()); \
      return;                                                                                 \
    }                                                                                         \
  } while (0)

// Times the body with CUDA events on the legacy stream.
class EventTimer {
 public:
  EventTimer() {
    cudaEventCreate(&start_);
    cudaEventCreate(&stop_);
  }
  ~EventTimer() {
    cudaEventDestroy(start_);
    cudaEventDestroy(stop_);
  }
  void Start() { cudaEventRecord(start_); }
  // Seconds since Start().
  double Stop() {
    cudaEventRecord(stop_);
    cudaEventSynchronize(stop_);
    float ms = 0.0f;
    cudaEventElapsedTime(&ms, start_, stop_);
    return ms * 1e-3;
  }

 private:
  cudaEvent_t start_, stop_;
};

// Rates over the summed device time. (benchmark::Counter::kIsRate would divide by the host CPU
// time, which is not what a GPU benchmark measures.)
double GigaPerSecond(double total, double seconds) {
  return seconds > 0 ? total * 1e-9 / seconds : 0;
}

std::string Fmt(const char* fmt, double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), fmt, v);
  return buf;
}

// A device buffer of n bf16 values in [-0.5, 0.5). The values come from one 8 MiB random host
// pattern, repeated (offset by `seed`): generating hundreds of MiB of randoms on the host would
// dominate the benchmark's start-up, and the kernels' speed does not depend on the values.
absl::StatusOr<CudaBuffer> RandomBf16(size_t n, uint32_t seed) {
  static const std::vector<uint16_t>* pattern = [] {
    auto* p = new std::vector<uint16_t>(size_t{4} << 20);
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> dist(-0.5f, 0.5f);
    for (uint16_t& h : *p) h = F32ToBf16(dist(rng));
    return p;
  }();
  absl::StatusOr<CudaBuffer> buf = CudaBuffer::Allocate(n * 2);
  if (!buf.ok()) return buf.status();
  const size_t offset = (seed * size_t{7919}) % (pattern->size() / 2);
  for (size_t done = 0; done < n;) {
    const size_t chunk = std::min(n - done, pattern->size() - offset);
    if (cudaMemcpy(buf->as<uint16_t>() + done, pattern->data() + offset, chunk * 2,
                   cudaMemcpyHostToDevice) != cudaSuccess) {
      return absl::InternalError("RandomBf16: cudaMemcpy failed");
    }
    done += chunk;
  }
  return buf;
}

// ---- device-to-device copy: the bandwidth reference ------------------------------------------

void BM_DeviceCopy(benchmark::State& state) {
  const size_t bytes = size_t{256} << 20;  // well past any L2
  absl::StatusOr<CudaBuffer> a = CudaBuffer::Allocate(bytes);
  absl::StatusOr<CudaBuffer> b = CudaBuffer::Allocate(bytes);
  BENCH_CHECK(a.status());
  BENCH_CHECK(b.status());
  BENCH_CUDA(cudaMemset(a->data(), 1, bytes));
  EventTimer timer;
  double seconds = 0.0;
  for (auto _ : state) {
    timer.Start();
    cudaMemcpyAsync(b->data(), a->data(), bytes, cudaMemcpyDeviceToDevice);
    const double t = timer.Stop();
    state.SetIterationTime(t);
    seconds += t;
  }
  BENCH_CUDA(cudaGetLastError());
  // Bytes/s (read + write) over the device time; for the LoRA benchmarks' ratio.
  state.counters["GBps"] = GigaPerSecond(2.0 * bytes * state.iterations(), seconds);
}

// ---- LoRA: BGMV (decode) and SGMV (prefill) ----------------------------------------------------

// A model's worth of LoRA weights for a fused q/k/v linear: `copies` independent layers so that the
// working set exceeds L2 and the measured bandwidth is HBM's.
struct LoraSetup {
  int64_t in = 4096;
  int64_t out[3] = {4096, 1024, 1024};
  int64_t rank = 16;
  int64_t num_adapters = 0;
  int64_t copies = 0;
  std::vector<CudaBuffer> weights;  // one allocation per copy: every A, then every B
  std::vector<CudaBuffer> slices;   // one device descriptor array per copy
  size_t a_bytes_per_copy = 0, b_bytes_per_copy = 0;

  absl::Status Init(int64_t adapters) {
    num_adapters = adapters;
    const size_t a_elems = static_cast<size_t>(rank * in);
    a_bytes_per_copy = static_cast<size_t>(adapters) * 3 * a_elems * 2;
    for (int s = 0; s < 3; ++s) {
      b_bytes_per_copy += static_cast<size_t>(adapters) * out[s] * rank * 2;
    }
    const size_t per_copy = a_bytes_per_copy + b_bytes_per_copy;
    copies = static_cast<int64_t>((size_t{512} << 20) / per_copy + 1);
    for (int64_t c = 0; c < copies; ++c) {
      absl::StatusOr<CudaBuffer> all = RandomBf16(per_copy / 2, static_cast<uint32_t>(c));
      if (!all.ok()) return all.status();
      const uint16_t* a = all->as<uint16_t>();
      const uint16_t* b = a + a_bytes_per_copy / 2;
      std::vector<CudaLoraSlice> desc(adapters * 3);
      for (int64_t j = 0; j < adapters; ++j) {
        for (int s = 0; s < 3; ++s) {
          desc[j * 3 + s] = {a, b, static_cast<int32_t>(rank), static_cast<int32_t>(s * rank)};
          a += a_elems;
          b += out[s] * rank;
        }
      }
      weights.push_back(*std::move(all));
      absl::StatusOr<CudaBuffer> d = CudaBuffer::Allocate(desc.size() * sizeof(CudaLoraSlice));
      if (!d.ok()) return d.status();
      if (absl::Status s = d->CopyFromHost(desc.data(), desc.size() * sizeof(CudaLoraSlice));
          !s.ok()) {
        return s;
      }
      slices.push_back(*std::move(d));
    }
    return absl::OkStatus();
  }

  // One setup per adapter count for the whole process: Google Benchmark calls a benchmark function
  // several times while it sizes the iteration count.
  static absl::StatusOr<const LoraSetup*> Get(int64_t adapters) {
    static auto* cache = new std::map<int64_t, std::unique_ptr<LoraSetup>>();
    std::unique_ptr<LoraSetup>& entry = (*cache)[adapters];
    if (entry == nullptr) {
      auto setup = std::make_unique<LoraSetup>();
      if (absl::Status s = setup->Init(adapters); !s.ok()) return s;
      entry = std::move(setup);
    }
    return entry.get();
  }

  CudaLoraWeights Weights(int64_t copy) const {
    CudaLoraWeights w{.num_adapters = num_adapters,
                      .num_slices = 3,
                      .dtype = DType::kBF16,
                      .in_features = in,
                      .max_rank = rank,
                      .d_slices = slices[copy].as<CudaLoraSlice>()};
    for (int s = 0; s < 3; ++s) w.out_features[s] = out[s];
    return w;
  }
};

// state.range(0): tokens (one distinct adapter each, the S2 pattern), 0 = shrink, 1 = expand.
void BM_BgmvDecode(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const bool expand = state.range(1) == 1;
  absl::StatusOr<const LoraSetup*> got = LoraSetup::Get(tokens);
  BENCH_CHECK(got.status());
  const LoraSetup& setup = **got;
  std::vector<int32_t> adapter(tokens);
  for (int64_t t = 0; t < tokens; ++t) adapter[t] = static_cast<int32_t>(t);
  absl::StatusOr<CudaBuffer> d_adapter = CudaBuffer::Allocate(tokens * 4);
  BENCH_CHECK(d_adapter.status());
  BENCH_CHECK(d_adapter->CopyFromHost(adapter.data(), tokens * 4));
  const int64_t y_cols = setup.out[0] + setup.out[1] + setup.out[2];
  absl::StatusOr<CudaBuffer> x = RandomBf16(tokens * setup.in, 99);
  absl::StatusOr<CudaBuffer> y = RandomBf16(tokens * y_cols, 98);
  absl::StatusOr<CudaBuffer> v = CudaBuffer::Allocate(tokens * 3 * setup.rank * 4);
  BENCH_CHECK(x.status());
  BENCH_CHECK(y.status());
  BENCH_CHECK(v.status());
  BENCH_CUDA(cudaMemset(v->data(), 0, tokens * 3 * setup.rank * 4));
  CudaLoraOutput outs[3] = {{y->as<uint16_t>(), y_cols},
                            {y->as<uint16_t>() + setup.out[0], y_cols},
                            {y->as<uint16_t>() + setup.out[0] + setup.out[1], y_cols}};
  EventTimer timer;
  double seconds = 0.0;
  int64_t copy = 0;
  for (auto _ : state) {
    const CudaLoraWeights w = setup.Weights(copy);
    copy = (copy + 1) % setup.copies;
    timer.Start();
    absl::Status s = expand
                         ? CudaBgmvExpand(outs, DType::kBF16, v->as<float>(), 3 * setup.rank,
                                          d_adapter->as<int32_t>(), tokens, w)
                         : CudaBgmvShrink(v->as<float>(), 3 * setup.rank, x->data(), DType::kBF16,
                                          setup.in, d_adapter->as<int32_t>(), tokens, w);
    const double t = timer.Stop();
    state.SetIterationTime(t);
    seconds += t;
    BENCH_CHECK(s);
  }
  BENCH_CUDA(cudaDeviceSynchronize());
  // Bytes the op must move: the weights it reads, plus activations in and out.
  const double act = expand ? tokens * (3.0 * setup.rank * 4 + 2.0 * y_cols * 2)
                            : tokens * (setup.in * 2.0 + 3.0 * setup.rank * 4);
  const double bytes = (expand ? setup.b_bytes_per_copy : setup.a_bytes_per_copy) + act;
  state.counters["GBps"] = GigaPerSecond(bytes * state.iterations(), seconds);
}

// Prefill: state.range(0) tokens in 8 segments of 8 adapters.
void BM_SgmvPrefill(benchmark::State& state) {
  const int64_t tokens = state.range(0);
  const bool expand = state.range(1) == 1;
  constexpr int64_t kSegments = 8;
  absl::StatusOr<const LoraSetup*> got = LoraSetup::Get(kSegments);
  BENCH_CHECK(got.status());
  const LoraSetup& setup = **got;
  std::vector<int64_t> starts(kSegments + 1);
  std::vector<int32_t> seg_adapter(kSegments);
  for (int64_t i = 0; i <= kSegments; ++i) starts[i] = tokens * i / kSegments;
  for (int64_t i = 0; i < kSegments; ++i) seg_adapter[i] = static_cast<int32_t>(i);
  absl::StatusOr<CudaBuffer> d_starts = CudaBuffer::Allocate(starts.size() * 8);
  absl::StatusOr<CudaBuffer> d_seg = CudaBuffer::Allocate(seg_adapter.size() * 4);
  BENCH_CHECK(d_starts.status());
  BENCH_CHECK(d_seg.status());
  BENCH_CHECK(d_starts->CopyFromHost(starts.data(), starts.size() * 8));
  BENCH_CHECK(d_seg->CopyFromHost(seg_adapter.data(), seg_adapter.size() * 4));
  const CudaLoraSegments segments{kSegments, d_starts->as<int64_t>(), d_seg->as<int32_t>()};
  const int64_t y_cols = setup.out[0] + setup.out[1] + setup.out[2];
  absl::StatusOr<CudaBuffer> x = RandomBf16(tokens * setup.in, 99);
  absl::StatusOr<CudaBuffer> y = RandomBf16(tokens * y_cols, 98);
  absl::StatusOr<CudaBuffer> v = CudaBuffer::Allocate(tokens * 3 * setup.rank * 4);
  BENCH_CHECK(x.status());
  BENCH_CHECK(y.status());
  BENCH_CHECK(v.status());
  BENCH_CUDA(cudaMemset(v->data(), 0, tokens * 3 * setup.rank * 4));
  CudaLoraOutput outs[3] = {{y->as<uint16_t>(), y_cols},
                            {y->as<uint16_t>() + setup.out[0], y_cols},
                            {y->as<uint16_t>() + setup.out[0] + setup.out[1], y_cols}};
  EventTimer timer;
  double seconds = 0.0;
  int64_t copy = 0;
  for (auto _ : state) {
    const CudaLoraWeights w = setup.Weights(copy);
    copy = (copy + 1) % setup.copies;
    timer.Start();
    absl::Status s = expand ? CudaSgmvExpand(outs, DType::kBF16, v->as<float>(), 3 * setup.rank,
                                             tokens, segments, w)
                            : CudaSgmvShrink(v->as<float>(), 3 * setup.rank, x->data(),
                                             DType::kBF16, setup.in, tokens, segments, w);
    const double t = timer.Stop();
    state.SetIterationTime(t);
    seconds += t;
    BENCH_CHECK(s);
  }
  BENCH_CUDA(cudaDeviceSynchronize());
  const double flops = 2.0 * tokens * setup.rank * (expand ? y_cols : 3.0 * setup.in);
  state.counters["TFLOPs"] = GigaPerSecond(flops * state.iterations(), seconds) * 1e-3;
}

// ---- GEMM
// ------------------------------------------------------------------------------------------

// state.range(0): n of an n x n x n product. state.range(1): 0 = CudaBlas::Gemm with bf16 x,
// 1 = CudaBlas::Gemm with f32 x (includes the bf16 conversion), 2 = plain cublasGemmEx.
void BM_Gemm(benchmark::State& state) {
  const int64_t n = state.range(0);
  const int variant = static_cast<int>(state.range(1));
  absl::StatusOr<std::unique_ptr<CudaBlas>> blas = CudaBlas::Create();
  BENCH_CHECK(blas.status());
  absl::StatusOr<CudaBuffer> w = RandomBf16(n * n, 1);
  absl::StatusOr<CudaBuffer> x = RandomBf16(n * n, 2);
  absl::StatusOr<CudaBuffer> x32 = CudaBuffer::Allocate(n * n * 4);
  absl::StatusOr<CudaBuffer> y = CudaBuffer::Allocate(n * n * 2);
  BENCH_CHECK(w.status());
  BENCH_CHECK(x.status());
  BENCH_CHECK(x32.status());
  BENCH_CHECK(y.status());
  BENCH_CHECK(CudaConvert(x32->data(), DType::kF32, x->data(), DType::kBF16, n * n));
  const WeightView wv{DType::kBF16, w->data(), n, n};
  const float alpha = 1.0f, beta = 0.0f;
  const int ni = static_cast<int>(n);
  EventTimer timer;
  double seconds = 0.0;
  for (auto _ : state) {
    timer.Start();
    if (variant == 2) {
      cublasStatus_t err =
          cublasGemmEx((*blas)->handle(), CUBLAS_OP_N, CUBLAS_OP_N, ni, ni, ni, &alpha, w->data(),
                       CUDA_R_16BF, ni, x->data(), CUDA_R_16BF, ni, &beta, y->data(), CUDA_R_16BF,
                       ni, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
      const double t = timer.Stop();
      state.SetIterationTime(t);
      seconds += t;
      if (err != CUBLAS_STATUS_SUCCESS) {
        state.SkipWithError(cublasGetStatusString(err));
        return;
      }
    } else {
      absl::Status s =
          variant == 0 ? (*blas)->Gemm(y->data(), DType::kBF16, x->data(), DType::kBF16, n, wv)
                       : (*blas)->Gemm(y->data(), DType::kBF16, x32->data(), DType::kF32, n, wv);
      const double t = timer.Stop();
      state.SetIterationTime(t);
      seconds += t;
      BENCH_CHECK(s);
    }
  }
  BENCH_CUDA(cudaDeviceSynchronize());
  state.counters["TFLOPs"] = GigaPerSecond(2.0 * n * n * n * state.iterations(), seconds) * 1e-3;
}

// Collects the headline figures from the runs for the closing table.
class SummaryReporter : public benchmark::ConsoleReporter {
 public:
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& run : runs) {
      if (run.error_occurred) continue;
      const std::string name = run.benchmark_name();
      auto counter = [&](const char* c) {
        auto it = run.counters.find(c);
        return it == run.counters.end() ? 0.0 : static_cast<double>(it->second.value);
      };
      if (name.rfind("BM_DeviceCopy", 0) == 0) {
        g_copy_bytes_per_s = counter("GBps");
        Summary()["copy D2D GB/s"] = Fmt("%.0f", g_copy_bytes_per_s);
      } else if (name.rfind("BM_BgmvDecode", 0) == 0 || name.rfind("BM_SgmvPrefill", 0) == 0) {
        const double gbps = counter("GBps");
        const double tflops = counter("TFLOPs");
        std::string row = gbps > 0 ? Fmt("%.0f GB/s", gbps) : Fmt("%.2f TFLOP/s", tflops);
        if (gbps > 0 && g_copy_bytes_per_s > 0) {
          row += Fmt(" (%.2f x copy)", gbps / g_copy_bytes_per_s);
        }
        row += Fmt(", %.1f us", run.GetAdjustedRealTime());
        Summary()[name] = row;
      } else if (name.rfind("BM_Gemm", 0) == 0) {
        Summary()[name] = Fmt("%.1f TFLOP/s", counter("TFLOPs"));
      }
    }
  }
};

}  // namespace
}  // namespace loraplex::kernels::cuda

int main(int argc, char** argv) {
  using namespace loraplex::kernels::cuda;  // NOLINT: main only
  std::string why;
  if (!CudaDeviceAvailable(&why)) {
    const char* req = std::getenv("LP_REQUIRE_CUDA");
    std::printf("no CUDA device found: %s\n", why.c_str());
    return req != nullptr && std::strcmp(req, "1") == 0 ? 1 : 0;
  }
  // Registered in order: the copy first, so the LoRA rows can quote their ratio to it.
  benchmark::RegisterBenchmark("BM_DeviceCopy", BM_DeviceCopy)
      ->UseManualTime()
      ->Unit(benchmark::kMicrosecond);
  for (int64_t tokens : {32, 64}) {
    for (int64_t op : {0, 1}) {
      benchmark::RegisterBenchmark(op == 0 ? "BM_BgmvDecode/shrink" : "BM_BgmvDecode/expand",
                                   BM_BgmvDecode)
          ->Args({tokens, op})
          ->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
    }
  }
  for (int64_t op : {0, 1}) {
    benchmark::RegisterBenchmark(op == 0 ? "BM_SgmvPrefill/shrink" : "BM_SgmvPrefill/expand",
                                 BM_SgmvPrefill)
        ->Args({2048, op})
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
  for (int64_t variant : {2, 0, 1}) {
    const char* name = variant == 2   ? "BM_Gemm/cublasGemmEx"
                       : variant == 0 ? "BM_Gemm/CudaBlas_bf16x"
                                      : "BM_Gemm/CudaBlas_f32x";
    benchmark::RegisterBenchmark(name, BM_Gemm)
        ->Args({8192, variant})
        ->UseManualTime()
        ->Unit(benchmark::kMicrosecond);
  }
  benchmark::Initialize(&argc, argv);
  SummaryReporter reporter;
  benchmark::RunSpecifiedBenchmarks(&reporter);
  benchmark::Shutdown();
  absl::StatusOr<std::string> device = CudaDeviceName();
  std::printf("\n== cuda_bench summary (%s)\n", device.ok() ? device->c_str() : "?");
  for (const auto& [name, value] : Summary())
    std::printf("%-40s %s\n", name.c_str(), value.c_str());
  return 0;
}
