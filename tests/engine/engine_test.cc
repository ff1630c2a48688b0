// The engine over the real stories260K model: batched results equal solo runs of
// model::Generate (the offline path, written independently of the engine), the golden story,
// cancellation and block accounting, admission control and refusals.
#include "engine/engine.h"

#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <utility>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/synchronization/notification.h"
#include "adapters/registry.h"
#include "common/status.h"
#include "kernels/kernels.h"
#include "model/generate.h"
#include "nlohmann/json.hpp"
#include "tests/testing/testing.h"

namespace loraplex::engine {
namespace {

using ::loraplex::testing::StatusIs;
namespace fs = std::filesystem;

struct Result {
  std::vector<int32_t> ids;
  std::string text;
  FinishReason reason = FinishReason::kNone;
  std::vector<GeneratedToken> tokens;
  int outputs = 0;
};

// Collects the outputs of several requests; the sinks hand them over through Queue.
class Collector {
 public:
  OutputSink Sink() {
    return [this](StepOutput out) { queue_.TryPush(std::move(out)); };
  }
  // Waits until `n` requests have finished; returns results by request id.
  std::map<RequestId, Result> WaitFor(size_t n) {
    while (done_ < n) {
      std::optional<StepOutput> out = queue_.Pop(absl::Seconds(60));
      if (!out) break;
      Result& r = results_[out->id];
      ++r.outputs;
      for (const GeneratedToken& t : out->tokens) {
        r.ids.push_back(t.token_id);
        r.tokens.push_back(t);
      }
      r.text += out->text;
      if (out->finished) {
        r.reason = out->finish_reason;
        ++done_;
      }
    }
    return results_;
  }
  // The next output (for step-by-step tests).
  std::optional<StepOutput> Next() { return queue_.Pop(absl::Seconds(60)); }

 private:
  Queue<StepOutput> queue_;
  std::map<RequestId, Result> results_;
  size_t done_ = 0;
};

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model::LoadOptions opts;
    opts.dtype = kernels::DType::kF32;
    auto m =
        model::LlamaModel::Load(loraplex::testing::Stories260KDir() + "/stories260K.gguf", opts);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(m).value().release();
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }

  std::unique_ptr<Engine> MakeEngine(EngineOptions options) {
    auto e = Engine::Create(model_, options);
    EXPECT_TRUE(e.ok()) << e.status();
    return e.ok() ? std::move(e).value() : nullptr;
  }

  static GenerationRequest Greedy(std::vector<int32_t> prompt, int32_t max_tokens) {
    GenerationRequest r;
    r.prompt_ids = std::move(prompt);
    r.max_tokens = max_tokens;
    return r;
  }

  // The same request through the offline single-sequence path.
  static model::GenerateResult Solo(const GenerationRequest& r) {
    model::GenerateOptions o;
    o.max_tokens = r.max_tokens;
    o.sampling = r.sampling;
    o.ignore_eos = r.ignore_eos;
    o.stop = r.stop;
    o.stop_token_ids = r.stop_token_ids;
    auto res = model::Generate(*model_, r.prompt_ids, o);
    EXPECT_TRUE(res.ok()) << res.status();
    return res.ok() ? *res : model::GenerateResult{};
  }
  static std::vector<int32_t> Ids(const model::GenerateResult& r) {
    std::vector<int32_t> ids;
    for (const auto& t : r.tokens) ids.push_back(t.token_id);
    return ids;
  }

  // Runs the requests at once; each gives the tokens it gives alone (Solo).
  static void ExpectEachAsAlone(Engine& engine, const std::vector<GenerationRequest>& reqs) {
    const std::vector<Result> results = RunAll(engine, reqs);
    ASSERT_EQ(results.size(), reqs.size());
    for (size_t i = 0; i < reqs.size(); ++i) {
      EXPECT_EQ(results[i].ids, Ids(Solo(reqs[i]))) << "request " << i;
    }
  }

  // A registry of f32 adapters for the model, its state under root.
  static absl::StatusOr<std::unique_ptr<adapters::AdapterRegistry>> OpenRegistry(
      const std::string& root) {
    adapters::RegistryOptions ro;
    ro.state_dir = root + "/state";
    ro.base = model_->config();
    ro.load.dtype = kernels::DType::kF32;
    return adapters::AdapterRegistry::Open(ro);
  }
  static std::string QvDir() { return loraplex::testing::FixturesDir() + "/peft/stories260k/qv"; }
  // OpenRegistry with the stories260K qv fixture registered as "qv" (version 1).
  static absl::StatusOr<std::unique_ptr<adapters::AdapterRegistry>> OpenRegistryWithQv(
      const std::string& root) {
    LP_ASSIGN_OR_RETURN(std::unique_ptr<adapters::AdapterRegistry> registry, OpenRegistry(root));
    LP_RETURN_IF_ERROR(
        registry->RegisterFromDir("qv", QvDir(), /*replace=*/false, /*pin=*/false).status());
    return registry;
  }

