// SGMV/BGMV against a naive per-adapter loop of plain GEMMs, on SmolLM2-135M shapes (hidden 576,
// q_proj 576 -> 576), bf16 weights, with the base GEMM of the same tokens for scale. See
// docs/benchmarks.md for the ratios measured in one run.
//
// BM_Decode*: 32 tokens, each of a different adapter (scenario S2's decode step).
// BM_Prefill*: 8 segments of 64 tokens, each of a different adapter.

#include <benchmark/benchmark.h>

#include <random>
#include <vector>

#include "common/half.h"
#include "kernels/kernels.h"
#include "kernels/lora.h"

namespace loraplex::kernels {
namespace {

constexpr int64_t kHidden = 576;

struct Setup {
  std::vector<std::vector<uint16_t>> store;
  std::vector<WeightView> a, b;
  std::vector<uint16_t> w_base;
  WeightView base;
  std::vector<float> x, y, v;
  LoraSliceWeights w;

  Setup(int64_t adapters, int64_t rank, int64_t tokens) {
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> d(-0.1f, 0.1f);
    auto mat = [&](int64_t n) {
      std::vector<uint16_t> m(n);
      for (auto& e : m) e = F32ToBf16(d(rng));
      return m;
    };
    store.reserve(2 * adapters);
    for (int64_t j = 0; j < adapters; ++j) {
      store.push_back(mat(rank * kHidden));
      a.push_back({DType::kBF16, store.back().data(), rank, kHidden});
      store.push_back(mat(kHidden * rank));
      b.push_back({DType::kBF16, store.back().data(), kHidden, rank});
    }
    w_base = mat(kHidden * kHidden);
    base = {DType::kBF16, w_base.data(), kHidden, kHidden};
    x.resize(tokens * kHidden);
    for (auto& e : x) e = d(rng);
    y.assign(tokens * kHidden, 0.0f);
    v.assign(tokens * rank, 0.0f);
    w = {adapters, 1, a.data(), b.data()};
  }
};

void BM_DecodeBgmv(benchmark::State& state) {
  const int64_t rank = state.range(0), tokens = 32;
  Setup s(tokens, rank, tokens);
  std::vector<int32_t> idx(tokens);
  for (int64_t t = 0; t < tokens; ++t) idx[t] = static_cast<int32_t>(t);
  LoraOutput out{s.y.data(), kHidden};
  for (auto _ : state) {
    BgmvShrink(s.v.data(), rank, s.x.data(), kHidden, idx.data(), tokens, s.w);
    BgmvExpand(&out, s.v.data(), rank, idx.data(), tokens, s.w);
    benchmark::ClobberMemory();
  }
}

// The loop a first implementation writes: per token, two GEMMs through the generic Gemm and an Add.
void BM_DecodeNaiveLoop(benchmark::State& state) {
  const int64_t rank = state.range(0), tokens = 32;
  Setup s(tokens, rank, tokens);
  std::vector<float> tmp(kHidden);
  for (auto _ : state) {
    for (int64_t t = 0; t < tokens; ++t) {
      Gemm(s.v.data(), s.x.data() + t * kHidden, 1, s.a[t]);
      Gemm(tmp.data(), s.v.data(), 1, s.b[t]);
      Add(s.y.data() + t * kHidden, tmp.data(), kHidden);
    }
    benchmark::ClobberMemory();
  }
}

void BM_DecodeBaseGemm(benchmark::State& state) {
  Setup s(1, 1, 32);
  for (auto _ : state) {
    Gemm(s.y.data(), s.x.data(), 32, s.base);
    benchmark::ClobberMemory();
  }
}

void BM_PrefillSgmv(benchmark::State& state) {
  const int64_t rank = state.range(0), segs = 8, per = 64, tokens = segs * per;
  Setup s(segs, rank, tokens);
  std::vector<int64_t> starts;
  std::vector<int32_t> ads;
  for (int64_t i = 0; i <= segs; ++i) starts.push_back(i * per);
  for (int64_t i = 0; i < segs; ++i) ads.push_back(static_cast<int32_t>(i));
  LoraSegments seg{segs, starts.data(), ads.data()};
  LoraOutput out{s.y.data(), kHidden};
  for (auto _ : state) {
    SgmvShrink(s.v.data(), rank, s.x.data(), kHidden, seg, s.w);
    SgmvExpand(&out, s.v.data(), rank, seg, s.w);
    benchmark::ClobberMemory();
  }
}

void BM_PrefillNaiveLoop(benchmark::State& state) {
  const int64_t rank = state.range(0), segs = 8, per = 64;
  Setup s(segs, rank, segs * per);
  std::vector<float> tmp(per * kHidden);
  for (auto _ : state) {
    for (int64_t i = 0; i < segs; ++i) {
      Gemm(s.v.data() + i * per * rank, s.x.data() + i * per * kHidden, per, s.a[i]);
      Gemm(tmp.data(), s.v.data() + i * per * rank, per, s.b[i]);
      Add(s.y.data() + i * per * kHidden, tmp.data(), per * kHidden);
    }
    benchmark::ClobberMemory();
  }
}

BENCHMARK(BM_DecodeBgmv)->Arg(8)->Arg(16)->Arg(64);
BENCHMARK(BM_DecodeNaiveLoop)->Arg(8)->Arg(16)->Arg(64);
BENCHMARK(BM_DecodeBaseGemm);
BENCHMARK(BM_PrefillSgmv)->Arg(16);
BENCHMARK(BM_PrefillNaiveLoop)->Arg(16);

}  // namespace
}  // namespace loraplex::kernels

BENCHMARK_MAIN();
