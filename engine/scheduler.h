// Iteration-level continuous batching over a paged KV cache.
//
// Every engine step the scheduler picks which tokens of which sequences run:
//   1. one decode token for every running sequence that has finished its prompt (oldest first);
//   2. the next prompt chunk of running sequences still in prefill, within what is left of the
//      token budget (chunked prefill: a long prompt takes several steps and never stalls decodes);
//   3. new sequences from the waiting queue while the budget, the running limit and the free KV
//      blocks allow (a sequence is admitted only when its whole remaining prompt fits in the
//      blocks not promised to prompts already admitted), in the order the fairness policy gives.
//
// Fairness (SchedulerOptions::fairness). Requests belong to tenants (Sequence::tenant: the
// adapter's name, "" for the base model). kFifo admits the oldest waiting request. kVtc is the
// Virtual Token Counter of Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024):
// each tenant has a counter of the service it received, input_token_weight per prompt token (at
// admission, once) plus output_token_weight per decoded token, divided by its share (weight,
// default 1); admission takes the oldest waiting request of the tenant with the smallest counter.
// A tenant that had nothing waiting or running has its counter lifted to the smallest counter of
// the tenants that do when its next request arrives, so an idle tenant cannot bank service and
// then flood. One tenant sending far more than the others then gets the leftover capacity while
// the others keep their share of admissions; within a tenant the order stays FIFO. When every
// running slot (max_running) is taken, VTC preempts the youngest sequence of the tenant holding
// the most slots for its share, so that a waiting tenant below its share of the running set (and
// no better served) does not wait for the flood's sequences to finish; the preempted sequence is
// recomputed later like any other. Both policies may cap the running sequences of one tenant
// (max_running_per_tenant). Under VTC the cap can instead be each tenant's share of the running
// slots (share_running_slots): max(1, floor(max_running x share / the shares of the active
// tenants)), where a tenant is active while it has a request waiting or running or has sent one
// within active_window_ms. A tenant alone gets every slot; beside seven others, an eighth of them.
// On a CPU a step's time grows with its sequences, so without it a flooding tenant holding most
// slots makes every step long for the others' first tokens too. A request that does not fit in the
// free blocks is not overtaken by others (as FIFO: a big request is never starved).
//
// Prefix cache (SchedulerOptions::prefix_cache; engine/block_pool.h). A sequence admitted with
// nothing computed first looks up the full blocks of its tokens (all but the last token, whose
// logits it needs) under its adapter version and the current merge state; the blocks found are
// shared, its num_computed starts past them, and only the rest is prefilled. After every step the
// blocks a sequence has filled are entered in the cache, prompt and generated tokens alike, so a
// conversation's next turn and a preempted sequence find theirs again. Idle cached blocks are
// evicted least recently used when a block is needed and none is free.
// KV blocks are allocated as tokens need them. When a running sequence needs a block and none is
// free, the youngest running sequence (by request id) is preempted: its blocks are freed and it
// goes back to the front of the waiting queue, to be recomputed from its tokens later. The caller
// guarantees that any one sequence fits the whole cache alone (Engine::Submit checks it), so the
// oldest sequence always progresses.
//
// Not thread-safe: owned by the engine thread, like the KvCache it allocates from.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/block_pool.h"
#include "engine/sequence.h"
#include "model/kv_cache.h"

namespace loraplex::engine {

enum class Fairness { kFifo, kVtc };
// "fifo", "vtc" (--fairness); INVALID_ARGUMENT otherwise.
absl::StatusOr<Fairness> ParseFairness(const std::string& name);

struct SchedulerOptions {
  int64_t max_batch_tokens = 512;  // tokens per step (decodes + prefill chunks), >= 1
  int64_t max_running = 64;        // sequences per step, >= 1
  Fairness fairness = Fairness::kVtc;
  int64_t max_running_per_tenant = 0;  // 0: no cap
  // kVtc with max_running_per_tenant 0: cap each tenant at its share of the slots among the
  // tenants active now or within active_window_ms (see above).
  bool share_running_slots = false;
  int64_t active_window_ms = 30000;
  std::function<int64_t()> now_ms;  // monotonic milliseconds; empty: std::chrono::steady_clock
  double input_token_weight = 1;    // VTC service of one prompt token
  double output_token_weight = 2;   // and of one generated token (the paper's w_p, w_q)
  std::map<std::string, double> tenant_weights;  // VTC shares (> 0); absent: 1
  bool prefix_cache = false;                     // share full KV blocks of equal prefixes
};

// A run of consecutive tokens of one sequence in this step: tokens[start, start + count).
struct ScheduledChunk {
  Sequence* seq = nullptr;
  int64_t start = 0;
  int64_t count = 0;
  // True when the chunk ends at the sequence's last token: its logits give the next token.
  bool sample = false;
};

struct StepPlan {
  std::vector<ScheduledChunk> chunks;  // at most one per sequence
  int64_t num_tokens = 0;
  int64_t num_preempted = 0;
};

class Scheduler {
 public:
  // `cache` must outlive the scheduler.
  Scheduler(model::KvCache* cache, SchedulerOptions options);

