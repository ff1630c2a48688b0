#include "engine/scheduler.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace loraplex::engine {
namespace {

bool OlderThan(const Sequence* a, const Sequence* b) { return a->id < b->id; }

}  // namespace

absl::StatusOr<Fairness> ParseFairness(const std::string& name) {
  if (name == "vtc") return Fairness::kVtc;
  if (name == "fifo") return Fairness::kFifo;
  return absl::InvalidArgumentError(absl::StrCat("--fairness ", name, ": must be vtc or fifo"));
}

Scheduler::Scheduler(model::KvCache* cache, SchedulerOptions options)
    : cache_(cache), options_(options), pool_(cache, options.prefix_cache) {
  LP_CHECK(options_.max_batch_tokens >= 1) << "max_batch_tokens " << options_.max_batch_tokens;
  LP_CHECK(options_.max_running >= 1) << "max_running " << options_.max_running;
  LP_CHECK(options_.max_running_per_tenant >= 0) << options_.max_running_per_tenant;
  for (const auto& [tenant, w] : options_.tenant_weights) {
    LP_CHECK(w > 0 && std::isfinite(w)) << "tenant weight of '" << tenant << "': " << w;
  }
}

double Scheduler::counter(const std::string& tenant) const {
  auto it = tenants_.find(tenant);
  return it == tenants_.end() ? 0.0 : it->second.counter;
}

