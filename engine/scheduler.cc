#include "engine/scheduler.h"

#include <algorithm>

#include "common/logging.h"

namespace loraplex::engine {
namespace {

bool OlderThan(const Sequence* a, const Sequence* b) { return a->id < b->id; }

}  // namespace

Scheduler::Scheduler(model::KvCache* cache, SchedulerOptions options)
    : cache_(cache), options_(options) {
  LP_CHECK(options_.max_batch_tokens >= 1) << "max_batch_tokens " << options_.max_batch_tokens;
  LP_CHECK(options_.max_running >= 1) << "max_running " << options_.max_running;
}

int64_t Scheduler::BlocksFor(int64_t tokens) const {
  const int64_t bs = cache_->block_size();
  return (tokens + bs - 1) / bs;
}

void Scheduler::AddWaiting(Sequence* seq) {
  // Waiting stays sorted by id, so preempted sequences (older) go back before new arrivals.
  waiting_.insert(std::upper_bound(waiting_.begin(), waiting_.end(), seq, OlderThan), seq);
}

void Scheduler::FreeBlocks(Sequence* seq) {
  for (int32_t b : seq->blocks) cache_->FreeBlock(b);
  seq->blocks.clear();
}

void Scheduler::Remove(Sequence* seq) {
  FreeBlocks(seq);
  if (auto it = std::find(running_.begin(), running_.end(), seq); it != running_.end()) {
    running_.erase(it);
  }
  if (auto it = std::find(waiting_.begin(), waiting_.end(), seq); it != waiting_.end()) {
    waiting_.erase(it);
  }
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
    *budget += chunk->count;
    plan->num_tokens -= chunk->count;
    plan->chunks.erase(chunk);
  }
  FreeBlocks(victim);
  victim->num_computed = 0;
  running_.erase(std::find(running_.begin(), running_.end(), victim));
  AddWaiting(victim);
  ++plan->num_preempted;
  LP_LOG(DEBUG) << "preempted request " << victim->id << " (" << victim->length() << " tokens)";
}

bool Scheduler::EnsureBlocks(Sequence* seq, int64_t tokens, StepPlan* plan, int64_t* budget) {
  const int64_t need = BlocksFor(tokens);
  while (static_cast<int64_t>(seq->blocks.size()) < need) {
    absl::StatusOr<int32_t> block = cache_->AllocateBlock();
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

  // 1. Decodes, oldest first. A preemption removes the youngest, which is at the end of running_
  //    and not scheduled yet (or is `s` itself, the last one), so the index stays valid.
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Sequence* s = running_[i];
    if (s->num_pending() != 1) continue;
    if (!EnsureBlocks(s, s->length(), &plan, &budget)) break;
    add_chunk(s, 1);
  }

  // 2. Prefill chunks of sequences already admitted, oldest first, in what budget is left.
  for (size_t i = 0; i < running_.size() && budget > 0; ++i) {
    Sequence* s = running_[i];
    if (s->num_pending() <= 1) continue;
    const int64_t bs = cache_->block_size();
    auto fits = [&] {
      const int64_t slots =
          (static_cast<int64_t>(s->blocks.size()) + cache_->num_free_blocks()) * bs;
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

  // 3. Admission, FIFO. Not in a step that had to preempt: memory is short already.
  while (plan.num_preempted == 0 && !waiting_.empty() && budget > 0 &&
         static_cast<int64_t>(running_.size()) < options_.max_running) {
    Sequence* s = waiting_.front();
    const int64_t need = BlocksFor(s->length() + 1);
    if (cache_->num_free_blocks() - PromisedBlocks() < need) break;
    waiting_.pop_front();
    running_.insert(std::upper_bound(running_.begin(), running_.end(), s, OlderThan), s);
    const int64_t count = std::min(s->num_pending(), budget);
    const bool ok = EnsureBlocks(s, s->num_computed + count, &plan, &budget);
    LP_CHECK(ok) << "an admitted sequence could not get the blocks counted for it";
    add_chunk(s, count);
  }
  return plan;
}

void Scheduler::Commit(const StepPlan& plan) {
  for (const ScheduledChunk& c : plan.chunks) c.seq->num_computed += c.count;
}

}  // namespace loraplex::engine
