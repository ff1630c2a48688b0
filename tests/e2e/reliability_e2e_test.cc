// End to end: what impatient clients and adapter churn do to a real loraplex-server (stories260K,
// loopback). Each case provokes one interleaving on purpose, not by luck:
//  - a merge whose adapter is held up on its way back from disk (its adapter_config.json in the
//    state directory made a FIFO) while unloads, loads, lists and generations come: none of them
//    may wait behind it (the server once froze for the 60 s acquire timeout);
//  - uploads cancelled mid-stream, after the last chunk, ended without the end message, cut by a
//    deadline, or with wrong byte counts: nothing is registered and a replaced version stays;
//  - hundreds of streams cancelled at random points, with tiny deadlines, slow readers, streams
//    abandoned unread, beside cancelled uploads: afterwards no KV block or sequence is held and
//    greedy answers still equal their solo runs.
// The server of the sanitizer builds fails these tests on any report (ServerProcess).
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "tests/e2e/admin_e2e.h"
#include "tests/testing/server_process.h"
#include "tests/testing/testing.h"

namespace loraplex {
namespace {

namespace fs = std::filesystem;
using e2e::AdminServer;
using e2e::Authorize;
using e2e::Complete;
using e2e::Fixture;
using e2e::Generated;
using e2e::Load;
using e2e::ReadAll;
using grpc::StatusCode;

constexpr int kTokens = e2e::kGreedyTokens;  // greedy tokens per comparison
// How long an RPC may take while another adapter operation is held up. Generous for a loaded
// 2-core machine under a sanitizer; the freeze this guards against lasted 60 s.
constexpr absl::Duration kLiveness = absl::Seconds(2);

// The fixtures, their offline outputs (computed once) and a scratch area shared by the tests
// (tests/e2e/admin_e2e.h).
class ReliabilityE2eTest : public e2e::AdapterRootTest {
 protected:
  static void SetUpTestSuite() {
    SetUpAdapterRoot("lp-reliability", {"qv", "all_linear", "rank1"}, LP_GENERATE_BINARY, kTokens);
  }
  std::unique_ptr<AdminServer> Start(std::vector<std::string> extra = {}) {
    return StartServer(LP_SERVER_BINARY, std::move(extra));
  }
};

absl::StatusOr<v1::AdapterInfo> Get(AdminServer& s, const std::string& name) {
  v1::AdapterInfo info;
  grpc::Status st = e2e::Get(s, name, &info);
  if (!st.ok()) {
    return absl::Status(static_cast<absl::StatusCode>(st.error_code()), st.error_message());
  }
  return info;
}

// Runs `call` and returns how long it took.
absl::Duration Timed(const std::function<void()>& call) {
  const absl::Time t = absl::Now();
  call();
  return absl::Now() - t;
}

// The engine holds nothing once every call has ended (polled: the last cancellations land within
// a step or two).
void ExpectEngineIdle(AdminServer& s) {
  v1::EngineStats stats;
  for (int i = 0; i < 100; ++i) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    ASSERT_TRUE(s.inference().GetEngineStats(&ctx, {}, &stats).ok());
    if (stats.kv_blocks_used() == 0 && stats.running() == 0 && stats.waiting() == 0) return;
    absl::SleepFor(absl::Milliseconds(50));
  }
  ADD_FAILURE() << "the engine still holds " << stats.kv_blocks_used() << " KV blocks, "
                << stats.running() << " running and " << stats.waiting() << " waiting sequences";
}

// SetAdapterMode(MERGED) for an adapter whose reload is held up must not hold up any other call:
// unloads (which may unmerge), loads, reads and generations all answer within kLiveness. It used
// to wait for the adapter on a gRPC callback thread while holding the merge lock, and an unload
// then blocked the other callback thread on that lock: every call waited for the 60 s timeout.
TEST_F(ReliabilityE2eTest, MergeWaitingForItsAdapterHoldsUpNoOtherCall) {
  auto s = Start({"--max-loaded-adapters=1"});
  ASSERT_TRUE(s->ok());
  ASSERT_TRUE(Load(*s, "slow", "qv").ok());
  ASSERT_TRUE(Load(*s, "other", "rank1").ok());  // the one slot: "slow" goes to disk
  ASSERT_TRUE(Load(*s, "third", "all_linear").ok());
  ASSERT_EQ(Get(*s, "slow")->residency(), v1::DISK);

  const std::string config = dir_ + "/state/adapters/slow/v1/adapter_config.json";
  const std::string text = ReadAll(config);
  ASSERT_TRUE(fs::remove(config));
  ASSERT_EQ(mkfifo(config.c_str(), 0600), 0);

  grpc::Status merged;
  v1::AdapterInfo merged_info;
  std::thread merger([&] {
    grpc::ClientContext ctx;
    Authorize(&ctx);
    v1::SetAdapterModeRequest req;
    req.set_name("slow");
    req.set_mode(v1::MERGED);
    merged = s->admin().SetAdapterMode(&ctx, req, &merged_info);
  });
  absl::SleepFor(absl::Milliseconds(500));  // the merge is waiting for "slow" to come back

  // No ASSERT until the merger is joined: returning early would leave it blocked.
  std::vector<std::pair<std::string, absl::Duration>> took;
  took.emplace_back("UnloadAdapter", Timed([&] {
                      grpc::ClientContext ctx;
                      Authorize(&ctx);
                      v1::UnloadAdapterRequest req;
                      req.set_name("other");
                      v1::UnloadAdapterResponse resp;
                      EXPECT_TRUE(s->admin().UnloadAdapter(&ctx, req, &resp).ok());
                    }));
  took.emplace_back("LoadAdapter", Timed([&] { EXPECT_TRUE(Load(*s, "fourth", "qv").ok()); }));
  took.emplace_back("SetAdapterMode(UNMERGED) of another adapter", Timed([&] {
                      grpc::ClientContext ctx;
                      Authorize(&ctx);
                      v1::SetAdapterModeRequest req;
                      req.set_name("third");
                      req.set_mode(v1::UNMERGED);
                      v1::AdapterInfo info;
                      EXPECT_TRUE(s->admin().SetAdapterMode(&ctx, req, &info).ok());
                    }));
  took.emplace_back("GetAdapter", Timed([&] { EXPECT_TRUE(Get(*s, "third").ok()); }));
  took.emplace_back("ListAdapters", Timed([&] {
                      std::vector<v1::AdapterInfo> list;
                      EXPECT_TRUE(e2e::List(*s, &list).ok());
                    }));
  took.emplace_back("Complete (base)", Timed([&] {
                      Generated g = Complete(*s, "", kTokens, 20);
                      EXPECT_TRUE(g.status.ok()) << g.status.error_message();
                      EXPECT_EQ(g.ids, Expected("base"));
                    }));
  took.emplace_back("GetEngineStats", Timed([&] {
                      grpc::ClientContext ctx;
                      v1::EngineStats stats;
                      EXPECT_TRUE(s->inference().GetEngineStats(&ctx, {}, &stats).ok());
                    }));
  for (const auto& [call, d] : took) {
    EXPECT_LT(d, kLiveness) << call << " waited behind the held-up merge";
  }

  // Let the reload go on.
  e2e::FeedFifo(*s, config, text);
  merger.join();
  ASSERT_TRUE(merged.ok()) << merged.error_message();
  EXPECT_TRUE(merged_info.merged());
  EXPECT_TRUE(Get(*s, "slow")->merged());
  Generated g = Complete(*s, "slow");
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.ids, Expected("qv"));
  EXPECT_EQ(Complete(*s, "").ids, Expected("base"));  // mixed mode: the base still unmerged
}

