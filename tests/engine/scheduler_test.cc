// The scheduler alone, over a real (tiny) KvCache: chunked prefill, decode priority, admission
// under a short cache, preemption of the youngest and block accounting. Generation is simulated by
// appending a token whenever a chunk samples, so these tests need no model.
#include "engine/scheduler.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "tests/testing/testing.h"

namespace loraplex::engine {
namespace {

model::LlamaConfig TinyConfig() {
  model::LlamaConfig c;
  c.num_layers = 1;
  c.num_heads = 1;
  c.num_kv_heads = 1;
  c.head_dim = 2;
  c.hidden_size = 2;
  c.vocab_size = 16;
  c.max_position_embeddings = 1024;
  return c;
}

class SchedulerTest : public ::testing::Test {
 protected:
  void MakeCache(int64_t blocks, int64_t block_size = 4) {
    ASSERT_OK_AND_ASSIGN(model::KvCache c,
                         model::KvCache::Create(TinyConfig(), blocks, block_size));
    cache_ = std::make_unique<model::KvCache>(std::move(c));
  }
  Sequence* NewSeq(int64_t prompt_len, int32_t max_tokens = 100) {
    GenerationRequest req;
    req.prompt_ids.assign(prompt_len, 3);
    req.max_tokens = max_tokens;
    seqs_.push_back(std::make_unique<Sequence>(next_id_++, std::move(req), nullptr, nullptr));
    return seqs_.back().get();
  }
  // Schedules, commits, and appends a token to every sequence that sampled.
  StepPlan Step(Scheduler& s) {
    StepPlan plan = s.Schedule();
    s.Commit(plan);
    for (const ScheduledChunk& c : plan.chunks) {
      if (c.sample) c.seq->tokens.push_back(5);
    }
    return plan;
  }
  int64_t BlocksHeld() const {
    int64_t n = 0;
    for (const auto& s : seqs_) n += static_cast<int64_t>(s->blocks.size());
    return n;
  }

  std::unique_ptr<model::KvCache> cache_;
  std::vector<std::unique_ptr<Sequence>> seqs_;
  RequestId next_id_ = 1;
};

TEST_F(SchedulerTest, LongPromptIsPrefilledInChunksWithinTheBudget) {
  MakeCache(64);
  Scheduler s(cache_.get(), {.max_batch_tokens = 32, .max_running = 8});
  Sequence* a = NewSeq(100);
  s.AddWaiting(a);
  std::vector<int64_t> counts;
  for (int i = 0; i < 4; ++i) {
    StepPlan p = Step(s);
    ASSERT_EQ(p.chunks.size(), 1u);
    counts.push_back(p.chunks[0].count);
    EXPECT_EQ(p.chunks[0].sample, i == 3);
  }
  EXPECT_EQ(counts, (std::vector<int64_t>{32, 32, 32, 4}));
  EXPECT_EQ(a->num_computed, 100);
  EXPECT_EQ(a->length(), 101);                            // one token sampled
  EXPECT_EQ(static_cast<int64_t>(a->blocks.size()), 25);  // 100 slots / 4
  // Decoding: one token per step.
  StepPlan p = Step(s);
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].count, 1);
  EXPECT_EQ(p.chunks[0].start, 100);
  EXPECT_EQ(static_cast<int64_t>(a->blocks.size()), 26);  // position 100 opened block 25
}

TEST_F(SchedulerTest, DecodesAreNotStalledByANewLongPrompt) {
  MakeCache(256);
  Scheduler s(cache_.get(), {.max_batch_tokens = 16, .max_running = 8});
  Sequence* a = NewSeq(3);
  Sequence* b = NewSeq(5);
  s.AddWaiting(a);
  s.AddWaiting(b);
  Step(s);  // both prefilled in one step (8 tokens)
  ASSERT_EQ(a->num_generated(), 1);
  ASSERT_EQ(b->num_generated(), 1);
  Sequence* c = NewSeq(200);
  s.AddWaiting(c);
  for (int i = 0; i < 5; ++i) {
    StepPlan p = Step(s);
    EXPECT_EQ(p.num_tokens, 16);
    // Every step: a and b decode first, c gets the remaining 14 tokens.
    ASSERT_EQ(p.chunks.size(), 3u);
    EXPECT_EQ(p.chunks[0].seq, a);
    EXPECT_EQ(p.chunks[1].seq, b);
    EXPECT_EQ(p.chunks[2].seq, c);
    EXPECT_EQ(p.chunks[2].count, 14);
  }
  EXPECT_EQ(a->num_generated(), 6);
  EXPECT_EQ(c->num_computed, 70);
}

