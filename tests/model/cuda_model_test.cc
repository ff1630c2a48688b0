// The CUDA model (LoadOptions.device = kCuda) against the CPU model on the same weights and the
// same multi-step batches: prefill chunks and decode tokens of several sequences mixed in one step,
// non-contiguous KV blocks, logits at every token; with PEFT adapters (tests/fixtures/peft, whose
// CPU logits tests/adapters/peft_golden_test.cc checks against HF PEFT) unmerged, merged in mixed
// mode, and after unmerge; DoRA adapters too (their per-row rescale, merged and in mixed mode).
// Without a device every test skips with "no CUDA device found: <reason>";
// LP_REQUIRE_CUDA=1 (scripts/gpu-check.sh) turns the skip into a failure.
//
// The same file also builds cuda_model_emulated_test (tests/model/cuda.cmake): model/ linked
// against a host emulation of kernels/cuda (cuda_emulation.cc), so these checks of the CUDA
// model's own logic run on every machine; there the "device" is always present.
//
// On failure: the CPU side is the reference (checked against transformers/PEFT by the CPU tests);
// fixtures regenerate with tools/make_hf_goldens.py and tools/make_peft_goldens.py.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <string>
#include <vector>

#include "adapters/base_weights.h"
#include "adapters/lora_adapter.h"
#include "model/device.h"
#include "model/llama_model.h"
#include "nlohmann/json.hpp"
#include "tests/testing/testing.h"
#include "tests/testing/tolerances.h"
#include "tests/testing/top_logits.h"

namespace loraplex::model {
namespace {

using ::loraplex::testing::AllClose;
using ::loraplex::testing::FixturesDir;
using ::loraplex::testing::Stories260KDir;
using ::loraplex::testing::Tolerance;

bool RequireCuda() {
  const char* v = std::getenv("LP_REQUIRE_CUDA");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

class CudaModelTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!CudaBackendAvailable(&why)) {
      if (RequireCuda()) FAIL() << "LP_REQUIRE_CUDA=1 but no CUDA device found: " << why;
      GTEST_SKIP() << "no CUDA device found: " << why;
    }
  }
};

std::unique_ptr<LlamaModel> LoadModel(const std::string& path, kernels::DType dtype, Device device,
                                      int64_t adapter_slots = 64, bool graphs = true) {
  LoadOptions o;
  o.cuda_graphs = graphs;
  o.dtype = dtype;
  o.require_tokenizer = false;
  o.device = device;
  o.cuda_adapter_slots = adapter_slots;
  auto m = LlamaModel::Load(path, o);
  EXPECT_OK(m);
  return m.ok() ? std::move(m).value() : nullptr;
}

// One sequence of a script: its token ids and its adapter, an index into the step's adapters (-1 =
// base model).
struct Seq {
  std::vector<int32_t> ids;
  int32_t adapter = -1;
};
// A step feeds `count` further tokens of sequence `seq`.
struct Chunk {
  int seq;
  int count;
};

// Deterministic ids in [0, vocab).
std::vector<int32_t> Ids(int n, int vocab, uint32_t seed) {
  std::vector<int32_t> out(n);
  for (int i = 0; i < n; ++i) {
    seed = seed * 1664525u + 1013904223u;
    out[i] = static_cast<int32_t>((seed >> 8) % vocab);
  }
  return out;
}

