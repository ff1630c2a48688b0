// Scenario S2 (DESIGN.md section 6) in-process: 32 sequences decoding together, each with its own
// LoRA adapter (rank r on q,k,v,o, random weights), against the same batch with no adapter; and
// S6 (the same at ranks 8, 16, 64). Context 128 tokens (prefilled once, not timed).
// BM_S2S6Interleaved measures S2 and S6 step by step in turns, for machines whose load drifts.
// BM_PrefillAdapters: 4 prompts of 128 tokens in one prefill step, each with its own adapter.
// Model: LP_BENCH_MODEL or models/SmolLM2-135M-Instruct.Q4_1.gguf (skipped when missing), its
// base weights stored as LP_BENCH_DTYPE says (default bf16).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "kernels/kernels.h"
#include "model/llama_model.h"
#include "model/lora_plan.h"

namespace {

using loraplex::kernels::DType;
using loraplex::model::ForwardBatch;
using loraplex::model::KvCache;
using loraplex::model::LinearModule;
using loraplex::model::LlamaModel;
using loraplex::model::LoraPair;
using loraplex::model::LoraWeightsView;

constexpr int kSeqs = 32;
constexpr int kPrompt = 128;
constexpr int kBlock = 16;
constexpr int kMaxBlocks = 16;  // 256 tokens per sequence

LlamaModel* Model() {
  static LlamaModel* m = [] {
    const char* env = std::getenv("LP_BENCH_MODEL");
    loraplex::model::LoadOptions options;
    // LP_BENCH_DEVICE=cuda runs S2/S4/S6 on the GPU (scripts/gpu-check.sh); the CPU otherwise.
    const char* device = std::getenv("LP_BENCH_DEVICE");
    if (device != nullptr && std::string(device) == "cuda") {
      options.device = loraplex::model::Device::kCuda;
    }
    // LP_BENCH_DTYPE: the --dtype of the base weights (native, bf16, f32, q8_0, q4_0; bf16 unset).
    if (const char* dtype = std::getenv("LP_BENCH_DTYPE"); dtype != nullptr) {
      if (auto st = loraplex::model::ParseWeightStorage(dtype, &options); !st.ok()) {
        std::fprintf(stderr, "LP_BENCH_DTYPE: %s\n", st.ToString().c_str());
        return static_cast<LlamaModel*>(nullptr);
      }
    }
    // LP_BENCH_BATCH_INVARIANT=1: the kernels as loraplex-server --batch-invariant runs them.
    if (const char* bi = std::getenv("LP_BENCH_BATCH_INVARIANT"); bi != nullptr && bi[0] == '1') {
      loraplex::kernels::SetBatchInvariant(true);
    }
    auto r = LlamaModel::Load(env ? env : "models/SmolLM2-135M-Instruct.Q4_1.gguf", options);
    if (!r.ok()) std::fprintf(stderr, "LlamaModel::Load: %s\n", r.status().ToString().c_str());
    return r.ok() ? std::move(r).value().release() : nullptr;
  }();
  return m;
}

// A random bf16 adapter of rank r on q, k, v, o of every layer, in one buffer laid out as the
// adapters' (model::LoraStorageKey).
struct RandomAdapter {
  std::vector<uint16_t> storage;
  std::vector<LoraPair> pairs;
  LoraWeightsView view;

  RandomAdapter(const LlamaModel& m, int64_t rank, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.0f, 0.02f);
    const int64_t layers = m.config().num_layers;
    constexpr LinearModule kModules[] = {LinearModule::kQ, LinearModule::kK, LinearModule::kV,
                                         LinearModule::kO};
    std::vector<loraplex::model::LoraMatrixSlot> slots;  // each module's A, then its B
    for (int64_t l = 0; l < layers; ++l) {
      for (LinearModule mod : kModules) {
        slots.push_back(
            {loraplex::model::LoraStorageKey(l, mod, false), rank * m.LinearInFeatures(mod) * 2});
        slots.push_back(
            {loraplex::model::LoraStorageKey(l, mod, true), m.LinearOutFeatures(mod) * rank * 2});
      }
    }
    int64_t bytes = 0;
    const std::vector<int64_t> offset = loraplex::model::PlaceLoraMatrices(slots, &bytes);
    storage.resize(bytes / 2);
    for (auto& x : storage) x = loraplex::F32ToBf16(dist(rng));
    pairs.reserve(layers * 4);
    view.layers.resize(layers);
    size_t slot = 0;
    for (int64_t l = 0; l < layers; ++l) {
      for (LinearModule mod : kModules) {
        const int64_t in = m.LinearInFeatures(mod), out = m.LinearOutFeatures(mod);
        LoraPair p;
        p.rank = rank;
        p.a = {DType::kBF16, storage.data() + offset[slot++] / 2, rank, in};
        p.b = {DType::kBF16, storage.data() + offset[slot++] / 2, out, rank};
        pairs.push_back(p);
        view.layers[l][static_cast<int>(mod)] = &pairs.back();
      }
    }
  }
};