TEST_F(SchedulerTest, AdmissionWaitsForBlocksInFifoOrder) {
  MakeCache(8);  // 32 slots
  Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 8});
  Sequence* a = NewSeq(20);  // needs 6 blocks for prompt + 1
  Sequence* b = NewSeq(10);  // needs 3: does not fit beside a
  Sequence* c = NewSeq(2);   // would fit, but FIFO keeps it behind b
  s.AddWaiting(a);
  s.AddWaiting(b);
  s.AddWaiting(c);
  StepPlan p = Step(s);
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].seq, a);
  EXPECT_EQ(s.num_waiting(), 2);
  s.Remove(a);  // a finishes: its blocks are free at once
  EXPECT_EQ(cache_->num_free_blocks(), 8);
  p = Step(s);
  EXPECT_EQ(p.chunks.size(), 2u);
  EXPECT_EQ(s.num_waiting(), 0);
  EXPECT_EQ(BlocksHeld(), cache_->num_used_blocks());
}

TEST_F(SchedulerTest, RunningLimitCapsTheBatch) {
  MakeCache(64);
  Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 2});
  for (int i = 0; i < 3; ++i) s.AddWaiting(NewSeq(2));
  StepPlan p = Step(s);
  EXPECT_EQ(p.chunks.size(), 2u);
  EXPECT_EQ(s.num_running(), 2);
  EXPECT_EQ(s.num_waiting(), 1);
}

TEST_F(SchedulerTest, YoungestIsPreemptedWhenBlocksRunOutAndRecomputedLater) {
  MakeCache(4);  // 16 slots
  Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 8});
  Sequence* a = NewSeq(7);  // 2 blocks with its first decode slot
  Sequence* b = NewSeq(7);
  s.AddWaiting(a);
  s.AddWaiting(b);
  Step(s);  // both prefilled: 7 slots each = 2 blocks each, all 4 blocks used
  ASSERT_EQ(cache_->num_free_blocks(), 0);
  Step(s);  // decode position 7: still in block 1
  // Position 8 needs a third block for a: b (younger) is preempted.
  StepPlan p = Step(s);
  EXPECT_EQ(p.num_preempted, 1);
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].seq, a);
  EXPECT_EQ(b->num_computed, 0);
  EXPECT_TRUE(b->blocks.empty());
  EXPECT_EQ(s.num_waiting(), 1);
  EXPECT_EQ(b->length(), 9);  // its generated tokens are kept, to be recomputed
  EXPECT_EQ(BlocksHeld(), cache_->num_used_blocks());
  // a finishes; b is re-admitted and recomputes all 9 tokens in one chunk, then samples.
  s.Remove(a);
  p = Step(s);
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].seq, b);
  EXPECT_EQ(p.chunks[0].start, 0);
  EXPECT_EQ(p.chunks[0].count, 9);
  EXPECT_TRUE(p.chunks[0].sample);
}

TEST_F(SchedulerTest, RemovingAWaitingOrRunningSequenceFreesEverything) {
  MakeCache(16);
  Scheduler s(cache_.get(), {.max_batch_tokens = 8, .max_running = 8});
  Sequence* a = NewSeq(30);
  Sequence* b = NewSeq(3);
  s.AddWaiting(a);
  Step(s);  // a holds 2 blocks of its prompt
  s.AddWaiting(b);
  EXPECT_GT(cache_->num_used_blocks(), 0);
  s.Remove(a);
  s.Remove(b);
  EXPECT_EQ(cache_->num_used_blocks(), 0);
  EXPECT_EQ(s.num_running(), 0);
  EXPECT_EQ(s.num_waiting(), 0);
  EXPECT_TRUE(s.Schedule().chunks.empty());
}