// Runs the steps on a fresh cache of `m` and returns each step's logits (every token of the step,
// in batch order). Blocks are handed out round-robin over the sequences, so no table is contiguous.
// With `tops`, each step runs through the samplers' Forward with `top_k` instead and its StepLogits
// go there (the returned logits are then empty).
std::vector<std::vector<float>> RunSteps(LlamaModel& m, const std::vector<Seq>& seqs,
                                         const std::vector<std::vector<Chunk>>& steps,
                                         const std::vector<const LoraWeightsView*>& adapters,
                                         int64_t top_k = 0,
                                         std::vector<StepLogits>* tops = nullptr) {
  constexpr int64_t kBlock = 4;  // small, so short sequences still span several blocks
  int64_t max_blocks = 1;
  for (const Seq& s : seqs) {
    max_blocks = std::max<int64_t>(max_blocks, (s.ids.size() + kBlock - 1) / kBlock);
  }
  const int64_t num_seqs = static_cast<int64_t>(seqs.size());
  auto cache = m.CreateKvCache(max_blocks * num_seqs, kBlock);
  EXPECT_OK(cache);
  if (!cache.ok()) return {};
  std::vector<int32_t> tables(num_seqs * max_blocks);
  for (int64_t b = 0; b < max_blocks; ++b) {
    for (int64_t s = 0; s < num_seqs; ++s) tables[s * max_blocks + b] = *cache->AllocateBlock();
  }
  std::vector<int> done(seqs.size(), 0);
  std::vector<std::vector<float>> out;
  for (const auto& step : steps) {
    ForwardBatch b;
    b.max_blocks_per_seq = max_blocks;
    b.block_tables = tables;
    b.adapters = adapters;
    bool any_adapter = false;
    for (const Chunk& c : step) {
      for (int i = 0; i < c.count; ++i) {
        const int pos = done[c.seq]++;
        b.logit_rows.push_back(static_cast<int32_t>(b.tokens.size()));
        b.tokens.push_back(seqs[c.seq].ids.at(pos));
        b.positions.push_back(pos);
        b.token_seq.push_back(c.seq);
        b.token_adapter.push_back(seqs[c.seq].adapter);
        any_adapter |= seqs[c.seq].adapter >= 0;
      }
    }
    if (!any_adapter) b.token_adapter.clear();
    std::vector<float> logits;
    if (tops != nullptr) {
      tops->emplace_back();
      EXPECT_OK(m.Forward(b, &*cache, top_k, &tops->back()));
    } else {
      EXPECT_OK(m.Forward(b, &*cache, &logits));
    }
    out.push_back(std::move(logits));
  }
  return out;
}

// Three sequences: prefill chunks, a prefill beside decodes, then decodes only.
std::vector<std::vector<Chunk>> MixedSteps() {
  return {{{0, 13}, {1, 5}},
          {{0, 1}, {1, 6}, {2, 9}},
          {{0, 1}, {1, 1}, {2, 1}},
          {{2, 1}, {0, 1}},
          {{1, 1}, {2, 1}, {0, 1}}};
}
std::vector<Seq> MixedSeqs(int vocab, int32_t adapter0 = -1, int32_t adapter1 = -1,
                           int32_t adapter2 = -1) {
  // Exactly as long as MixedSteps consumes: 13+1+1+1+1, 5+6+1+1, 9+1+1+1.
  return {
      {Ids(17, vocab, 1), adapter0}, {Ids(13, vocab, 2), adapter1}, {Ids(12, vocab, 3), adapter2}};
}

void ExpectStepsClose(const std::vector<std::vector<float>>& cuda,
                      const std::vector<std::vector<float>>& cpu, Tolerance tol,
                      const std::string& what) {
  ASSERT_EQ(cuda.size(), cpu.size()) << what;
  for (size_t i = 0; i < cpu.size(); ++i) {
    EXPECT_TRUE(AllClose(cuda[i], cpu[i], tol)) << what << ", step " << i;
  }
}

TEST_F(CudaModelTest, TinyLlamaVariantsMatchCpu) {
  for (const char* variant : {"base", "qwen2_bias", "rope_llama3", "rope_linear"}) {
    const std::string path = FixturesDir() + "/tiny_llama/" + variant;
    auto cpu = LoadModel(path, kernels::DType::kF32, Device::kCpu);
    auto cuda = LoadModel(path, kernels::DType::kF32, Device::kCuda);
    ASSERT_TRUE(cpu && cuda) << variant;
    EXPECT_EQ(cuda->device(), Device::kCuda);
    const auto seqs = MixedSeqs(static_cast<int>(cpu->config().vocab_size));
    ExpectStepsClose(RunSteps(*cuda, seqs, MixedSteps(), {}),
                     RunSteps(*cpu, seqs, MixedSteps(), {}),
                     ::loraplex::testing::kCudaF32ModelLogits, variant);
  }
}

TEST_F(CudaModelTest, SlidingWindowMatchesCpuBeforeAndPastTheWindow) {
  const std::string path = FixturesDir() + "/tiny_llama/mistral_window";
  auto cpu = LoadModel(path, kernels::DType::kF32, Device::kCpu);
  auto cuda = LoadModel(path, kernels::DType::kF32, Device::kCuda);
  ASSERT_TRUE(cpu && cuda);
  const int64_t window = cpu->config().sliding_window;
  ASSERT_EQ(window, 8);
  const int vocab = static_cast<int>(cpu->config().vocab_size);
  // Chunked prefill across the window edge, then decode steps far past it (RunSteps' blocks of 4
  // slots: whole blocks fall out of the window), two sequences at different depths in one step.
  const std::vector<Seq> seqs = {{Ids(29, vocab, 7), -1}, {Ids(23, vocab, 8), -1}};
  const std::vector<std::vector<Chunk>> steps = {{{0, 6}, {1, 11}}, {{0, 13}, {1, 1}},
                                                 {{0, 1}, {1, 9}},  {{0, 7}, {1, 1}},
                                                 {{1, 1}, {0, 1}},  {{0, 1}}};
  ExpectStepsClose(RunSteps(*cuda, seqs, steps, {}), RunSteps(*cpu, seqs, steps, {}),
                   ::loraplex::testing::kCudaF32ModelLogits, "mistral_window");
}