int64_t Scheduler::NowMs() const {
  if (options_.now_ms) return options_.now_ms();
  return std::chrono::duration_cast<std::chrono::milliseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

double Scheduler::ActiveShares(const std::string& tenant) {
  const int64_t since = NowMs() - options_.active_window_ms;
  for (auto it = arrivals_.begin(); it != arrivals_.end();) {
    it = it->second < since ? arrivals_.erase(it) : std::next(it);
  }
  double total = 0;
  for (const auto& [name, t] : tenants_) {
    if (t.waiting > 0 || t.running > 0 || name == tenant || arrivals_.contains(name)) {
      total += Share(name);
    }
  }
  for (const auto& [name, at] : arrivals_) {
    if (name != tenant && !tenants_.contains(name)) total += Share(name);  // forgotten counter
  }
  if (!tenants_.contains(tenant)) total += Share(tenant);
  return total;
}

int64_t Scheduler::RunningCap(const std::string& tenant) {
  if (options_.max_running_per_tenant > 0) return options_.max_running_per_tenant;
  if (!options_.share_running_slots || options_.fairness != Fairness::kVtc) {
    return options_.max_running;
  }
  const double fair =
      static_cast<double>(options_.max_running) * Share(tenant) / ActiveShares(tenant);
  return std::clamp<int64_t>(static_cast<int64_t>(std::floor(fair)), 1, options_.max_running);
}

void Scheduler::Charge(const std::string& tenant, double service) {
  tenants_[tenant].counter += service / Share(tenant);
}

void Scheduler::MaybeForget(const std::string& tenant) {
  auto it = tenants_.find(tenant);
  if (it == tenants_.end() || it->second.waiting > 0 || it->second.running > 0) return;
  double lowest = std::numeric_limits<double>::infinity();
  for (const auto& [name, t] : tenants_) {
    if (t.waiting > 0 || t.running > 0) lowest = std::min(lowest, t.counter);
  }
  if (lowest == std::numeric_limits<double>::infinity()) {
    tenants_.clear();  // nobody has work: no share to keep track of
  } else if (it->second.counter <= lowest) {
    tenants_.erase(it);  // its next arrival's lift gives it `lowest` or more either way
  }
}

int64_t Scheduler::BlocksFor(int64_t tokens) const {
  const int64_t bs = cache_->block_size();
  return (tokens + bs - 1) / bs;
}

void Scheduler::AddWaiting(Sequence* seq) {
  Tenant& tenant = TenantOf(seq);
  if (options_.fairness == Fairness::kVtc && !seq->prompt_charged && tenant.waiting == 0 &&
      tenant.running == 0) {
    // VTC's lift: a tenant coming back from idle starts level with the least-served busy one.
    double lowest = std::numeric_limits<double>::infinity();
    for (const auto& [name, t] : tenants_) {
      if (t.waiting > 0 || t.running > 0) lowest = std::min(lowest, t.counter);
    }
    if (lowest != std::numeric_limits<double>::infinity()) {
      tenant.counter = std::max(tenant.counter, lowest);
    }
  }
  ++tenant.waiting;
  if (options_.share_running_slots) arrivals_[seq->tenant] = NowMs();
  // Waiting stays sorted by id, so preempted sequences (older) go back before new arrivals.
  waiting_.insert(std::upper_bound(waiting_.begin(), waiting_.end(), seq, OlderThan), seq);
}

void Scheduler::FreeBlocks(Sequence* seq) {
  // Last block first: idle cached blocks are evicted in release order, and a chain's tail is
  // worth less than its head (no later block can be matched without the earlier ones).
  for (auto it = seq->blocks.rbegin(); it != seq->blocks.rend(); ++it) pool_.Release(*it);
  seq->blocks.clear();
  seq->num_hashed = 0;
  seq->prefix_open = false;
}

void Scheduler::Remove(Sequence* seq) {
  FreeBlocks(seq);
  if (auto it = std::find(running_.begin(), running_.end(), seq); it != running_.end()) {
    running_.erase(it);
    --TenantOf(seq).running;
  }
  if (auto it = std::find(waiting_.begin(), waiting_.end(), seq); it != waiting_.end()) {
    waiting_.erase(it);
    --TenantOf(seq).waiting;
  }
  MaybeForget(seq->tenant);
}

std::deque<Sequence*>::iterator Scheduler::NextToAdmit() {
  auto best = waiting_.end();
  double best_counter = 0;
  std::map<std::string, int64_t> caps;  // per tenant, computed once per call
  for (auto it = waiting_.begin(); it != waiting_.end(); ++it) {  // oldest first
    const Tenant& t = TenantOf(*it);
    auto cap = caps.find((*it)->tenant);
    if (cap == caps.end()) cap = caps.emplace((*it)->tenant, RunningCap((*it)->tenant)).first;
    // A cap of every slot is no cap: the running limit and TakeSlotFor govern then.
    if (cap->second < options_.max_running && t.running >= cap->second) continue;
    if (options_.fairness == Fairness::kFifo) return it;
    // Strictly smaller: among equal counters (and within a tenant) the oldest stays.
    if (best == waiting_.end() || t.counter < best_counter) {
      best = it;
      best_counter = t.counter;
    }
  }
  return best;
}

int64_t Scheduler::PromisedBlocks() const {
  int64_t promised = 0;
  for (const Sequence* s : running_) {
    if (s->num_pending() > 1) {
      promised +=
          std::max<int64_t>(0, BlocksFor(s->length() + 1) - static_cast<int64_t>(s->blocks.size()));
    }
  }
  return promised;
}

void Scheduler::Preempt(Sequence* victim, StepPlan* plan, int64_t* budget) {
  auto chunk = std::find_if(plan->chunks.begin(), plan->chunks.end(),
                            [victim](const ScheduledChunk& c) { return c.seq == victim; });
  if (chunk != plan->chunks.end()) {
    // A decode this plan charged is not served after all.
    if (auto d = std::find(step_decodes_.begin(), step_decodes_.end(), victim);
        d != step_decodes_.end()) {
      Charge(victim->tenant, -options_.output_token_weight);
      step_decodes_.erase(d);
    }
    *budget += chunk->count;
    plan->num_tokens -= chunk->count;
    plan->chunks.erase(chunk);
  }
  FreeBlocks(victim);
  victim->num_computed = 0;
  running_.erase(std::find(running_.begin(), running_.end(), victim));
  --TenantOf(victim).running;
  AddWaiting(victim);
  ++plan->num_preempted;
  LP_LOG(DEBUG) << "preempted request " << victim->id << " (" << victim->length() << " tokens)";
}

bool Scheduler::EnsureBlocks(Sequence* seq, int64_t tokens, StepPlan* plan, int64_t* budget) {
  const int64_t need = BlocksFor(tokens);
  while (static_cast<int64_t>(seq->blocks.size()) < need) {
    absl::StatusOr<int32_t> block = pool_.Allocate();
    if (block.ok()) {
      seq->blocks.push_back(*block);
      continue;
    }
    Sequence* victim = running_.back();  // the youngest
    Preempt(victim, plan, budget);
    if (victim == seq) return false;
  }
  return true;
}

StepPlan Scheduler::Schedule() {
  StepPlan plan;
  int64_t budget = options_.max_batch_tokens;
  auto add_chunk = [&](Sequence* s, int64_t count) {
    plan.chunks.push_back({s, s->num_computed, count, s->num_computed + count == s->length()});
    plan.num_tokens += count;
    budget -= count;
  };

  step_decodes_.clear();
  // 1. Decodes, oldest first. A preemption removes the youngest, which is at the end of running_
  //    and not scheduled yet (or is `s` itself, the last one), so the index stays valid.
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Sequence* s = running_[i];
    if (s->num_pending() != 1) continue;
    if (!EnsureBlocks(s, s->length(), &plan, &budget)) break;
    add_chunk(s, 1);
    Charge(s->tenant, options_.output_token_weight);
    step_decodes_.push_back(s);
  }

  // 2. Prefill chunks of sequences already admitted, oldest first, in what budget is left.
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Sequence* s = running_[i];
    if (s->num_pending() <= 1) continue;
    const int64_t bs = cache_->block_size();
    auto fits = [&] {
      const int64_t slots = (static_cast<int64_t>(s->blocks.size()) + pool_.num_available()) * bs;
      return std::min({s->num_pending(), budget, slots - s->num_computed});
    };
    int64_t count = fits();
    if (count <= 0) {
      // Not even one slot: take blocks from younger sequences (or give up our own).
      if (!EnsureBlocks(s, s->num_computed + 1, &plan, &budget)) break;
      count = fits();
    }
    if (count <= 0) continue;
    const bool ok = EnsureBlocks(s, s->num_computed + count, &plan, &budget);
    LP_CHECK(ok) << "blocks counted as free could not be allocated";
    add_chunk(s, count);
  }

  // 3. Admission in the fairness policy's order. Not in a step that had to preempt for blocks:
  //    memory is short already.
  const bool short_of_blocks = plan.num_preempted > 0;
  while (!short_of_blocks && !waiting_.empty() && budget > 0) {
    auto next = NextToAdmit();
    if (next == waiting_.end()) break;  // every waiting tenant is at its cap
    Sequence* s = *next;
    if (static_cast<int64_t>(running_.size()) >= options_.max_running) {
      if (!TakeSlotFor(s, &plan, &budget)) break;
      next = std::find(waiting_.begin(), waiting_.end(), s);  // the preemption inserted
    }
    if (!AdmitBlocks(s)) break;
    waiting_.erase(next);
    Tenant& tenant = TenantOf(s);
    --tenant.waiting;
    ++tenant.running;
    if (!s->prompt_charged) {
      // The prompt tokens it computes (those found in the prefix cache cost next to nothing).
      const int64_t computed = std::max<int64_t>(0, s->num_prompt_tokens - s->num_computed);
      Charge(s->tenant, options_.input_token_weight * static_cast<double>(computed));
      s->prompt_charged = true;
    }
    running_.insert(std::upper_bound(running_.begin(), running_.end(), s, OlderThan), s);
    const int64_t count = std::min(s->num_pending(), budget);
    const bool ok = EnsureBlocks(s, s->num_computed + count, &plan, &budget);
    LP_CHECK(ok) << "an admitted sequence could not get the blocks counted for it";
    add_chunk(s, count);
  }
  return plan;
}