  // Submits every request at once and waits for all; results in request order.
  static std::vector<Result> RunAll(Engine& engine, const std::vector<GenerationRequest>& reqs) {
    Collector c;
    std::vector<RequestId> ids;
    for (const auto& r : reqs) {
      absl::StatusOr<RequestId> id = engine.Submit(r, c.Sink());
      EXPECT_TRUE(id.ok()) << id.status();
      if (id.ok()) ids.push_back(*id);
    }
    std::map<RequestId, Result> by_id = c.WaitFor(ids.size());
    std::vector<Result> results;
    for (RequestId id : ids) results.push_back(by_id[id]);
    return results;
  }

  // Waits (bounded) until the engine holds no KV block.
  static EngineStats WaitForNoBlocks(const Engine& e) {
    EngineStats s;
    for (int i = 0; i < 500; ++i) {
      s = e.Stats();
      if (s.kv_blocks_used == 0 && s.running == 0) break;
      absl::SleepFor(absl::Milliseconds(2));
    }
    return s;
  }

  static model::LlamaModel* model_;
};
model::LlamaModel* EngineTest::model_ = nullptr;

std::vector<int32_t> GoldenIds() {
  std::ifstream f(loraplex::testing::Stories260KDir() + "/golden-greedy.json");
  nlohmann::json j = nlohmann::json::parse(f);
  return j["greedy_ids_after_bos"].get<std::vector<int32_t>>();
}

TEST_F(EngineTest, GreedyFromBosIsTheGoldenStory) {
  auto engine = MakeEngine({});
  Collector c;
  GenerationRequest r = Greedy({1}, 60);
  r.ignore_eos = true;
  ASSERT_OK_AND_ASSIGN(RequestId id, engine->Submit(r, c.Sink()));
  auto results = c.WaitFor(1);
  EXPECT_EQ(results[id].ids, GoldenIds())
      << "golden: ../shared/models/stories260K/golden-greedy.json";
  EXPECT_EQ(results[id].reason, FinishReason::kLength);
  EXPECT_EQ(results[id].text, Solo(r).text);
}

// The memory the engine reports (for /metrics): weights and KV pool from the shapes, computed here
// from the config; scratch at least what a step of the longest prompt needs.
TEST_F(EngineTest, MemoryStatsAreWeightsPoolAndScratch) {
  const model::LlamaConfig& c = model_->config();
  const int64_t h = c.hidden_size, qd = c.q_dim(), kvd = c.kv_dim(), ff = c.intermediate_size;
  const int64_t matrices = c.vocab_size * h * (c.tie_word_embeddings ? 1 : 2) +
                           c.num_layers * (h * qd + 2 * h * kvd + qd * h + 3 * h * ff);
  const int64_t norms = h + c.num_layers * 2 * h;
  ASSERT_FALSE(c.attention_bias);
  const int64_t f32 = sizeof(float);  // SetUpTestSuite loads f32 weights

  auto engine = MakeEngine({.max_batch_tokens = 64, .kv_block_size = 4, .kv_blocks = 20});
  EngineStats s = engine->Stats();
  EXPECT_EQ(s.weight_bytes, (matrices + norms) * f32);
  EXPECT_EQ(s.weight_bytes, model_->weight_bytes());
  EXPECT_EQ(s.kv_pool_bytes, 20 * 4 * 2 * c.num_layers * kvd * f32);

  const std::vector<int32_t> story = GoldenIds();
  std::vector<int32_t> prompt = {1};
  prompt.insert(prompt.end(), story.begin(), story.begin() + 40);
  GenerationRequest r = Greedy(prompt, 3);
  r.ignore_eos = true;
  Collector col;
  ASSERT_OK_AND_ASSIGN(RequestId id, engine->Submit(r, col.Sink()));
  EXPECT_EQ(col.WaitFor(1)[id].ids.size(), 3u);
  s = WaitForNoBlocks(*engine);
  // One prefill step of 41 tokens: x, h, q, k, v, attention out, projection, gate, up, plus one
  // row of logits.
  const int64_t n = static_cast<int64_t>(prompt.size());
  const int64_t step = n * (3 * h + 2 * qd + 2 * kvd + 2 * ff) * f32 + c.vocab_size * f32;
  EXPECT_GE(s.scratch_bytes, step);
  EXPECT_EQ(s.kv_pool_bytes, 20 * 4 * 2 * c.num_layers * kvd * f32);  // unchanged by use
}

// A client that has its answer finds its tokens and its end in the stats already (they are
// counted before the outputs go out).
TEST_F(EngineTest, StatsCountTokensBeforeTheyAreSent) {
  auto engine = MakeEngine({});
  ASSERT_NE(engine, nullptr);
  for (int round = 1; round <= 20; ++round) {
    const EngineStats before = engine->Stats();
    Collector c;
    GenerationRequest r = Greedy({1, 5, 9}, 1 + round % 4);
    r.ignore_eos = true;
    ASSERT_OK_AND_ASSIGN(RequestId id, engine->Submit(std::move(r), c.Sink()));
    const Result got = c.WaitFor(1)[id];
    const EngineStats after = engine->Stats();
    EXPECT_EQ(after.generated_tokens - before.generated_tokens,
              static_cast<int64_t>(got.ids.size()))
        << "round " << round;
    EXPECT_EQ(after.finished_requests - before.finished_requests, 1) << "round " << round;
  }
}