// ---- fairness across tenants (adapters) -----------------------------------------------------

class FairnessTest : public SchedulerTest {
 protected:
  Sequence* NewFor(const std::string& tenant, int64_t prompt_len = 4) {
    Sequence* s = NewSeq(prompt_len);
    s->tenant = tenant;
    return s;
  }
  // Runs steps until nothing is left, finishing every sequence after `decodes` generated tokens;
  // returns the tenants in the order their sequences were admitted.
  std::string AdmissionOrder(Scheduler& s, int decodes = 3) {
    std::string order;
    for (int step = 0; step < 1000 && (s.num_running() > 0 || s.num_waiting() > 0); ++step) {
      StepPlan p = Step(s);
      for (const ScheduledChunk& c : p.chunks) {
        if (c.start == 0) order += c.seq->tenant;
      }
      for (const ScheduledChunk& c : p.chunks) {
        if (c.seq->num_generated() >= decodes) s.Remove(c.seq);
      }
    }
    return order;
  }
};

// One tenant ("a") queues six requests before another ("b") queues two. FIFO serves all of a's
// first; VTC alternates while both have work, because each admission charges the prompt (and
// each decode its token) to the tenant's counter.
TEST_F(FairnessTest, VtcInterleavesAFloodWithAnotherTenantFifoDoesNot) {
  for (Fairness f : {Fairness::kFifo, Fairness::kVtc}) {
    MakeCache(64);
    seqs_.clear();
    Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 2, .fairness = f});
    for (int i = 0; i < 6; ++i) s.AddWaiting(NewFor("a"));
    for (int i = 0; i < 2; ++i) s.AddWaiting(NewFor("b"));
    EXPECT_EQ(AdmissionOrder(s), f == Fairness::kFifo ? "aaaaaabb" : "ababaaaa");
    EXPECT_EQ(cache_->num_used_blocks(), 0);
  }
}

// The counter is the service received over the share: 1 per prompt token at admission, 2 per
// decoded token; a share of 4 makes "b"'s tokens count a quarter, so b is admitted four times
// for each of a's while both have work waiting.
TEST_F(FairnessTest, CountersChargeWeightedTokensOverTheShare) {
  MakeCache(64);
  Scheduler s(cache_.get(), {.max_batch_tokens = 64,
                             .max_running = 1,
                             .fairness = Fairness::kVtc,
                             .tenant_weights = {{"b", 4.0}}});
  Sequence* a = NewFor("a", 8);
  s.AddWaiting(a);
  Step(s);  // a admitted: 8 prompt tokens, one sampled token
  EXPECT_EQ(s.counter("a"), 8.0);
  Step(s);  // one decode
  EXPECT_EQ(s.counter("a"), 10.0);
  s.Remove(a);
  for (int i = 0; i < 3; ++i) s.AddWaiting(NewFor("a", 8));
  for (int i = 0; i < 8; ++i) s.AddWaiting(NewFor("b", 8));
  // a's first request is admitted (tie at 0, older) and at once gives its slot back to b, whose
  // share is four slots to a's one; then four b's per a while both have work.
  EXPECT_EQ(AdmissionOrder(s, 1), "bbbbabbbbaa");
}

// A tenant idle while another was served does not come back with a lower counter than the busy
// one (VTC's lift): it cannot bank its idle time and then take every slot.
TEST_F(FairnessTest, AReturningTenantIsLiftedToTheBusyOnesCounter) {
  MakeCache(64);
  Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 1});  // VTC by default
  Sequence* a = NewFor("a", 4);
  s.AddWaiting(a);
  for (int i = 0; i < 20; ++i) Step(s);  // a: 4 + 19 decodes * 2
  const double served = s.counter("a");
  EXPECT_EQ(served, 42.0);
  s.AddWaiting(NewFor("a", 4));
  Sequence* b = NewFor("b", 4);
  s.AddWaiting(b);  // b was never seen: lifted from 0 to a's counter
  EXPECT_EQ(s.counter("b"), served);
  s.Remove(a);
  // Tie: the older request (a's) goes first, then b.
  EXPECT_EQ(AdmissionOrder(s, 1), "ab");
  // Everybody idle: the counters are forgotten.
  EXPECT_EQ(s.counter("a"), 0.0);
  EXPECT_EQ(s.counter("b"), 0.0);
}