double Scheduler::Share(const std::string& tenant) const {
  auto w = options_.tenant_weights.find(tenant);
  return w == options_.tenant_weights.end() ? 1.0 : w->second;
}

bool Scheduler::TakeSlotFor(const Sequence* seq, StepPlan* plan, int64_t* budget) {
  if (options_.fairness != Fairness::kVtc) return false;
  const Tenant& mine = TenantOf(seq);
  // The busy tenant holding the most slots for its share.
  const std::string* victim_tenant = nullptr;
  double most = 0;
  for (const auto& [name, t] : tenants_) {
    const double held = static_cast<double>(t.running) / Share(name);
    if (name != seq->tenant && t.running > 0 && held > most) {
      most = held;
      victim_tenant = &name;
    }
  }
  if (victim_tenant == nullptr) return false;
  const Tenant& victim = tenants_.at(*victim_tenant);
  // Only where the slot moves toward equal shares, and never from a tenant that received less
  // service (it would be admitted back at once: thrashing).
  if (static_cast<double>(mine.running + 1) / Share(seq->tenant) >= most ||
      victim.counter < mine.counter) {
    return false;
  }
  for (auto it = running_.rbegin(); it != running_.rend(); ++it) {  // its youngest
    if ((*it)->tenant != *victim_tenant) continue;
    // Only when seq then fits: else the victim would lose its work for nothing.
    int64_t room = pool_.num_available() - PromisedBlocks();
    for (int32_t b : (*it)->blocks) room += pool_.refs(b) == 1 ? 1 : 0;  // its own go free
    if (room < BlocksFor(seq->length() + 1)) return false;
    Preempt(*it, plan, budget);
    return true;
  }
  return false;
}

