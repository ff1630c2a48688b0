// SGMV/BGMV on SmolLM2-135M shapes (hidden 576, k/v 192), bf16 weights, f32 activations.
// See docs/benchmarks.md ("LoRA kernels") for the figures measured in one run.
//
// BM_Qkv{Shrink,Expand}, BM_O{Shrink,Expand}: the decode step of scenario S2 for one layer: 32
//   tokens, each of a different adapter (BGMV), q/k/v fused in one call (3 slices) and o alone.
//   Shrink and expand are timed apart. The "GB/s" counter is the adapter weight bytes the op
//   must read (32 adapters x rank x (in or out) x 2 bytes) per second of wall time; compare it
//   with bandwidth_bench. Iterations cycle through enough copies of the weights (>= 384 MiB, like
//   the 30 layers of a real step) that they come from DRAM, not from the last-level cache.
// BM_LayerLora: q/k/v and o shrink + expand, i.e. one layer's LoRA work in S2, as the model runs
//   it (BgmvShrinkExpand, fused); BM_LayerLoraTwoPhase: the same as four separate ops.
// BM_GroupedDecode: 32 tokens over 4 adapters, interleaved (t % 4), so each adapter has 8 tokens
//   that are not consecutive: the case where grouping tokens by adapter pays.
// BM_Decode{Bgmv,NaiveLoop}, BM_DecodeBaseGemm, BM_Prefill*: the q_proj-only comparisons against
//   a naive per-token loop of plain GEMMs and the base GEMM (weights hot in cache).

#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "common/half.h"
#include "kernels/kernels.h"
#include "kernels/lora.h"

namespace loraplex::kernels {
namespace {

constexpr int64_t kHidden = 576;
constexpr int64_t kKv = 192;
constexpr int64_t kTokens = 32;
constexpr int64_t kQkvOut[3] = {kHidden, kKv, kKv};

// ~384 MiB of random bf16 weights, filled once (a cheap LCG: the values do not matter, only that
// they are finite and not all equal).
const std::vector<uint16_t>& Pool() {
  static const std::vector<uint16_t>* pool = [] {
    auto* p = new std::vector<uint16_t>(size_t{192} << 20);
    uint32_t s = 12345;
    for (uint16_t& e : *p) {
      s = s * 1664525u + 1013904223u;
      e = F32ToBf16((static_cast<float>(s >> 8) / 16777216.0f - 0.5f) * 0.2f);
    }
    return p;
  }();
  return *pool;
}

// `copies` independent sets of the q/k/v (fused) and o weights of `adapters` adapters of one rank,
// laid out back to back in Pool().
struct LayerWeights {
  struct Copy {
    std::vector<WeightView> qkv_a, qkv_b, o_a, o_b;
    LoraSliceWeights qkv, o;
  };
  std::vector<Copy> copies;
  int64_t qkv_a_bytes = 0, qkv_b_bytes = 0, o_a_bytes = 0, o_b_bytes = 0;  // per copy

  LayerWeights(int64_t adapters, int64_t rank) {
    const uint16_t* base = Pool().data();
    const int64_t pool_elems = static_cast<int64_t>(Pool().size());
    const int64_t per_adapter = rank * (3 * kHidden + (kHidden + 2 * kKv) + 2 * kHidden);
    const int64_t per_copy = adapters * per_adapter;
    const int64_t n = std::max<int64_t>(2, pool_elems / per_copy);
    copies.resize(n);
    int64_t off = 0;
    auto take = [&](int64_t rows, int64_t cols) {
      if (off + rows * cols > pool_elems) off = 0;  // only past rank ~1000: reuse from the start
      WeightView w{DType::kBF16, base + off, rows, cols};
      off += rows * cols;
      return w;
    };
    for (Copy& c : copies) {
      for (int64_t j = 0; j < adapters; ++j) {
        // As an adapter's buffer holds them (model::LoraStorageKey): the group's A, then its B.
        for (int s = 0; s < 3; ++s) c.qkv_a.push_back(take(rank, kHidden));
        for (int s = 0; s < 3; ++s) c.qkv_b.push_back(take(kQkvOut[s], rank));
        c.o_a.push_back(take(rank, kHidden));
        c.o_b.push_back(take(kHidden, rank));
      }
      c.qkv = {adapters, 3, c.qkv_a.data(), c.qkv_b.data()};
      c.o = {adapters, 1, c.o_a.data(), c.o_b.data()};
    }
    qkv_a_bytes = adapters * 3 * rank * kHidden * 2;
    qkv_b_bytes = adapters * rank * (kHidden + 2 * kKv) * 2;
    o_a_bytes = o_b_bytes = adapters * rank * kHidden * 2;
  }
};

// Activations of one decode step: x [32, 576], v [32, 3 * rank], y q/k/v fused [32, 960], y_o.
struct Activations {
  std::vector<float> x, v, y, y_o;
  LoraOutput qkv_out[3];
  LoraOutput o_out;
  int64_t v_stride;

