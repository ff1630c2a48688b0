// The automatic merge policy (--merge-policy auto): when to merge the adapter that dominates the
// load into the base weights and when to take it out again (dLoRA's merged/unmerged switching,
// with thresholds from measured costs instead of constants).
//
// The cost model. Unmerged, every token of an adapter pays one LoRA pass (shrink + expand) of
// c seconds (measured: LlamaModel::lora_cost over the recent steps). With adapter H merged, H's
// tokens pay none, and every other token, base-model ones included, pays the unmerge pass (mixed
// mode) besides its own. So per second of traffic of T tokens/s of which H has the share s,
// merging saves (s T - (1 - s) T) c = (2 s - 1) T c seconds of compute. A switch (merge plus the
// later unmerge, both stalling the engine between two steps) costs S seconds, measured on the
// merges done so far (a prior before the first). Merging pays when the saving over the horizon h
// (how long a load pattern is expected to hold) exceeds S:
//   merge H when s > R = 1/2 + S / (2 T c h);  unmerge it when s < L = 1/2 - S / (2 T c h).
// Between L and R nothing changes (hysteresis: each switch must earn its cost back). The base
// model ("") and weighted mixes ("@mix") are never candidates, nor adapters a client set the mode
// of by hand or that cannot be merged (a quantized base).
//
// DecideMerge is a pure function of its inputs (tests/server/merge_policy_test.cc); MergePolicy
// turns successive engine snapshots into those inputs.
#pragma once

#include <cstdint>
#include <map>
#include <set>
#include <string>

#include "absl/time/time.h"
#include "engine/engine.h"

namespace loraplex::server {

struct MergeInputs {
  std::map<std::string, double> tokens_per_s;  // per adapter over the last window ("" base)
  double lora_s_per_token_pass = 0;            // c; <= 0: not measured (nothing decided)
  double switch_s = 0;                         // S: a merge and an unmerge
  double horizon_s = 10;                       // h
  std::string merged;                          // the adapter the policy merged; "" none
  std::set<std::string> excluded;              // never merged by the policy
};

struct MergeDecision {
  enum class Action { kKeep, kMerge, kUnmerge };
  Action action = Action::kKeep;
  std::string adapter;                        // the one to merge, or the merged one to unmerge
  double share = 0;                           // its share of the tokens
  double merge_above = 0, unmerge_below = 0;  // R and L
  std::string reason;                         // for the log
};

MergeDecision DecideMerge(const MergeInputs& in);

// Keeps the estimate of c from the engine's counters (LoRA seconds over token passes since the
// previous snapshot, smoothed) and each adapter's tokens per second, smoothed over the engine's
// windows with time constant smoothing_s: one window holds only a few steps, and one burst of
// prefills would otherwise swing the shares past a threshold and back (a switch each way).
class MergePolicy {
 public:
  explicit MergePolicy(double horizon_s = 10, double smoothing_s = 3)
      : horizon_s_(horizon_s), smoothing_s_(smoothing_s) {}
  // Inputs from a new engine snapshot; switch_s, merged and excluded come from the caller. While
  // an adapter is merged (`merged`) c is left as measured unmerged: the few mixed-mode passes of
  // a merged step carry the LoRA ops' fixed costs and would overstate it several times.
  MergeInputs Observe(const engine::EngineStats& stats, bool merged = false);
  double lora_s_per_token_pass() const { return c_; }

 private:
  double horizon_s_;
  double smoothing_s_;
  double c_ = 0;
  double last_seconds_ = 0;
  int64_t last_passes_ = 0;
  absl::Time last_window_end_;
  std::map<std::string, double> rates_;  // smoothed tokens/s per adapter
};

}  // namespace loraplex::server
