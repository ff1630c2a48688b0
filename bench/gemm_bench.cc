// Gemm on the SmolLM2-135M projection shapes: ours (f32 and bf16 weights, once per CPU table this
// machine supports: avx2, avx512) against OpenBLAS (cblas_sgemm) and oneDNN matmul, all on the same
// number of threads as ThreadPool::Default(). Counters: GFLOP/s (2*m*n*k) and weight bytes/s, the
// figure to set beside bandwidth_bench for decode (m = 1). Results and the choice they led to are
// in docs/benchmarks.md. Filter with --benchmark_filter=..., e.g. 'm:1/'.
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "bench/smollm2_shapes.h"
#include "common/half.h"
#include "common/thread_pool.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/kernels.h"

#if LP_BENCH_OPENBLAS
#include <cblas.h>
#endif
#if LP_BENCH_ONEDNN
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace {

using loraplex::kernels::DType;
using loraplex::kernels::WeightView;

using loraplex::bench::Shape;
constexpr const auto& kShapes = loraplex::bench::kSmolLm2Shapes;
// Decode batches (1..8 sequences), 16 and 32 tokens (around where the AVX-512 table switches to
// its prefill tiles) and a 128-token prefill chunk.
const int64_t kTokens[] = {1, 2, 4, 8, 16, 32, 128};
// Our tables to compare; those this CPU lacks are skipped.
const char* const kIsas[] = {"avx2", "avx512"};

struct Operands {
  std::vector<float> x, y, w32;
  std::vector<uint16_t> w16, x16;
  Operands(int64_t m, int64_t n, int64_t k)
      : x(m * k), y(m * n), w32(n * k), w16(n * k), x16(m * k) {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    for (float& v : x) v = d(rng);
    for (float& v : w32) v = d(rng);
    for (size_t i = 0; i < w32.size(); ++i) w16[i] = loraplex::F32ToBf16(w32[i]);
    for (size_t i = 0; i < x.size(); ++i) x16[i] = loraplex::F32ToBf16(x[i]);
  }
};

void SetCounters(benchmark::State& state, int64_t m, int64_t n, int64_t k, int64_t weight_bytes) {
  const double iters = static_cast<double>(state.iterations());
  state.counters["GFLOPS"] =
      benchmark::Counter(2.0 * m * n * k * iters / 1e9, benchmark::Counter::kIsRate);
  state.counters["weight_GBps"] = benchmark::Counter(
      static_cast<double>(weight_bytes) * iters / 1e9, benchmark::Counter::kIsRate);
}

void BM_Ours(benchmark::State& state, Shape s, int64_t m, DType dtype, const char* isa) {
  const std::string saved = loraplex::kernels::CpuKernelIsa();
  if (!loraplex::kernels::cpu::SetActiveCpuOpsForTesting(isa)) {
    state.SkipWithError((std::string(isa) + " is not supported on this CPU").c_str());
    return;
  }
  Operands o(m, s.n, s.k);
  WeightView w{dtype, dtype == DType::kF32 ? static_cast<const void*>(o.w32.data()) : o.w16.data(),
               s.n, s.k};
  for (auto _ : state) {
    loraplex::kernels::Gemm(o.y.data(), o.x.data(), m, w);
    benchmark::DoNotOptimize(o.y.data());
  }
  SetCounters(state, m, s.n, s.k, s.n * s.k * (dtype == DType::kF32 ? 4 : 2));
  state.SetLabel(loraplex::kernels::CpuKernelIsa());
  loraplex::kernels::cpu::SetActiveCpuOpsForTesting(saved.c_str());
}

#if LP_BENCH_OPENBLAS
void BM_OpenBlasSgemm(benchmark::State& state, Shape s, int64_t m) {
  Operands o(m, s.n, s.k);
  openblas_set_num_threads(loraplex::ThreadPool::Default().num_threads());
  for (auto _ : state) {
    // y[m, n] = x[m, k] * W[n, k]^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, m, s.n, s.k, 1.0f, o.x.data(), s.k,
                o.w32.data(), s.k, 0.0f, o.y.data(), s.n);
    benchmark::DoNotOptimize(o.y.data());
  }
  SetCounters(state, m, s.n, s.k, s.n * s.k * 4);
  state.SetLabel(openblas_get_corename());
}

// No cblas_sbgemm: Debian's libopenblas 0.3.21 declares it in cblas.h but is built without
// BUILD_BFLOAT16, so the symbol is not exported (nm -D libopenblas.so.0 shows none).
#endif

#if LP_BENCH_ONEDNN
// oneDNN matmul with weights [n, k] described as a [k, n] matrix in format "ba" (no copy). The
// primitive is created once, outside the timing, as a server would cache it per shape.
void BM_OneDnn(benchmark::State& state, Shape s, int64_t m, DType dtype) {
  using dt = dnnl::memory::data_type;
  using tag = dnnl::memory::format_tag;
  Operands o(m, s.n, s.k);
  try {
    dnnl::engine eng(dnnl::engine::kind::cpu, 0);
    dnnl::stream strm(eng);
    // bf16 weights need bf16 activations in oneDNN 2.6 (no f32 x bf16 matmul).
    const dt in_type = dtype == DType::kF32 ? dt::f32 : dt::bf16;
    dnnl::memory::desc src_md({m, s.k}, in_type, tag::ab);
    dnnl::memory::desc wei_md({s.k, s.n}, in_type, tag::ba);
    dnnl::memory::desc dst_md({m, s.n}, dt::f32, tag::ab);
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src_md, wei_md, dst_md), eng);
    dnnl::matmul prim(pd);
    void* x = dtype == DType::kF32 ? static_cast<void*>(o.x.data()) : o.x16.data();
    void* w = dtype == DType::kF32 ? static_cast<void*>(o.w32.data()) : o.w16.data();
    dnnl::memory src(src_md, eng, x), wei(wei_md, eng, w), dst(dst_md, eng, o.y.data());
    for (auto _ : state) {
      prim.execute(strm, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
      strm.wait();
      benchmark::DoNotOptimize(o.y.data());
    }
    SetCounters(state, m, s.n, s.k, s.n * s.k * (dtype == DType::kF32 ? 4 : 2));
    state.SetLabel(pd.impl_info_str());
  } catch (const dnnl::error& e) {
    state.SkipWithError(e.what());
  }
}
#endif

void RegisterAll() {
  for (const Shape& s : kShapes) {
    for (int64_t m : kTokens) {
      const std::string suffix = std::string("/") + s.name + "/m:" + std::to_string(m) + "/";
      auto reg = [&](const std::string& name, auto fn) {
        benchmark::RegisterBenchmark((name + suffix).c_str(), fn)
            ->Unit(benchmark::kMicrosecond)
            ->UseRealTime()
            ->MinTime(0.2);
      };
      for (const char* isa : kIsas) {
        reg(std::string("ours_f32_") + isa,
            [=](benchmark::State& st) { BM_Ours(st, s, m, DType::kF32, isa); });
        reg(std::string("ours_bf16_") + isa,
            [=](benchmark::State& st) { BM_Ours(st, s, m, DType::kBF16, isa); });
      }
#if LP_BENCH_OPENBLAS
      reg("openblas_sgemm", [=](benchmark::State& st) { BM_OpenBlasSgemm(st, s, m); });
#endif
#if LP_BENCH_ONEDNN
      reg("onednn_f32", [=](benchmark::State& st) { BM_OneDnn(st, s, m, DType::kF32); });
      reg("onednn_bf16", [=](benchmark::State& st) { BM_OneDnn(st, s, m, DType::kBF16); });
#endif
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  RegisterAll();
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