  explicit Activations(int64_t rank) : v_stride(3 * rank) {
    std::mt19937 rng(1);
    std::uniform_real_distribution<float> d(-1.0f, 1.0f);
    x.resize(kTokens * kHidden);
    for (float& e : x) e = d(rng);
    v.assign(kTokens * v_stride, 0.0f);
    const int64_t qkv = kHidden + 2 * kKv;
    y.assign(kTokens * qkv, 0.0f);
    y_o.assign(kTokens * kHidden, 0.0f);
    qkv_out[0] = {y.data(), qkv};
    qkv_out[1] = {y.data() + kHidden, qkv};
    qkv_out[2] = {y.data() + kHidden + kKv, qkv};
    o_out = {y_o.data(), kHidden};
  }
};

enum Op { kQkvShrink, kQkvExpand, kOShrink, kOExpand, kLayer, kLayerTwoPhase };

void RunDecode(benchmark::State& state, Op op, int64_t adapters,
               const std::vector<int32_t>& token_adapter) {
  const int64_t rank = state.range(0);
  LayerWeights w(adapters, rank);
  Activations act(rank);
  const int32_t* idx = token_adapter.data();
  // Expand reads v as the shrink left it.
  BgmvShrink(act.v.data(), act.v_stride, act.x.data(), kHidden, idx, kTokens, w.copies[0].qkv);
  size_t i = 0;
  for (auto _ : state) {
    const LayerWeights::Copy& c = w.copies[i++ % w.copies.size()];
    switch (op) {
      case kQkvShrink:
        BgmvShrink(act.v.data(), act.v_stride, act.x.data(), kHidden, idx, kTokens, c.qkv);
        break;
      case kQkvExpand:
        BgmvExpand(act.qkv_out, act.v.data(), act.v_stride, idx, kTokens, c.qkv);
        break;
      case kOShrink:
        BgmvShrink(act.v.data(), act.v_stride, act.x.data(), kHidden, idx, kTokens, c.o);
        break;
      case kOExpand:
        BgmvExpand(&act.o_out, act.v.data(), act.v_stride, idx, kTokens, c.o);
        break;
      case kLayer:
        BgmvShrinkExpand(act.qkv_out, act.x.data(), kHidden, idx, kTokens, c.qkv, false);
        BgmvShrinkExpand(&act.o_out, act.x.data(), kHidden, idx, kTokens, c.o, false);
        break;
      case kLayerTwoPhase:
        BgmvShrink(act.v.data(), act.v_stride, act.x.data(), kHidden, idx, kTokens, c.qkv);
        BgmvExpand(act.qkv_out, act.v.data(), act.v_stride, idx, kTokens, c.qkv);
        BgmvShrink(act.v.data(), act.v_stride, act.x.data(), kHidden, idx, kTokens, c.o);
        BgmvExpand(&act.o_out, act.v.data(), act.v_stride, idx, kTokens, c.o);
        break;
    }
    benchmark::ClobberMemory();
  }
  const int64_t layer = w.qkv_a_bytes + w.qkv_b_bytes + w.o_a_bytes + w.o_b_bytes;
  const int64_t bytes[] = {w.qkv_a_bytes, w.qkv_b_bytes, w.o_a_bytes, w.o_b_bytes, layer, layer};
  state.counters["GB/s"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * bytes[op] * 1e-9, benchmark::Counter::kIsRate);
  state.counters["copies"] = static_cast<double>(w.copies.size());
}

std::vector<int32_t> OnePerToken() {
  std::vector<int32_t> idx(kTokens);
  for (int64_t t = 0; t < kTokens; ++t) idx[t] = static_cast<int32_t>(t);
  return idx;
}

void BM_QkvShrink(benchmark::State& s) { RunDecode(s, kQkvShrink, kTokens, OnePerToken()); }
void BM_QkvExpand(benchmark::State& s) { RunDecode(s, kQkvExpand, kTokens, OnePerToken()); }
void BM_OShrink(benchmark::State& s) { RunDecode(s, kOShrink, kTokens, OnePerToken()); }
void BM_OExpand(benchmark::State& s) { RunDecode(s, kOExpand, kTokens, OnePerToken()); }
void BM_LayerLora(benchmark::State& s) { RunDecode(s, kLayer, kTokens, OnePerToken()); }
void BM_LayerLoraTwoPhase(benchmark::State& s) {
  RunDecode(s, kLayerTwoPhase, kTokens, OnePerToken());
}
void BM_GroupedDecode(benchmark::State& s) {
  std::vector<int32_t> idx(kTokens);
  for (int64_t t = 0; t < kTokens; ++t) idx[t] = static_cast<int32_t>(t % 4);
  RunDecode(s, kLayer, 4, idx);
}

BENCHMARK(BM_QkvShrink)->Arg(8)->Arg(16)->Arg(64)->ArgName("rank")->UseRealTime();
BENCHMARK(BM_QkvExpand)->Arg(8)->Arg(16)->Arg(64)->ArgName("rank")->UseRealTime();
BENCHMARK(BM_OShrink)->Arg(8)->Arg(16)->Arg(64)->ArgName("rank")->UseRealTime();
BENCHMARK(BM_OExpand)->Arg(8)->Arg(16)->Arg(64)->ArgName("rank")->UseRealTime();
BENCHMARK(BM_LayerLora)->Arg(8)->Arg(16)->Arg(64)->ArgName("rank")->UseRealTime();
BENCHMARK(BM_LayerLoraTwoPhase)->Arg(8)->Arg(16)->Arg(64)->ArgName("rank")->UseRealTime();
BENCHMARK(BM_GroupedDecode)->Arg(16)->Arg(64)->ArgName("rank")->UseRealTime();

// q_proj only, weights hot in cache: against a naive loop and the base GEMM of the same tokens.
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
  const int64_t rank = state.range(0), tokens = kTokens;
  Setup s(tokens, rank, tokens);
  std::vector<int32_t> idx = OnePerToken();
  LoraOutput out{s.y.data(), kHidden};
  for (auto _ : state) {
    BgmvShrink(s.v.data(), rank, s.x.data(), kHidden, idx.data(), tokens, s.w);
    BgmvExpand(&out, s.v.data(), rank, idx.data(), tokens, s.w);
    benchmark::ClobberMemory();
  }
}

// The loop a first implementation writes: per token, two GEMMs through the generic Gemm and an Add.
void BM_DecodeNaiveLoop(benchmark::State& state) {
  const int64_t rank = state.range(0), tokens = kTokens;
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
  Setup s(1, 1, kTokens);
  for (auto _ : state) {
    Gemm(s.y.data(), s.x.data(), kTokens, s.base);
    benchmark::ClobberMemory();
  }
}

// 512 prompt tokens in segments of state.range(1), segment i on adapter i, at rank state.range(0);
// `fused`: both ops in one call, as the model runs them (fused from 8 tasks: here 512 / 32
// blocks), else the shrink and the expand in turn.
void RunPrefillSgmv(benchmark::State& state, bool fused) {
  const int64_t rank = state.range(0), per = state.range(1), segs = 512 / per, tokens = segs * per;
  Setup s(segs, rank, tokens);
  std::vector<int64_t> starts;
  std::vector<int32_t> ads;
  for (int64_t i = 0; i <= segs; ++i) starts.push_back(i * per);
  for (int64_t i = 0; i < segs; ++i) ads.push_back(static_cast<int32_t>(i));
  LoraSegments seg{segs, starts.data(), ads.data()};
  LoraOutput out{s.y.data(), kHidden};
  for (auto _ : state) {
    if (fused) {
      SgmvShrinkExpand(&out, s.x.data(), kHidden, seg, s.w, /*negate=*/false);
    } else {
      SgmvShrink(s.v.data(), rank, s.x.data(), kHidden, seg, s.w);
      SgmvExpand(&out, s.v.data(), rank, seg, s.w);
    }
    benchmark::ClobberMemory();
  }
}

void BM_PrefillSgmv(benchmark::State& state) { RunPrefillSgmv(state, /*fused=*/false); }
void BM_PrefillSgmvFused(benchmark::State& state) { RunPrefillSgmv(state, /*fused=*/true); }

void BM_PrefillNaiveLoop(benchmark::State& state) {
  const int64_t rank = state.range(0), per = state.range(1), segs = 512 / per;
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
// 512 prompt tokens in segments of 64 (8 prompts), and of 8, 16, 32 (short prompts or chunks):
// where SGMV hands a segment to Gemm (kGemmMinTokens in kernels/cpu/lora_fast.cc).
BENCHMARK(BM_PrefillSgmv)->ArgsProduct({{16, 64}, {8, 16, 32, 64}})->ArgNames({"rank", "seg"});
BENCHMARK(BM_PrefillSgmvFused)->ArgsProduct({{16, 64}, {8, 16, 32, 64}})->ArgNames({"rank", "seg"});
BENCHMARK(BM_PrefillNaiveLoop)->ArgsProduct({{16, 64}, {8, 16, 32, 64}})->ArgNames({"rank", "seg"});

}  // namespace
}  // namespace loraplex::kernels

BENCHMARK_MAIN();