// Every running slot held by a: under VTC a request of b (no better served) takes a's youngest
// slot at once, until the slots are shared equally; FIFO waits for a's to finish.
TEST_F(FairnessTest, VtcTakesASlotFromTheTenantHoldingMoreThanItsShare) {
  for (Fairness f : {Fairness::kFifo, Fairness::kVtc}) {
    MakeCache(64);
    seqs_.clear();
    Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 4, .fairness = f});
    std::vector<Sequence*> a;
    for (int i = 0; i < 4; ++i) {
      a.push_back(NewFor("a"));
      s.AddWaiting(a.back());
    }
    Step(s);
    Step(s);  // a holds the 4 slots, decoding
    Sequence* b1 = NewFor("b");
    Sequence* b2 = NewFor("b");
    Sequence* b3 = NewFor("b");
    s.AddWaiting(b1);
    s.AddWaiting(b2);
    s.AddWaiting(b3);
    StepPlan p = Step(s);
    if (f == Fairness::kFifo) {
      EXPECT_EQ(p.num_preempted, 0);
      EXPECT_EQ(s.num_waiting(), 3);
      continue;
    }
    // b takes two slots (2 + 2); a third would tip the balance the other way.
    EXPECT_EQ(p.num_preempted, 2);
    EXPECT_EQ(s.num_running(), 4);
    EXPECT_EQ(b1->num_computed, 4);
    EXPECT_EQ(b2->num_computed, 4);
    EXPECT_EQ(b3->num_computed, 0);
    EXPECT_EQ(a[3]->num_computed, 0);  // the youngest of a's, recomputed later
    EXPECT_EQ(a[2]->num_computed, 0);
    EXPECT_EQ(a[1]->num_computed, 6);
    EXPECT_EQ(BlocksHeld(), cache_->num_used_blocks());
  }
}

// max_running_per_tenant: a's requests take at most one slot, in FIFO and VTC alike, and a
// request that does not fit in memory is not overtaken (the head waits).
TEST_F(FairnessTest, PerTenantCapAndNoOvertakingOfABigRequest) {
  for (Fairness f : {Fairness::kFifo, Fairness::kVtc}) {
    MakeCache(64);
    seqs_.clear();
    Scheduler s(
        cache_.get(),
        {.max_batch_tokens = 64, .max_running = 4, .fairness = f, .max_running_per_tenant = 1});
    for (int i = 0; i < 3; ++i) s.AddWaiting(NewFor("a"));
    s.AddWaiting(NewFor("b"));
    StepPlan p = Step(s);
    ASSERT_EQ(p.chunks.size(), 2u);
    EXPECT_EQ(p.chunks[0].seq->tenant, "a");
    EXPECT_EQ(p.chunks[1].seq->tenant, "b");
    EXPECT_EQ(s.num_waiting(), 2);
  }
  MakeCache(8);  // 32 slots
  seqs_.clear();
  Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 8});
  s.AddWaiting(NewFor("a", 20));
  Step(s);                          // a holds 6 blocks
  Sequence* big = NewFor("b", 10);  // needs 3: does not fit
  s.AddWaiting(big);
  s.AddWaiting(NewFor("c", 2));  // would fit; same counter as b (both lifted), b is older
  StepPlan p = Step(s);
  EXPECT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(s.num_waiting(), 2);
}