// How an upload stream ends in the cases below.
enum class UploadEnding {
  kCancelMidStream,       // TryCancel after half of the chunks
  kCancelAfterLastChunk,  // TryCancel after every chunk, before the end message
  kCancelAfterEnd,        // TryCancel after the end message, without a half-close (racy)
  kHalfCloseWithoutEnd,   // every chunk, then WritesDone without the end message
  kDeadlineMidStream,     // a 300 ms deadline, chunks sent slower than that
  kWrongByteCount,        // the end message counts one byte too many
};

grpc::Status UploadEndingWith(AdminServer& s, const std::string& name, const std::string& dir,
                              bool replace, UploadEnding ending) {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  if (ending == UploadEnding::kDeadlineMidStream) {
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(300));
  }
  v1::AdapterInfo info;
  auto writer = s.admin().UploadAdapter(&ctx, &info);
  std::vector<v1::UploadAdapterRequest> messages = e2e::UploadMessages(name, dir, replace, "");
  v1::UploadAdapterRequest end = messages.back();
  messages.pop_back();
  if (ending == UploadEnding::kWrongByteCount) {
    end.mutable_end()->set_model_bytes(end.end().model_bytes() + 1);
  }
  const size_t half = messages.size() / 2;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (ending == UploadEnding::kCancelMidStream && i == half) break;
    if (ending == UploadEnding::kDeadlineMidStream && i == half) {
      absl::SleepFor(absl::Milliseconds(600));
    }
    if (!writer->Write(messages[i])) break;
  }
  switch (ending) {
    case UploadEnding::kCancelMidStream:
    case UploadEnding::kCancelAfterLastChunk:
      absl::SleepFor(absl::Milliseconds(100));  // the chunks are in the server
      ctx.TryCancel();
      break;
    case UploadEnding::kCancelAfterEnd:
      writer->Write(end);
      absl::SleepFor(absl::Milliseconds(100));
      ctx.TryCancel();
      break;
    case UploadEnding::kHalfCloseWithoutEnd:
    case UploadEnding::kDeadlineMidStream:
      writer->WritesDone();
      break;
    case UploadEnding::kWrongByteCount:
      writer->Write(end);
      writer->WritesDone();
      break;
  }
  return writer->Finish();
}

