// The host sampler on one SmolLM2-sized logit row (49152 entries): greedy, temperature alone,
// temperature with top_p, with top_k; Sample (sorts only the bands of the row its draw walks)
// against SampleReference (sorts the whole row). The logits are normal with sd 3, close to what a
// small instruct model gives mid-sentence. Nothing here asserts a time (docs/benchmarks.md).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <random>
#include <vector>

#include "model/sampler.h"

namespace loraplex::model {
namespace {

constexpr int64_t kVocab = 49152;

const std::vector<float>& Row() {
  static const std::vector<float> row = [] {
    std::mt19937_64 rng(1);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::vector<float> r(kVocab);
    for (float& x : r) x = normal(rng);
    return r;
  }();
  return row;
}

SamplingParams Params(int64_t kind) {
  switch (kind) {
    case 0:
      return {};  // greedy
    case 1:
      return {.temperature = 0.8f, .seed = 1};
    case 2:
      return {.temperature = 0.8f, .top_p = 0.9f, .seed = 1};
    default:
      return {.temperature = 0.8f, .top_k = 40, .seed = 1};
  }
}

const char* Label(int64_t kind) {
  static const char* labels[] = {"greedy", "T=0.8", "T=0.8 top_p=0.9", "T=0.8 top_k=40"};
  return labels[kind];
}

void BM_Sample(benchmark::State& state) {
  Sampler sampler(Params(state.range(0)));
  for (auto _ : state) benchmark::DoNotOptimize(sampler.Sample(Row().data(), kVocab));
  state.SetLabel(Label(state.range(0)));
}
BENCHMARK(BM_Sample)->DenseRange(0, 3)->Unit(benchmark::kMicrosecond);

void BM_SampleReference(benchmark::State& state) {
  Sampler sampler(Params(state.range(0)));
  for (auto _ : state) benchmark::DoNotOptimize(sampler.SampleReference(Row().data(), kVocab));
  state.SetLabel(Label(state.range(0)));
}
BENCHMARK(BM_SampleReference)->DenseRange(0, 3)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace loraplex::model

BENCHMARK_MAIN();