TEST_F(EngineTest, BatchedGreedyEqualsEachRequestAlone) {
  // A small token budget forces chunked prefill beside running decodes.
  auto engine = MakeEngine({.max_batch_tokens = 24, .max_running = 16});
  const std::vector<int32_t> story = GoldenIds();
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 12; ++i) {
    std::vector<int32_t> prompt = {1};
    prompt.insert(prompt.end(), story.begin(), story.begin() + (i * 5) % 57);
    GenerationRequest r = Greedy(prompt, 8 + (i * 7) % 40);
    r.ignore_eos = (i % 3 == 0);
    reqs.push_back(r);
  }
  const std::vector<Result> results = RunAll(*engine, reqs);
  ASSERT_EQ(results.size(), reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    model::GenerateResult solo = Solo(reqs[i]);
    EXPECT_EQ(results[i].ids, Ids(solo)) << "request " << i;
    EXPECT_EQ(results[i].text, solo.text) << "request " << i;
    EXPECT_EQ(FinishReasonName(results[i].reason), solo.finish_reason) << "request " << i;
  }
  EngineStats s = WaitForNoBlocks(*engine);
  EXPECT_EQ(s.kv_blocks_used, 0);
  EXPECT_EQ(s.finished_requests, static_cast<int64_t>(reqs.size()));
}

// kernels::SetBatchInvariant (--batch-invariant) over the real model, f32 and quantized to q4_0 at
// load: a request's tokens and logprobs are bit for bit the same alone and in a busy mix of steps
// (other requests' prompts, with and without an adapter, decodes, and its own prompt cut into
// chunks by the token budget): the adapter of many tokens in a step, the token tiles of the GEMMs
// and the tokens-in-lanes prefill would each change the low bits.
TEST_F(EngineTest, BatchInvariantOutputsDoNotDependOnWhatSharesTheSteps) {
  kernels::SetBatchInvariant(true);
  absl::Cleanup off = [] { kernels::SetBatchInvariant(false); };
  const std::string root = loraplex::testing::MakeTempDir("lp-engine-invariant");
  absl::Cleanup remove_root = [&] { fs::remove_all(root); };
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<adapters::AdapterRegistry> registry,
                       OpenRegistryWithQv(root));
  model::LoadOptions q4;
  q4.dtype = kernels::DType::kQ4_0;
  ASSERT_OK_AND_ASSIGN(
      std::unique_ptr<model::LlamaModel> quantized,
      model::LlamaModel::Load(loraplex::testing::Stories260KDir() + "/stories260K.gguf", q4));
  const std::vector<int32_t> story = GoldenIds();
  auto prompt = [&](int from, int len) {
    std::vector<int32_t> p = {1};
    p.insert(p.end(), story.begin() + from, story.begin() + from + len);
    return p;
  };
  for (model::LlamaModel* m : {model_, quantized.get()}) {
    SCOPED_TRACE(m == model_ ? "f32" : "q4_0");
    std::vector<GenerationRequest> probes = {Greedy(prompt(0, 40), 20), Greedy(prompt(5, 40), 20)};
    ASSERT_OK_AND_ASSIGN(probes[1].adapter, registry->Acquire("qv"));
    for (GenerationRequest& p : probes) {
      p.ignore_eos = true;
      p.sampling.logprobs = 2;
    }
    std::vector<GenerationRequest> busy;
    for (int i = 0; i < 10; ++i) {
      GenerationRequest r = Greedy(prompt(i, 3 + (i * 11) % 45), 6 + i * 3);
      r.ignore_eos = true;
      if (i % 2 == 1) {
        ASSERT_OK_AND_ASSIGN(r.adapter, registry->Acquire("qv"));
      }
      busy.push_back(r);
      if (i == 3) busy.push_back(probes[0]);
      if (i == 6) busy.push_back(probes[1]);
    }
    // One engine on the model at a time (the model's LoRA counters belong to one engine thread).
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Engine> loaded,
                         Engine::Create(m, {.max_batch_tokens = 48, .max_running = 16}));
    const std::vector<Result> mixed = RunAll(*loaded, busy);
    loaded.reset();
    ASSERT_EQ(mixed.size(), busy.size());
    const Result* in_mix[2] = {&mixed[4], &mixed[8]};
    ASSERT_OK_AND_ASSIGN(std::unique_ptr<Engine> quiet, Engine::Create(m, {}));
    for (int p = 0; p < 2; ++p) {
      const std::vector<Result> alone = RunAll(*quiet, {probes[p]});
      ASSERT_EQ(alone.size(), 1u);
      EXPECT_EQ(in_mix[p]->ids, alone[0].ids) << "probe " << p;
      ASSERT_EQ(in_mix[p]->tokens.size(), alone[0].tokens.size()) << "probe " << p;
      for (size_t t = 0; t < alone[0].tokens.size(); ++t) {
        const GeneratedToken &a = alone[0].tokens[t], &b = in_mix[p]->tokens[t];
        EXPECT_EQ(std::memcmp(&a.logprob, &b.logprob, sizeof(float)), 0)
            << "probe " << p << " token " << t << ": " << a.logprob << " vs " << b.logprob;
        ASSERT_EQ(a.top.size(), b.top.size());
        for (size_t j = 0; j < a.top.size(); ++j) {
          EXPECT_EQ(a.top[j].token_id, b.top[j].token_id);
          EXPECT_EQ(std::memcmp(&a.top[j].logprob, &b.top[j].logprob, sizeof(float)), 0)
              << "probe " << p << " token " << t << " top " << j;
        }
      }
    }
  }
}