TEST_F(CudaModelTest, Stories260KMatchesCpuInF32AndBf16) {
  for (kernels::DType dtype : {kernels::DType::kF32, kernels::DType::kBF16}) {
    auto cpu = LoadModel(Stories260KDir() + "/stories260K.gguf", dtype, Device::kCpu);
    auto cuda = LoadModel(Stories260KDir() + "/stories260K.gguf", dtype, Device::kCuda);
    ASSERT_TRUE(cpu && cuda);
    const auto seqs = MixedSeqs(static_cast<int>(cpu->config().vocab_size));
    const bool f32 = dtype == kernels::DType::kF32;
    ExpectStepsClose(
        RunSteps(*cuda, seqs, MixedSteps(), {}), RunSteps(*cpu, seqs, MixedSteps(), {}),
        f32 ? ::loraplex::testing::kCudaF32ModelLogits : ::loraplex::testing::kCudaBf16ModelLogits,
        f32 ? "f32" : "bf16");
  }
}

// The engine's prefix cache hands a sequence blocks another sequence's step wrote: B shares A's
// first two blocks (8 tokens) and computes only its own 6 tokens, in a later step, reading A's K/V
// through its block table. Its logits must be those of B computed from scratch on the CPU.
TEST_F(CudaModelTest, BlocksWrittenByOneSequenceServeAnotherSharingItsPrefix) {
  auto cpu = LoadModel(Stories260KDir() + "/stories260K.gguf", kernels::DType::kF32, Device::kCpu);
  auto cuda =
      LoadModel(Stories260KDir() + "/stories260K.gguf", kernels::DType::kF32, Device::kCuda);
  ASSERT_TRUE(cpu && cuda);
  const int vocab = static_cast<int>(cpu->config().vocab_size);
  const std::vector<int32_t> a = Ids(14, vocab, 5);
  std::vector<int32_t> b(a.begin(), a.begin() + 8);
  for (int32_t id : Ids(6, vocab, 6)) b.push_back(id);
  // One step over `ids[from, to)` of one sequence with this block table (blocks of 4).
  auto step = [](LlamaModel& m, KvCache& cache, const std::vector<int32_t>& ids, int from, int to,
                 std::vector<int32_t> table) {
    ForwardBatch batch;
    batch.max_blocks_per_seq = static_cast<int64_t>(table.size());
    batch.block_tables = std::move(table);
    for (int pos = from; pos < to; ++pos) {
      batch.logit_rows.push_back(static_cast<int32_t>(batch.tokens.size()));
      batch.tokens.push_back(ids[pos]);
      batch.positions.push_back(pos);
      batch.token_seq.push_back(0);
    }
    std::vector<float> logits;
    EXPECT_OK(m.Forward(batch, &cache, &logits));
    return logits;
  };
  // From scratch on the CPU: B's last 6 rows.
  auto cpu_cache = cpu->CreateKvCache(4, 4);
  ASSERT_OK(cpu_cache);
  for (int i = 0; i < 4; ++i) ASSERT_OK(cpu_cache->AllocateBlock());
  std::vector<float> want = step(*cpu, *cpu_cache, b, 0, 14, {0, 1, 2, 3});
  want.erase(want.begin(), want.begin() + 8 * vocab);
  // On the device: A in blocks 5, 2, 7, 0; then B in 5, 2 (A's) and 3, 6 (its own).
  auto cache = cuda->CreateKvCache(8, 4);
  ASSERT_OK(cache);
  for (int i = 0; i < 8; ++i) ASSERT_OK(cache->AllocateBlock());
  step(*cuda, *cache, a, 0, 14, {5, 2, 7, 0});
  const std::vector<float> got = step(*cuda, *cache, b, 8, 14, {5, 2, 3, 6});
  EXPECT_TRUE(AllClose(got, want, ::loraplex::testing::kCudaF32ModelLogits));
}

