// The merge policy's decisions (server/merge_policy.h): thresholds R = 1/2 + S / (2 T c h) and
// L = 1/2 - S / (2 T c h) from the measured costs, hysteresis between them, who is never a
// candidate, and the cost estimate from engine snapshots.
#include "server/merge_policy.h"

#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <string>

namespace loraplex::server {
namespace {

using Action = MergeDecision::Action;

// 1000 tokens/s, c = 10 us per token pass, h = 10 s: T c h = 0.1 s; with S = 0.02 s the margin
// is 0.02 / 0.2 = 0.1, so R = 0.6 and L = 0.4.
MergeInputs Inputs(double hot_share, const std::string& merged = "") {
  MergeInputs in;
  in.tokens_per_s = {{"hot", 1000 * hot_share}, {"cold", 1000 * (1 - hot_share)}};
  in.lora_s_per_token_pass = 10e-6;
  in.switch_s = 0.02;
  in.horizon_s = 10;
  in.merged = merged;
  return in;
}

TEST(MergePolicyTest, ThresholdsComeFromTheMeasuredCosts) {
  MergeDecision d = DecideMerge(Inputs(0.9));
  EXPECT_DOUBLE_EQ(d.merge_above, 0.6);
  EXPECT_DOUBLE_EQ(d.unmerge_below, 0.4);
  // Dearer switches or cheaper LoRA passes widen the band; more traffic narrows it.
  MergeInputs in = Inputs(0.9);
  in.switch_s = 0.08;
  EXPECT_DOUBLE_EQ(DecideMerge(in).merge_above, 0.9);
  in = Inputs(0.9);
  in.lora_s_per_token_pass = 5e-6;
  EXPECT_DOUBLE_EQ(DecideMerge(in).merge_above, 0.7);
  in = Inputs(0.9);
  in.tokens_per_s = {{"hot", 3600}, {"cold", 400}};
  EXPECT_DOUBLE_EQ(DecideMerge(in).merge_above, 0.525);
}

TEST(MergePolicyTest, MergesTheDominantAdapterOnlyAboveR) {
  MergeDecision d = DecideMerge(Inputs(0.9));
  EXPECT_EQ(d.action, Action::kMerge);
  EXPECT_EQ(d.adapter, "hot");
  EXPECT_DOUBLE_EQ(d.share, 0.9);
  EXPECT_NE(d.reason.find("merging pays"), std::string::npos) << d.reason;
  EXPECT_EQ(DecideMerge(Inputs(0.61)).action, Action::kMerge);
  EXPECT_EQ(DecideMerge(Inputs(0.59)).action, Action::kKeep);
  EXPECT_EQ(DecideMerge(Inputs(0.5)).action, Action::kKeep);
  // When "cold" dominates it is the candidate.
  d = DecideMerge(Inputs(0.2));
  EXPECT_EQ(d.action, Action::kMerge);
  EXPECT_EQ(d.adapter, "cold");
}

TEST(MergePolicyTest, StaysMergedDownToLThenUnmerges) {
  for (double share : {0.9, 0.59, 0.45, 0.41}) {
    EXPECT_EQ(DecideMerge(Inputs(share, "hot")).action, Action::kKeep) << share;
  }
  MergeDecision d = DecideMerge(Inputs(0.39, "hot"));
  EXPECT_EQ(d.action, Action::kUnmerge);
  EXPECT_EQ(d.adapter, "hot");
  EXPECT_NE(d.reason.find("stopped paying"), std::string::npos) << d.reason;
  // The merged adapter gone quiet, the others busy: unmerge.
  MergeInputs in = Inputs(0, "hot");
  in.tokens_per_s = {{"cold", 500}, {"", 500}};
  EXPECT_EQ(DecideMerge(in).action, Action::kUnmerge);
}

TEST(MergePolicyTest, BaseMixesAndExcludedAdaptersAreNeverMerged) {
  MergeInputs in = Inputs(0.9);
  in.tokens_per_s = {{"", 900}, {"cold", 100}};
  EXPECT_EQ(DecideMerge(in).action, Action::kKeep);  // the base model dominates
  in.tokens_per_s = {{"@mix", 900}, {"cold", 100}};
  EXPECT_EQ(DecideMerge(in).action, Action::kKeep);
  in = Inputs(0.9);
  in.excluded = {"hot"};  // its mode set by hand, or the model refused it
  EXPECT_EQ(DecideMerge(in).action, Action::kKeep);
}

TEST(MergePolicyTest, NothingHappensWithoutTrafficOrAMeasuredCost) {
  MergeInputs in = Inputs(0.9);
  in.lora_s_per_token_pass = 0;
  EXPECT_EQ(DecideMerge(in).action, Action::kKeep);
  in = Inputs(0.9, "hot");
  in.tokens_per_s.clear();
  MergeDecision d = DecideMerge(in);
  EXPECT_EQ(d.action, Action::kKeep);  // idle: merged costs nothing
  EXPECT_EQ(d.reason, "no traffic");
}

TEST(MergePolicyTest, ObserveMeasuresTheCostAndTheWindowRates) {
  MergePolicy policy(/*horizon_s=*/10);
  engine::EngineStats s;
  s.lora_seconds = 0.5;
  s.lora_token_passes = 50000;  // 10 us each
  s.window_tokens = {{"hot", 900}, {"", 100}};
  s.window_s = 0.5;
  s.window_end = absl::FromUnixSeconds(100);
  MergeInputs in = policy.Observe(s);
  EXPECT_DOUBLE_EQ(in.lora_s_per_token_pass, 10e-6);
  EXPECT_DOUBLE_EQ(in.tokens_per_s["hot"], 1800);
  EXPECT_DOUBLE_EQ(in.tokens_per_s[""], 200);
  EXPECT_DOUBLE_EQ(in.horizon_s, 10);
  // The same window again says nothing new; the next one's passes cost 20 us: smoothed.
  in = policy.Observe(s);
  EXPECT_TRUE(in.tokens_per_s.empty());
  s.lora_seconds += 0.2;
  s.lora_token_passes += 10000;
  s.window_end = absl::FromUnixSeconds(101);
  in = policy.Observe(s);
  EXPECT_NEAR(in.lora_s_per_token_pass, 0.7 * 10e-6 + 0.3 * 20e-6, 1e-12);
  // Too few passes in a window leave the estimate alone.
  s.lora_seconds += 1;
  s.lora_token_passes += 3;
  EXPECT_NEAR(policy.Observe(s).lora_s_per_token_pass, 13e-6, 1e-12);
}

// The next snapshot of `s`: a window of `seconds` with these tokens, and `passes` LoRA token
// passes costing `us_per_pass` each.
void NextWindow(engine::EngineStats* s, std::map<std::string, int64_t> tokens, double seconds,
                int64_t passes, double us_per_pass) {
  s->window_tokens = std::move(tokens);
  s->window_s = seconds;
  s->window_end += absl::Seconds(seconds);
  s->lora_token_passes += passes;
  s->lora_seconds += static_cast<double>(passes) * us_per_pass * 1e-6;
}

TEST(MergePolicyTest, SharesAreSmoothedOverWindows) {
  MergePolicy policy(/*horizon_s=*/10, /*smoothing_s=*/3);
  engine::EngineStats s;
  s.window_end = absl::FromUnixSeconds(100);
  MergeInputs in;
  for (int i = 0; i < 10; ++i) {
    NextWindow(&s, {{"hot", 900}, {"cold", 100}}, 1, 1000, 10);
    in = policy.Observe(s);
  }
  EXPECT_NEAR(in.tokens_per_s["hot"], 900, 1e-6);
  in.switch_s = 0.02;  // R = 0.6, L = 0.4 (as Inputs())
  EXPECT_EQ(DecideMerge(in).action, Action::kMerge);
  // One window of cold prefills (10% hot) moves the rates by 1 - e^(-1/3) of the way only: the
  // share stays above L and the merged adapter stays merged.
  NextWindow(&s, {{"hot", 40}, {"cold", 360}}, 1, 400, 10);
  in = policy.Observe(s, /*merged=*/true);
  const double w = 1 - std::exp(-1.0 / 3);
  EXPECT_NEAR(in.tokens_per_s["hot"], 900 * (1 - w) + 40 * w, 1e-6);
  in.switch_s = 0.02;
  in.merged = "hot";
  MergeDecision d = DecideMerge(in);
  EXPECT_EQ(d.action, Action::kKeep) << d.reason;
  EXPECT_GT(d.share, 0.6);
  // A lasting move to the base model unmerges within a few windows; the quiet adapters fade out.
  int windows = 0;
  do {
    NextWindow(&s, {{"", 1000}}, 1, 0, 10);
    in = policy.Observe(s, /*merged=*/true);
    in.switch_s = 0.02;
    in.merged = "hot";
    ++windows;
  } while (DecideMerge(in).action != Action::kUnmerge && windows < 100);
  EXPECT_LE(windows, 4);
  for (int i = 0; i < 60; ++i) {
    NextWindow(&s, {{"", 1000}}, 1, 0, 10);
    in = policy.Observe(s);
  }
  EXPECT_EQ(in.tokens_per_s.size(), 1u);
  EXPECT_NEAR(in.tokens_per_s[""], 1000, 1e-3);
}

TEST(MergePolicyTest, TheCostIsMeasuredOnlyWhileNothingIsMerged) {
  MergePolicy policy;
  engine::EngineStats s;
  s.window_end = absl::FromUnixSeconds(100);
  NextWindow(&s, {{"hot", 1000}}, 1, 1000, 10);
  EXPECT_NEAR(policy.Observe(s).lora_s_per_token_pass, 10e-6, 1e-12);
  // Merged: a few mixed-mode passes per step carry the ops' fixed costs (here 50 us each).
  NextWindow(&s, {{"hot", 900}, {"cold", 100}}, 1, 200, 50);
  EXPECT_NEAR(policy.Observe(s, /*merged=*/true).lora_s_per_token_pass, 10e-6, 1e-12);
  // Unmerged again: measured from the next window on, not from the merged one's passes.
  NextWindow(&s, {{"hot", 500}, {"cold", 500}}, 1, 1000, 20);
  EXPECT_NEAR(policy.Observe(s).lora_s_per_token_pass, 0.7 * 10e-6 + 0.3 * 20e-6, 1e-12);
}

}  // namespace
}  // namespace loraplex::server