TEST_F(EngineTest, PreemptionUnderAShortCacheKeepsResultsExact) {
  // 12 blocks of 4 = 48 slots; six requests of up to 5 + 30 tokens cannot all stay resident.
  auto engine =
      MakeEngine({.max_batch_tokens = 64, .max_running = 8, .kv_block_size = 4, .kv_blocks = 12});
  const std::vector<int32_t> story = GoldenIds();
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 6; ++i) {
    std::vector<int32_t> prompt = {1};
    prompt.insert(prompt.end(), story.begin() + i, story.begin() + i + 4);
    GenerationRequest r = Greedy(prompt, 30);
    r.ignore_eos = true;
    reqs.push_back(r);
  }
  ExpectEachAsAlone(*engine, reqs);
  EXPECT_GT(engine->Stats().preemptions, 0) << "the test meant to exercise preemption";
  EXPECT_EQ(WaitForNoBlocks(*engine).kv_blocks_used, 0);
}

TEST_F(EngineTest, CancellationFreesBlocksWithinAStep) {
  auto engine = MakeEngine({});
  Collector c;
  GenerationRequest r = Greedy({1}, 400);
  r.ignore_eos = true;
  ASSERT_OK_AND_ASSIGN(RequestId id, engine->Submit(r, c.Sink()));
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(c.Next().has_value());
  const EngineStats before = engine->Stats();
  EXPECT_GT(before.kv_blocks_used, 0);
  engine->Cancel(id);
  // Outputs already on their way may still arrive; the last one says cancelled.
  std::optional<StepOutput> out;
  do {
    out = c.Next();
    ASSERT_TRUE(out.has_value());
  } while (!out->finished);
  EXPECT_EQ(out->finish_reason, FinishReason::kCancelled);
  // Stats are published after each step, so they lag by at most one step; the cancel is taken at
  // the start of the next one.
  EXPECT_LE(out->completion_tokens, before.generated_tokens + 2)
      << "the engine kept generating after the cancel";
  EngineStats s = WaitForNoBlocks(*engine);
  EXPECT_EQ(s.kv_blocks_used, 0);
  EXPECT_EQ(s.kv_blocks_free, s.kv_blocks_total);
  EXPECT_EQ(s.cancelled_requests, 1);
  engine->Cancel(id);  // unknown by now: ignored
}

TEST_F(EngineTest, QueueFullIsResourceExhaustedAndWaitersRunLater) {
  // 4 blocks of 16 = 64 slots. A request of a 40-token prompt holds 3 blocks once prefilled, so
  // the next one (3 blocks for its prompt) waits; the queue holds two.
  auto engine = MakeEngine({.max_batch_tokens = 64,
                            .max_running = 8,
                            .max_queue = 2,
                            .kv_block_size = 16,
                            .kv_blocks = 4});
  const std::vector<int32_t> story = GoldenIds();
  std::vector<int32_t> prompt = {1};
  prompt.insert(prompt.end(), story.begin(), story.begin() + 39);
  GenerationRequest r = Greedy(prompt, 20);
  r.ignore_eos = true;
  Collector c;
  // The first request's sink holds the engine thread after its first token until the submissions
  // below are made: else, on a slow or loaded machine, the first request could finish (and the
  // next one leave the queue) in between, and the queue count would not be exact.
  absl::Notification submitted;
  auto release = [&] {
    if (!submitted.HasBeenNotified()) submitted.Notify();
  };
  absl::Cleanup release_on_failure = release;  // an ASSERT below must not leave the engine held
  bool first_token = true;                     // engine thread only
  OutputSink to_collector = c.Sink();
  OutputSink holding = [&](StepOutput out) {
    to_collector(std::move(out));
    if (std::exchange(first_token, false)) submitted.WaitForNotification();
  };
  ASSERT_OK_AND_ASSIGN(RequestId first, engine->Submit(r, holding));
  // Wait until the first one runs, so the queue count is exact.
  std::optional<StepOutput> first_out = c.Next();
  ASSERT_TRUE(first_out.has_value());
  ASSERT_EQ(first_out->id, first);
  ASSERT_OK(engine->Submit(r, c.Sink()));
  ASSERT_OK(engine->Submit(r, c.Sink()));
  EXPECT_THAT(engine->Submit(r, c.Sink()),
              StatusIs(absl::StatusCode::kResourceExhausted, "queue is full"));
  release();
  auto results = c.WaitFor(3);
  ASSERT_EQ(results.size(), 3u);
  const std::vector<int32_t> solo = Ids(Solo(r));
  for (auto& [id, res] : results) {
    EXPECT_EQ(res.reason, FinishReason::kLength);
    std::vector<int32_t> ids = res.ids;
    if (id == first) ids.insert(ids.begin(), first_out->tokens[0].token_id);
    EXPECT_EQ(ids, solo) << "request " << id;
  }
  // With the queue empty again, new requests are taken.
  EXPECT_OK(engine->Submit(Greedy({1}, 4), c.Sink()));
  c.WaitFor(4);
}

