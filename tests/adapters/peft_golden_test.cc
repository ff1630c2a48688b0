// The forward pass with PEFT adapters against HF transformers + PEFT (fixtures by
// tools/make_peft_goldens.py): every adapter config on stories260K, through the HF copy and the
// GGUF copy (q/k un-permuted at load), merged and unmerged, mixed batches of many adapters, and
// SmolLM2-135M when models/ holds it.

#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "adapters/lora_adapter.h"
#include "model/llama_model.h"
#include "nlohmann/json.hpp"
#include "tests/testing/testing.h"

namespace loraplex::adapters {
namespace {

using ::loraplex::testing::AllClose;
using ::loraplex::testing::FixturesDir;
using ::loraplex::testing::Stories260KDir;
using model::ForwardBatch;
using model::KvCache;
using model::LlamaModel;
using model::LoraWeightsView;

constexpr const char* kRegenerate = "python3 tools/make_peft_goldens.py";

struct GoldenPrompt {
  std::string name;
  std::vector<int32_t> ids;
  std::vector<int32_t> positions;
  std::vector<float> logits;                  // [positions, vocab]
  std::vector<std::vector<int32_t>> top_ids;  // top-k ids per position, when stored
};

// Reads a "loraplex-golden-logits/1" fixture (JSON index + little-endian f32 data).
std::vector<GoldenPrompt> ReadGolden(const std::string& json_path) {
  std::vector<GoldenPrompt> out;
  std::ifstream in(json_path);
  EXPECT_TRUE(in.good()) << json_path << " missing; regenerate with " << kRegenerate;
  if (!in.good()) return out;
  nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j["format"], "loraplex-golden-logits/1");
  const std::string dir = json_path.substr(0, json_path.rfind('/'));
  std::ifstream data(dir + "/" + j["data_file"].get<std::string>(), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(data)), std::istreambuf_iterator<char>());
  for (const auto& p : j["prompts"]) {
    GoldenPrompt g;
    g.name = p["name"];
    g.ids = p["token_ids"].get<std::vector<int32_t>>();
    g.positions = p["logits"]["positions"].get<std::vector<int32_t>>();
    auto shape = p["logits"]["shape"].get<std::vector<int64_t>>();
    const size_t off = p["logits"]["offset_bytes"].get<size_t>();
    const size_t n = shape[0] * shape[1];
    EXPECT_LE(off + 4 * n, bytes.size()) << json_path;
    if (off + 4 * n > bytes.size()) return {};
    g.logits.resize(n);
    std::memcpy(g.logits.data(), bytes.data() + off, 4 * n);
    if (p.contains("top_k")) {
      for (const auto& row : p["top_k"]) {
        std::vector<int32_t> ids;
        for (const auto& e : row) ids.push_back(e["token_id"].get<int32_t>());
        g.top_ids.push_back(ids);
      }
    }
    out.push_back(std::move(g));
  }
  return out;
}

// One sequence per entry of `seqs`, all in one step; seq i uses adapters[slot[i]] (-1 = base).
// Returns per sequence the logits of the requested positions.
std::vector<std::vector<float>> RunBatch(LlamaModel& m,
                                         const std::vector<std::vector<int32_t>>& seqs,
                                         const std::vector<std::vector<int32_t>>& positions,
                                         const std::vector<int32_t>& slot,
                                         const std::vector<const LoraWeightsView*>& adapters) {
  const int64_t block = 16;
  int64_t max_blocks = 1;
  for (const auto& s : seqs)
    max_blocks = std::max<int64_t>(max_blocks, (s.size() + block - 1) / block);
  auto cache = KvCache::Create(m.config(), max_blocks * seqs.size(), block);
  EXPECT_OK(cache);
  ForwardBatch b;
  b.max_blocks_per_seq = max_blocks;
  b.adapters = adapters;
  std::vector<size_t> first_row(seqs.size());
  for (size_t s = 0; s < seqs.size(); ++s) {
    for (int64_t i = 0; i < max_blocks; ++i) b.block_tables.push_back(*cache->AllocateBlock());
    const int32_t base = static_cast<int32_t>(b.tokens.size());
    first_row[s] = b.logit_rows.size();
    for (size_t i = 0; i < seqs[s].size(); ++i) {
      b.tokens.push_back(seqs[s][i]);
      b.positions.push_back(static_cast<int32_t>(i));
      b.token_seq.push_back(static_cast<int32_t>(s));
      b.adapter_slot.push_back(slot[s]);
    }
    for (int32_t p : positions[s]) b.logit_rows.push_back(base + p);
  }
  std::vector<float> logits;
  EXPECT_OK(m.Forward(b, &*cache, &logits));
  const int64_t vocab = m.config().vocab_size;
  std::vector<std::vector<float>> out(seqs.size());
  for (size_t s = 0; s < seqs.size(); ++s) {
    if (logits.size() < (first_row[s] + positions[s].size()) * vocab) break;
    out[s].assign(logits.begin() + first_row[s] * vocab,
                  logits.begin() + (first_row[s] + positions[s].size()) * vocab);
  }
  return out;
}