// Sampling's Forward with top_k on the device: each row's best k entries (ids best first, ties by
// lower id; their logits; log-softmax over the whole row) must be what a host selection over the
// whole rows of the same model gives, and top_k = 0 or a CPU model must hand over whole rows.
TEST_F(CudaModelTest, TopLogitsSelectedOnTheDeviceMatchTheWholeRows) {
#ifdef LP_CUDA_EMULATED
  GTEST_SKIP() << "the host emulation's CudaTopK is SelectTopLogits itself, the selection this "
                  "test compares it with; runs on a real GPU";
#endif
  auto cuda =
      LoadModel(Stories260KDir() + "/stories260K.gguf", kernels::DType::kF32, Device::kCuda);
  ASSERT_TRUE(cuda);
  const int64_t vocab = cuda->config().vocab_size;
  const auto seqs = MixedSeqs(static_cast<int>(vocab));
  const auto whole = RunSteps(*cuda, seqs, MixedSteps(), {});
  for (int64_t k : {int64_t{1}, int64_t{5}, int64_t{40}, LlamaModel::kMaxTopLogits}) {
    std::vector<StepLogits> tops;
    RunSteps(*cuda, seqs, MixedSteps(), {}, k, &tops);
    ASSERT_EQ(tops.size(), whole.size());
    for (size_t step = 0; step < whole.size(); ++step) {
      const StepLogits& t = tops[step];
      const int64_t rows = static_cast<int64_t>(whole[step].size()) / vocab;
      ASSERT_EQ(t.k, std::min(k, vocab));
      ASSERT_EQ(t.vocab, vocab);
      ASSERT_EQ(static_cast<int64_t>(t.ids.size()), rows * t.k);
      for (int64_t r = 0; r < rows; ++r) {
        const ::loraplex::testing::HostTopLogits want =
            ::loraplex::testing::SelectTopLogits(whole[step].data() + r * vocab, vocab, t.k);
        for (int64_t i = 0; i < t.k; ++i) {
          ASSERT_EQ(t.ids[r * t.k + i], want.ids[i])
              << "k " << k << " step " << step << " row " << r;
          EXPECT_EQ(t.logits[r * t.k + i], want.logits[i]);
          EXPECT_NEAR(t.logprobs[r * t.k + i], want.logprobs[i], 1e-4);
        }
      }
    }
  }
  // Whole rows: top_k = 0 on CUDA, and any top_k on the CPU.
  std::vector<StepLogits> full;
  RunSteps(*cuda, seqs, MixedSteps(), {}, 0, &full);
  auto cpu = LoadModel(Stories260KDir() + "/stories260K.gguf", kernels::DType::kF32, Device::kCpu);
  ASSERT_TRUE(cpu);
  std::vector<StepLogits> cpu_full;
  RunSteps(*cpu, seqs, MixedSteps(), {}, 5, &cpu_full);
  for (size_t step = 0; step < whole.size(); ++step) {
    EXPECT_EQ(full[step].k, 0);
    EXPECT_EQ(full[step].logits, whole[step]) << step;
    EXPECT_EQ(cpu_full[step].k, 0);
    EXPECT_EQ(cpu_full[step].logits.size(), whole[step].size());
  }
}

// Adapters of `dtype` for `m`, DoRA ones included (their norms read from `m`, which must not merge
// while they load).
adapters::AdapterLoadOptions PeftOptions(const LlamaModel& m,
                                         kernels::DType dtype = kernels::DType::kF32) {
  adapters::AdapterLoadOptions o{dtype, 256};
  o.base_weights = adapters::DirectBaseWeights(m);
  return o;
}

std::unique_ptr<adapters::LoraAdapter> LoadPeft(const std::string& name, const LlamaModel& m) {
  auto a = adapters::LoraAdapter::Load(FixturesDir() + "/peft/stories260k/" + name, m.config(),
                                       PeftOptions(m));
  EXPECT_OK(a) << name;
  return a.ok() ? std::move(a).value() : nullptr;
}