// The fairness options are checked where they enter (engine/scheduler.h has the policy's tests).
TEST_F(EngineTest, RefusesBadFairnessOptions) {
  EXPECT_THAT(Engine::Create(model_, {.max_running_per_adapter = -2}),
              StatusIs(absl::StatusCode::kInvalidArgument, "max_running_per_adapter"));
  EXPECT_THAT(Engine::Create(model_, {.fairness_window_ms = -1}),
              StatusIs(absl::StatusCode::kInvalidArgument, "fairness_window_ms"));
  for (double share : {0.0, -1.0, std::nan("")}) {
    EXPECT_THAT(Engine::Create(model_, {.adapter_shares = {{"a", share}}}),
                StatusIs(absl::StatusCode::kInvalidArgument, "share of adapter 'a'"));
  }
  EXPECT_THAT(ParseFairness("lottery"),
              StatusIs(absl::StatusCode::kInvalidArgument, "vtc or fifo"));
  ASSERT_OK_AND_ASSIGN(Fairness f, ParseFairness("fifo"));
  EXPECT_EQ(f, Fairness::kFifo);
  EXPECT_NE(MakeEngine({.fairness = Fairness::kFifo,
                        .max_running_per_adapter = 2,
                        .adapter_shares = {{"", 2.0}}}),
            nullptr);
}

