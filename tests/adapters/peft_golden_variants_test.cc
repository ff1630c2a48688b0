// Adapter variants against their references (fixtures by tools/make_compression_goldens.py,
// make_mix_goldens.py and make_dora_goldens.py): rank compression at load against numpy's
// truncated SVD and PEFT, weighted mixes against PEFT's cat, and DoRA against PEFT's use_dora,
// unmerged, merged and batched.

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "tests/adapters/peft_golden.h"

namespace loraplex::adapters {
namespace {

using namespace ::loraplex::adapters::golden;  // NOLINT: the fixtures' helpers

// Rank compression at load (AdapterLoadOptions::compress_rank) against numpy's truncated SVD of
// the dense update and PEFT running that truncated update (tools/make_compression_goldens.py):
// the served update is numpy's best rank-k approximation, the reported errors are numpy's, and
// the logits, unmerged, merged and in a batch beside another adapter, are PEFT's.
constexpr const char* kRegenerateCompression = "python3 tools/make_compression_goldens.py --logits";

std::string CompressedFixture(const std::string& name) {
  return FixturesDir() + "/peft/stories260k/compressed/" + name;
}

// B A of every module of a view, in f64: [out, in] row-major.
std::vector<double> Product(const model::LoraPair& p) {
  const auto& a = p.a;
  const auto& b = p.b;
  std::vector<double> out(b.rows * a.cols, 0.0);
  const float* af = static_cast<const float*>(a.data);
  const float* bf = static_cast<const float*>(b.data);
  for (int64_t o = 0; o < b.rows; ++o) {
    for (int64_t k = 0; k < p.rank; ++k) {
      const double bk = bf[o * p.rank + k];
      for (int64_t i = 0; i < a.cols; ++i) out[o * a.cols + i] += bk * af[k * a.cols + i];
    }
  }
  return out;
}

class StoriesCompressionTest : public ::testing::TestWithParam<std::string> {};

TEST_P(StoriesCompressionTest, ServesNumpysTruncatedUpdateWithPeftsLogits) {
  std::ifstream in(CompressedFixture("compression.json"));
  ASSERT_TRUE(in.good()) << "regenerate with " << kRegenerateCompression;
  const nlohmann::json golden = nlohmann::json::parse(in)["adapters"][GetParam()];
  ASSERT_TRUE(golden.is_object()) << GetParam();
  const int64_t k = golden["max_rank"].get<int64_t>();
  const std::string trained = StoriesFixture(golden["adapter"].get<std::string>());
  const std::string truncated = CompressedFixture(GetParam());
  auto m = LoadModel(Stories260KDir());
  ASSERT_NE(m, nullptr);
  AdapterLoadOptions o{kernels::DType::kF32, 256};
  o.compress_rank = k;
  ASSERT_OK_AND_ASSIGN(auto ad, LoraAdapter::Load(trained, m->config(), o));
  ASSERT_OK_AND_ASSIGN(auto ref,
                       LoraAdapter::Load(truncated, m->config(), {kernels::DType::kF32, 256}));

  // The report: numpy's relative errors, per module and overall.
  ASSERT_TRUE(ad->compression().has_value());
  const CompressionReport& report = *ad->compression();
  EXPECT_EQ(report.max_rank, k);
  EXPECT_EQ(ad->max_rank(), k);
  EXPECT_NEAR(report.relative_error, golden["relative_error"].get<double>(), 1e-6);
  ASSERT_EQ(report.modules.size(), golden["modules"].size());
  for (size_t i = 0; i < report.modules.size(); ++i) {
    const nlohmann::json& g = golden["modules"][i];
    EXPECT_EQ(report.modules[i].module, g["module"].get<std::string>());
    EXPECT_EQ(report.modules[i].trained_rank, g["trained_rank"].get<int64_t>());
    EXPECT_EQ(report.modules[i].rank, g["rank"].get<int64_t>());
    EXPECT_NEAR(report.modules[i].relative_error, g["relative_error"].get<double>(), 1e-6)
        << report.modules[i].module;
  }

  // The served update equals numpy's truncated one (the factors may differ by signs, their
  // products may not), within f32 rounding of the factors.
  int modules = 0;
  for (int64_t l = 0; l < m->config().num_layers; ++l) {
    for (int mi = 0; mi < model::kNumLinearModules; ++mi) {
      const model::LoraPair* got = ad->view().layers[l][mi];
      const model::LoraPair* want = ref->view().layers[l][mi];
      ASSERT_EQ(got == nullptr, want == nullptr) << "layer " << l << " module " << mi;
      if (got == nullptr) continue;
      ++modules;
      EXPECT_EQ(got->rank, want->rank);
      const std::vector<double> g = Product(*got), w = Product(*want);
      double max_abs = 0, max_diff = 0;
      for (size_t i = 0; i < w.size(); ++i) {
        max_abs = std::max(max_abs, std::abs(w[i]));
        max_diff = std::max(max_diff, std::abs(g[i] - w[i]));
      }
      EXPECT_LE(max_diff, 1e-5 * max_abs) << ModuleKey(l, static_cast<model::LinearModule>(mi));
    }
  }
  EXPECT_EQ(modules, static_cast<int>(golden["modules"].size()));

  // Logits: PEFT's with the truncated update, unmerged, merged, and batched beside qv.
  std::vector<GoldenPrompt> prompts = ReadGolden(truncated + "/logits.json");
  ASSERT_EQ(prompts.size(), 4u) << "regenerate with " << kRegenerateCompression;
  ExpectGoldenUnmergedAndMerged(*m, ad->view(), prompts, kRegenerateCompression);
  ASSERT_OK_AND_ASSIGN(
      auto qv, LoraAdapter::Load(StoriesFixture("qv"), m->config(), {kernels::DType::kF32, 256}));
  std::vector<GoldenPrompt> qv_golden = ReadGolden(StoriesFixture("qv") + "/logits.json");
  ASSERT_GE(qv_golden.size(), 2u);
  std::vector<std::vector<float>> got =
      RunBatch(*m, {prompts[0].ids, qv_golden[1].ids},
               {prompts[0].positions, qv_golden[1].positions}, {0, 1}, {&ad->view(), &qv->view()});
  EXPECT_TRUE(AllClose(got[0], prompts[0].logits, testing::kF32ModelLogits)) << "batched";
  EXPECT_TRUE(AllClose(got[1], qv_golden[1].logits, testing::kF32ModelLogits)) << "qv beside it";
}

INSTANTIATE_TEST_SUITE_P(Adapters, StoriesCompressionTest,
                         ::testing::Values("rank64_r8", "all_linear_r2"));

// A compress_rank at or above the trained rank keeps every module as trained, bit for bit, and
// reports no loss; bf16 storage rounds the truncated factors once, as it rounds trained ones.
TEST(StoriesCompressionTest, RankAtOrAboveTheTrainedOneKeepsTheAdapter) {
  auto m = LoadModel(Stories260KDir());
  ASSERT_NE(m, nullptr);
  for (kernels::DType dtype : {kernels::DType::kF32, kernels::DType::kBF16}) {
    AdapterLoadOptions o{dtype, 256};
    ASSERT_OK_AND_ASSIGN(auto plain,
                         LoraAdapter::Load(StoriesFixture("all_linear"), m->config(), o));
    EXPECT_FALSE(plain->compression().has_value());
    o.compress_rank = 4;  // all_linear's rank
    ASSERT_OK_AND_ASSIGN(auto same,
                         LoraAdapter::Load(StoriesFixture("all_linear"), m->config(), o));
    ASSERT_TRUE(same->compression().has_value());
    EXPECT_EQ(same->compression()->relative_error, 0.0);
    EXPECT_EQ(same->compression()->trained_max_rank, 4);
    EXPECT_EQ(same->bytes(), plain->bytes());
    for (const ModuleCompression& mc : same->compression()->modules) {
      EXPECT_EQ(mc.rank, 4);
      EXPECT_EQ(mc.relative_error, 0.0);
    }
    const int64_t elem = dtype == kernels::DType::kF32 ? 4 : 2;
    for (int64_t l = 0; l < m->config().num_layers; ++l) {
      for (int mi = 0; mi < model::kNumLinearModules; ++mi) {
        const model::LoraPair* a = plain->view().layers[l][mi];
        const model::LoraPair* b = same->view().layers[l][mi];
        ASSERT_EQ(a == nullptr, b == nullptr);
        if (a == nullptr) continue;
        EXPECT_EQ(std::memcmp(a->a.data, b->a.data, a->a.rows * a->a.cols * elem), 0);
        EXPECT_EQ(std::memcmp(a->b.data, b->b.data, a->b.rows * a->b.cols * elem), 0);
      }
    }
    o.compress_rank = 2;
    ASSERT_OK_AND_ASSIGN(auto half,
                         LoraAdapter::Load(StoriesFixture("all_linear"), m->config(), o));
    EXPECT_EQ(half->max_rank(), 2);
    EXPECT_EQ(half->bytes() * 2, plain->bytes());
    EXPECT_GT(half->compression()->relative_error, 0.0);
  }
}

// --max-lora-rank applies to the served rank: a rank-64 adapter is refused by a server capped at
// 16, and accepted there compressed to 16. A negative compress_rank is refused.
TEST(StoriesCompressionTest, MaxRankAppliesToTheCompressedRank) {
  auto m = LoadModel(Stories260KDir());
  ASSERT_NE(m, nullptr);
  AdapterLoadOptions o{kernels::DType::kBF16, 16};
  auto refused = LoraAdapter::Load(StoriesFixture("rank64"), m->config(), o);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kFailedPrecondition) << refused.status();
  EXPECT_THAT(std::string(refused.status().message()),
              ::testing::HasSubstr("max_rank compresses it"));
  o.compress_rank = 16;
  ASSERT_OK_AND_ASSIGN(auto ad, LoraAdapter::Load(StoriesFixture("rank64"), m->config(), o));
  EXPECT_EQ(ad->max_rank(), 16);
  o.compress_rank = -1;
  EXPECT_EQ(LoraAdapter::Load(StoriesFixture("rank64"), m->config(), o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// Weighted mixes (adapters/lora_mix.h) against PEFT's add_weighted_adapter(combination_type="cat")
// (tools/make_mix_goldens.py): unmerged, merged, and in one batch with a single adapter and the
// base model.
constexpr const char* kRegenerateMixes = "python3 tools/make_mix_goldens.py";

std::string MixFixture(const std::string& name) {
  return FixturesDir() + "/peft/stories260k/mixes/" + name;
}

class StoriesMixTest : public ::testing::TestWithParam<std::string> {};

TEST_P(StoriesMixTest, LogitsAndGreedyMatchPeftCatUnmergedMergedAndBatched) {
  std::ifstream in(MixFixture("mixes.json"));
  ASSERT_TRUE(in.good()) << "regenerate with " << kRegenerateMixes;
  const nlohmann::json spec = nlohmann::json::parse(in)["mixes"][GetParam()];
  ASSERT_TRUE(spec.is_array()) << GetParam();
  for (const std::string& path : {Stories260KDir(), Stories260KDir() + "/stories260K.gguf"}) {
    SCOPED_TRACE(path);
    auto m = LoadModel(path);
    ASSERT_NE(m, nullptr);
    std::vector<std::unique_ptr<LoraAdapter>> parts;
    std::vector<MixPart> mix_parts;
    for (const nlohmann::json& p : spec) {
      ASSERT_OK_AND_ASSIGN(auto ad, LoraAdapter::Load(StoriesFixture(p["adapter"]), m->config(),
                                                      {kernels::DType::kF32, 256}));
      mix_parts.push_back({&ad->view(), p["weight"].get<float>()});
      parts.push_back(std::move(ad));
    }
    ASSERT_OK_AND_ASSIGN(auto mix, LoraMix::Build(mix_parts, m->config(), 256));
    std::vector<GoldenPrompt> golden = ReadGolden(MixFixture(GetParam()) + "/logits.json");
    ASSERT_EQ(golden.size(), 4u) << "regenerate with " << kRegenerateMixes;
    std::vector<GoldenPrompt> base = ReadGolden(StoriesFixture("base_logits.json"));
    ASSERT_EQ(base.size(), 2u);
    // The mix changes the output (the goldens are not the base model's).
    EXPECT_FALSE(AllClose(golden[0].logits, base[0].logits, testing::kF32ModelLogits));
    ExpectGoldenUnmergedAndMerged(*m, mix->view(), golden, kRegenerateMixes);
    // PEFT's greedy continuations: alone through model::Generate (merged for "_merged"), and the
    // unmerged ones decoded together with qv's and the base model's.
    for (const GoldenPrompt& g : golden) {
      const bool merged = g.name.size() > 7 && g.name.substr(g.name.size() - 7) == "_merged";
      ASSERT_FALSE(g.greedy.ids.empty()) << "regenerate with " << kRegenerateMixes;
      if (merged) ASSERT_OK(m->Merge(&mix->view()));
      ExpectSameContinuation(SoloGreedy(*m, g.ids, g.greedy.ids.size(), &mix->view()), g.greedy,
                             GetParam() + " " + g.name);
      if (merged) ASSERT_OK(m->Unmerge());
    }
    // One batch: the mix, one of its parts alone, and the base model.
    ASSERT_OK_AND_ASSIGN(
        auto qv, LoraAdapter::Load(StoriesFixture("qv"), m->config(), {kernels::DType::kF32, 256}));
    std::vector<GoldenPrompt> qv_golden = ReadGolden(StoriesFixture("qv") + "/logits.json");
    ASSERT_GE(qv_golden.size(), 2u);
    std::vector<std::vector<float>> got =
        RunBatch(*m, {golden[1].ids, qv_golden[0].ids, base[1].ids},
                 {golden[1].positions, qv_golden[0].positions, base[1].positions}, {0, 1, -1},
                 {&mix->view(), &qv->view()});
    EXPECT_TRUE(AllClose(got[0], golden[1].logits, testing::kF32ModelLogits)) << "mix, batched";
    EXPECT_TRUE(AllClose(got[1], qv_golden[0].logits, testing::kF32ModelLogits)) << "qv beside it";
    EXPECT_TRUE(AllClose(got[2], base[1].logits, testing::kF32ModelLogits)) << "base beside it";
    const std::vector<std::vector<int32_t>> decoded =
        BatchedGreedy(*m, {golden[0].ids, qv_golden[0].ids}, golden[0].greedy.ids.size(), {0, 1},
                      {&mix->view(), &qv->view()});
    ExpectSameContinuation(decoded[0], golden[0].greedy, GetParam() + " batched");
    ExpectSameContinuation(decoded[1], qv_golden[0].greedy, "qv batched beside " + GetParam());
  }
}

INSTANTIATE_TEST_SUITE_P(Mixes, StoriesMixTest, ::testing::Values("qv_all", "three"));

// A mix of one adapter at weight 1 is that adapter, bit for bit (also in bf16); the summed rank
// is checked against the limit; bad parts are refused.
TEST(StoriesMixTest, OnePartAtWeightOneIsTheAdapterAndLimitsHold) {
  auto m = LoadModel(Stories260KDir());
  ASSERT_NE(m, nullptr);
  for (kernels::DType dtype : {kernels::DType::kF32, kernels::DType::kBF16}) {
    ASSERT_OK_AND_ASSIGN(auto qv,
                         LoraAdapter::Load(StoriesFixture("qv"), m->config(), {dtype, 256}));
    ASSERT_OK_AND_ASSIGN(auto mix, LoraMix::Build({{&qv->view(), 1.0f}}, m->config(), 256));
    EXPECT_EQ(mix->max_rank(), qv->max_rank());
    EXPECT_EQ(mix->bytes(), qv->bytes());
    const int64_t elem = dtype == kernels::DType::kF32 ? 4 : 2;
    for (int64_t l = 0; l < m->config().num_layers; ++l) {
      for (int mi = 0; mi < model::kNumLinearModules; ++mi) {
        const model::LoraPair* a = qv->view().layers[l][mi];
        const model::LoraPair* b = mix->view().layers[l][mi];
        ASSERT_EQ(a == nullptr, b == nullptr);
        if (a == nullptr) continue;
        EXPECT_EQ(std::memcmp(a->a.data, b->a.data, a->a.rows * a->a.cols * elem), 0);
        EXPECT_EQ(std::memcmp(a->b.data, b->b.data, a->b.rows * a->b.cols * elem), 0);
      }
    }
    // qv (rank 8) twice: rank 16 on q and v.
    ASSERT_OK_AND_ASSIGN(
        auto twice, LoraMix::Build({{&qv->view(), 0.5f}, {&qv->view(), 0.5f}}, m->config(), 16));
    EXPECT_EQ(twice->max_rank(), 16);
    EXPECT_EQ(
        LoraMix::Build({{&qv->view(), 0.5f}, {&qv->view(), 0.5f}}, m->config(), 15).status().code(),
        absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(LoraMix::Build({}, m->config(), 256).status().code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(LoraMix::Build({{&qv->view(), std::nanf("")}}, m->config(), 256).status().code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(LoraMix::Build({{nullptr, 1.0f}}, m->config(), 256).status().code(),
              absl::StatusCode::kInvalidArgument);
    std::vector<MixPart> nine(kMaxMixParts + 1, MixPart{&qv->view(), 0.1f});
    EXPECT_EQ(LoraMix::Build(nine, m->config(), 1024).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
}

// DoRA (use_dora) against PEFT's DoraLinearLayer (tools/make_dora_goldens.py): y = g (W x + s B A
// x) with g = m / ||W + s B A||_row, unmerged and merged (W' = g (W + s B A)), greedy
// continuations, and in one batch with plain LoRA adapters and the base model, also while a DoRA
// adapter is merged (mixed mode: the others take 1 / g and the delta back out).
constexpr const char* kRegenerateDora = "python3 tools/make_dora_goldens.py";

bool IsMerged(const GoldenPrompt& g) {
  return g.name.size() > 7 && g.name.substr(g.name.size() - 7) == "_merged";
}

class StoriesDoraTest : public ::testing::TestWithParam<std::string> {};

TEST_P(StoriesDoraTest, LogitsAndGreedyMatchPeftUnmergedMergedAndBatched) {
  for (const std::string& path : {Stories260KDir(), Stories260KDir() + "/stories260K.gguf"}) {
    SCOPED_TRACE(path);
    auto m = LoadModel(path);
    ASSERT_NE(m, nullptr);
    ASSERT_OK_AND_ASSIGN(
        auto ad, LoraAdapter::Load(StoriesFixture(GetParam()), m->config(), DoraOptions(*m)));
    EXPECT_TRUE(ad->dora());
    EXPECT_TRUE(ad->view().dora);
    std::vector<GoldenPrompt> golden = ReadGolden(StoriesFixture(GetParam()) + "/logits.json");
    ASSERT_EQ(golden.size(), 4u) << "regenerate with " << kRegenerateDora;
    std::vector<GoldenPrompt> base = ReadGolden(StoriesFixture("base_logits.json"));
    ASSERT_EQ(base.size(), 2u);

    // The magnitudes matter: the same A and B read as plain LoRA give other logits.
    LoraWeightsView plain = ad->view();
    plain.dora = false;
    std::vector<std::unique_ptr<model::LoraPair>> plain_pairs;
    for (auto& layer : plain.layers) {
      for (const model::LoraPair*& p : layer) {
        if (p == nullptr) continue;
        plain_pairs.push_back(std::make_unique<model::LoraPair>(*p));
        plain_pairs.back()->dora_scale = plain_pairs.back()->dora_inv_scale = nullptr;
        p = plain_pairs.back().get();
      }
    }
    EXPECT_FALSE(
        AllClose(RunOne(*m, golden[0], &plain), golden[0].logits, testing::kF32ModelLogits));

    ExpectGoldenUnmergedAndMerged(*m, ad->view(), golden, kRegenerateDora);
    for (const GoldenPrompt& g : golden) {
      ASSERT_FALSE(g.greedy.ids.empty()) << "regenerate with " << kRegenerateDora;
      if (IsMerged(g)) ASSERT_OK(m->Merge(&ad->view()));
      ExpectSameContinuation(SoloGreedy(*m, g.ids, g.greedy.ids.size(), &ad->view()), g.greedy,
                             GetParam() + " " + g.name);
      if (IsMerged(g)) ASSERT_OK(m->Unmerge());
    }

    // One batch: the DoRA adapter, plain qv and the base model; unmerged, then with the DoRA
    // adapter merged (the others take its g and delta back out), then with qv merged.
    ASSERT_OK_AND_ASSIGN(
        auto qv, LoraAdapter::Load(StoriesFixture("qv"), m->config(), {kernels::DType::kF32, 256}));
    std::vector<GoldenPrompt> qv_golden = ReadGolden(StoriesFixture("qv") + "/logits.json");
    ASSERT_GE(qv_golden.size(), 2u);
    for (const LoraWeightsView* merged :
         {static_cast<const LoraWeightsView*>(nullptr), &ad->view(), &qv->view()}) {
      SCOPED_TRACE(merged == nullptr ? "nothing merged"
                   : merged->dora    ? "DoRA merged"
                                     : "qv merged");
      if (merged != nullptr) ASSERT_OK(m->Merge(merged));
      std::vector<std::vector<float>> got = RunBatch(
          *m, {golden[1].ids, qv_golden[0].ids, base[1].ids, golden[0].ids},
          {golden[1].positions, qv_golden[0].positions, base[1].positions, golden[0].positions},
          {0, 1, -1, 0}, {&ad->view(), &qv->view()});
      EXPECT_TRUE(AllClose(got[0], golden[1].logits, testing::kF32ModelLogits)) << "DoRA";
      EXPECT_TRUE(AllClose(got[1], qv_golden[0].logits, testing::kF32ModelLogits)) << "qv";
      EXPECT_TRUE(AllClose(got[2], base[1].logits, testing::kF32ModelLogits)) << "base";
      EXPECT_TRUE(AllClose(got[3], golden[0].logits, testing::kF32ModelLogits)) << "DoRA again";
      const std::vector<std::vector<int32_t>> decoded =
          BatchedGreedy(*m, {golden[0].ids, qv_golden[0].ids, base[0].ids},
                        golden[0].greedy.ids.size(), {0, 1, -1}, {&ad->view(), &qv->view()});
      ExpectSameContinuation(decoded[0], golden[0].greedy, GetParam() + " batched");
      ExpectSameContinuation(decoded[1], qv_golden[0].greedy, "qv batched beside " + GetParam());
      if (merged != nullptr) ASSERT_OK(m->Unmerge());
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Dora, StoriesDoraTest,
                         ::testing::Values("dora_qv", "dora_all", "dora_rslora"));

// Three DoRA adapters: one merged, the two others and the base model in one batch, each token
// rescaled by its own g after taking the merged one's back out.
TEST(StoriesDoraTest, DoraTokensBesideAMergedDoraAdapter) {
  auto m = LoadModel(Stories260KDir());
  ASSERT_NE(m, nullptr);
  std::vector<std::unique_ptr<LoraAdapter>> ads;
  std::vector<std::vector<GoldenPrompt>> golden;
  for (const char* name : {"dora_qv", "dora_all", "dora_rslora"}) {
    ASSERT_OK_AND_ASSIGN(auto ad,
                         LoraAdapter::Load(StoriesFixture(name), m->config(), DoraOptions(*m)));
    ads.push_back(std::move(ad));
    golden.push_back(ReadGolden(StoriesFixture(name) + "/logits.json"));
    ASSERT_EQ(golden.back().size(), 4u) << "regenerate with " << kRegenerateDora;
  }
  std::vector<GoldenPrompt> base = ReadGolden(StoriesFixture("base_logits.json"));
  ASSERT_EQ(base.size(), 2u);
  for (size_t merged = 0; merged < ads.size(); ++merged) {
    SCOPED_TRACE(merged);
    ASSERT_OK(m->Merge(&ads[merged]->view()));
    std::vector<std::vector<float>> got = RunBatch(
        *m, {golden[0][0].ids, golden[1][1].ids, base[0].ids, golden[2][0].ids},
        {golden[0][0].positions, golden[1][1].positions, base[0].positions, golden[2][0].positions},
        {0, 1, -1, 2}, {&ads[0]->view(), &ads[1]->view(), &ads[2]->view()});
    EXPECT_TRUE(AllClose(got[0], golden[0][0].logits, testing::kF32ModelLogits)) << "dora_qv";
    EXPECT_TRUE(AllClose(got[1], golden[1][1].logits, testing::kF32ModelLogits)) << "dora_all";
    EXPECT_TRUE(AllClose(got[2], base[0].logits, testing::kF32ModelLogits)) << "base";
    EXPECT_TRUE(AllClose(got[3], golden[2][0].logits, testing::kF32ModelLogits)) << "dora_rslora";
    ASSERT_OK(m->Unmerge());
  }
}

// The norms are of the pristine base: an adapter loaded while another is merged gets the same
// scales, bit for bit. Unmerge restores the base exactly after a DoRA merge. DoRA adapters are
// refused in mixes.
TEST(StoriesDoraTest, NormsUseThePristineBaseAndMixesRefuseDora) {
  auto m = LoadModel(Stories260KDir());
  ASSERT_NE(m, nullptr);
  ASSERT_OK_AND_ASSIGN(auto alone,
                       LoraAdapter::Load(StoriesFixture("dora_all"), m->config(), DoraOptions(*m)));
  ASSERT_OK_AND_ASSIGN(
      auto qv, LoraAdapter::Load(StoriesFixture("qv"), m->config(), {kernels::DType::kF32, 256}));
  ASSERT_OK_AND_ASSIGN(std::vector<float> q_before, m->BaseLinearF32(0, model::LinearModule::kQ));
  ASSERT_OK(m->Merge(&qv->view()));
  ASSERT_OK_AND_ASSIGN(auto while_merged,
                       LoraAdapter::Load(StoriesFixture("dora_all"), m->config(), DoraOptions(*m)));
  ASSERT_OK(m->Unmerge());
  int modules = 0;
  for (int64_t l = 0; l < m->config().num_layers; ++l) {
    for (int mi = 0; mi < model::kNumLinearModules; ++mi) {
      const model::LoraPair* a = alone->view().layers[l][mi];
      const model::LoraPair* b = while_merged->view().layers[l][mi];
      ASSERT_NE(a, nullptr);
      ASSERT_NE(b, nullptr);
      ASSERT_NE(a->dora_scale, nullptr);
      ++modules;
      EXPECT_EQ(std::memcmp(a->dora_scale, b->dora_scale, a->b.rows * sizeof(float)), 0);
      for (int64_t o = 0; o < a->b.rows; ++o) {
        EXPECT_FLOAT_EQ(a->dora_scale[o] * a->dora_inv_scale[o], 1.0f);
      }
    }
  }
  EXPECT_EQ(modules, 7 * m->config().num_layers);
  ASSERT_OK(m->Merge(&alone->view()));
  ASSERT_OK(m->Unmerge());
  ASSERT_OK_AND_ASSIGN(std::vector<float> q_after, m->BaseLinearF32(0, model::LinearModule::kQ));
  EXPECT_EQ(q_before, q_after);
  auto mix = LoraMix::Build({{&qv->view(), 0.5f}, {&alone->view(), 0.5f}}, m->config(), 256);
  EXPECT_EQ(mix.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(mix.status().message()), ::testing::HasSubstr("DoRA"));
}

}  // namespace
}  // namespace loraplex::adapters