// Decode steps replayed from CUDA graphs give the very bits of the same steps launched op by op:
// prefill chunks, then decode steps of three sequences (two with PEFT adapters, so the graphs hold
// BGMV launches) whose KV blocks and positions move on at every step, then one sequence leaves and
// the batch changes shape. The graphs must have been used.
TEST_F(CudaModelTest, GraphReplaysMatchOpByOpLaunches) {
#ifdef LP_CUDA_EMULATED
  GTEST_SKIP() << "the host emulation has no CUDA graphs: both models launch op by op, so the "
                  "comparison would be of a thing with itself; runs on a real GPU";
#endif
  for (kernels::DType dtype : {kernels::DType::kF32, kernels::DType::kBF16}) {
    const std::string path = Stories260KDir() + "/stories260K.gguf";
    auto graphs = LoadModel(path, dtype, Device::kCuda, 64, /*graphs=*/true);
    auto direct = LoadModel(path, dtype, Device::kCuda, 64, /*graphs=*/false);
    ASSERT_TRUE(graphs && direct);
    auto qv = LoadPeft("qv", *graphs);
    auto all = LoadPeft("all_linear", *graphs);
    auto dora = LoadPeft("dora_all", *graphs);  // the graphs hold its row scales too
    ASSERT_TRUE(qv && all && dora);
    const std::vector<const LoraWeightsView*> adapters = {&qv->view(), &all->view(), &dora->view()};
    const int vocab = static_cast<int>(graphs->config().vocab_size);
    const std::vector<Seq> seqs = {{Ids(40, vocab, 4), 0},
                                   {Ids(34, vocab, 5), -1},
                                   {Ids(40, vocab, 6), 1},
                                   {Ids(30, vocab, 7), 2}};
    std::vector<std::vector<Chunk>> steps = {{{0, 7}, {1, 9}, {2, 3}, {3, 5}}};
    for (int i = 0; i < 25; ++i) steps.push_back({{0, 1}, {1, 1}, {2, 1}, {3, 1}});
    for (int i = 0; i < 8; ++i) steps.push_back({{0, 1}, {2, 1}});
    const auto a = RunSteps(*graphs, seqs, steps, adapters);
    const auto b = RunSteps(*direct, seqs, steps, adapters);
    ASSERT_EQ(a.size(), b.size());
    for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i], b[i]) << "step " << i;
    const CudaGraphStats stats = graphs->cuda_graph_stats();
    EXPECT_EQ(direct->cuda_graph_stats().replays, 0);
    // 25 steps of one shape, 8 of another: each shape runs once, is captured at its second step
    // and replayed from then on.
    EXPECT_EQ(stats.captures, 2);
    EXPECT_EQ(stats.replays, 24 + 7);
  }
}

class CudaAdapterTest : public CudaModelTest {
 protected:
  void SetUp() override {
    CudaModelTest::SetUp();
    if (IsSkipped() || HasFailure()) return;
    cpu_ = LoadModel(Stories260KDir(), kernels::DType::kF32, Device::kCpu);
    cuda_ = LoadModel(Stories260KDir(), kernels::DType::kF32, Device::kCuda);
    ASSERT_TRUE(cpu_ && cuda_);
    for (const char* name : {"qv", "all_linear", "rank64", "rslora", "patterns", "layers"}) {
      adapters_.push_back(LoadPeft(name, *cpu_));
      ASSERT_NE(adapters_.back(), nullptr);
      views_.push_back(&adapters_.back()->view());
    }
  }
  std::unique_ptr<LlamaModel> cpu_, cuda_;
  std::vector<std::unique_ptr<adapters::LoraAdapter>> adapters_;
  std::vector<const LoraWeightsView*> views_;
};

TEST_F(CudaAdapterTest, MixedAdaptersMatchCpuUnmerged) {
  const int vocab = static_cast<int>(cpu_->config().vocab_size);
  // Every adapter beside the base model, over SGMV (prefill) and BGMV (decode) steps.
  for (int first = 0; first < static_cast<int>(views_.size()); first += 2) {
    const auto seqs = MixedSeqs(vocab, first, -1, first + 1);
    ExpectStepsClose(RunSteps(*cuda_, seqs, MixedSteps(), views_),
                     RunSteps(*cpu_, seqs, MixedSteps(), views_),
                     ::loraplex::testing::kCudaF32ModelLogits, "adapters " + std::to_string(first));
  }
  // Six sequences, six adapters, one step: a decode-like batch of short runs.
  std::vector<Seq> seqs;
  std::vector<Chunk> step;
  for (int j = 0; j < static_cast<int>(views_.size()); ++j) {
    seqs.push_back({Ids(3, vocab, 10 + j), j});
    step.push_back({j, 3});
  }
  ExpectStepsClose(RunSteps(*cuda_, seqs, {step}, views_), RunSteps(*cpu_, seqs, {step}, views_),
                   ::loraplex::testing::kCudaF32ModelLogits, "six adapters");
}