// share_running_slots: each tenant may hold its share of max_running among the tenants active
// now or within the window; a lone tenant holds every slot. Its sequences over a lowered cap run
// on (no preemption for it), and no new ones are admitted until it is back under.
TEST_F(FairnessTest, RunningShareCapsEachTenantAtItsShareOfTheActiveOnes) {
  MakeCache(256);
  int64_t now = 0;
  Scheduler s(cache_.get(), {.max_batch_tokens = 64,
                             .max_running = 8,
                             .share_running_slots = true,
                             .active_window_ms = 1000,
                             .now_ms = [&now] { return now; }});
  auto running_of = [&s](const std::string& tenant) {
    return std::count_if(s.running().begin(), s.running().end(),
                         [&](const Sequence* q) { return q->tenant == tenant; });
  };
  auto finish_oldest = [&](const std::string& tenant, int n) {
    std::vector<Sequence*> done;
    for (Sequence* q : s.running()) {
      if (q->tenant == tenant && static_cast<int>(done.size()) < n) done.push_back(q);
    }
    for (Sequence* q : done) s.Remove(q);
  };
  for (int i = 0; i < 20; ++i) s.AddWaiting(NewFor("a"));
  Step(s);
  EXPECT_EQ(running_of("a"), 8);  // alone: every slot
  EXPECT_EQ(s.RunningCap("a"), 8);
  s.AddWaiting(NewFor("b"));
  EXPECT_EQ(s.RunningCap("a"), 4);
  EXPECT_EQ(s.RunningCap("b"), 4);
  Step(s);  // every slot taken: b takes a's youngest (VTC), a keeps its other 7 for now
  EXPECT_EQ(running_of("a"), 7);
  EXPECT_EQ(running_of("b"), 1);
  finish_oldest("a", 4);
  Step(s);
  EXPECT_EQ(running_of("a"), 4);  // 3 were left: one admitted, up to its cap
  finish_oldest("a", 2);
  Step(s);
  EXPECT_EQ(running_of("a"), 4);  // two admitted; three slots stay free
  EXPECT_EQ(s.num_running(), 5);
  finish_oldest("b", 1);  // b done, but active for the window still
  now = 1000;
  Step(s);
  EXPECT_EQ(running_of("a"), 4);
  now = 1001;  // b's last request is older than the window: a alone again
  EXPECT_EQ(s.RunningCap("a"), 8);
  Step(s);
  EXPECT_EQ(running_of("a"), 8);
}

// Shares weigh the caps; FIFO and an explicit cap ignore share_running_slots.
TEST_F(FairnessTest, RunningShareFollowsTheSharesAndOnlyUnderVtc) {
  MakeCache(64);
  Scheduler vtc(cache_.get(), {.max_running = 8,
                               .share_running_slots = true,
                               .now_ms = [] { return int64_t{0}; },
                               .tenant_weights = {{"b", 3.0}}});
  vtc.AddWaiting(NewFor("a"));
  vtc.AddWaiting(NewFor("b"));
  EXPECT_EQ(vtc.RunningCap("a"), 2);
  EXPECT_EQ(vtc.RunningCap("b"), 6);
  EXPECT_EQ(vtc.RunningCap("c"), 1);  // as a newcomer: 8 x 1/5, floor
  Scheduler fifo(cache_.get(),
                 {.max_running = 8, .fairness = Fairness::kFifo, .share_running_slots = true});
  fifo.AddWaiting(NewFor("a"));
  fifo.AddWaiting(NewFor("b"));
  EXPECT_EQ(fifo.RunningCap("a"), 8);
  Scheduler fixed(cache_.get(),
                  {.max_running = 8, .max_running_per_tenant = 3, .share_running_slots = true});
  fixed.AddWaiting(NewFor("a"));
  EXPECT_EQ(fixed.RunningCap("a"), 3);
}

