// LoraPlan (model/lora_plan.h) on hand-made batches: the own pass's indices with the merged
// adapter's tokens taken out, runs of equal indices as segments, the SGMV/BGMV rule at its edge,
// the unmerge pass of mixed mode, plans rebuilt in place, and the module groups.
#include "model/lora_plan.h"

#include <gtest/gtest.h>

#include <set>
#include <utility>
#include <vector>

namespace loraplex::model {
namespace {

// A batch of tokens whose adapters are `token_adapter` (indices into `adapters`); only the fields
// LoraPlan reads are filled.
ForwardBatch Batch(const std::vector<int32_t>& token_adapter,
                   const std::vector<const LoraWeightsView*>& adapters, int64_t num_tokens = -1) {
  ForwardBatch b;
  b.tokens.assign(num_tokens >= 0 ? num_tokens : token_adapter.size(), 0);
  b.token_adapter = token_adapter;
  b.adapters = adapters;
  return b;
}

// Equal indices repeated: {{a, 2}, {b, 3}} -> a a b b b.
std::vector<int32_t> Runs(const std::vector<std::pair<int32_t, int>>& runs) {
  std::vector<int32_t> out;
  for (const auto& [j, count] : runs) out.insert(out.end(), count, j);
  return out;
}

TEST(LoraPlanTest, AllBaseWithNothingMergedIsEmpty) {
  LoraPlan plan;
  plan.Build(Batch({}, {}, 5), nullptr);
  EXPECT_TRUE(plan.empty());
  EXPECT_EQ(plan.num_tokens(), 5);
  EXPECT_FALSE(plan.own().active);
  EXPECT_FALSE(plan.unmerge().active);
  EXPECT_EQ(plan.merged(), nullptr);

  // Indices given, but every token on the base model.
  plan.Build(Batch({-1, -1, -1}, {}), nullptr);
  EXPECT_TRUE(plan.empty());
}

TEST(LoraPlanTest, DecodeTokensAreOneSegmentEachAndGoToBgmv) {
  LoraWeightsView a, b, c;
  LoraPlan plan;
  plan.Build(Batch({0, 1, -1, 2, 0}, {&a, &b, &c}), nullptr);
  const LoraPass& own = plan.own();
  ASSERT_TRUE(own.active);
  EXPECT_FALSE(plan.empty());
  EXPECT_FALSE(own.negate);
  EXPECT_EQ(own.adapters, (std::vector<const LoraWeightsView*>{&a, &b, &c}));
  EXPECT_EQ(own.token_adapter, (std::vector<int32_t>{0, 1, -1, 2, 0}));
  EXPECT_EQ(own.starts, (std::vector<int64_t>{0, 1, 2, 3, 4, 5}));
  EXPECT_EQ(own.seg_adapter, (std::vector<int32_t>{0, 1, -1, 2, 0}));
  EXPECT_EQ(own.num_segments(), 5);
  EXPECT_FALSE(own.sgmv);  // 5 tokens < 4 * 5 segments
  EXPECT_FALSE(plan.unmerge().active);
}

TEST(LoraPlanTest, PrefillRunsAreSegmentsAndGoToSgmv) {
  LoraWeightsView a, b;
  LoraPlan plan;
  plan.Build(Batch(Runs({{1, 8}, {-1, 5}, {0, 8}, {1, 3}}), {&a, &b}), nullptr);
  const LoraPass& own = plan.own();
  ASSERT_TRUE(own.active);
  EXPECT_EQ(own.starts, (std::vector<int64_t>{0, 8, 13, 21, 24}));
  EXPECT_EQ(own.seg_adapter, (std::vector<int32_t>{1, -1, 0, 1}));
  EXPECT_TRUE(own.sgmv);  // 24 tokens >= 4 * 4 segments
  const kernels::LoraSegments seg = own.segments();
  EXPECT_EQ(seg.num_segments, 4);
  EXPECT_EQ(seg.starts, own.starts.data());
  EXPECT_EQ(seg.adapter, own.seg_adapter.data());
}

TEST(LoraPlanTest, SgmvFromFourTokensPerSegment) {
  EXPECT_TRUE(UseSgmv(8, 2));
  EXPECT_FALSE(UseSgmv(7, 2));
  EXPECT_TRUE(UseSgmv(4, 1));
  EXPECT_FALSE(UseSgmv(3, 1));

  LoraWeightsView a, b;
  LoraPlan plan;
  plan.Build(Batch(Runs({{0, 4}, {1, 4}}), {&a, &b}), nullptr);  // exactly 4 per segment
  EXPECT_TRUE(plan.own().sgmv);
  plan.Build(Batch(Runs({{0, 4}, {1, 3}}), {&a, &b}), nullptr);  // 7 tokens, 2 segments
  EXPECT_FALSE(plan.own().sgmv);
}

TEST(LoraPlanTest, MixedModeMasksTheMergedAdaptersTokens) {
  LoraWeightsView a, merged, b;
  LoraPlan plan;
  plan.Build(Batch({0, 1, -1, 1, 2, 2}, {&a, &merged, &b}), &merged);
  EXPECT_EQ(plan.merged(), &merged);
  // Own pass: the merged adapter's tokens take nothing (their delta is in W).
  const LoraPass& own = plan.own();
  ASSERT_TRUE(own.active);
  EXPECT_FALSE(own.negate);
  EXPECT_EQ(own.token_adapter, (std::vector<int32_t>{0, -1, -1, -1, 2, 2}));
  EXPECT_EQ(own.starts, (std::vector<int64_t>{0, 1, 4, 6}));
  EXPECT_EQ(own.seg_adapter, (std::vector<int32_t>{0, -1, 2}));
  // Unmerge pass: every other token, base ones included, takes the merged delta back out.
  const LoraPass& unmerge = plan.unmerge();
  ASSERT_TRUE(unmerge.active);
  EXPECT_TRUE(unmerge.negate);
  EXPECT_EQ(unmerge.adapters, (std::vector<const LoraWeightsView*>{&merged}));
  EXPECT_EQ(unmerge.token_adapter, (std::vector<int32_t>{0, -1, 0, -1, 0, 0}));
  EXPECT_EQ(unmerge.starts, (std::vector<int64_t>{0, 1, 2, 3, 4, 6}));
  EXPECT_EQ(unmerge.seg_adapter, (std::vector<int32_t>{0, -1, 0, -1, 0}));
  EXPECT_FALSE(unmerge.sgmv);  // 6 tokens < 4 * 5 segments
}

TEST(LoraPlanTest, MergedWithAnAllBaseBatch) {
  LoraWeightsView merged;
  LoraPlan plan;
  plan.Build(Batch({}, {}, 9), &merged);
  EXPECT_FALSE(plan.own().active);
  const LoraPass& unmerge = plan.unmerge();
  ASSERT_TRUE(unmerge.active);
  EXPECT_EQ(unmerge.token_adapter, std::vector<int32_t>(9, 0));
  EXPECT_EQ(unmerge.starts, (std::vector<int64_t>{0, 9}));
  EXPECT_EQ(unmerge.seg_adapter, (std::vector<int32_t>{0}));
  EXPECT_TRUE(unmerge.sgmv);
}

TEST(LoraPlanTest, OnlyTheMergedAdaptersTokensIsEmpty) {
  LoraWeightsView a, merged;
  LoraPlan plan;
  plan.Build(Batch({1, 1, 1}, {&a, &merged}), &merged);
  EXPECT_FALSE(plan.own().active);
  EXPECT_FALSE(plan.unmerge().active);
  EXPECT_TRUE(plan.empty());
}

TEST(LoraPlanTest, RebuildingForgetsTheLastStep) {
  LoraWeightsView a, merged;
  LoraPlan plan;
  plan.Build(Batch(Runs({{0, 6}, {1, 6}}), {&a, &merged}), &merged);
  ASSERT_TRUE(plan.unmerge().active);
  const int64_t warm = plan.capacity_bytes();
  EXPECT_GT(warm, 0);
  plan.Build(Batch({0, -1}, {&a}), nullptr);
  EXPECT_EQ(plan.num_tokens(), 2);
  EXPECT_EQ(plan.merged(), nullptr);
  EXPECT_FALSE(plan.unmerge().active);
  EXPECT_EQ(plan.own().token_adapter, (std::vector<int32_t>{0, -1}));
  EXPECT_EQ(plan.own().starts, (std::vector<int64_t>{0, 1, 2}));
  EXPECT_GE(plan.capacity_bytes(), warm);  // capacity is kept for the next step
}

TEST(LoraPlanTest, ModuleGroupsCoverEveryModuleOnceAndShareTheirInput) {
  LlamaConfig c;
  c.hidden_size = 64;
  c.intermediate_size = 160;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 24;  // q_dim 96 != hidden
  std::set<LinearModule> seen;
  for (int g = 0; g < kNumLoraGroups; ++g) {
    const LoraModuleGroup& group = ModulesOf(static_cast<LoraGroup>(g));
    ASSERT_GE(group.num_modules, 1);
    ASSERT_LE(group.num_modules, kernels::kMaxLoraSlices);
    for (int i = 0; i < group.num_modules; ++i) {
      EXPECT_TRUE(seen.insert(group.modules[i]).second) << LinearModuleName(group.modules[i]);
      EXPECT_EQ(LinearInFeatures(c, group.modules[i]), LinearInFeatures(c, group.modules[0]));
    }
  }
  EXPECT_EQ(static_cast<int>(seen.size()), kNumLinearModules);
  EXPECT_EQ(ModulesOf(LoraGroup::kQkv).modules[2], LinearModule::kV);
  EXPECT_EQ(ModulesOf(LoraGroup::kO).modules[0], LinearModule::kO);
  EXPECT_EQ(ModulesOf(LoraGroup::kGateUp).modules[1], LinearModule::kUp);
  EXPECT_EQ(ModulesOf(LoraGroup::kDown).modules[0], LinearModule::kDown);
}

}  // namespace
}  // namespace loraplex::model