TEST_F(CudaAdapterTest, MergedMixedModeMatchesCpuAndUnmergeRestoresTheBase) {
  const int vocab = static_cast<int>(cpu_->config().vocab_size);
  // Base, the merged adapter and another adapter side by side.
  const auto seqs = MixedSeqs(vocab, -1, 1, 0);
  const auto base_seqs = MixedSeqs(vocab);
  const auto before = RunSteps(*cuda_, base_seqs, MixedSteps(), views_);
  for (int cycle = 0; cycle < 3; ++cycle) {
    ASSERT_OK(cpu_->Merge(views_[1]));
    ASSERT_OK(cuda_->Merge(views_[1]));
    EXPECT_THAT(cuda_->Merge(views_[0]),
                ::loraplex::testing::StatusIs(absl::StatusCode::kFailedPrecondition));
    ExpectStepsClose(RunSteps(*cuda_, seqs, MixedSteps(), views_),
                     RunSteps(*cpu_, seqs, MixedSteps(), views_),
                     ::loraplex::testing::kCudaF32ModelLogits, "merged all_linear");
    ASSERT_OK(cpu_->Unmerge());
    ASSERT_OK(cuda_->Unmerge());
    // The pristine weights are back bit for bit, so the same batch gives the same bits.
    const auto after = RunSteps(*cuda_, base_seqs, MixedSteps(), views_);
    ASSERT_EQ(after.size(), before.size());
    for (size_t i = 0; i < before.size(); ++i) EXPECT_EQ(after[i], before[i]) << "step " << i;
  }
  EXPECT_THAT(cuda_->Unmerge(),
              ::loraplex::testing::StatusIs(absl::StatusCode::kFailedPrecondition));
}

// DoRA adapters (per-row scales g, tools/make_dora_goldens.py fixtures) beside plain LoRA and the
// base model in one batch, over SGMV and BGMV steps: unmerged; with a DoRA adapter merged (every
// other token takes 1 / g and the delta back out, another DoRA adapter's tokens then their own g);
// and with a plain adapter merged beside DoRA tokens. Each against the CPU model; unmerge restores
// the base bit for bit.
TEST_F(CudaModelTest, DoraAdaptersMatchCpuUnmergedMergedAndMixed) {
  auto cpu = LoadModel(Stories260KDir(), kernels::DType::kF32, Device::kCpu);
  auto cuda = LoadModel(Stories260KDir(), kernels::DType::kF32, Device::kCuda);
  ASSERT_TRUE(cpu && cuda);
  std::vector<std::unique_ptr<adapters::LoraAdapter>> ads;
  std::vector<const LoraWeightsView*> views;
  for (const char* name : {"dora_qv", "dora_all", "qv", "dora_rslora"}) {
    ads.push_back(LoadPeft(name, *cpu));
    ASSERT_NE(ads.back(), nullptr);
    views.push_back(&ads.back()->view());
  }
  ASSERT_TRUE(views[0]->dora && views[1]->dora && !views[2]->dora && views[3]->dora);
  const int vocab = static_cast<int>(cpu->config().vocab_size);
  const auto base_seqs = MixedSeqs(vocab);
  const auto before = RunSteps(*cuda, base_seqs, MixedSteps(), views);
  // Which adapter each of the three sequences takes; -1 = the base model.
  const std::vector<std::vector<int32_t>> layouts = {{0, -1, 2}, {1, 0, -1}, {2, 1, 3}, {-1, 3, 1}};
  // Nothing merged, then each adapter merged in turn (DoRA q/v, DoRA all-linear, plain qv).
  for (int merged : {-1, 0, 1, 2}) {
    SCOPED_TRACE(merged < 0 ? std::string("nothing merged") : "merged " + std::to_string(merged));
    if (merged >= 0) {
      ASSERT_OK(cpu->Merge(views[merged]));
      ASSERT_OK(cuda->Merge(views[merged]));
    }
    for (const auto& l : layouts) {
      const auto seqs = MixedSeqs(vocab, l[0], l[1], l[2]);
      ExpectStepsClose(RunSteps(*cuda, seqs, MixedSteps(), views),
                       RunSteps(*cpu, seqs, MixedSteps(), views),
                       ::loraplex::testing::kCudaF32ModelLogits,
                       "adapters " + std::to_string(l[0]) + "," + std::to_string(l[1]) + "," +
                           std::to_string(l[2]));
    }
    // Decode-like: one step of short runs of every adapter and the base model.
    std::vector<Seq> seqs;
    std::vector<Chunk> step;
    for (int j = -1; j < static_cast<int>(views.size()); ++j) {
      seqs.push_back({Ids(2, vocab, 20 + j), j});
      step.push_back({j + 1, 2});
    }
    ExpectStepsClose(RunSteps(*cuda, seqs, {step}, views), RunSteps(*cpu, seqs, {step}, views),
                     ::loraplex::testing::kCudaF32ModelLogits, "every adapter in one step");
    if (merged >= 0) {
      ASSERT_OK(cpu->Unmerge());
      ASSERT_OK(cuda->Unmerge());
      const auto after = RunSteps(*cuda, base_seqs, MixedSteps(), views);
      ASSERT_EQ(after.size(), before.size());
      for (size_t i = 0; i < before.size(); ++i) EXPECT_EQ(after[i], before[i]) << "step " << i;
    }
  }
}