TEST_F(EngineTest, RefusesWhatCanNeverRun) {
  auto engine = MakeEngine({.kv_block_size = 16, .kv_blocks = 8});
  const int64_t ctx = model_->config().max_position_embeddings;
  const int32_t vocab = static_cast<int32_t>(model_->config().vocab_size);
  Collector c;
  EXPECT_THAT(engine->Submit(Greedy({}, 4), c.Sink()),
              StatusIs(absl::StatusCode::kInvalidArgument, "empty"));
  EXPECT_THAT(engine->Submit(Greedy({1, vocab}, 4), c.Sink()),
              StatusIs(absl::StatusCode::kInvalidArgument, "prompt_token_ids[1]"));
  EXPECT_THAT(engine->Submit(Greedy({1, -1}, 4), c.Sink()),
              StatusIs(absl::StatusCode::kInvalidArgument, "vocabulary"));
  EXPECT_THAT(engine->Submit(Greedy({1}, 0), c.Sink()),
              StatusIs(absl::StatusCode::kInvalidArgument, "max_tokens"));
  GenerationRequest bad = Greedy({1}, 4);
  bad.sampling.temperature = -1;
  EXPECT_THAT(engine->Submit(bad, c.Sink()), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(engine->Submit(Greedy(std::vector<int32_t>(ctx, 1), 1), c.Sink()),
              StatusIs(absl::StatusCode::kResourceExhausted, "context length"));
  EXPECT_THAT(engine->Submit(Greedy({1, 2}, static_cast<int32_t>(ctx)), c.Sink()),
              StatusIs(absl::StatusCode::kResourceExhausted, "context length"));
  // 8 blocks of 16 = 128 slots: 200 tokens never fit.
  EXPECT_THAT(engine->Submit(Greedy({1}, 200), c.Sink()),
              StatusIs(absl::StatusCode::kResourceExhausted, "KV blocks"));
  EXPECT_EQ(engine->Stats().waiting, 0);
}

TEST_F(EngineTest, StopStringsStopIdsAndEos) {
  auto engine = MakeEngine({});
  Collector c;
  GenerationRequest a = Greedy({1}, 60);
  a.stop = {" Lily"};
  GenerationRequest b = Greedy({1}, 60);
  b.stop_token_ids = {GoldenIds()[3]};     // "▁time"
  GenerationRequest d = Greedy({1}, 400);  // runs into EOS
  ASSERT_OK_AND_ASSIGN(RequestId ia, engine->Submit(a, c.Sink()));
  ASSERT_OK_AND_ASSIGN(RequestId ib, engine->Submit(b, c.Sink()));
  ASSERT_OK_AND_ASSIGN(RequestId id, engine->Submit(d, c.Sink()));
  auto results = c.WaitFor(3);
  EXPECT_EQ(results[ia].reason, FinishReason::kStop);
  EXPECT_EQ(results[ia].text, " Once upon a time, there was a little girl named");
  EXPECT_EQ(results[ib].reason, FinishReason::kStop);
  const std::vector<int32_t> golden = GoldenIds();
  EXPECT_EQ(results[ib].ids, std::vector<int32_t>(golden.begin(), golden.begin() + 4));
  EXPECT_EQ(results[ib].text, " Once upon a");
  const std::vector<std::pair<GenerationRequest, RequestId>> all = {{a, ia}, {b, ib}, {d, id}};
  for (const auto& [req, rid] : all) {
    model::GenerateResult solo = Solo(req);
    EXPECT_EQ(results[rid].ids, Ids(solo));
    EXPECT_EQ(results[rid].text, solo.text);
    EXPECT_EQ(FinishReasonName(results[rid].reason), solo.finish_reason);
  }
}

TEST_F(EngineTest, SameSeedSameSamplesAndLogprobsOnlyWhenAsked) {
  auto engine = MakeEngine({});
  Collector c;
  GenerationRequest r = Greedy({1}, 40);
  r.ignore_eos = true;
  r.sampling.temperature = 1.0f;
  r.sampling.top_p = 0.9f;
  r.sampling.seed = 1234;
  GenerationRequest other = r;
  other.sampling.seed = 99;
  GenerationRequest with_lp = r;
  with_lp.sampling.logprobs = 3;
  ASSERT_OK_AND_ASSIGN(RequestId i1, engine->Submit(r, c.Sink()));
  ASSERT_OK_AND_ASSIGN(RequestId i2, engine->Submit(r, c.Sink()));
  ASSERT_OK_AND_ASSIGN(RequestId i3, engine->Submit(other, c.Sink()));
  ASSERT_OK_AND_ASSIGN(RequestId i4, engine->Submit(with_lp, c.Sink()));
  auto results = c.WaitFor(4);
  EXPECT_EQ(results[i1].ids, results[i2].ids);
  EXPECT_NE(results[i1].ids, results[i3].ids);
  EXPECT_EQ(results[i1].ids, results[i4].ids);  // logprobs do not change sampling
  EXPECT_EQ(results[i1].ids, Ids(Solo(r)));
  for (const GeneratedToken& t : results[i1].tokens) EXPECT_TRUE(t.top.empty());
  model::GenerateResult solo = Solo(with_lp);
  ASSERT_EQ(results[i4].tokens.size(), solo.tokens.size());
  for (size_t i = 0; i < solo.tokens.size(); ++i) {
    const GeneratedToken& t = results[i4].tokens[i];
    ASSERT_EQ(t.top.size(), 3u);
    EXPECT_GE(t.top[0].logprob, t.top[1].logprob);
    EXPECT_LE(t.logprob, 0.0f);
    EXPECT_NEAR(t.logprob, solo.tokens[i].logprob, 1e-5);
  }
}

TEST_F(EngineTest, ShutdownCancelsWhatIsInFlightAndRefusesNewWork) {
  auto engine = MakeEngine({});
  Collector c;
  GenerationRequest r = Greedy({1}, 400);
  r.ignore_eos = true;
  ASSERT_OK(engine->Submit(r, c.Sink()));
  ASSERT_TRUE(c.Next().has_value());
  engine->Shutdown();
  auto results = c.WaitFor(1);
  ASSERT_EQ(results.size(), 1u);
  EXPECT_EQ(results.begin()->second.reason, FinishReason::kCancelled);
  EXPECT_THAT(engine->Submit(r, c.Sink()), StatusIs(absl::StatusCode::kUnavailable));
}

// A finished request has given its adapter's lease back by the time its final output reaches the
// caller: an adapter unloaded while the request ran is gone from the registry then, not still
// listed DRAINING (a client that saw the end and then listed the adapters raced the engine).
TEST_F(EngineTest, TheAdapterLeaseIsBackBeforeTheFinalOutput) {
  const std::string root = loraplex::testing::MakeTempDir("lp-engine-lease");
  absl::Cleanup remove_root = [&] { fs::remove_all(root); };
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<adapters::AdapterRegistry> registry,
                       OpenRegistryWithQv(root));
  auto engine = MakeEngine({});
  GenerationRequest r = Greedy({1}, 8);
  r.ignore_eos = true;
  ASSERT_OK_AND_ASSIGN(r.adapter, registry->Acquire("qv"));
  // Atomic: TSan cannot see the ordering absl::Notification gives (Abseil is not instrumented).
  std::atomic<size_t> listed_at_the_end{99};
  absl::Notification unloaded, finished;
  OutputSink sink = [&](StepOutput out) {
    // The first output waits (on the engine thread) until the adapter is unloaded, so the request
    // surely holds the lease of a DRAINING version when it finishes.
    unloaded.WaitForNotificationWithTimeout(absl::Seconds(60));
    if (!out.finished) return;
    listed_at_the_end = registry->List().size();
    finished.Notify();
  };
  ASSERT_OK_AND_ASSIGN(RequestId id, engine->Submit(std::move(r), sink));
  (void)id;
  ASSERT_OK_AND_ASSIGN(adapters::AdapterInfo info, registry->Unload("qv"));
  EXPECT_EQ(info.state, adapters::AdapterState::kDraining);
  unloaded.Notify();
  ASSERT_TRUE(finished.WaitForNotificationWithTimeout(absl::Seconds(60)));
  EXPECT_EQ(listed_at_the_end.load(), 0u) << "the finished request still held its adapter's lease";
}

// The merge policy's measurements: every token that takes an adapter's delta counts one LoRA
// pass (the last sampled token is never fed), base tokens none, and the CPU times the passes.
TEST_F(EngineTest, LoraPassesAreCountedAndTimed) {
  const std::string root = loraplex::testing::MakeTempDir("lp-engine-lora-cost");
  absl::Cleanup remove_root = [&] { fs::remove_all(root); };
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<adapters::AdapterRegistry> registry,
                       OpenRegistryWithQv(root));
  auto engine = MakeEngine({});
  // The model's counters are cumulative, and the model is shared by the suite's tests.
  const model::LlamaModel::LoraCost before = model_->lora_cost();
  GenerationRequest with = Greedy({1, 5, 9, 13, 17}, 8);
  with.ignore_eos = true;
  ASSERT_OK_AND_ASSIGN(with.adapter, registry->Acquire("qv"));
  GenerationRequest base = Greedy({1, 5, 9}, 8);
  base.ignore_eos = true;
  const std::vector<Result> results = RunAll(*engine, {with, base});
  ASSERT_EQ(results.size(), 2u);
  const EngineStats s = WaitForNoBlocks(*engine);
  EXPECT_EQ(s.lora_token_passes - before.token_passes, 5 + 7);
  EXPECT_GT(s.lora_seconds, before.seconds);
}

