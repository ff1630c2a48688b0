// End to end: crash consistency of the adapter state directory (docs/operations.md, "The state
// directory") against a real loraplex-server on stories260K.
//
// KillNineAtRandomPointsServesWhatReturnedOk: one state directory, one server after another, each
// killed with SIGKILL at a random (seeded, printed) point of a random sequence of uploads,
// replaces, loads by path, unloads and merges/unmerges: right after the K-th acknowledged
// operation, after a random delay, in the middle of an upload stream (or just after its last
// message, while it commits), or a random few milliseconds after an operation was sent. After
// every restart: the server starts; every operation acknowledged OK is there (names, versions,
// sha256 of adapter_model.safetensors, merged); the one operation whose answer the kill cut off
// is either done or not, never half (half the time generations run meanwhile, so replaced and
// unloaded versions are still draining when the kill comes); every listed adapter answers a greedy
// generation equal to loraplex-generate on the fixture it claims (by sha256); the base model is
// unharmed; staging/ is empty and adapters/ holds exactly the listed versions, as manifest.json
// does. LP_CRASH_SEED replays the operations and kill points of a run (where a delay lands depends
// on timing), LP_CRASH_KILLS sets the number of kills (default 150).
//
// The disk faults (a full or failing state directory) are disk_fault_e2e_test.cc; what both share
// is crash_e2e_util.h.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <iostream>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "tests/e2e/crash_e2e_util.h"

namespace loraplex::crash_e2e {
namespace {

enum class OpKind { kUpload, kLoad, kUnload, kMerge, kUnmerge };
const char* OpName(OpKind k) {
  switch (k) {
    case OpKind::kUpload:
      return "upload";
    case OpKind::kLoad:
      return "load";
    case OpKind::kUnload:
      return "unload";
    case OpKind::kMerge:
      return "merge";
    case OpKind::kUnmerge:
      return "unmerge";
  }
  return "?";
}

struct Op {
  OpKind kind = OpKind::kUpload;
  std::string name, folder;
  bool replace = false;
  std::string ToString() const {
    return absl::StrCat(OpName(kind), " ", name, folder.empty() ? "" : " <- " + folder,
                        replace ? " (replace)" : "");
  }
};

// A random operation that must succeed on a live server given the acknowledged state.
Op PickOp(const Registry& now, std::mt19937& rng) {
  auto pick = [&rng](size_t n) { return static_cast<size_t>(rng() % n); };
  static const char* const kNames[] = {"a0", "a1", "a2", "a3", "a4"};
  std::vector<std::string> existing;
  std::string merged;
  for (const auto& [name, r] : now) {
    existing.push_back(name);
    if (r.merged) merged = name;
  }
  Op op;
  const int r = static_cast<int>(rng() % 100);
  if (existing.empty() || r < 55) {  // upload or load, new or replacing
    op.kind = r % 3 == 0 ? OpKind::kLoad : OpKind::kUpload;
    op.name = kNames[pick(std::size(kNames))];
    op.folder = kFolders[pick(std::size(kFolders))];
    // An existing name needs replace; a new one takes either (replace makes version 1 then).
    op.replace = now.count(op.name) > 0 || rng() % 2 == 0;
  } else if (r < 67) {
    op.kind = OpKind::kUnload;
    op.name = existing[pick(existing.size())];
  } else if (r < 87) {
    op.kind = OpKind::kMerge;
    // One merged adapter at a time: merging it again is fine, another one would be refused.
    op.name = merged.empty() ? existing[pick(existing.size())] : merged;
    if (!merged.empty() && rng() % 2 == 0) op.kind = OpKind::kUnmerge;
  } else {
    op.kind = OpKind::kUnmerge;  // also of an unmerged adapter: OK, nothing to do
    op.name = merged.empty() || rng() % 3 == 0 ? existing[pick(existing.size())] : merged;
  }
  return op;
}

// Kills a server once, from whichever thread gets there first.
class Killer {
 public:
  explicit Killer(AdminServer* s) : server_(s) {}
  void Kill() {
    std::lock_guard<std::mutex> lock(mu_);
    if (killed_.load()) return;
    killed_.store(true);  // before the signal: an error seen after it may be the kill's
    server_->Kill();
  }
  bool killed() const { return killed_.load(); }