// bf16 weights and bf16 adapters, as the server loads them by default: the device copies widen
// A and B exactly, so only the GEMM inputs' rounding separates CUDA from the CPU.
TEST_F(CudaModelTest, Bf16AdaptersMatchCpu) {
  auto cpu = LoadModel(Stories260KDir(), kernels::DType::kBF16, Device::kCpu);
  auto cuda = LoadModel(Stories260KDir(), kernels::DType::kBF16, Device::kCuda);
  ASSERT_TRUE(cpu && cuda);
  std::vector<std::unique_ptr<adapters::LoraAdapter>> ads;
  std::vector<const LoraWeightsView*> views;
  for (const char* name : {"all_linear", "rank64", "dora_all"}) {
    auto a = adapters::LoraAdapter::Load(FixturesDir() + "/peft/stories260k/" + name, cpu->config(),
                                         PeftOptions(*cpu, kernels::DType::kBF16));
    ASSERT_OK(a);
    ads.push_back(std::move(a).value());
    views.push_back(&ads.back()->view());
  }
  const auto seqs = MixedSeqs(static_cast<int>(cpu->config().vocab_size), 0, 2, 1);
  ExpectStepsClose(RunSteps(*cuda, seqs, MixedSteps(), views),
                   RunSteps(*cpu, seqs, MixedSteps(), views),
                   ::loraplex::testing::kCudaBf16ModelLogits, "bf16 adapters");
}

// One prompt of a "loraplex-golden-logits/1" fixture made by tools/make_peft_goldens.py (the
// format tests/adapters/peft_golden_test.cc reads): ids, the positions with logits, the logits.
struct PeftPrompt {
  std::string name;
  std::vector<int32_t> ids, positions;
  std::vector<float> logits;  // [positions.size(), vocab]
};

std::vector<PeftPrompt> ReadPeftGolden(const std::string& json_path) {
  std::vector<PeftPrompt> out;
  std::ifstream in(json_path);
  EXPECT_TRUE(in.good()) << json_path << " missing: python3 tools/make_peft_goldens.py";
  if (!in.good()) return out;
  const nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j["format"], "loraplex-golden-logits/1") << json_path;
  const std::string dir = json_path.substr(0, json_path.rfind('/'));
  std::ifstream data(dir + "/" + j["data_file"].get<std::string>(), std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(data)), std::istreambuf_iterator<char>());
  for (const auto& p : j["prompts"]) {
    PeftPrompt g;
    g.name = p["name"];
    g.ids = p["token_ids"].get<std::vector<int32_t>>();
    g.positions = p["logits"]["positions"].get<std::vector<int32_t>>();
    const auto shape = p["logits"]["shape"].get<std::vector<size_t>>();
    const size_t off = p["logits"]["offset_bytes"].get<size_t>();
    const size_t n = shape.at(0) * shape.at(1);
    EXPECT_LE(off + 4 * n, bytes.size()) << json_path;
    if (off + 4 * n > bytes.size()) return {};
    g.logits.resize(n);
    std::memcpy(g.logits.data(), bytes.data() + off, 4 * n);
    out.push_back(std::move(g));
  }
  return out;
}

// Logits at g.positions of one sequence run as a single prefill step (adapter 0 of `adapters`, or
// the base model when empty).
std::vector<float> RunPrompt(LlamaModel& m, const PeftPrompt& g,
                             const std::vector<const LoraWeightsView*>& adapters) {
  const auto all = RunSteps(m, {{g.ids, adapters.empty() ? -1 : 0}},
                            {{{0, static_cast<int>(g.ids.size())}}}, adapters);
  const int64_t vocab = m.config().vocab_size;
  std::vector<float> out;
  if (all.size() != 1) return out;
  for (int32_t p : g.positions) {
    if (static_cast<size_t>((p + 1) * vocab) > all[0].size()) return {};
    out.insert(out.end(), all[0].begin() + p * vocab, all[0].begin() + (p + 1) * vocab);
  }
  return out;
}