std::vector<float> RunOne(LlamaModel& m, const GoldenPrompt& g, const LoraWeightsView* view) {
  return RunBatch(
      m, {g.ids}, {g.positions}, {view ? 0 : -1},
      view ? std::vector<const LoraWeightsView*>{view} : std::vector<const LoraWeightsView*>{})[0];
}

std::unique_ptr<LlamaModel> LoadModel(const std::string& path) {
  model::LoadOptions o;
  o.dtype = kernels::DType::kF32;
  o.require_tokenizer = false;
  auto m = LlamaModel::Load(path, o);
  EXPECT_OK(m);
  return m.ok() ? std::move(m).value() : nullptr;
}

const std::vector<std::string> kStoriesAdapters = {
    "qv",     "qv_f16", "all_linear", "rslora", "patterns",
    "layers", "regex",  "rank1",      "rank64", "fan_in_fan_out"};

std::string StoriesFixture(const std::string& name) {
  return FixturesDir() + "/peft/stories260k/" + name;
}

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
  std::vector<int32_t> slots;
  // Base first.
  std::vector<GoldenPrompt> base = ReadGolden(StoriesFixture("base_logits.json"));
  ASSERT_EQ(base.size(), 2u);
  seqs.push_back(base[1].ids);
  positions.push_back(base[1].positions);
  expected.push_back(base[1].logits);
  slots.push_back(-1);
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
    slots.push_back(static_cast<int32_t>(i));
  }
  // The same adapter twice, non-adjacent, too.
  seqs.push_back(seqs[1]);
  positions.push_back(positions[1]);
  expected.push_back(expected[1]);
  slots.push_back(0);
  std::vector<std::vector<float>> got = RunBatch(*m, seqs, positions, slots, views);
  for (size_t s = 0; s < seqs.size(); ++s) {
    EXPECT_TRUE(AllClose(got[s], expected[s], testing::kF32ModelLogits)) << "sequence " << s;
  }
}

// SmolLM2-135M from the Q4_1 GGUF (skipped when scripts/fetch-model.sh has not run).
class SmolLm2PeftTest : public ::testing::TestWithParam<std::string> {};

TEST_P(SmolLm2PeftTest, LastLogitsAndTop20MatchPeft) {
  const std::string gguf = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  if (!std::filesystem::exists(gguf)) GTEST_SKIP() << gguf << " absent: run scripts/fetch-model.sh";
  auto m = LoadModel(gguf);
  ASSERT_NE(m, nullptr);
  const std::string dir = FixturesDir() + "/peft/smollm2/" + GetParam();
  ASSERT_TRUE(std::filesystem::exists(dir + "/adapter_config.json"))
      << dir << " missing; regenerate with " << kRegenerate << " --only smollm2";
  ASSERT_OK_AND_ASSIGN(auto ad, LoraAdapter::Load(dir, m->config(), {kernels::DType::kF32, 256}));
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

INSTANTIATE_TEST_SUITE_P(Adapters, SmolLm2PeftTest, ::testing::Values("qv", "all_linear"));

}  // namespace
}  // namespace loraplex::adapters