// An upload that did not end with the end message and a half-close is discarded: the client's
// code says why, no version appears (nor replaces the current one), and nothing stays in staging.
TEST_F(ReliabilityE2eTest, UploadsThatDoNotFinishAreDiscarded) {
  auto s = Start();
  ASSERT_TRUE(s->ok());
  ASSERT_TRUE(e2e::Upload(*s, "p", Fixture("qv"), false, "auto").ok());
  const std::string qv_sha = Get(*s, "p")->sha256();

  const struct {
    UploadEnding ending;
    const char* what;
    StatusCode code;
  } cases[] = {
      {UploadEnding::kCancelMidStream, "cancelled mid-stream", StatusCode::CANCELLED},
      {UploadEnding::kCancelAfterLastChunk, "cancelled after the last chunk",
       StatusCode::CANCELLED},
      {UploadEnding::kHalfCloseWithoutEnd, "half-closed without the end message",
       StatusCode::INVALID_ARGUMENT},
      {UploadEnding::kDeadlineMidStream, "past its deadline", StatusCode::DEADLINE_EXCEEDED},
      {UploadEnding::kWrongByteCount, "with a wrong byte count", StatusCode::INVALID_ARGUMENT},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.what);
    // A new name and a replacement of "p", each ended this way.
    grpc::Status fresh = UploadEndingWith(*s, "fresh", Fixture("all_linear"), false, c.ending);
    EXPECT_EQ(fresh.error_code(), c.code) << fresh.error_message();
    grpc::Status replaced = UploadEndingWith(*s, "p", Fixture("all_linear"), true, c.ending);
    EXPECT_EQ(replaced.error_code(), c.code) << replaced.error_message();
    // The server may still be discarding when the client has its status.
    absl::SleepFor(absl::Milliseconds(200));
    EXPECT_EQ(Get(*s, "fresh").status().code(), absl::StatusCode::kNotFound);
    absl::StatusOr<v1::AdapterInfo> p = Get(*s, "p");
    ASSERT_TRUE(p.ok()) << p.status();
    EXPECT_EQ(p->version(), 1);
    EXPECT_EQ(p->sha256(), qv_sha);
    Generated g = Complete(*s, "p");
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    EXPECT_EQ(g.ids, Expected("qv"));
    EXPECT_EQ(g.version, 1);
  }
  // A cancel after the end message races with the commit that message asked for, as for any
  // call cancelled after the server has all of it: discarded when the server sees the cancel
  // before the manifest's rename, else registered whole. Either way the client sees CANCELLED.
  for (int i = 0; i < 5; ++i) {
    const std::string name = absl::StrCat("late", i);
    grpc::Status late =
        UploadEndingWith(*s, name, Fixture("all_linear"), false, UploadEnding::kCancelAfterEnd);
    EXPECT_EQ(late.error_code(), StatusCode::CANCELLED) << late.error_message();
    absl::SleepFor(absl::Milliseconds(200));
    absl::StatusOr<v1::AdapterInfo> got = Get(*s, name);
    if (got.ok()) {
      Generated g = Complete(*s, name);
      EXPECT_EQ(g.ids, Expected("all_linear")) << name << " was registered, but not whole";
    } else {
      EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound) << got.status();
    }
  }
  EXPECT_TRUE(fs::is_empty(dir_ + "/state/staging"));
  // A whole upload still works after all that.
  ASSERT_TRUE(e2e::Upload(*s, "p", Fixture("all_linear"), true, "auto").ok());
  Generated g = Complete(*s, "p");
  EXPECT_EQ(g.version, 2);
  EXPECT_EQ(g.ids, Expected("all_linear"));
}

// What one client thread of the stress case does with one stream.
enum class Impatience { kCancelAfterTokens, kTinyDeadline, kSlowReader, kAbandoned, kPatient };