// The checks tests/adapters/peft_golden_test.cc makes on the CPU, here on CUDA: every stories260K
// PEFT fixture's logits (DoRA ones included, against PEFT's DoraLinearLayer), unmerged and merged,
// from the HF copy and the GGUF file; and the base model's logits while an adapter is merged (mixed
// mode).
TEST_F(CudaModelTest, PeftGoldensOnCudaUnmergedAndMerged) {
  const std::vector<PeftPrompt> base =
      ReadPeftGolden(FixturesDir() + "/peft/stories260k/base_logits.json");
  ASSERT_FALSE(base.empty());
  for (const std::string& path : {Stories260KDir(), Stories260KDir() + "/stories260K.gguf"}) {
    auto m = LoadModel(path, kernels::DType::kF32, Device::kCuda);
    ASSERT_NE(m, nullptr);
    for (const char* name :
         {"qv", "qv_f16", "all_linear", "rslora", "patterns", "layers", "regex", "rank1", "rank64",
          "fan_in_fan_out", "dora_qv", "dora_all", "dora_rslora"}) {
      SCOPED_TRACE(path + " " + name);
      // DoRA norms from the CUDA model's own (device) base weights, nothing merged meanwhile.
      auto ad = adapters::LoraAdapter::Load(FixturesDir() + "/peft/stories260k/" + name,
                                            m->config(), PeftOptions(*m));
      ASSERT_OK(ad);
      const LoraWeightsView* view = &(*ad)->view();
      const auto golden =
          ReadPeftGolden(FixturesDir() + "/peft/stories260k/" + name + "/logits.json");
      ASSERT_FALSE(golden.empty());
      for (const PeftPrompt& g : golden) {
        const bool merged = g.name.size() > 7 && g.name.substr(g.name.size() - 7) == "_merged";
        if (merged) {
          ASSERT_OK(m->Merge(view));
        }
        EXPECT_TRUE(
            AllClose(RunPrompt(*m, g, {view}), g.logits, ::loraplex::testing::kF32ModelLogits))
            << g.name;
        if (merged) {
          // Mixed mode: the base model's tokens still see the pristine base.
          EXPECT_TRUE(AllClose(RunPrompt(*m, base[0], {}), base[0].logits,
                               ::loraplex::testing::kF32ModelLogits))
              << "base while " << name << " is merged";
          ASSERT_OK(m->Unmerge());
        }
      }
    }
  }
}

TEST(CudaAdapterSlotsTest, EvictionAndReusedAddressesNeverServeAStaleCopy) {
  std::string why;
  if (!CudaBackendAvailable(&why)) {
    if (RequireCuda()) FAIL() << "LP_REQUIRE_CUDA=1 but no CUDA device found: " << why;
    GTEST_SKIP() << "no CUDA device found: " << why;
  }
  auto cpu = LoadModel(Stories260KDir(), kernels::DType::kF32, Device::kCpu);
  // Two device slots for three adapters per step: the step holds all three, later steps evict.
  auto cuda = LoadModel(Stories260KDir(), kernels::DType::kF32, Device::kCuda, 2);
  ASSERT_TRUE(cpu && cuda);
  const int vocab = static_cast<int>(cpu->config().vocab_size);
  const char* names[] = {"qv", "rank64", "all_linear", "rslora", "regex", "rank1"};
  for (int round = 0; round < 4; ++round) {
    // Fresh adapter objects each round: the allocator may well reuse the last round's addresses.
    std::vector<std::unique_ptr<adapters::LoraAdapter>> ads;
    std::vector<const LoraWeightsView*> views;
    for (int j = 0; j < 3; ++j) {
      ads.push_back(LoadPeft(names[(round + j) % 6], *cpu));
      ASSERT_NE(ads.back(), nullptr);
      views.push_back(&ads.back()->view());
    }
    const auto seqs = MixedSeqs(vocab, 0, 1, 2);
    ExpectStepsClose(RunSteps(*cuda, seqs, MixedSteps(), views),
                     RunSteps(*cpu, seqs, MixedSteps(), views),
                     ::loraplex::testing::kCudaF32ModelLogits, "round " + std::to_string(round));
  }
}

}  // namespace
}  // namespace loraplex::model