// The prefix cache (SchedulerOptions::prefix_cache, engine/block_pool.h) with blocks of 4 slots.
class PrefixCacheTest : public SchedulerTest {
 protected:
  // A sequence with these prompt tokens, computed by `identity` (as Sequence sets it from the
  // adapter lease: "name@version", "@base", "" for a mix).
  Sequence* NewPrompt(std::vector<int32_t> prompt, const std::string& identity = "@base",
                      int32_t max_tokens = 100) {
    GenerationRequest req;
    req.prompt_ids = std::move(prompt);
    req.max_tokens = max_tokens;
    seqs_.push_back(std::make_unique<Sequence>(next_id_++, std::move(req), nullptr, nullptr));
    seqs_.back()->prefix_identity = identity;
    return seqs_.back().get();
  }
  static std::vector<int32_t> Tokens(int64_t n, int32_t first = 3) {
    std::vector<int32_t> t;
    for (int64_t i = 0; i < n; ++i) t.push_back(static_cast<int32_t>(first + i));
    return t;
  }
  // Runs steps until seq has computed its prompt (and sampled once).
  void Prefill(Scheduler& s, Sequence* seq) {
    for (int i = 0; i < 100 && seq->num_generated() == 0; ++i) Step(s);
    ASSERT_GT(seq->num_generated(), 0);
  }
  // Blocks held by some sequence plus idle cached ones: every block out of the free list.
  int64_t Accounted(const Scheduler& s) const {
    std::vector<int32_t> held;
    for (const auto& q : seqs_) held.insert(held.end(), q->blocks.begin(), q->blocks.end());
    std::sort(held.begin(), held.end());
    held.erase(std::unique(held.begin(), held.end()), held.end());
    return static_cast<int64_t>(held.size()) + s.blocks().num_idle();
  }
};

TEST_F(PrefixCacheTest, ASharedPrefixIsMatchedAndOnlyTheRestComputed) {
  MakeCache(64);
  Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 8, .prefix_cache = true});
  const std::vector<int32_t> system = Tokens(18);  // 4 full blocks and 2 tokens
  std::vector<int32_t> turn = system;
  turn.push_back(40);  // ends in its own user turn
  Sequence* a = NewPrompt(turn);
  s.AddWaiting(a);
  Prefill(s, a);
  EXPECT_EQ(s.blocks().num_cached(), 4);  // 19 computed: 4 full blocks
  EXPECT_EQ(s.prefix_hit_tokens(), 0);

  std::vector<int32_t> prompt = system;
  prompt.push_back(41);  // same 18 first tokens, another turn
  Sequence* b = NewPrompt(prompt);
  s.AddWaiting(b);
  StepPlan p = Step(s);
  ASSERT_EQ(p.chunks.size(), 2u);
  EXPECT_EQ(p.chunks[1].seq, b);
  EXPECT_EQ(p.chunks[1].start, 16);  // the 4 blocks are shared: 3 tokens left to compute
  EXPECT_EQ(p.chunks[1].count, 3);
  EXPECT_EQ(std::vector<int32_t>(b->blocks.begin(), b->blocks.begin() + 4),
            std::vector<int32_t>(a->blocks.begin(), a->blocks.begin() + 4));
  EXPECT_NE(b->blocks[4], a->blocks[4]);  // the partial block is its own
  EXPECT_EQ(s.blocks().refs(a->blocks[0]), 2);
  EXPECT_EQ(s.prefix_hit_tokens(), 16);
  EXPECT_EQ(s.prefix_lookup_tokens(), 19 + 19);

  // Both finish: the cached blocks stay, idle, and count as available.
  s.Remove(a);
  EXPECT_EQ(s.blocks().refs(b->blocks[0]), 1);
  s.Remove(b);
  EXPECT_EQ(s.blocks().num_idle(), s.blocks().num_cached());
  EXPECT_EQ(s.blocks().num_available(), 64);
  EXPECT_EQ(Accounted(s), cache_->num_used_blocks());
}

TEST_F(PrefixCacheTest, AFullyCachedPromptStillComputesItsLastToken) {
  MakeCache(64);
  Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 8, .prefix_cache = true});
  Sequence* a = NewPrompt(Tokens(16));
  s.AddWaiting(a);
  Prefill(s, a);
  Step(s);  // position 16 computed
  s.Remove(a);
  Sequence* b = NewPrompt(Tokens(16));
  s.AddWaiting(b);
  StepPlan p = Step(s);
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].start, 12);  // 3 blocks matched, the 4th recomputed for the logits
  EXPECT_EQ(p.chunks[0].count, 4);
  EXPECT_TRUE(p.chunks[0].sample);
}