// n random rank-r adapters (seeds seed, seed + 1, ...) as adapters 0..n-1 of `b`.
void AddAdapters(const LlamaModel& m, int n, int64_t rank, uint32_t seed,
                 std::vector<std::unique_ptr<RandomAdapter>>* adapters, ForwardBatch* b) {
  for (int i = 0; i < n; ++i) {
    adapters->push_back(std::make_unique<RandomAdapter>(m, rank, seed + i));
    b->adapters.push_back(&adapters->back()->view);
  }
}

// Prefills kSeqs sequences of kPrompt tokens into `cache` (one sequence per step, not timed;
// sequence s uses adapter s of b->adapters when `with_adapters`), then leaves `b` as the
// decode batch: one token per sequence at position kPrompt. False, with the state skipped, on
// failure.
bool PrefillThenDecodeBatch(LlamaModel* m, KvCache* cache, bool with_adapters, ForwardBatch* b,
                            std::vector<float>* logits, benchmark::State& state) {
  b->max_blocks_per_seq = kMaxBlocks;
  for (int i = 0; i < kSeqs * kMaxBlocks; ++i) b->block_tables.push_back(*cache->AllocateBlock());
  for (int s = 0; s < kSeqs; ++s) {
    b->tokens.clear();
    b->positions.clear();
    b->token_seq.clear();
    b->token_adapter.clear();
    for (int i = 0; i < kPrompt; ++i) {
      b->tokens.push_back(100 + (i * 37 + s * 11) % 1000);
      b->positions.push_back(i);
      b->token_seq.push_back(s);
      if (with_adapters) b->token_adapter.push_back(s);
    }
    b->logit_rows = {kPrompt - 1};
    if (!m->Forward(*b, cache, logits).ok()) {
      state.SkipWithError("prefill failed");
      return false;
    }
  }
  b->tokens.assign(kSeqs, 0);
  b->positions.assign(kSeqs, kPrompt);
  b->token_seq.clear();
  b->logit_rows.clear();
  b->token_adapter.clear();
  for (int s = 0; s < kSeqs; ++s) {
    b->token_seq.push_back(s);
    b->logit_rows.push_back(s);
    if (with_adapters) b->token_adapter.push_back(s);
  }
  return true;
}

