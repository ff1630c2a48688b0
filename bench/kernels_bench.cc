// The non-GEMM kernels of a SmolLM2-135M step: PagedAttention for decode over long contexts and
// for a 128-token prefill, RmsNorm and SiluMul. For scale beside gemm_bench; nothing asserts a
// time.
#include <benchmark/benchmark.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "kernels/kernels.h"

namespace {

using loraplex::kernels::AttentionBatch;
using loraplex::kernels::KvLayout;

std::vector<float> Random(size_t n) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> d(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = d(rng);
  return v;
}

// SmolLM2-135M attention: 9 query heads, 3 kv heads, head_dim 64, block size 16.
// range(0) = context length, range(1) = query tokens (1 = decode, else prefill of the last ones),
// range(2) = sequences in the batch (each with the same context).
void BM_PagedAttention(benchmark::State& state) {
  const int64_t ctx = state.range(0), queries = state.range(1), seqs = state.range(2);
  const int64_t n_heads = 9;
  KvLayout layout{16, 3, 64, (ctx + 15) / 16};
  const int64_t blocks = seqs * layout.max_blocks_per_seq;
  std::vector<float> k = Random(blocks * 16 * 3 * 64), v = Random(blocks * 16 * 3 * 64);
  std::vector<int32_t> tables(blocks);
  for (int64_t b = 0; b < blocks; ++b) tables[b] = static_cast<int32_t>((b * 7919) % blocks);
  std::vector<int32_t> tok_seq, tok_pos;
  for (int64_t s = 0; s < seqs; ++s) {
    for (int64_t t = ctx - queries; t < ctx; ++t) {
      tok_seq.push_back(static_cast<int32_t>(s));
      tok_pos.push_back(static_cast<int32_t>(t));
    }
  }
  AttentionBatch batch{static_cast<int64_t>(tok_seq.size()), tok_seq.data(), tok_pos.data(),
                       tables.data()};
  std::vector<float> q = Random(batch.num_tokens * n_heads * 64), out(q.size());
  for (auto _ : state) {
    loraplex::kernels::PagedAttention(out.data(), q.data(), k.data(), v.data(), batch, layout,
                                      n_heads, 0.125f);
    benchmark::DoNotOptimize(out.data());
  }
  state.SetLabel(loraplex::kernels::CpuKernelIsa());
}
BENCHMARK(BM_PagedAttention)
    ->Args({128, 1, 1})
    ->Args({2048, 1, 1})
    ->Args({2048, 1, 8})
    ->Args({128, 128, 1})
    ->Args({192, 1, 32})
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

void BM_RmsNorm(benchmark::State& state) {
  const int64_t rows = state.range(0);
  std::vector<float> x = Random(rows * 576), w = Random(576), out(x.size());
  for (auto _ : state) {
    loraplex::kernels::RmsNorm(out.data(), x.data(), w.data(), rows, 576, 1e-5f);
    benchmark::DoNotOptimize(out.data());
  }
}
BENCHMARK(BM_RmsNorm)->Arg(1)->Arg(128)->Unit(benchmark::kMicrosecond)->UseRealTime();

void BM_SiluMul(benchmark::State& state) {
  const int64_t n = state.range(0) * 1536;
  std::vector<float> g = Random(n), u = Random(n), out(n);
  for (auto _ : state) {
    loraplex::kernels::SiluMul(out.data(), g.data(), u.data(), n);
    benchmark::DoNotOptimize(out.data());
  }
}
BENCHMARK(BM_SiluMul)->Arg(1)->Arg(128)->Unit(benchmark::kMicrosecond)->UseRealTime();

// The sampler's whole-row normaliser over SmolLM2's 49152 logits (uniform in [-6, 6], a logit-like
// spread): the SIMD kernel (arg 0) against the reference's scalar f64 exp per logit (arg 1), which
// the sampler used before. 32 rows of it are one S2 step's sampling.
void BM_LogSumExp(benchmark::State& state) {
  constexpr int64_t kVocab = 49152;
  std::vector<float> x = Random(kVocab);
  for (float& v : x) v *= 6.0f;
  const bool reference = state.range(0) == 1;
  for (auto _ : state) {
    const double z = reference ? loraplex::kernels::ref::LogSumExp(x.data(), kVocab)
                               : loraplex::kernels::LogSumExp(x.data(), kVocab);
    benchmark::DoNotOptimize(z);
  }
}
BENCHMARK(BM_LogSumExp)->Arg(0)->Arg(1)->Unit(benchmark::kMicrosecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