// The prefix cache over the real model. One script of requests sharing a system prompt, run one
// at a time on an engine with the cache and on one without: the greedy tokens are identical in
// every phase (base and adapter requests; the adapter merged; a replaced version), the cached
// engine finds the shared blocks, and a request never finds blocks of another adapter, another
// version or another merge state.
TEST_F(EngineTest, PrefixCacheReusesBlocksExactlyPerAdapterVersionAndMergeState) {
  const std::string root = loraplex::testing::MakeTempDir("lp-engine-prefix");
  absl::Cleanup remove_root = [&] { fs::remove_all(root); };
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<adapters::AdapterRegistry> registry,
                       OpenRegistryWithQv(root));

  const std::vector<int32_t> story = GoldenIds();
  const std::vector<int32_t> system(story.begin(), story.begin() + 26);  // 6 blocks of 4, and 2
  auto turn = [&](int i) {
    std::vector<int32_t> p = {1};
    p.insert(p.end(), system.begin(), system.end());
    p.push_back(story[30 + i]);
    p.push_back(story[40 + 2 * i]);
    return p;
  };
  struct Step {
    std::string adapter;  // "" base
    int turn;
    int64_t hit_tokens;  // what the cached engine must find
  };
  // Phases: unmerged; qv merged; qv replaced by version 2 (unmerged).
  const std::vector<std::vector<Step>> phases = {
      {{"", 0, 0}, {"", 1, 24}, {"qv", 0, 0}, {"qv", 2, 24}, {"", 2, 24}},
      {{"", 3, 0}, {"", 4, 24}, {"qv", 3, 0}, {"qv", 4, 24}},
      {{"qv", 5, 0}, {"qv", 6, 24}, {"", 5, 24}}};

  auto run = [&](bool prefix_cache, std::vector<std::vector<int32_t>>* outputs) {
    auto engine = MakeEngine({.kv_block_size = 4, .prefix_cache = prefix_cache});
    ASSERT_NE(engine, nullptr);
    for (size_t ph = 0; ph < phases.size(); ++ph) {
      std::shared_ptr<const adapters::Lease> merged;
      if (ph == 1) {
        ASSERT_OK_AND_ASSIGN(merged, registry->Acquire("qv"));
        ASSERT_OK(engine->RunOnEngineThread(
            [&](model::LlamaModel& m) { return m.Merge(&merged->view()); }));
      }
      for (const Step& step : phases[ph]) {
        GenerationRequest r = Greedy(turn(step.turn), 12);
        r.ignore_eos = true;
        if (!step.adapter.empty()) {
          ASSERT_OK_AND_ASSIGN(r.adapter, registry->Acquire(step.adapter));
        }
        const int64_t before = engine->Stats().prefix_cache_hit_tokens;
        Collector c;
        ASSERT_OK_AND_ASSIGN(RequestId id, engine->Submit(std::move(r), c.Sink()));
        outputs->push_back(c.WaitFor(1)[id].ids);
        const EngineStats s = WaitForNoBlocks(*engine);
        EXPECT_EQ(s.prefix_cache_hit_tokens - before, prefix_cache ? step.hit_tokens : 0)
            << "phase " << ph << ", adapter '" << step.adapter << "', turn " << step.turn;
      }
      if (ph == 1) {
        ASSERT_OK(engine->RunOnEngineThread([](model::LlamaModel& m) { return m.Unmerge(); }));
        // A new version of qv for the last phase.
        ASSERT_OK(
            registry->RegisterFromDir("qv", QvDir(), /*replace=*/true, /*pin=*/false).status());
      }
    }
    const EngineStats s = engine->Stats();
    if (prefix_cache) {
      EXPECT_GT(s.prefix_cache_blocks, 0);
      EXPECT_GT(s.prefix_cache_lookup_tokens, s.prefix_cache_hit_tokens);
    } else {
      EXPECT_EQ(s.prefix_cache_blocks, 0);
      EXPECT_EQ(s.prefix_cache_lookup_tokens, 0);
    }
    EXPECT_EQ(s.kv_blocks_used, 0);
    EXPECT_EQ(s.kv_blocks_free, s.kv_blocks_total);
  };
  std::vector<std::vector<int32_t>> cached, uncached;
  run(false, &uncached);
  run(true, &cached);
  ASSERT_EQ(cached.size(), uncached.size());
  for (size_t i = 0; i < cached.size(); ++i) {
    EXPECT_EQ(cached[i], uncached[i]) << "request " << i;
    EXPECT_EQ(cached[i].size(), 12u);
  }
  // The adapter is exercised: its tokens differ from the base model's somewhere.
  EXPECT_NE(uncached[0], uncached[2]);
}