 private:
  AdminServer* server_;
  std::mutex mu_;
  std::atomic<bool> killed_{false};
};

TEST_F(CrashE2eTest, KillNineAtRandomPointsServesWhatReturnedOk) {
  uint32_t seed = std::random_device()();
  if (const char* s = std::getenv("LP_CRASH_SEED")) seed = static_cast<uint32_t>(std::stoul(s));
  int kills = 150;
  if (const char* k = std::getenv("LP_CRASH_KILLS")) kills = std::stoi(k);
  std::cout << "crash seed " << seed << " (LP_CRASH_SEED=" << seed << " replays it), " << kills
            << " kills" << std::endl;
  RecordProperty("seed", std::to_string(seed));
  std::mt19937 rng(seed);

  enum Mode { kAfterAcks, kAfterDelay, kMidUpload, kJustAfterSend, kModes };
  const char* const kModeNames[] = {"after K acks", "after a delay", "mid-upload",
                                    "just after a send"};
  int64_t checks = 0, acked = 0, cut_off = 0, done_after_cut = 0, merges_restored = 0;
  int64_t by_kind[5] = {0, 0, 0, 0, 0};
  int by_mode[kModes] = {0, 0, 0, 0};
  Registry want;  // the state every acknowledged operation implies
  std::optional<Op> in_flight;
  const absl::Time t0 = absl::Now();
  for (int kill = 0; kill <= kills; ++kill) {
    auto s = Start();
    ASSERT_TRUE(s->ok()) << "restart " << kill << " (seed " << seed << ") after "
                         << (in_flight ? in_flight->ToString() : std::string("no operation"))
                         << " was cut off";
    // What is served now must be what returned OK, plus or minus the operation cut off.
    for (const auto& [name, r] : want) {
      if (r.merged && !(in_flight.has_value() && in_flight->name == name)) ++merges_restored;
    }
    Registry seen;
    if (in_flight.has_value()) {
      const Op& op = *in_flight;
      const bool registers = op.kind == OpKind::kUpload || op.kind == OpKind::kLoad;
      seen = CheckRestarted(*s, want, &checks, op.name, registers ? op.folder : "",
                            op.kind == OpKind::kMerge || op.kind == OpKind::kUnmerge);
      const bool had = want.count(op.name) > 0, has = seen.count(op.name) > 0;
      if (op.kind != OpKind::kUnload) {
        EXPECT_TRUE(!had || has) << op.ToString() << " was cut off and lost " << op.name;
      }
      if (op.kind == OpKind::kMerge && has && had) {
        EXPECT_TRUE(seen[op.name].merged || !want[op.name].merged);
      }
      if (registers && has && (!had || seen[op.name].version != want[op.name].version)) {
        ++done_after_cut;
      }
      if (op.kind == OpKind::kUnload && had && !has) ++done_after_cut;
      if ((op.kind == OpKind::kMerge || op.kind == OpKind::kUnmerge) && had && has &&
          seen[op.name].merged != want[op.name].merged) {
        ++done_after_cut;
      }
    } else {
      seen = CheckRestarted(*s, want, &checks);
    }
    if (HasFailure()) {
      ADD_FAILURE() << "after kill " << kill << " (seed " << seed << "), cut off: "
                    << (in_flight ? in_flight->ToString() : std::string("nothing"))
                    << "\nserver log:\n"
                    << Tail(s->log());
      return;
    }
    want = seen;  // the cut-off operation's outcome is known now
    in_flight.reset();
    if (kill == kills) break;

    // Operations until the kill.
    Killer killer(s.get());
    const Mode mode = static_cast<Mode>(rng() % kModes);
    ++by_mode[mode];
    const int k = static_cast<int>(rng() % 5);  // acks before the kill / the op that is hit
    std::thread delayed;
    if (mode == kAfterDelay) {
      const int ms = static_cast<int>(rng() % 150);
      delayed = std::thread([&killer, ms] {
        std::this_thread::sleep_for(std::chrono::milliseconds(ms));
        killer.Kill();
      });
    }
    // Half the time, generations run meanwhile: their leases keep replaced and unloaded versions
    // draining (their folders still on disk) when the kill comes.
    std::thread traffic;
    if (rng() % 2 == 0) {
      traffic = std::thread([&killer, &s, seed = rng()] {
        std::mt19937 r(seed);
        while (!killer.killed()) Generate(*s, absl::StrCat("a", r() % 5));  // errors are fine
      });
    }
    int acks_here = 0;
    for (int i = 0; !killer.killed(); ++i) {
      if (mode == kAfterAcks && acks_here == k) {
        killer.Kill();
        break;
      }
      if (i >= 40) {  // a delay longer than the operations: kill now
        killer.Kill();
        break;
      }
      Op op = PickOp(want, rng);
      if (mode == kMidUpload && i == k) {
        op.kind = OpKind::kUpload;
        if (op.folder.empty()) {
          op.folder = kFolders[rng() % std::size(kFolders)];
          op.replace = true;
        }
      }
      std::thread sniper;
      if (mode == kJustAfterSend && i == k) {
        const int us = static_cast<int>(rng() % 12000);
        sniper = std::thread([&killer, us] {
          std::this_thread::sleep_for(std::chrono::microseconds(us));
          killer.Kill();
        });
      }
      grpc::Status st;
      v1::AdapterInfo info;
      switch (op.kind) {
        case OpKind::kUpload: {
          std::function<void(int)> step;
          if (mode == kMidUpload && i == k) {
            // A random message of the stream; -1 is after the half-close (during the commit).
            const int messages = 3 + static_cast<int>(F(op.folder).bytes / kChunk);
            // Half the time after the half-close: the kill lands in the commit.
            const int at =
                rng() % 2 == 0 ? -1 : static_cast<int>(rng() % static_cast<uint32_t>(messages));
            const int us = static_cast<int>(rng() % 3000);
            step = [&killer, at, us](int index) {
              if (index != at) return;
              if (at == -1) std::this_thread::sleep_for(std::chrono::microseconds(us));
              killer.Kill();
            };
          }
          st = UploadInChunks(*s, op.name, F(op.folder).dir, op.replace,
                              rng() % 2 == 0 ? F(op.folder).sha256 : "", &info, step);
          break;
        }
        case OpKind::kLoad:
          st = Load(*s, op.name, op.folder, op.replace, &info);
          break;
        case OpKind::kUnload:
          st = Unload(*s, op.name);
          break;
        case OpKind::kMerge:
        case OpKind::kUnmerge:
          st = SetMode(*s, op.name, op.kind == OpKind::kMerge, &info);
          break;
      }
      if (sniper.joinable()) sniper.join();
      if (!st.ok()) {
        if (killer.killed()) {  // cut off: done or not, the restart tells
          in_flight = op;
          ++cut_off;
          break;
        }
        ADD_FAILURE() << op.ToString() << " failed on a live server: " << Describe(st);
        killer.Kill();
        break;
      }
      // Acknowledged: it must survive any kill from now on.
      ++acked;
      ++acks_here;
      ++by_kind[static_cast<int>(op.kind)];
      ++checks;
      switch (op.kind) {
        case OpKind::kUpload:
        case OpKind::kLoad: {
          EXPECT_EQ(info.sha256(), F(op.folder).sha256) << op.ToString();
          EXPECT_EQ(info.name(), op.name);
          EXPECT_FALSE(info.merged()) << op.ToString() << ": a new version starts unmerged";
          if (auto it = want.find(op.name); it != want.end()) {
            EXPECT_GT(info.version(), it->second.version) << op.ToString();
          }
          want[op.name] = {info.version(), info.sha256(), false};
          break;
        }
        case OpKind::kUnload:
          want.erase(op.name);
          break;
        case OpKind::kMerge:
        case OpKind::kUnmerge:
          EXPECT_EQ(info.merged(), op.kind == OpKind::kMerge) << op.ToString();
          want[op.name].merged = op.kind == OpKind::kMerge;
          break;
      }
    }
    if (delayed.joinable()) delayed.join();
    killer.Kill();
    if (traffic.joinable()) traffic.join();
    if (HasFailure()) {
      ADD_FAILURE() << "before kill " << kill + 1 << " (seed " << seed << ")\nserver log:\n"
                    << Tail(s->log());
      return;
    }
  }
  const double seconds = absl::ToDoubleSeconds(absl::Now() - t0);
  std::cout << "crash: " << kills << " kills in " << seconds << " s (modes: ";
  for (int m = 0; m < kModes; ++m)
    std::cout << (m ? ", " : "") << kModeNames[m] << " " << by_mode[m];
  std::cout << "), " << acked << " operations acknowledged (";
  for (int k = 0; k < 5; ++k) {
    std::cout << (k ? ", " : "") << OpName(static_cast<OpKind>(k)) << " " << by_kind[k];
  }
  std::cout << "), " << cut_off << " cut off by the kill (" << done_after_cut
            << " of them done anyway), " << merges_restored << " restarts that had to merge "
            << "again, " << checks << " checks" << std::endl;
  RecordProperty("kills", kills);
  RecordProperty("acknowledged", static_cast<int>(acked));
  RecordProperty("checks", static_cast<int>(checks));
  EXPECT_GE(acked, kills);  // the loop did real work
}

}  // namespace
}  // namespace loraplex::crash_e2e
