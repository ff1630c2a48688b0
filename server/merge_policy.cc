#include "server/merge_policy.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace loraplex::server {
namespace {

// Weight of the newest window in the smoothed c.
constexpr double kCostSmoothing = 0.3;
// Windows with fewer LoRA token passes than this say too little about c.
constexpr int64_t kMinPassesForCost = 16;

bool Candidate(const std::string& name) { return !name.empty() && name[0] != '@'; }

}  // namespace

MergeDecision DecideMerge(const MergeInputs& in) {
  MergeDecision d;
  double total = 0;
  for (const auto& [name, rate] : in.tokens_per_s) total += rate;
  if (total <= 0 || in.lora_s_per_token_pass <= 0) {
    d.reason = total <= 0 ? "no traffic" : "no LoRA cost measured yet";
    return d;
  }
  // Seconds of compute a share above 1/2 saves per second, per unit of (2 s - 1).
  const double gain = total * in.lora_s_per_token_pass * in.horizon_s;
  const double margin = in.switch_s / (2 * gain);
  d.merge_above = 0.5 + margin;
  d.unmerge_below = 0.5 - margin;
  auto share_of = [&](const std::string& name) {
    auto it = in.tokens_per_s.find(name);
    return it == in.tokens_per_s.end() ? 0.0 : it->second / total;
  };
  auto describe = [&](const std::string& verdict) {
    return absl::StrFormat(
        "%s: %.0f%% of %.0f tokens/s (merge above %.0f%%, unmerge below %.0f%%; LoRA %.1f us per "
        "token pass, switch %.1f ms)",
        verdict, 100 * d.share, total, 100 * d.merge_above, 100 * d.unmerge_below,
        1e6 * in.lora_s_per_token_pass, 1e3 * in.switch_s);
  };
  if (!in.merged.empty()) {
    d.adapter = in.merged;
    d.share = share_of(in.merged);
    if (d.share < d.unmerge_below) {
      d.action = MergeDecision::Action::kUnmerge;
      d.reason = describe("merging stopped paying");
    } else {
      d.reason = describe("stays merged");
    }
    return d;
  }
  std::string best;
  double best_rate = 0;
  for (const auto& [name, rate] : in.tokens_per_s) {
    if (!Candidate(name) || in.excluded.count(name) > 0) continue;
    if (rate > best_rate) {
      best = name;
      best_rate = rate;
    }
  }
  if (best.empty()) {
    d.reason = "no adapter to merge";
    return d;
  }
  d.adapter = best;
  d.share = best_rate / total;
  if (d.share > d.merge_above) {
    d.action = MergeDecision::Action::kMerge;
    d.reason = describe("merging pays");
  } else {
    d.reason = describe("merging does not pay");
  }
  return d;
}

MergeInputs MergePolicy::Observe(const engine::EngineStats& stats, bool merged) {
  const int64_t passes = stats.lora_token_passes - last_passes_;
  const double seconds = stats.lora_seconds - last_seconds_;
  if (!merged && passes >= kMinPassesForCost && seconds > 0) {
    const double c = seconds / static_cast<double>(passes);
    c_ = c_ > 0 ? (1 - kCostSmoothing) * c_ + kCostSmoothing * c : c;
  }
  last_passes_ = stats.lora_token_passes;
  last_seconds_ = stats.lora_seconds;
  MergeInputs in;
  in.lora_s_per_token_pass = c_;
  in.horizon_s = horizon_s_;
  // A window seen before (the engine idles between windows) says nothing new: no traffic.
  if (stats.window_s > 0 && stats.window_end != last_window_end_) {
    // The first window is taken as it is; later ones move the rates by 1 - e^(-window / tau).
    const double weight = rates_.empty() ? 1.0 : 1 - std::exp(-stats.window_s / smoothing_s_);
    for (auto& [name, rate] : rates_) rate *= 1 - weight;
    for (const auto& [name, tokens] : stats.window_tokens) {
      rates_[name] += weight * static_cast<double>(tokens) / stats.window_s;
    }
    // An adapter gone quiet fades out of the map below a hundredth of a token per second.
    std::erase_if(rates_, [](const auto& entry) { return entry.second < 0.01; });
    in.tokens_per_s = rates_;
  }
  last_window_end_ = stats.window_end;
  return in;
}

}  // namespace loraplex::server