TEST_F(PrefixCacheTest, KeyedByAdapterVersionMergeStateAndEveryEarlierToken) {
  MakeCache(128);
  Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 16, .prefix_cache = true});
  const std::vector<int32_t> prompt = Tokens(13);  // 3 full blocks to match
  auto hits_of = [&](Sequence* q) {
    const int64_t before = s.prefix_hit_tokens();
    s.AddWaiting(q);
    Prefill(s, q);
    return s.prefix_hit_tokens() - before;
  };
  EXPECT_EQ(hits_of(NewPrompt(prompt, "qv@1")), 0);
  EXPECT_EQ(hits_of(NewPrompt(prompt, "qv@1")), 12);
  EXPECT_EQ(hits_of(NewPrompt(prompt, "qv@2")), 0) << "a new version must not reuse the old K/V";
  EXPECT_EQ(hits_of(NewPrompt(prompt, "other@1")), 0);
  EXPECT_EQ(hits_of(NewPrompt(prompt, "@base")), 0);
  EXPECT_EQ(hits_of(NewPrompt(prompt, "")), 0) << "no identity: never cached";
  EXPECT_EQ(hits_of(NewPrompt(prompt, "")), 0);
  s.SetMergeState(7);  // an adapter merged: the base weights changed
  EXPECT_EQ(hits_of(NewPrompt(prompt, "qv@1")), 0);
  EXPECT_EQ(hits_of(NewPrompt(prompt, "qv@1")), 12);
  s.SetMergeState(0);  // unmerged: the blocks of the unmerged state serve again
  EXPECT_EQ(hits_of(NewPrompt(prompt, "qv@1")), 12);
  // A change in any earlier token ends the match at that block.
  std::vector<int32_t> changed = prompt;
  changed[5] = 99;
  EXPECT_EQ(hits_of(NewPrompt(changed, "qv@1")), 4);
  changed = prompt;
  changed[0] = 99;
  EXPECT_EQ(hits_of(NewPrompt(changed, "qv@1")), 0);
}

TEST_F(PrefixCacheTest, GeneratedTokensAreCachedForTheNextTurn) {
  MakeCache(64);
  Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 8, .prefix_cache = true});
  Sequence* a = NewPrompt(Tokens(6));
  s.AddWaiting(a);
  for (int i = 0; i < 12; ++i) Step(s);  // 6 prompt + 12 generated (5s), 17 computed
  ASSERT_EQ(a->num_computed, 17);
  EXPECT_EQ(s.blocks().num_cached(), 4);
  std::vector<int32_t> next_turn = a->tokens;  // the conversation so far and a new user turn
  next_turn.push_back(50);
  s.Remove(a);
  Sequence* b = NewPrompt(next_turn);
  s.AddWaiting(b);
  StepPlan p = Step(s);
  EXPECT_EQ(p.chunks[0].start, 16);
}

TEST_F(PrefixCacheTest, AMergeWhileRunningStopsEnteringTheSequencesBlocks) {
  MakeCache(64);
  Scheduler s(cache_.get(), {.max_batch_tokens = 4, .max_running = 8, .prefix_cache = true});
  Sequence* a = NewPrompt(Tokens(12), "qv@1");
  s.AddWaiting(a);
  Step(s);  // block 0 computed under state 0
  EXPECT_EQ(s.blocks().num_cached(), 1);
  s.SetMergeState(3);
  Step(s);
  Step(s);  // blocks 1 and 2 computed under state 3, but a's key says 0
  EXPECT_EQ(a->num_computed, 12);
  EXPECT_EQ(s.blocks().num_cached(), 1);
}