// Hundreds of Generate streams, each ended a seeded way (cancelled after 0-8 tokens, a 1-30 ms
// deadline, read slowly, abandoned unread, or read to the end), beside uploads cancelled mid-stream
// and after their last chunk. The server survives, answers every patient greedy stream with its
// solo run, holds no KV block or sequence afterwards, registers none of the cancelled uploads, and
// (under a sanitizer) reports nothing.
TEST_F(ReliabilityE2eTest, ImpatientClientsAndCancelledUploadsHarmNothing) {
  auto s = Start({"--max-running=16", "--kv-blocks=64"});
  ASSERT_TRUE(s->ok());
  ASSERT_TRUE(Load(*s, "a", "qv").ok());
  ASSERT_TRUE(Load(*s, "b", "all_linear").ok());
  const uint32_t seed = 20261206;
  std::printf("stress seed %u\n", seed);

  constexpr int kThreads = 6;
  constexpr int kStreamsPerThread = 40;
  std::atomic<int> patient_ok{0}, mismatches{0}, unexpected{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(seed + t);
      for (int i = 0; i < kStreamsPerThread; ++i) {
        const auto kind = static_cast<Impatience>(rng() % 5);
        const std::string adapter = std::vector<std::string>{"", "a", "b"}[rng() % 3];
        v1::GenerateRequest req = e2e::GreedyRequest(adapter, kTokens);
        grpc::ClientContext ctx;
        const int deadline_ms = kind == Impatience::kTinyDeadline ? 1 + rng() % 30 : 60000;
        ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(deadline_ms));
        auto reader = s->inference().Generate(&ctx, req);
        const int cancel_after = static_cast<int>(rng() % 9);
        std::vector<int32_t> ids;
        v1::GenerateResponse resp;
        if (kind == Impatience::kAbandoned) {
          ctx.TryCancel();  // never reads a message
        } else {
          while (reader->Read(&resp)) {
            ids.insert(ids.end(), resp.token_ids().begin(), resp.token_ids().end());
            if (kind == Impatience::kSlowReader) absl::SleepFor(absl::Milliseconds(5));
            if (kind == Impatience::kCancelAfterTokens &&
                static_cast<int>(ids.size()) >= cancel_after) {
              ctx.TryCancel();
              break;
            }
          }
        }
        grpc::Status st = reader->Finish();
        const bool should_finish = kind == Impatience::kPatient || kind == Impatience::kSlowReader;
        if (should_finish) {
          if (!st.ok()) {
            ++unexpected;
            ADD_FAILURE() << "stream " << t << "/" << i << ": " << st.error_message();
          } else if (ids != Expected(adapter.empty()  ? "base"
                                     : adapter == "a" ? "qv"
                                                      : "all_linear")) {
            ++mismatches;
          } else {
            ++patient_ok;
          }
        } else if (!st.ok() && st.error_code() != StatusCode::CANCELLED &&
                   st.error_code() != StatusCode::DEADLINE_EXCEEDED) {
          ++unexpected;
          ADD_FAILURE() << "stream " << t << "/" << i << ": " << st.error_code() << " "
                        << st.error_message();
        }
      }
    });
  }
  // Beside them: uploads that never finish.
  std::thread uploader([&] {
    for (int i = 0; i < 10; ++i) {
      const UploadEnding ending =
          i % 2 == 0 ? UploadEnding::kCancelMidStream : UploadEnding::kCancelAfterLastChunk;
      grpc::Status st = UploadEndingWith(*s, absl::StrCat("u", i), Fixture("rank1"), false, ending);
      EXPECT_EQ(st.error_code(), StatusCode::CANCELLED) << st.error_message();
      st = UploadEndingWith(*s, "a", Fixture("rank1"), true, ending);
      EXPECT_EQ(st.error_code(), StatusCode::CANCELLED) << st.error_message();
    }
  });
  for (std::thread& t : threads) t.join();
  uploader.join();
  std::printf("patient streams equal to their solo runs: %d, mismatches %d, unexpected codes %d\n",
              patient_ok.load(), mismatches.load(), unexpected.load());
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_GT(patient_ok.load(), 0);

  ExpectEngineIdle(*s);
  for (int i = 0; i < 10; ++i) {
    EXPECT_EQ(Get(*s, absl::StrCat("u", i)).status().code(), absl::StatusCode::kNotFound);
  }
  EXPECT_EQ(Get(*s, "a")->version(), 1);
  Generated g = Complete(*s, "a");
  ASSERT_TRUE(g.status.ok()) << g.status.error_message();
  EXPECT_EQ(g.ids, Expected("qv"));
  EXPECT_EQ(Complete(*s, "b").ids, Expected("all_linear"));
  EXPECT_EQ(Complete(*s, "").ids, Expected("base"));
}