void BM_S2Decode32(benchmark::State& state) {
  const bool with_adapters = state.range(0) != 0;
  const int64_t rank = state.range(1);
  LlamaModel* m = Model();
  if (m == nullptr) {
    state.SkipWithError("model not found (scripts/fetch-model.sh)");
    return;
  }
  std::vector<std::unique_ptr<RandomAdapter>> adapters;
  ForwardBatch b;
  if (with_adapters) AddAdapters(*m, kSeqs, rank, 1000, &adapters, &b);
  auto cache = m->CreateKvCache(kSeqs * kMaxBlocks, kBlock);
  std::vector<float> logits;
  // Decode: one token per sequence per step, every sequence its own adapter.
  if (!PrefillThenDecodeBatch(m, &*cache, with_adapters, &b, &logits, state)) return;
  const double lora_s0 = m->lora_cost().seconds;
  for (auto _ : state) {
    if (!m->Forward(b, &*cache, &logits).ok()) {
      state.SkipWithError("decode failed");
      return;
    }
    for (auto& p : b.positions) p = p + 1 < kMaxBlocks * kBlock ? p + 1 : kPrompt;
  }
  state.counters["out_tok/s"] = benchmark::Counter(static_cast<double>(state.iterations()) * kSeqs,
                                                   benchmark::Counter::kIsRate);
  // The LoRA passes' share of a step (timed inside the forward pass).
  state.counters["lora_ms"] =
      1e3 * (m->lora_cost().seconds - lora_s0) / static_cast<double>(state.iterations());
}
// {adapters, rank}: base, then S2 at rank 16, then the S6 sweep.
BENCHMARK(BM_S2Decode32)
    ->Args({0, 0})
    ->Args({1, 16})
    ->Args({1, 8})
    ->Args({1, 64})
    ->ArgNames({"adapters", "rank"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(3);

// S2 and S6 interleaved, for loaded machines: one prefill (no adapter: the cached values do not
// change the cost), then rounds of one decode step per configuration (no adapter, 32 distinct
// adapters of rank 8, 16, 64), so every configuration sees the same load. Per configuration: the
// median and the best step over the rounds as out tok/s, and each as a ratio to no adapter.
// One decode step of `b`, its milliseconds appended to `ms`; false (the state skipped) on failure.
bool TimedDecodeStep(LlamaModel* m, const ForwardBatch& b, KvCache* cache,
                     std::vector<float>* logits, std::vector<double>* ms, benchmark::State& state) {
  const auto t0 = std::chrono::steady_clock::now();
  if (!m->Forward(b, cache, logits).ok()) {
    state.SkipWithError("decode failed");
    return false;
  }
  ms->push_back(
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  return true;
}

void BM_S2S6Interleaved(benchmark::State& state) {
  LlamaModel* m = Model();
  if (m == nullptr) {
    state.SkipWithError("model not found (scripts/fetch-model.sh)");
    return;
  }
  constexpr int kRanks[] = {0, 8, 16, 64};
  constexpr int kConfigs = 4;
  std::vector<std::unique_ptr<RandomAdapter>> adapters;
  std::vector<const LoraWeightsView*> views[kConfigs];
  for (int c = 1; c < kConfigs; ++c) {
    for (int i = 0; i < kSeqs; ++i) {
      adapters.push_back(std::make_unique<RandomAdapter>(*m, kRanks[c], 1000 * c + i));
      views[c].push_back(&adapters.back()->view);
    }
  }
  auto cache = m->CreateKvCache(kSeqs * kMaxBlocks, kBlock);
  ForwardBatch b;
  std::vector<float> logits;
  if (!PrefillThenDecodeBatch(m, &*cache, /*with_adapters=*/false, &b, &logits, state)) return;
  std::vector<int32_t> token_adapter(kSeqs);
  for (int s = 0; s < kSeqs; ++s) token_adapter[s] = s;
  std::vector<double> ms[kConfigs];
  for (auto _ : state) {
    for (int c = 0; c < kConfigs; ++c) {
      b.adapters = views[c];
      if (c == 0) {
        b.token_adapter.clear();
      } else {
        b.token_adapter = token_adapter;
      }
      if (!TimedDecodeStep(m, b, &*cache, &logits, &ms[c], state)) return;
      for (auto& p : b.positions) p = p + 1 < kMaxBlocks * kBlock ? p + 1 : kPrompt;
    }
  }
  double median[kConfigs], best[kConfigs];
  for (int c = 0; c < kConfigs; ++c) {
    std::sort(ms[c].begin(), ms[c].end());
    median[c] = ms[c][ms[c].size() / 2];
    best[c] = ms[c][0];
  }
  for (int c = 0; c < kConfigs; ++c) {
    const std::string name = c == 0 ? "base" : "r" + std::to_string(kRanks[c]);
    state.counters[name + "_tok/s_med"] = kSeqs * 1000.0 / median[c];
    state.counters[name + "_tok/s_best"] = kSeqs * 1000.0 / best[c];
    if (c > 0) {
      state.counters[name + "_ratio_med"] = median[0] / median[c];
      state.counters[name + "_ratio_best"] = best[0] / best[c];
    }
  }
}
BENCHMARK(BM_S2S6Interleaved)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(15);

// Scenario S4: one sequence decoding with one rank-16 q,k,v,o adapter, unmerged (LoRA applied per
// token) vs merged into the base weights vs the base model alone.
void BM_S4SingleDecode(benchmark::State& state) {
  const int mode = static_cast<int>(state.range(0));  // 0 base, 1 unmerged, 2 merged
  LlamaModel* m = Model();
  if (m == nullptr) {
    state.SkipWithError("model not found (scripts/fetch-model.sh)");
    return;
  }
  RandomAdapter adapter(*m, 16, 7);
  ForwardBatch b;
  if (mode != 0) b.adapters.push_back(&adapter.view);
  if (mode == 2 && !m->Merge(&adapter.view).ok()) {
    state.SkipWithError("merge failed");
    return;
  }
  auto cache = m->CreateKvCache(kMaxBlocks, kBlock);
  b.max_blocks_per_seq = kMaxBlocks;
  for (int i = 0; i < kMaxBlocks; ++i) b.block_tables.push_back(*cache->AllocateBlock());
  std::vector<float> logits;
  for (int i = 0; i < kPrompt; ++i) {
    b.tokens.push_back(100 + (i * 37) % 1000);
    b.positions.push_back(i);
    b.token_seq.push_back(0);
    if (mode != 0) b.token_adapter.push_back(0);
  }
  b.logit_rows = {kPrompt - 1};
  if (!m->Forward(b, &*cache, &logits).ok()) state.SkipWithError("prefill failed");
  b.tokens = {0};
  b.positions = {kPrompt};
  b.token_seq = {0};
  b.logit_rows = {0};
  if (mode != 0) b.token_adapter = {0};
  for (auto _ : state) {
    if (!m->Forward(b, &*cache, &logits).ok()) {
      state.SkipWithError("decode failed");
      break;
    }
    b.positions[0] = b.positions[0] + 1 < kMaxBlocks * kBlock ? b.positions[0] + 1 : kPrompt;
  }
  if (mode == 2) (void)m->Unmerge();
  state.counters["tok/s"] =
      benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_S4SingleDecode)
    ->Arg(0)
    ->Arg(1)
    ->Arg(2)
    ->ArgName("mode")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(3);

// The switch the merge policy pays: merging one rank-r q,k,v,o adapter into the base weights
// (W + B A for 120 matrices of SmolLM2) and unmerging it (the pristine copies put back), each
// timed alone; the merge also in its two parts, PrepareMerge (the arithmetic and the copies, which
// the server runs while steps go on) and the swap (what the engine stops for). Needs unquantized
// base weights (LP_BENCH_DTYPE bf16, the default, or f32).
void BM_MergeUnmerge(benchmark::State& state) {
  LlamaModel* m = Model();
  if (m == nullptr) {
    state.SkipWithError("model not found (scripts/fetch-model.sh)");
    return;
  }
  RandomAdapter adapter(*m, state.range(0), 11);
  double prepare_s = 0, swap_s = 0, unmerge_s = 0;
  for (auto _ : state) {
    const auto t0 = std::chrono::steady_clock::now();
    absl::StatusOr<LlamaModel::PreparedMerge> prepared = m->PrepareMerge(&adapter.view);
    if (!prepared.ok()) {
      state.SkipWithError(prepared.status().ToString().c_str());
      return;
    }
    const auto t1 = std::chrono::steady_clock::now();
    if (absl::Status s = m->Merge(*std::move(prepared)); !s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      return;
    }
    const auto t2 = std::chrono::steady_clock::now();
    if (absl::Status s = m->Unmerge(); !s.ok()) {
      state.SkipWithError(s.ToString().c_str());
      return;
    }
    const auto t3 = std::chrono::steady_clock::now();
    prepare_s += std::chrono::duration<double>(t1 - t0).count();
    swap_s += std::chrono::duration<double>(t2 - t1).count();
    unmerge_s += std::chrono::duration<double>(t3 - t2).count();
  }
  const double n = static_cast<double>(state.iterations());
  state.counters["merge_ms"] = 1e3 * (prepare_s + swap_s) / n;
  state.counters["prepare_ms"] = 1e3 * prepare_s / n;
  state.counters["swap_ms"] = 1e3 * swap_s / n;
  state.counters["unmerge_ms"] = 1e3 * unmerge_s / n;
}
BENCHMARK(BM_MergeUnmerge)->Arg(16)->ArgName("rank")->Unit(benchmark::kMillisecond)->UseRealTime();

// S7's decode step in-process: 32 sequences, 29 (90%) with the hot rank-16 q,k,v,o adapter and
// one each with 3 cold ones, in rounds of one step per configuration so every configuration sees
// the same load: unmerged, the hot adapter merged (the cold tokens in mixed mode; merge and unmerge
// between the steps are not timed), and no adapter at all (what merging could reach at best).
// Per configuration the median step as out tok/s, and merged / unmerged and base / unmerged.
void BM_S7MergedInterleaved(benchmark::State& state) {
  constexpr int kCold = 3;
  LlamaModel* m = Model();
  if (m == nullptr) {
    state.SkipWithError("model not found (scripts/fetch-model.sh)");
    return;
  }
  std::vector<std::unique_ptr<RandomAdapter>> adapters;
  for (int i = 0; i <= kCold; ++i) {
    adapters.push_back(std::make_unique<RandomAdapter>(*m, 16, 3000 + i));
  }
  auto cache = m->CreateKvCache(kSeqs * kMaxBlocks, kBlock);
  ForwardBatch b;
  std::vector<float> logits;
  if (!PrefillThenDecodeBatch(m, &*cache, /*with_adapters=*/false, &b, &logits, state)) return;
  std::vector<const LoraWeightsView*> views;
  for (const auto& a : adapters) views.push_back(&a->view);
  std::vector<int32_t> token_adapter(kSeqs, 0);
  for (int i = 0; i < kCold; ++i) token_adapter[kSeqs - 1 - i] = 1 + i;
  constexpr int kConfigs = 3;  // unmerged, merged, base
  std::vector<double> ms[kConfigs];
  for (auto _ : state) {
    for (int c = 0; c < kConfigs; ++c) {
      if (c == 1 && !m->Merge(views[0]).ok()) {
        state.SkipWithError("merge failed");
        return;
      }
      b.adapters = c == 2 ? std::vector<const LoraWeightsView*>{} : views;
      b.token_adapter = c == 2 ? std::vector<int32_t>{} : token_adapter;
      if (!TimedDecodeStep(m, b, &*cache, &logits, &ms[c], state)) return;
      if (c == 1 && !m->Unmerge().ok()) {
        state.SkipWithError("unmerge failed");
        return;
      }
      for (auto& p : b.positions) p = p + 1 < kMaxBlocks * kBlock ? p + 1 : kPrompt;
    }
  }
  double median[kConfigs];
  for (int c = 0; c < kConfigs; ++c) {
    std::sort(ms[c].begin(), ms[c].end());
    median[c] = ms[c][ms[c].size() / 2];
  }
  state.counters["unmerged_tok/s"] = kSeqs * 1000.0 / median[0];
  state.counters["merged_tok/s"] = kSeqs * 1000.0 / median[1];
  state.counters["base_tok/s"] = kSeqs * 1000.0 / median[2];
  state.counters["merged/unmerged"] = median[0] / median[1];
  state.counters["base/unmerged"] = median[0] / median[2];
}
BENCHMARK(BM_S7MergedInterleaved)->Unit(benchmark::kMillisecond)->UseRealTime()->Iterations(40);

// Prefill with adapters: 4 prompts of kPrompt tokens in one step, each with its own rank-r q,k,v,o
// adapter (an SGMV segment of 128 tokens per adapter), against the same step with no adapter.
void BM_PrefillAdapters(benchmark::State& state) {
  constexpr int kPrompts = 4;
  const bool with_adapters = state.range(0) != 0;
  LlamaModel* m = Model();
  if (m == nullptr) {
    state.SkipWithError("model not found (scripts/fetch-model.sh)");
    return;
  }
  std::vector<std::unique_ptr<RandomAdapter>> adapters;
  ForwardBatch b;
  if (with_adapters) AddAdapters(*m, kPrompts, state.range(1), 2000, &adapters, &b);
  constexpr int kBlocksPerSeq = kPrompt / kBlock;
  auto cache = m->CreateKvCache(kPrompts * kBlocksPerSeq, kBlock);
  b.max_blocks_per_seq = kBlocksPerSeq;
  for (int i = 0; i < kPrompts * kBlocksPerSeq; ++i) {
    b.block_tables.push_back(*cache->AllocateBlock());
  }
  for (int s = 0; s < kPrompts; ++s) {
    for (int i = 0; i < kPrompt; ++i) {
      b.tokens.push_back(100 + (i * 37 + s * 11) % 1000);
      b.positions.push_back(i);
      b.token_seq.push_back(s);
      if (with_adapters) b.token_adapter.push_back(s);
    }
    b.logit_rows.push_back((s + 1) * kPrompt - 1);
  }
  std::vector<float> logits;
  for (auto _ : state) {
    if (!m->Forward(b, &*cache, &logits).ok()) {
      state.SkipWithError("prefill failed");
      return;
    }
  }
  state.counters["prompt_tok/s"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * kPrompts * kPrompt, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_PrefillAdapters)
    ->Args({0, 0})
    ->Args({1, 16})
    ->Args({1, 64})
    ->ArgNames({"adapters", "rank"})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime()
    ->MinTime(2);

}  // namespace

BENCHMARK_MAIN();