bool Scheduler::AdmitBlocks(Sequence* seq) {
  const bool cacheable = pool_.prefix_cache() && !seq->prefix_identity.empty();
  BlockPool::Match match;
  if (cacheable) {
    // All but the last token: its logits are what the first step must give.
    match = pool_.Lookup(BlockPool::Root(seq->prefix_identity, merged_), seq->tokens,
                         (seq->length() - 1) / pool_.block_size());
  }
  const int64_t matched = static_cast<int64_t>(match.blocks.size());
  // Matched idle blocks stop being available once held.
  if (pool_.num_available() - match.idle - PromisedBlocks() <
      BlocksFor(seq->length() + 1) - matched) {
    return false;
  }
  LP_CHECK(seq->num_computed == 0 && seq->blocks.empty()) << "request " << seq->id;
  pool_.Retain(match.blocks);
  seq->blocks = std::move(match.blocks);
  seq->num_computed = matched * pool_.block_size();
  seq->prefix_open = cacheable;
  seq->prefix_merged = merged_;
  seq->prefix_hash = match.hash;
  seq->num_hashed = matched;
  if (cacheable) {
    prefix_lookup_tokens_ += seq->length();
    prefix_hit_tokens_ += seq->num_computed;
  }
  return true;
}

void Scheduler::EnterBlocks(Sequence* seq) {
  if (!seq->prefix_open) return;
  if (seq->prefix_merged != merged_) {
    seq->prefix_open = false;  // K/V from here on come from other weights than its key says
    return;
  }
  const int64_t bs = pool_.block_size();
  while ((seq->num_hashed + 1) * bs <= seq->num_computed) {
    const absl::Span<const int32_t> part =
        absl::MakeConstSpan(seq->tokens).subspan(seq->num_hashed * bs, bs);
    const uint64_t hash = BlockPool::Chain(seq->prefix_hash, part);
    pool_.Insert(seq->blocks[seq->num_hashed], seq->prefix_hash, hash, part);
    seq->prefix_hash = hash;
    ++seq->num_hashed;
  }
}

void Scheduler::SetMergeState(uint64_t merged) { merged_ = merged; }

void Scheduler::Commit(const StepPlan& plan) {
  for (const ScheduledChunk& c : plan.chunks) {
    c.seq->num_computed += c.count;
    EnterBlocks(c.seq);
  }
}

}  // namespace loraplex::engine
