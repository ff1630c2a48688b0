// The forward pass with PEFT adapters against HF transformers + PEFT (fixtures by
// tools/make_peft_goldens.py): every adapter config on stories260K, through the HF copy and the
// GGUF copy (q/k un-permuted at load), merged and unmerged, mixed batches of many adapters, and
// SmolLM2-135M when models/ holds it. Logits are compared within the tolerance table; PEFT's
// free-running greedy continuations (model.generate) are reproduced token for token.

#include "tests/adapters/peft_golden.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

namespace loraplex::adapters {
namespace {

using namespace ::loraplex::adapters::golden;  // NOLINT: the fixtures' helpers

class StoriesPeftTest : public ::testing::TestWithParam<std::string> {};

TEST_P(StoriesPeftTest, LogitsMatchPeftUnmergedAndMerged) {
  for (const std::string& path : {Stories260KDir(), Stories260KDir() + "/stories260K.gguf"}) {
    SCOPED_TRACE(path);
    auto m = LoadModel(path);
    ASSERT_NE(m, nullptr);
    const std::string dir = StoriesFixture(GetParam());
    ASSERT_OK_AND_ASSIGN(auto ad, LoraAdapter::Load(dir, m->config(), {kernels::DType::kF32, 256}));
    std::vector<GoldenPrompt> golden = ReadGolden(dir + "/logits.json");
    ASSERT_EQ(golden.size(), 4u);
    std::vector<GoldenPrompt> base = ReadGolden(StoriesFixture("base_logits.json"));
    ASSERT_EQ(base.size(), 2u);
    ASSERT_EQ(base[0].name, "story");
    for (const GoldenPrompt& g : golden) {
      const bool merged = g.name.size() > 7 && g.name.substr(g.name.size() - 7) == "_merged";
      if (merged) {
        ASSERT_OK(m->Merge(&ad->view()));
        // The merged adapter's requests run on W + sBA alone, which is what merge_and_unload
        // computes; nothing is added twice.
        EXPECT_TRUE(AllClose(RunOne(*m, g, &ad->view()), g.logits, testing::kF32ModelLogits))
            << g.name << "; regenerate with " << kRegenerate;
        // Base-model requests in the same state get the merged delta subtracted (mixed mode).
        const GoldenPrompt& b = base[g.name == "story_merged" ? 0 : 1];
        EXPECT_TRUE(AllClose(RunOne(*m, g, nullptr), b.logits, testing::kF32ModelLogits))
            << g.name << " as a base-model request while merged";
        ASSERT_OK(m->Unmerge());
      } else {
        EXPECT_TRUE(AllClose(RunOne(*m, g, &ad->view()), g.logits, testing::kF32ModelLogits))
            << g.name << "; regenerate with " << kRegenerate;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Adapters, StoriesPeftTest, ::testing::ValuesIn(kStoriesAdapters));

TEST(StoriesPeftTest, BaseLogitsUnchangedAndMixedModeWhileMerged) {
  auto m = LoadModel(Stories260KDir());
  ASSERT_NE(m, nullptr);
  std::vector<GoldenPrompt> base = ReadGolden(StoriesFixture("base_logits.json"));
  ASSERT_EQ(base.size(), 2u);
  ASSERT_OK_AND_ASSIGN(
      auto qv, LoraAdapter::Load(StoriesFixture("qv"), m->config(), {kernels::DType::kF32, 256}));
  ASSERT_OK_AND_ASSIGN(auto all, LoraAdapter::Load(StoriesFixture("all_linear"), m->config(),
                                                   {kernels::DType::kF32, 256}));
  std::vector<GoldenPrompt> all_golden = ReadGolden(StoriesFixture("all_linear") + "/logits.json");
  ASSERT_OK(m->Merge(&qv->view()));
  // Mixed mode: with qv merged, base tokens and all_linear tokens still get their own logits.
  for (const GoldenPrompt& g : base) {
    EXPECT_TRUE(AllClose(RunOne(*m, g, nullptr), g.logits, testing::kF32ModelLogits)) << g.name;
  }
  EXPECT_TRUE(AllClose(RunOne(*m, all_golden[0], &all->view()), all_golden[0].logits,
                       testing::kF32ModelLogits));
  ASSERT_OK(m->Unmerge());
  for (const GoldenPrompt& g : base) {
    EXPECT_TRUE(AllClose(RunOne(*m, g, nullptr), g.logits, testing::kF32ModelLogits)) << g.name;
  }
}

// Base + five adapters in one batch, different lengths: each sequence gets the logits PEFT gives
// it alone.
TEST(StoriesPeftTest, MixedBatchEqualsEachAlone) {
  auto m = LoadModel(Stories260KDir());
  ASSERT_NE(m, nullptr);
  const std::vector<std::string> names = {"qv", "rslora", "patterns", "rank1", "regex"};
  std::vector<std::unique_ptr<LoraAdapter>> ads;
  std::vector<const LoraWeightsView*> views;
  std::vector<std::vector<int32_t>> seqs, positions;
  std::vector<std::vector<float>> expected;
  std::vector<int32_t> seq_adapters;
  // Base first.
  std::vector<GoldenPrompt> base = ReadGolden(StoriesFixture("base_logits.json"));
  ASSERT_EQ(base.size(), 2u);
  seqs.push_back(base[1].ids);
  positions.push_back(base[1].positions);
  expected.push_back(base[1].logits);
  seq_adapters.push_back(-1);
  for (size_t i = 0; i < names.size(); ++i) {
    ASSERT_OK_AND_ASSIGN(auto ad, LoraAdapter::Load(StoriesFixture(names[i]), m->config(),
                                                    {kernels::DType::kF32, 256}));
    views.push_back(&ad->view());
    ads.push_back(std::move(ad));
    std::vector<GoldenPrompt> g = ReadGolden(StoriesFixture(names[i]) + "/logits.json");
    ASSERT_GE(g.size(), 2u);
    const GoldenPrompt& p = g[i % 2];  // alternate the two prompt lengths
    seqs.push_back(p.ids);
    positions.push_back(p.positions);
    expected.push_back(p.logits);
    seq_adapters.push_back(static_cast<int32_t>(i));
  }
  // The same adapter twice, non-adjacent, too.
  seqs.push_back(seqs[1]);
  positions.push_back(positions[1]);
  expected.push_back(expected[1]);
  seq_adapters.push_back(0);
  std::vector<std::vector<float>> got = RunBatch(*m, seqs, positions, seq_adapters, views);
  for (size_t s = 0; s < seqs.size(); ++s) {
    EXPECT_TRUE(AllClose(got[s], expected[s], testing::kF32ModelLogits)) << "sequence " << s;
  }
}

// Every stories260K adapter (and the base model) decoded together in one batch, unmerged, and
// each adapter merged alone through model::Generate: each continuation equals PEFT's.
TEST(StoriesPeftGreedyTest, ContinuationsMatchPeftBatchedUnmergedAndSoloMerged) {
  for (const std::string& path : {Stories260KDir(), Stories260KDir() + "/stories260K.gguf"}) {
    SCOPED_TRACE(path);
    auto m = LoadModel(path);
    ASSERT_NE(m, nullptr);
    std::vector<std::unique_ptr<LoraAdapter>> ads;
    std::vector<const LoraWeightsView*> views;
    std::vector<std::vector<int32_t>> prompts;
    std::vector<int32_t> seq_adapters;
    std::vector<const GoldenGreedy*> want;
    std::vector<std::string> what;
    std::vector<std::vector<GoldenPrompt>> golden;
    for (const std::string& name : kStoriesAdapters) {
      const std::string dir = StoriesFixture(name);
      ASSERT_OK_AND_ASSIGN(auto ad,
                           LoraAdapter::Load(dir, m->config(), {kernels::DType::kF32, 256}));
      golden.push_back(ReadGolden(dir + "/logits.json"));
      ASSERT_EQ(golden.back().size(), 4u) << dir;
      views.push_back(&ad->view());
      ads.push_back(std::move(ad));
    }
    size_t compared = 0, total = 0;
    for (size_t a = 0; a < golden.size(); ++a) {
      for (const GoldenPrompt& g : golden[a]) {
        ASSERT_FALSE(g.greedy.ids.empty())
            << kStoriesAdapters[a] << "/" << g.name << " has no greedy continuation; regenerate "
            << "with " << kRegenerate;
        if (g.name.ends_with("_merged")) continue;
        prompts.push_back(g.ids);
        seq_adapters.push_back(static_cast<int32_t>(a));
        want.push_back(&g.greedy);
        what.push_back(kStoriesAdapters[a] + "/" + g.name + " batched, unmerged");
      }
    }
    const size_t n = want[0]->ids.size();
    ASSERT_GE(n, 32u);
    std::vector<std::vector<int32_t>> got = BatchedGreedy(*m, prompts, n, seq_adapters, views);
    for (size_t s = 0; s < prompts.size(); ++s) {
      compared += ExpectSameContinuation(got[s], *want[s], what[s]);
      total += n;
    }
    for (size_t a = 0; a < golden.size(); ++a) {
      ASSERT_OK(m->Merge(views[a]));
      for (const GoldenPrompt& g : golden[a]) {
        if (!g.name.ends_with("_merged")) continue;
        compared += ExpectSameContinuation(SoloGreedy(*m, g.ids, n, views[a]), g.greedy,
                                           kStoriesAdapters[a] + "/" + g.name + " solo");
        total += n;
      }
      ASSERT_OK(m->Unmerge());
    }
    // Near-ties are rare: if most steps were skipped the test would prove little.
    std::cout << "[ info ] " << path << ": " << compared << " of " << total
              << " greedy steps compared\n";
    EXPECT_GE(compared * 10, total * 9);
  }
}

// SmolLM2-135M from the Q4_1 GGUF (skipped when scripts/fetch-model.sh has not run).
class SmolLm2PeftTest : public ::testing::TestWithParam<std::string> {};

TEST_P(SmolLm2PeftTest, LastLogitsAndTop20MatchPeft) {
  const std::string gguf = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  LP_SKIP_UNLESS_MODEL_EXISTS(gguf);
  auto m = LoadModel(gguf);
  ASSERT_NE(m, nullptr);
  const std::string dir = FixturesDir() + "/peft/smollm2/" + GetParam();
  ASSERT_TRUE(std::filesystem::exists(dir + "/adapter_config.json"))
      << dir << " missing; regenerate with " << kRegenerate << " --only smollm2";
  ASSERT_OK_AND_ASSIGN(auto ad, LoraAdapter::Load(dir, m->config(), DoraOptions(*m)));
  for (const char* file : {"/logits.json", "/top20.json"}) {
    for (const GoldenPrompt& g : ReadGolden(dir + file)) {
      std::vector<int32_t> all(g.ids.size());
      for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<int32_t>(i);
      std::vector<float> got = RunOne(*m, {g.name, g.ids, all, {}, {}}, &ad->view());
      const int64_t vocab = m->config().vocab_size;
      ASSERT_EQ(got.size(), all.size() * vocab);
      std::vector<float> last(got.end() - vocab, got.end());
      EXPECT_TRUE(AllClose(last, g.logits, testing::kF32ModelLogits))
          << g.name << "; regenerate with " << kRegenerate << " --only smollm2";
      // Top-1 of every position equals PEFT's, and its top-20 holds our top-5.
      for (size_t p = 0; p < g.top_ids.size(); ++p) {
        const float* row = got.data() + p * vocab;
        const int32_t best = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
        EXPECT_EQ(best, g.top_ids[p][0]) << g.name << " position " << p;
      }
    }
  }
}

// A DoRA adapter on the base kept in the file's Q4_1 blocks (--dtype native) takes its norms from
// those blocks dequantized: the same scales, bit for bit, as on the model dequantized to f32 at
// load (which PEFT's goldens use). Merging into the quantized base is refused, as for any adapter.
TEST(SmolLm2DoraTest, NormsOnTheQuantizedBaseAreThoseOfItsDequantizedWeights) {
  const std::string gguf = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  LP_SKIP_UNLESS_MODEL_EXISTS(gguf);
  auto f32 = LoadModel(gguf);
  ASSERT_NE(f32, nullptr);
  model::LoadOptions o;
  ASSERT_OK(model::ParseWeightStorage("native", &o));
  o.require_tokenizer = false;
  ASSERT_OK_AND_ASSIGN(auto native, LlamaModel::Load(gguf, o));
  const std::string dir = FixturesDir() + "/peft/smollm2/dora_qv";
  ASSERT_OK_AND_ASSIGN(auto a, LoraAdapter::Load(dir, f32->config(), DoraOptions(*f32)));
  AdapterLoadOptions bf16 = DoraOptions(*native);
  bf16.dtype = native->adapter_dtype();
  ASSERT_OK_AND_ASSIGN(auto b, LoraAdapter::Load(dir, native->config(), bf16));
  int modules = 0;
  for (int64_t l = 0; l < f32->config().num_layers; ++l) {
    for (int mi = 0; mi < model::kNumLinearModules; ++mi) {
      const model::LoraPair* pa = a->view().layers[l][mi];
      const model::LoraPair* pb = b->view().layers[l][mi];
      ASSERT_EQ(pa == nullptr, pb == nullptr);
      if (pa == nullptr) continue;
      ++modules;
      ASSERT_TRUE(kernels::IsQuantized(native->LinearWeight(l, model::LinearModule(mi)).dtype));
      EXPECT_EQ(std::memcmp(pa->dora_scale, pb->dora_scale, pa->b.rows * sizeof(float)), 0)
          << ModuleKey(l, model::LinearModule(mi));
    }
  }
  EXPECT_EQ(modules, 2 * f32->config().num_layers);
  EXPECT_EQ(native->Merge(&b->view()).code(), absl::StatusCode::kFailedPrecondition);
}

// dora_qv: tools/make_dora_goldens.py.
INSTANTIATE_TEST_SUITE_P(Adapters, SmolLm2PeftTest,
                         ::testing::Values("qv", "all_linear", "dora_qv"));

TEST_P(SmolLm2PeftTest, GreedyContinuationsMatchPeftUnmergedAndMerged) {
  const std::string gguf = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  LP_SKIP_UNLESS_MODEL_EXISTS(gguf);
  auto m = LoadModel(gguf);
  ASSERT_NE(m, nullptr);
  const std::string dir = FixturesDir() + "/peft/smollm2/" + GetParam();
  ASSERT_OK_AND_ASSIGN(auto ad, LoraAdapter::Load(dir, m->config(), DoraOptions(*m)));
  std::vector<GoldenPrompt> golden = ReadGolden(dir + "/logits.json");
  for (GoldenPrompt& g : ReadGolden(dir + "/top20.json")) golden.push_back(std::move(g));
  ASSERT_EQ(golden.size(), 2u);
  std::vector<std::vector<int32_t>> prompts;
  for (const GoldenPrompt& g : golden) {
    ASSERT_GE(g.greedy.ids.size(), 32u) << g.name << "; regenerate with " << kRegenerate;
    ASSERT_EQ(g.greedy_merged.ids.size(), g.greedy.ids.size()) << g.name;
    prompts.push_back(g.ids);
  }
  const size_t n = golden[0].greedy.ids.size();
  // Unmerged: both prompts in one batch with the adapter, as the engine runs them.
  std::vector<std::vector<int32_t>> got = BatchedGreedy(*m, prompts, n, {0, 0}, {&ad->view()});
  for (size_t i = 0; i < golden.size(); ++i) {
    ExpectSameContinuation(got[i], golden[i].greedy, golden[i].name + " batched, unmerged");
  }
  // Merged: the merged model's continuation (merge_and_unload + generate).
  ASSERT_OK(m->Merge(&ad->view()));
  for (const GoldenPrompt& g : golden) {
    ExpectSameContinuation(SoloGreedy(*m, g.ids, n, &ad->view()), g.greedy_merged,
                           g.name + " solo, merged");
  }
  ASSERT_OK(m->Unmerge());
}

}  // namespace
}  // namespace loraplex::adapters