// A merge prepared on another thread while steps run (what the adapter service does) and swapped
// in between two steps serves as a merge made between steps does; the steps in flight meanwhile
// run to the end.
TEST_F(EngineTest, AMergePreparedWhileStepsRunServesAsAMergeBetweenSteps) {
  const std::string root = loraplex::testing::MakeTempDir("lp-engine-prepared-merge");
  absl::Cleanup remove_root = [&] { fs::remove_all(root); };
  ASSERT_OK_AND_ASSIGN(std::unique_ptr<adapters::AdapterRegistry> registry,
                       OpenRegistryWithQv(root));
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const adapters::Lease> merged, registry->Acquire("qv"));
  const std::vector<int32_t> story = GoldenIds();
  auto requests = [&]() -> absl::StatusOr<std::vector<GenerationRequest>> {
    std::vector<GenerationRequest> reqs;
    for (int i = 0; i < 4; ++i) {
      GenerationRequest r = Greedy({1, story[10 + i], story[20 + i]}, 16);
      r.ignore_eos = true;
      if (i % 2 == 1) {
        LP_ASSIGN_OR_RETURN(r.adapter, registry->Acquire("qv"));
      }
      reqs.push_back(std::move(r));
    }
    return reqs;
  };

  // Merged between steps, by the engine thread alone.
  std::vector<Result> expected;
  {
    auto engine = MakeEngine({});
    ASSERT_NE(engine, nullptr);
    ASSERT_OK(
        engine->RunOnEngineThread([&](model::LlamaModel& m) { return m.Merge(&merged->view()); }));
    ASSERT_OK_AND_ASSIGN(std::vector<GenerationRequest> reqs, requests());
    expected = RunAll(*engine, reqs);
    ASSERT_OK(engine->RunOnEngineThread([](model::LlamaModel& m) { return m.Unmerge(); }));
  }

  auto engine = MakeEngine({});
  ASSERT_NE(engine, nullptr);
  Collector busy;
  std::vector<RequestId> in_flight;
  for (int i = 0; i < 3; ++i) {
    GenerationRequest r = Greedy({1, story[i]}, 200);
    r.ignore_eos = true;
    if (i == 1) {
      ASSERT_OK_AND_ASSIGN(r.adapter, registry->Acquire("qv"));
    }
    ASSERT_OK_AND_ASSIGN(RequestId id, engine->Submit(std::move(r), busy.Sink()));
    in_flight.push_back(id);
  }
  ASSERT_TRUE(busy.Next().has_value());  // steps are running
  ASSERT_OK_AND_ASSIGN(model::LlamaModel::PreparedMerge prepared,
                       engine->model().PrepareMerge(&merged->view()));
  ASSERT_OK(engine->RunOnEngineThread(
      [&](model::LlamaModel& m) { return m.Merge(std::move(prepared)); }));
  EXPECT_EQ(engine->model().merged(), &merged->view());
  std::map<RequestId, Result> finished = busy.WaitFor(in_flight.size());
  for (RequestId id : in_flight) {
    EXPECT_EQ(finished[id].reason, FinishReason::kLength) << "request " << id;
  }
  ASSERT_OK_AND_ASSIGN(std::vector<GenerationRequest> reqs, requests());
  const std::vector<Result> got = RunAll(*engine, reqs);
  ASSERT_EQ(got.size(), expected.size());
  for (size_t i = 0; i < got.size(); ++i) {
    EXPECT_EQ(got[i].ids, expected[i].ids) << "request " << i;
    EXPECT_EQ(got[i].ids.size(), 16u);
  }
  EXPECT_NE(expected[0].ids, expected[1].ids);  // the adapter changes what is generated
  ASSERT_OK(engine->RunOnEngineThread([](model::LlamaModel& m) { return m.Unmerge(); }));
}

// Many requests sharing a prefix at once, under a cache too small for all of them: blocks are
// shared while held, evicted when idle, preemption recomputes, and every result is exact.
TEST_F(EngineTest, PrefixCacheUnderMemoryPressureKeepsResultsExact) {
  auto engine =
      MakeEngine({.max_batch_tokens = 32, .max_running = 8, .kv_block_size = 4, .kv_blocks = 24});
  const std::vector<int32_t> story = GoldenIds();
  std::vector<GenerationRequest> reqs;
  for (int i = 0; i < 16; ++i) {
    std::vector<int32_t> prompt = {1};
    // Four families of prompts: 9, 13, 17 and 21 shared tokens, then one of their own.
    prompt.insert(prompt.end(), story.begin(), story.begin() + 8 + 4 * (i % 4));
    prompt.push_back(story[40 + i]);
    GenerationRequest r = Greedy(prompt, 20);
    r.ignore_eos = true;
    reqs.push_back(r);
  }
  ExpectEachAsAlone(*engine, reqs);
  const EngineStats s = WaitForNoBlocks(*engine);
  EXPECT_GT(s.prefix_cache_hit_tokens, 0);
  EXPECT_GT(s.preemptions, 0) << "the test meant to exercise preemption";
  EXPECT_EQ(s.kv_blocks_used, 0);
  EXPECT_LE(s.prefix_cache_blocks, s.kv_blocks_total);
}

}  // namespace
}  // namespace loraplex::engine
