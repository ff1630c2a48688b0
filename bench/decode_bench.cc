// Scenario S1 (DESIGN.md section 6) on the CPU: one sequence, no adapter, SmolLM2-135M-Instruct,
// a 128-token prompt then decode steps at context 128..256, for each weight storage (argument
// dtype: 0 bf16, 1 f32, 2 native = the file's Q4_1/Q8_0 blocks, 3 q8_0; the label says which).
// Reports tokens/s and the bytes of weights streamed per second (weight bytes x tokens/s), to set
// beside bandwidth_bench's BM_StreamRead from the same run (scripts/bench-s1.sh prints the ratio).
//
// The model path comes from LP_BENCH_MODEL (default models/SmolLM2-135M-Instruct.Q4_1.gguf, run
// from the repository root); the benchmark is skipped with a message when it is missing.
#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>

#include "kernels/kernels.h"
#include "model/llama_model.h"

namespace {

using loraplex::model::ForwardBatch;
using loraplex::model::KvCache;
using loraplex::model::LlamaModel;

std::string ModelPath() {
  const char* env = std::getenv("LP_BENCH_MODEL");
  return env ? env : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

// The weight storage of argument `arg` (the benchmarks' "dtype" argument): --dtype values.
constexpr const char* kStorage[] = {"bf16", "f32", "native", "q8_0"};

LlamaModel* GetModel(int64_t arg) {
  static std::map<int64_t, std::unique_ptr<LlamaModel>> models;
  auto it = models.find(arg);
  if (it != models.end()) return it->second.get();
  loraplex::model::LoadOptions options;
  if (!loraplex::model::ParseWeightStorage(kStorage[arg], &options).ok()) return nullptr;
  // LP_BENCH_DEVICE=cuda runs S1 on the GPU (scripts/gpu-check.sh); the CPU otherwise.
  const char* device = std::getenv("LP_BENCH_DEVICE");
  if (device != nullptr && std::string(device) == "cuda") {
    options.device = loraplex::model::Device::kCuda;
  }
  // LP_BENCH_BATCH_INVARIANT=1: the kernels as loraplex-server --batch-invariant runs them.
  if (const char* bi = std::getenv("LP_BENCH_BATCH_INVARIANT"); bi != nullptr && bi[0] == '1') {
    loraplex::kernels::SetBatchInvariant(true);
  }
  auto m = LlamaModel::Load(ModelPath(), options);
  if (!m.ok()) {
    std::fprintf(stderr, "LlamaModel::Load: %s\n", m.status().ToString().c_str());
    return nullptr;
  }
  return (models[arg] = std::move(m).value()).get();
}

constexpr int kPrompt = 128;
constexpr int kMaxContext = 256;
constexpr int kBlock = 16;

void BM_S1DecodeStep(benchmark::State& state) {
  LlamaModel* m = GetModel(state.range(0));
  state.SetLabel(kStorage[state.range(0)]);
  if (m == nullptr) {
    state.SkipWithError(("model not found: " + ModelPath() + " (scripts/fetch-model.sh)").c_str());
    return;
  }
  auto cache = m->CreateKvCache(kMaxContext / kBlock, kBlock);
  ForwardBatch b;
  b.max_blocks_per_seq = kMaxContext / kBlock;
  for (int i = 0; i < kMaxContext / kBlock; ++i) b.block_tables.push_back(*cache->AllocateBlock());
  // Prefill 128 tokens of a fixed pattern.
  for (int i = 0; i < kPrompt; ++i) {
    b.tokens.push_back(100 + (i * 37) % 1000);
    b.positions.push_back(i);
    b.token_seq.push_back(0);
  }
  b.logit_rows = {kPrompt - 1};
  std::vector<float> logits;
  if (!m->Forward(b, &*cache, &logits).ok()) {
    state.SkipWithError("prefill failed");
    return;
  }
  b.tokens = {0};
  b.positions = {kPrompt};
  b.token_seq = {0};
  b.logit_rows = {0};
  int32_t next = 0;
  for (auto _ : state) {
    b.tokens[0] = next;
    auto s = m->Forward(b, &*cache, &logits);
    if (!s.ok()) {
      state.SkipWithError(std::string(s.message()).c_str());
      return;
    }
    // Greedy next token, as a real decode loop would pick it.
    next = static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    b.positions[0] = b.positions[0] + 1 < kMaxContext ? b.positions[0] + 1 : kPrompt;
  }
  state.SetItemsProcessed(state.iterations());
  state.counters["tok/s"] =
      benchmark::Counter(static_cast<double>(state.iterations()), benchmark::Counter::kIsRate);
  state.counters["weight_GB/s"] =
      benchmark::Counter(static_cast<double>(state.iterations()) * m->weight_bytes() / 1e9,
                         benchmark::Counter::kIsRate);
  state.counters["weight_MB"] = m->weight_bytes() / 1e6;
}
BENCHMARK(BM_S1DecodeStep)
    ->DenseRange(0, 3)
    ->ArgName("dtype")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

// The 128-token prompt as one prefill step (the TTFT part of S1).
void BM_S1Prefill128(benchmark::State& state) {
  LlamaModel* m = GetModel(state.range(0));
  state.SetLabel(kStorage[state.range(0)]);
  if (m == nullptr) {
    state.SkipWithError(("model not found: " + ModelPath()).c_str());
    return;
  }
  auto cache = m->CreateKvCache(kPrompt / kBlock, kBlock);
  ForwardBatch b;
  b.max_blocks_per_seq = kPrompt / kBlock;
  for (int i = 0; i < kPrompt / kBlock; ++i) b.block_tables.push_back(*cache->AllocateBlock());
  for (int i = 0; i < kPrompt; ++i) {
    b.tokens.push_back(100 + (i * 37) % 1000);
    b.positions.push_back(i);
    b.token_seq.push_back(0);
  }
  b.logit_rows = {kPrompt - 1};
  std::vector<float> logits;
  for (auto _ : state) {
    if (!m->Forward(b, &*cache, &logits).ok()) {
      state.SkipWithError("prefill failed");
      return;
    }
  }
  state.counters["prompt_tok/s"] = benchmark::Counter(
      static_cast<double>(state.iterations()) * kPrompt, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_S1Prefill128)
    ->DenseRange(0, 3)
    ->ArgName("dtype")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