// Weighted mixes under memory pressure: with room for one adapter in memory, mixes of two of
// three adapters, single-adapter requests and base requests run together, some cancelled early.
// A mix copies each part as its lease arrives and lets it go before asking for the next, so no
// mix holds an adapter while it waits for room: every patient request finishes with its offline
// output (a mix stuck holding one part would end RESOURCE_EXHAUSTED after the 60 s acquire
// timeout), and the engine holds nothing afterwards.
TEST_F(ReliabilityE2eTest, MixesUnderEvictionNeitherStallNorLeak) {
  auto s = Start({"--max-running=16", "--max-loaded-adapters=1"});
  ASSERT_TRUE(s->ok());
  const std::vector<std::pair<std::string, std::string>> names = {
      {"a", "qv"}, {"b", "all_linear"}, {"c", "rank1"}};
  for (const auto& [name, folder] : names) ASSERT_TRUE(Load(*s, name, folder).ok());
  struct Mix {
    std::string x, y;
    std::vector<int32_t> expected;
  };
  std::vector<Mix> mixes = {{"a", "b", {}}, {"b", "c", {}}, {"c", "a", {}}};
  for (Mix& m : mixes) {
    auto folder = [&](const std::string& n) {
      for (const auto& [name, f] : names) {
        if (name == n) return Fixture(f);
      }
      return std::string();
    };
    m.expected = testing::Stories260KGreedyIds(
        LP_GENERATE_BINARY,
        folder(m.x) + " --adapter " + folder(m.y) + " --adapter-weights 0.6,0.8", kTokens);
    ASSERT_EQ(m.expected.size(), static_cast<size_t>(kTokens));
  }
  std::atomic<int> ok{0}, mismatches{0}, unexpected{0};
  const absl::Time start = absl::Now();
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937 rng(77 + t);
      for (int i = 0; i < 12; ++i) {
        const int kind = static_cast<int>(rng() % 5);  // 0-2: a mix, 3: one adapter, 4: base
        v1::GenerateRequest req = e2e::GreedyRequest("", kTokens);
        std::vector<int32_t> expected = Expected("base");
        if (kind < 3) {
          auto* p = req.add_adapters();
          p->set_name(mixes[kind].x);
          p->set_weight(0.6f);
          p = req.add_adapters();
          p->set_name(mixes[kind].y);
          p->set_weight(0.8f);
          expected = mixes[kind].expected;
        } else if (kind == 3) {
          const auto& [name, folder] = names[rng() % names.size()];
          req.set_adapter(name);
          expected = Expected(folder);
        }
        const bool impatient = rng() % 4 == 0;
        grpc::ClientContext ctx;
        ctx.set_deadline(std::chrono::system_clock::now() +
                         std::chrono::milliseconds(impatient ? 1 + rng() % 40 : 60000));
        v1::GenerateResponse resp;
        grpc::Status st = s->inference().Complete(&ctx, req, &resp);
        if (impatient) {
          if (!st.ok() && st.error_code() != StatusCode::DEADLINE_EXCEEDED) {
            ++unexpected;
            ADD_FAILURE() << st.error_code() << " " << st.error_message();
          }
          continue;
        }
        if (!st.ok()) {
          ++unexpected;
          ADD_FAILURE() << "request " << t << "/" << i << ": " << st.error_code() << " "
                        << st.error_message();
        } else if (std::vector<int32_t>(resp.token_ids().begin(), resp.token_ids().end()) !=
                   expected) {
          ++mismatches;
        } else {
          ++ok;
        }
      }
    });
  }
  for (std::thread& t : threads) t.join();
  const absl::Duration took = absl::Now() - start;
  std::printf("mixes under eviction: %d equal to offline, %d mismatches, %d unexpected, %s\n",
              ok.load(), mismatches.load(), unexpected.load(), absl::FormatDuration(took).c_str());
  EXPECT_EQ(mismatches.load(), 0);
  EXPECT_EQ(unexpected.load(), 0);
  EXPECT_GT(ok.load(), 0);
  ExpectEngineIdle(*s);
  v1::AdapterInfo info;
  for (const auto& [name, folder] : names) {
    ASSERT_TRUE(e2e::Get(*s, name, &info).ok());
    EXPECT_EQ(info.version(), 1);
  }
}

}  // namespace
}  // namespace loraplex
