// Gemm on GGUF-quantized weights against bf16 weights, on the SmolLM2-135M projection shapes, for
// decode (m = 1), batched decode steps of 8 and 32 tokens and a 128-token prefill, once per CPU
// table this machine has (amx: AMX tiles, for all formats but Q6_K at 8 tokens or more; avx512
// runs the AVX-512 VNNI quant table where the CPU has VNNI; avx2 the vpmaddubsw one). Counters:
// weight_GBps, the weight bytes one call streams (the stored blocks, scales included) per second,
// the figure to set beside bandwidth_bench for decode, and GFLOPS (2*m*n*k). Warm runs reuse one
// copy of the weights, which for all but lm_head (49152 x 576: 30 MB as Q8_0, 57 MB as bf16) then
// stays in L2/L3 and measures the kernels' arithmetic; the m = 1 "cold" runs cycle through 128 MB
// of copies and measure what decode sees, weights from memory. Filter with --benchmark_filter=...,
// e.g. 'm:1/cold'.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "bench/smollm2_shapes.h"
#include "common/half.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/quant_ops.h"
#include "kernels/kernels.h"
#include "kernels/quant.h"

namespace {

using loraplex::kernels::DType;
using loraplex::kernels::WeightView;

using loraplex::bench::Shape;
constexpr const auto& kShapes = loraplex::bench::kSmolLm2Shapes;
const int64_t kTokens[] = {1, 8, 32, 128};
const DType kTypes[] = {DType::kBF16, DType::kQ4_1, DType::kQ8_0, DType::kQ4_K};
const char* const kIsas[] = {"amx", "avx512", "avx2"};

// Random weights with plausible scales: f16 fields set so that values stay within ~0.1.
std::vector<uint8_t> MakeWeights(DType t, int64_t n, int64_t k) {
  std::mt19937 rng(11);
  if (t == DType::kBF16) {
    std::vector<uint8_t> out(n * k * 2);
    std::uniform_real_distribution<float> d(-0.1f, 0.1f);
    for (int64_t i = 0; i < n * k; ++i) {
      const uint16_t h = loraplex::F32ToBf16(d(rng));
      std::memcpy(out.data() + 2 * i, &h, 2);
    }
    return out;
  }
  std::vector<uint8_t> out(n * loraplex::kernels::RowBytes(t, k));
  for (uint8_t& b : out) b = static_cast<uint8_t>(rng());
  const int64_t bytes = loraplex::kernels::BytesPerBlock(t);
  const uint16_t small = loraplex::F32ToF16(1e-3f);
  for (size_t b = 0; b < out.size(); b += bytes) {
    if (t == DType::kQ6_K) {
      std::memcpy(out.data() + b + 208, &small, 2);
    } else {
      std::memcpy(out.data() + b, &small, 2);
      if (t != DType::kQ8_0 && t != DType::kQ4_0) std::memcpy(out.data() + b + 2, &small, 2);
    }
  }
  return out;
}

// Cold: the call cycles through copies of the weights totalling kColdBytes (4x this machine's
// L3 of 32 MB), so that every call reads its weights from memory, as decode of a whole model does.
constexpr size_t kColdBytes = size_t{128} << 20;

void BM_Gemm(benchmark::State& state, Shape s, int64_t m, DType t, const char* isa, bool cold) {
  const std::string saved = loraplex::kernels::CpuKernelIsa();
  if (!loraplex::kernels::cpu::SetActiveCpuOpsForTesting(isa)) {
    state.SkipWithError((std::string(isa) + " is not supported on this CPU").c_str());
    return;
  }
  const std::vector<uint8_t> one = MakeWeights(t, s.n, s.k);
  const size_t copies = cold ? std::max<size_t>(1, kColdBytes / one.size()) : 1;
  std::vector<uint8_t> w(one.size() * copies);
  for (size_t c = 0; c < copies; ++c)
    std::memcpy(w.data() + c * one.size(), one.data(), one.size());
  std::vector<float> x(m * s.k), y(m * s.n);
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  for (float& v : x) v = d(rng);
  size_t c = 0;
  for (auto _ : state) {
    const WeightView view{t, w.data() + c * one.size(), s.n, s.k};
    loraplex::kernels::Gemm(y.data(), x.data(), m, view);
    benchmark::DoNotOptimize(y.data());
    if (++c == copies) c = 0;
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["weight_GBps"] = benchmark::Counter(static_cast<double>(one.size()) * iters / 1e9,
                                                     benchmark::Counter::kIsRate);
  state.counters["GFLOPS"] =
      benchmark::Counter(2.0 * m * s.n * s.k * iters / 1e9, benchmark::Counter::kIsRate);
  state.counters["weight_MB"] = static_cast<double>(one.size()) / 1e6;
  state.SetLabel(t == DType::kBF16 ? loraplex::kernels::CpuKernelIsa()
                                   : loraplex::kernels::QuantKernelIsa());
  loraplex::kernels::cpu::SetActiveCpuOpsForTesting(saved.c_str());
}

void RegisterAll() {
  for (const Shape& s : kShapes) {
    for (int64_t m : kTokens) {
      for (DType t : kTypes) {
        // lm_head is the tied embedding: Q8_0 in the SmolLM2 GGUF, bf16 when dequantized.
        if (std::string(s.name) == "lm_head" && t != DType::kBF16 && t != DType::kQ8_0) continue;
        // K-quant rows are whole 256-value super-blocks: of these shapes only down (k = 1536)
        // has them (llama.cpp stores 576-column tensors of a K-quant model in another type).
        if (s.k % loraplex::kernels::BlockSize(t) != 0) continue;
        for (const char* isa : kIsas) {
          // amx differs from avx512 only for its formats at AmxMinTokens() tokens or more.
          if (std::string(isa) == "amx" && (m < loraplex::kernels::cpu::AmxMinTokens() ||
                                            !loraplex::kernels::cpu::AmxFormat(t))) {
            continue;
          }
          for (bool cold : {false, true}) {
            if (cold && m != 1) continue;  // prefill is compute-bound: weights from cache
            const std::string name = std::string(loraplex::kernels::DTypeName(t)) + "_" + isa +
                                     "/" + s.name + "/m:" + std::to_string(m) +
                                     (cold ? "/cold/" : "/");
            benchmark::RegisterBenchmark(
                name.c_str(), [=](benchmark::State& st) { BM_Gemm(st, s, m, t, isa, cold); })
                ->Unit(benchmark::kMicrosecond)
                ->UseRealTime()
                ->MinTime(0.2);
          }
        }
      }
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  RegisterAll();
  benchmark::Initialize(&argc, argv);
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