  // Appends to the waiting queue. The scheduler does not own sequences.
  void AddWaiting(Sequence* seq);
  // Removes a sequence wherever it is (waiting or running) and frees its blocks at once.
  void Remove(Sequence* seq);
  // Plans one step: allocates the blocks the scheduled tokens need (preempting when short) and
  // moves admitted sequences from waiting to running. Empty when nothing can run.
  StepPlan Schedule();
  // Advances num_computed of every chunk of the plan after a successful forward pass, and enters
  // the blocks filled by it in the prefix cache.
  void Commit(const StepPlan& plan);
  // The adapter merged into the base weights from the next step on (its view id; 0 for none):
  // part of the prefix cache's key. The engine sets it between steps.
  void SetMergeState(uint64_t merged);

  // Blocks needed to hold `tokens` token slots.
  int64_t BlocksFor(int64_t tokens) const;

  int64_t num_running() const { return static_cast<int64_t>(running_.size()); }
  int64_t num_waiting() const { return static_cast<int64_t>(waiting_.size()); }
  // A tenant's VTC counter (0 for one never seen; for tests and stats).
  double counter(const std::string& tenant) const;
  // The running sequences a tenant may hold now (max_running when uncapped).
  int64_t RunningCap(const std::string& tenant);
  const std::vector<Sequence*>& running() const { return running_; }
  const model::KvCache& cache() const { return *cache_; }
  const BlockPool& blocks() const { return pool_; }
  // Prefix cache counters since the start: tokens whose K/V admitted sequences needed, and those
  // of them found in the cache.
  int64_t prefix_lookup_tokens() const { return prefix_lookup_tokens_; }
  int64_t prefix_hit_tokens() const { return prefix_hit_tokens_; }

 private:
  // Makes seq's block table cover `tokens` positions, preempting younger sequences when no block
  // is free. False when seq itself had to be preempted (it is then back in the waiting queue).
  bool EnsureBlocks(Sequence* seq, int64_t tokens, StepPlan* plan, int64_t* budget);
  void Preempt(Sequence* victim, StepPlan* plan, int64_t* budget);
  void FreeBlocks(Sequence* seq);
  // Blocks promised to running sequences for the rest of their prompts.
  int64_t PromisedBlocks() const;
  // The waiting sequence to admit next under the fairness policy and the per-tenant cap, or
  // waiting_.end().
  std::deque<Sequence*>::iterator NextToAdmit();
  void Charge(const std::string& tenant, double service);
  double Share(const std::string& tenant) const;
  // VTC with every running slot taken: preempts the youngest sequence of the busy tenant holding
  // the most slots for its share, when giving one to seq's tenant moves the slots toward equal
  // shares, that tenant received no less service than seq's, and seq then fits in the blocks.
  // False when nothing was preempted.
  bool TakeSlotFor(const Sequence* seq, StepPlan* plan, int64_t* budget);

  struct Tenant {
    double counter = 0;  // VTC: service received, over the tenant's share
    int64_t waiting = 0;
    int64_t running = 0;
  };
  Tenant& TenantOf(const Sequence* seq) { return tenants_[seq->tenant]; }
  // Forgets a tenant with nothing waiting or running whose counter a lift would restore anyway.
  void MaybeForget(const std::string& tenant);
  int64_t NowMs() const;
  // The sum of the shares of the tenants active now (waiting, running, or arrived within
  // active_window_ms; prunes arrivals_), with `tenant` counted as active.
  double ActiveShares(const std::string& tenant);

  // Shares cached blocks with a sequence about to be admitted; false when it does not fit then
  // (nothing taken).
  bool AdmitBlocks(Sequence* seq);
  // Enters the blocks seq has filled since the last call.
  void EnterBlocks(Sequence* seq);

  model::KvCache* cache_;
  SchedulerOptions options_;
  BlockPool pool_;
  uint64_t merged_ = 0;
  int64_t prefix_lookup_tokens_ = 0, prefix_hit_tokens_ = 0;
  std::deque<Sequence*> waiting_;
  std::vector<Sequence*> running_;  // sorted by id: oldest first
  std::map<std::string, Tenant> tenants_;
  std::map<std::string, int64_t> arrivals_;    // share_running_slots: last arrival per tenant (ms)
  std::vector<const Sequence*> step_decodes_;  // the decodes Schedule() charged in this plan
};

}  // namespace loraplex::engine