TEST_F(PrefixCacheTest, IdleBlocksAreEvictedLeastRecentlyUsedTailFirstWhenMemoryRunsOut) {
  MakeCache(8);  // 32 slots
  Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 8, .prefix_cache = true});
  Sequence* a = NewPrompt(Tokens(12, 3));  // 3 blocks
  s.AddWaiting(a);
  Prefill(s, a);
  s.Remove(a);
  Sequence* b = NewPrompt(Tokens(16, 30));  // 4 more
  s.AddWaiting(b);
  Prefill(s, b);
  s.Remove(b);
  EXPECT_EQ(s.blocks().num_idle(), 7);
  EXPECT_EQ(s.blocks().num_available(), 8);
  // 20 tokens take 5 blocks: the free one, then a's three (released first), then b's last.
  Sequence* c = NewPrompt(Tokens(20, 60));
  s.AddWaiting(c);
  StepPlan p = Step(s);
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(s.blocks().num_evicted(), 4);
  EXPECT_EQ(s.blocks().num_cached(), 3 + 5);  // b's first three, and c's five
  s.Remove(c);
  const int64_t before = s.prefix_hit_tokens();
  Sequence* b2 = NewPrompt(Tokens(16, 30));
  s.AddWaiting(b2);
  Step(s);
  EXPECT_EQ(s.prefix_hit_tokens() - before, 12) << "b's head should have outlived its tail";
  Sequence* a2 = NewPrompt(Tokens(12, 3));
  s.AddWaiting(a2);
  Step(s);
  EXPECT_EQ(s.prefix_hit_tokens() - before, 12) << "a's blocks were evicted";
  EXPECT_EQ(Accounted(s), cache_->num_used_blocks());
}

TEST_F(PrefixCacheTest, MatchedIdleBlocksAreNotCountedTwiceAtAdmission) {
  MakeCache(7);  // 28 slots
  Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 8, .prefix_cache = true});
  Sequence* a = NewPrompt(Tokens(12));
  s.AddWaiting(a);
  Prefill(s, a);
  s.Remove(a);  // 3 idle cached blocks
  Sequence* d = NewPrompt(Tokens(7, 80));
  s.AddWaiting(d);
  Prefill(s, d);  // d holds 2: 2 free, 3 idle
  // b shares a's 12 tokens and needs 6 blocks for 20 tokens and its next: 3 matched and 3 more.
  // Free and idle make 5, but 3 of those are the matched ones: only 2 are left for it.
  std::vector<int32_t> prompt = Tokens(12);
  for (int i = 0; i < 8; ++i) prompt.push_back(70 + i);
  Sequence* b = NewPrompt(prompt);
  s.AddWaiting(b);
  Step(s);
  EXPECT_EQ(s.num_waiting(), 1);
  EXPECT_EQ(Step(s).num_preempted, 0);
  s.Remove(d);
  StepPlan p = Step(s);
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].seq, b);
  EXPECT_EQ(p.chunks[0].start, 12);
  EXPECT_EQ(static_cast<int64_t>(b->blocks.size()), 5);  // 3 shared + 2 new (the 6th at decode)
  EXPECT_EQ(Accounted(s), cache_->num_used_blocks());
}

TEST_F(PrefixCacheTest, APreemptedSequenceFindsItsOwnBlocksAgain) {
  MakeCache(8);  // 32 slots
  Scheduler s(cache_.get(), {.max_batch_tokens = 64, .max_running = 8, .prefix_cache = true});
  Sequence* a = NewPrompt(Tokens(14, 3));
  Sequence* b = NewPrompt(Tokens(14, 40));
  s.AddWaiting(a);
  s.AddWaiting(b);
  Step(s);  // both prefilled: 4 blocks each, all taken
  int64_t preempted = 0;
  for (int i = 0; i < 4 && preempted == 0; ++i) preempted += Step(s).num_preempted;
  ASSERT_EQ(preempted, 1);  // a needs a 5th block; b, the youngest, goes back to waiting
  EXPECT_EQ(b->num_computed, 0);
  s.Remove(a);
  const int64_t before = s.prefix_hit_tokens();
  StepPlan p = Step(s);
  ASSERT_EQ(p.chunks.size(), 1u);
  EXPECT_EQ(p.chunks[0].seq, b);
  EXPECT_EQ(p.chunks[0].start, 12);  // its 3 full blocks were still cached
  EXPECT_EQ(s.prefix_hit_tokens() - before, 12);
}

}  // namespace
}  // namespace loraplex::engine
