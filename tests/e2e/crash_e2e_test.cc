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
// unloaded versions are still draining when the kill comes); every listed adapter answers a greedy generation equal to
// loraplex-generate on the fixture it claims (by sha256); the base model is unharmed; staging/
// is empty and adapters/ holds exactly the listed versions, as manifest.json does. LP_CRASH_SEED
// replays the operations and kill points of a run (where a delay lands depends on timing),
// LP_CRASH_KILLS sets the number of kills (default 150).
//
// FullTmpfsStateDir... and InjectedWriteFaults...: a state directory that runs out of space (a
// small tmpfs; skipped when mount is not permitted) and one whose writes, fsyncs, renames and
// file creations fail (the LD_PRELOAD interposer tests/e2e/fault_inject.cc): registrations that
// hit the fault fail with FAILED_PRECONDITION naming it (the code every disk error of the registry
// has: the server's disk must be fixed before a retry can succeed), nothing half-written is
// listed or served, the adapters already registered keep serving, the server keeps running, a
// registration succeeds once space is back, and a restart (also one with the fault still on)
// serves everything that returned OK, merged as it was.
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "adapters/manifest.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "loraplex/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/testing/server_process.h"
#include "tests/testing/testing.h"

namespace loraplex {
namespace {

namespace fs = std::filesystem;
using grpc::StatusCode;

constexpr char kToken[] = "crash-admin-token";
constexpr int kTokens = 16;        // greedy tokens per comparison
constexpr size_t kChunk = 8192;    // upload chunk: several chunks per file, so kills land inside
constexpr char kNoSpace[] = "No space left on device";
constexpr char kIoError[] = "Input/output error";

// The fixtures the tests register (tests/fixtures/peft/stories260k): all fit the default limits.
const char* const kFolders[] = {"qv", "all_linear", "rank1", "layers", "regex", "patterns",
                                "rslora"};

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

std::string Tail(const std::string& text, size_t n = 3000) {
  return text.size() <= n ? text : text.substr(text.size() - n);
}

// A loraplex-server child on stories260K with the admin token, `state` as its --state-dir and
// `adapter_dir` as its --adapter-dir; port file and log in `work`. `env` is set for the child only.
class Server {
 public:
  Server(const std::string& work, const std::string& state, const std::string& adapter_dir,
         const std::vector<std::pair<std::string, std::string>>& env = {})
      : process_(Spawn(work, state, adapter_dir, env)) {
    if (!process_->ok()) return;
    auto channel = grpc::CreateChannel(process_->address(), grpc::InsecureChannelCredentials());
    inference_ = v1::Inference::NewStub(channel);
    admin_ = v1::Adapters::NewStub(channel);
  }
  bool ok() const { return process_->ok(); }
  int exit_status() const { return process_->exit_status(); }
  std::string log() const { return process_->log(); }
  void Kill() { process_->Kill(); }
  v1::Inference::Stub& inference() { return *inference_; }
  v1::Adapters::Stub& admin() { return *admin_; }

 private:
  static std::unique_ptr<testing::ServerProcess> Spawn(
      const std::string& work, const std::string& state, const std::string& adapter_dir,
      const std::vector<std::pair<std::string, std::string>>& env) {
    // ServerProcess hands the child this process's environment: set the extra variables around
    // the spawn only.
    std::vector<std::pair<std::string, std::optional<std::string>>> saved;
    for (const auto& [key, value] : env) {
      const char* old = std::getenv(key.c_str());
      saved.emplace_back(key, old != nullptr ? std::optional<std::string>(old) : std::nullopt);
      setenv(key.c_str(), value.c_str(), 1);
    }
    auto p = std::make_unique<testing::ServerProcess>(
        LP_SERVER_BINARY,
        std::vector<std::string>{"--model=" + testing::Stories260KDir() + "/stories260K.gguf",
                                 "--dtype=f32", "--state-dir=" + state,
                                 "--adapter-dir=" + adapter_dir,
                                 std::string("--admin-token=") + kToken},
        work);
    for (const auto& [key, old] : saved) {
      if (old.has_value()) {
        setenv(key.c_str(), old->c_str(), 1);
      } else {
        unsetenv(key.c_str());
      }
    }
    return p;
  }

  std::unique_ptr<testing::ServerProcess> process_;
  std::unique_ptr<v1::Inference::Stub> inference_;
  std::unique_ptr<v1::Adapters::Stub> admin_;
};

void Authorize(grpc::ClientContext* ctx) {
  ctx->AddMetadata("authorization", std::string("Bearer ") + kToken);
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
}

// Uploads the PEFT folder `dir` (header, 8 KiB chunks, end message, half-close). `step` (may be
// empty) runs after each message is written, with its index (0 = header), and once more with -1
// after the half-close, before waiting for the answer.
grpc::Status Upload(Server& s, const std::string& name, const std::string& dir, bool replace,
                    const std::string& sha256, v1::AdapterInfo* info,
                    const std::function<void(int)>& step = nullptr) {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  auto writer = s.admin().UploadAdapter(&ctx, info);
  v1::UploadAdapterRequest header;
  header.mutable_header()->set_name(name);
  header.mutable_header()->set_replace(replace);
  header.mutable_header()->set_sha256(sha256);
  bool open = writer->Write(header);
  int index = 0;
  if (step) step(index);
  v1::UploadAdapterRequest end;
  for (const std::string file : {adapters::kAdapterConfigFile, adapters::kAdapterWeightsFile}) {
    const std::string data = ReadAll(dir + "/" + file);
    for (size_t at = 0; open && at < data.size(); at += kChunk) {
      v1::UploadAdapterRequest chunk;
      chunk.mutable_chunk()->set_file_name(file);
      chunk.mutable_chunk()->set_data(data.substr(at, kChunk));
      open = writer->Write(chunk);
      if (step) step(++index);
    }
    if (file == adapters::kAdapterConfigFile) {
      end.mutable_end()->set_config_bytes(static_cast<int64_t>(data.size()));
    } else {
      end.mutable_end()->set_model_bytes(static_cast<int64_t>(data.size()));
    }
  }
  if (open) open = writer->Write(end);
  if (step) step(++index);
  writer->WritesDone();
  if (step) step(-1);
  return writer->Finish();
}

grpc::Status Load(Server& s, const std::string& name, const std::string& path, bool replace,
                  v1::AdapterInfo* info) {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  v1::LoadAdapterRequest req;
  req.set_name(name);
  req.set_path(path);
  req.set_replace(replace);
  return s.admin().LoadAdapter(&ctx, req, info);
}

grpc::Status Unload(Server& s, const std::string& name) {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  v1::UnloadAdapterRequest req;
  req.set_name(name);
  v1::UnloadAdapterResponse resp;
  return s.admin().UnloadAdapter(&ctx, req, &resp);
}

grpc::Status SetMode(Server& s, const std::string& name, bool merged, v1::AdapterInfo* info) {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  v1::SetAdapterModeRequest req;
  req.set_name(name);
  req.set_mode(merged ? v1::MERGED : v1::UNMERGED);
  return s.admin().SetAdapterMode(&ctx, req, info);
}

grpc::Status Get(Server& s, const std::string& name, v1::AdapterInfo* info) {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  v1::GetAdapterRequest req;
  req.set_name(name);
  return s.admin().GetAdapter(&ctx, req, info);
}

grpc::Status List(Server& s, std::vector<v1::AdapterInfo>* out) {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  v1::ListAdaptersResponse resp;
  grpc::Status st = s.admin().ListAdapters(&ctx, {}, &resp);
  out->assign(resp.adapters().begin(), resp.adapters().end());
  return st;
}

struct Generated {
  grpc::Status status;
  std::vector<int32_t> ids;
  int64_t version = 0;
};

Generated Generate(Server& s, const std::string& adapter) {
  v1::GenerateRequest req;
  req.add_prompt_token_ids(1);
  req.set_max_tokens(kTokens);
  req.set_ignore_eos(true);
  req.set_adapter(adapter);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
  v1::GenerateResponse resp;
  Generated g;
  g.status = s.inference().Complete(&ctx, req, &resp);
  g.ids.assign(resp.token_ids().begin(), resp.token_ids().end());
  g.version = resp.adapter_version();
  return g;
}

std::string Describe(const grpc::Status& st) {
  return absl::StrCat("code ", static_cast<int>(st.error_code()), ": ", st.error_message());
}

// What a registered adapter must look like: the state every acknowledged operation implies.
struct Registered {
  int64_t version = 0;
  std::string sha256;
  bool merged = false;
};
using Registry = std::map<std::string, Registered>;

// The fixtures (copied under the adapter root, so LoadAdapter can name them), their sha256 and
// offline greedy outputs, shared by the tests.
class CrashE2eTest : public ::testing::Test {
 protected:
  struct Fixture {
    std::string dir;  // under root_/adapters
    std::string sha256;
    std::vector<int32_t> ids;  // loraplex-generate --adapter dir
    int64_t bytes = 0;         // both files together
  };

  static void SetUpTestSuite() {
    root_ = new std::string(testing::MakeTempDir("lp-crash"));
    fixtures_ = new std::map<std::string, Fixture>();
    by_sha_ = new std::map<std::string, std::string>();
    fs::create_directories(*root_ + "/adapters");
    for (const char* folder : kFolders) {
      const std::string from = testing::FixturesDir() + "/peft/stories260k/" + folder;
      Fixture f;
      f.dir = *root_ + "/adapters/" + folder;
      fs::copy(from, f.dir);
      const std::string weights = ReadAll(f.dir + "/" + adapters::kAdapterWeightsFile);
      f.sha256 = adapters::Sha256Hex(weights.data(), weights.size());
      f.bytes = static_cast<int64_t>(
          weights.size() + ReadAll(f.dir + "/" + adapters::kAdapterConfigFile).size());
      f.ids = testing::Stories260KGreedyIds(LP_GENERATE_BINARY, f.dir, kTokens);
      (*by_sha_)[f.sha256] = folder;
      (*fixtures_)[folder] = std::move(f);
    }
    base_ids_ = new std::vector<int32_t>(testing::Stories260KGreedyIds(LP_GENERATE_BINARY, "",
                                                                       kTokens));
  }
  static void TearDownTestSuite() {
    std::error_code ec;
    fs::remove_all(*root_, ec);
    delete root_;
    delete fixtures_;
    delete by_sha_;
    delete base_ids_;
  }
  void SetUp() override {
    dir_ = testing::MakeTempDir(*root_ + "/t");
    state_ = dir_ + "/state";
    fs::create_directories(state_);
  }

  std::unique_ptr<Server> Start(const std::vector<std::pair<std::string, std::string>>& env = {}) {
    auto s = std::make_unique<Server>(dir_, state_, *root_ + "/adapters", env);
    EXPECT_TRUE(s->ok()) << "loraplex-server did not start on " << state_ << " (wait status "
                         << s->exit_status() << "); log:\n"
                         << Tail(s->log());
    return s;
  }

  static const Fixture& F(const std::string& folder) { return fixtures_->at(folder); }

  // The checks every test makes of a running server against `want` (name -> what it must be),
  // except for `loose`: a name whose last operation was cut off or failed after the point of no
  // return, which may be absent, as `want` says, or a newer version of `loose_folder`. Lists,
  // gets, generates with every listed adapter and the base model, and checks that each listed
  // version has its folder. Returns what the server lists (name -> state); counts checks.
  Registry CheckServes(Server& s, const Registry& want, int64_t* checks,
                       const std::string& loose = "", const std::string& loose_folder = "",
                       bool loose_merged_may_flip = false) {
    std::vector<v1::AdapterInfo> list;
    grpc::Status st = List(s, &list);
    EXPECT_TRUE(st.ok()) << Describe(st);
    Registry seen;
    for (const v1::AdapterInfo& info : list) {
      ++*checks;
      EXPECT_EQ(info.state(), v1::READY) << info.name() << " v" << info.version()
                                         << " is listed but not READY: a half-done registration";
      EXPECT_EQ(seen.count(info.name()), 0u) << info.name() << " is listed twice";
      seen[info.name()] = {info.version(), info.sha256(), info.merged()};
    }
    int merged = 0;
    std::set<std::string> names;
    for (const auto& [n, r] : want) names.insert(n);
    for (const auto& [n, r] : seen) names.insert(n);
    for (const std::string& name : names) {
      ++*checks;
      auto w = want.find(name);
      auto o = seen.find(name);
      const bool is_loose = name == loose;
      if (o != seen.end() && o->second.merged) ++merged;
      if (!is_loose) {
        if (w == want.end()) {
          ADD_FAILURE() << name << " v" << o->second.version
                        << " is served, but no registration of it returned OK";
          continue;
        }
        if (o == seen.end()) {
          ADD_FAILURE() << name << " v" << w->second.version
                        << " returned OK but is not served (lost)";
          continue;
        }
        EXPECT_EQ(o->second.version, w->second.version) << name;
        EXPECT_EQ(o->second.sha256, w->second.sha256) << name;
        EXPECT_EQ(o->second.merged, w->second.merged) << name << " merged";
        continue;
      }
      // The loose name: as acknowledged, or the cut-off registration done, or gone.
      if (o == seen.end()) continue;  // callers that cannot accept absence check it themselves
      if (w != want.end() && o->second.version == w->second.version) {
        EXPECT_EQ(o->second.sha256, w->second.sha256) << name;
        if (!loose_merged_may_flip) {
          EXPECT_EQ(o->second.merged, w->second.merged) << name;
        }
      } else {
        if (w != want.end()) {
          EXPECT_GT(o->second.version, w->second.version) << name << ": version went backwards";
        }
        EXPECT_EQ(o->second.sha256, loose_folder.empty() ? "?" : F(loose_folder).sha256)
            << name << " v" << o->second.version << " is neither the acknowledged version nor "
            << "the registration that was cut off";
        EXPECT_FALSE(o->second.merged) << name << ": a new version starts unmerged";
      }
    }
    EXPECT_LE(merged, 1) << "more than one adapter is merged";
    // Every listed adapter serves the outputs of the fixture its sha256 names.
    for (const auto& [name, r] : seen) {
      ++*checks;
      auto fixture = by_sha_->find(r.sha256);
      if (fixture == by_sha_->end()) {
        ADD_FAILURE() << name << " v" << r.version << " has sha256 " << r.sha256
                      << ", which is no fixture's: half-written";
        continue;
      }
      Generated g = Generate(s, name);
      EXPECT_TRUE(g.status.ok()) << name << ": " << Describe(g.status);
      EXPECT_EQ(g.ids, F(fixture->second).ids) << name << " v" << r.version << " ("
                                               << fixture->second << ")";
      EXPECT_EQ(g.version, r.version) << name;
      v1::AdapterInfo info;
      st = Get(s, name, &info);
      EXPECT_TRUE(st.ok()) << name << ": " << Describe(st);
      EXPECT_EQ(info.merged(), r.merged) << name << ": GetAdapter and ListAdapters disagree";
    }
    ++*checks;
    Generated base = Generate(s, "");
    EXPECT_TRUE(base.status.ok()) << Describe(base.status);
    EXPECT_EQ(base.ids, *base_ids_) << "the base model's output changed";
    // On disk: every listed version has its folder.
    ++*checks;
    std::set<std::string> folders = VersionFolders();
    for (const auto& [name, r] : seen) {
      EXPECT_EQ(folders.count(absl::StrCat(name, "/v", r.version)), 1u)
          << name << " v" << r.version << " is served without its folder";
    }
    return seen;
  }

  // "name/vN" of every version folder under adapters/.
  std::set<std::string> VersionFolders() const {
    std::set<std::string> folders;
    std::error_code ec;
    for (const auto& n : fs::directory_iterator(state_ + "/adapters", ec)) {
      for (const auto& v : fs::directory_iterator(n.path(), ec)) {
        folders.insert(n.path().filename().string() + "/" + v.path().filename().string());
      }
    }
    return folders;
  }

  // The same after a restart, also checking staging/ (emptied at start) and manifest.json.
  Registry CheckRestarted(Server& s, const Registry& want, int64_t* checks,
                          const std::string& loose = "", const std::string& loose_folder = "",
                          bool loose_merged_may_flip = false) {
    Registry seen = CheckServes(s, want, checks, loose, loose_folder, loose_merged_may_flip);
    ++*checks;
    std::error_code ec;
    EXPECT_TRUE(fs::is_empty(state_ + "/staging", ec)) << "staging/ not emptied at start";
    std::set<std::string> listed;
    for (const auto& [name, r] : seen) listed.insert(absl::StrCat(name, "/v", r.version));
    EXPECT_EQ(VersionFolders(), listed) << "adapters/ holds other folders than the listed versions";
    nlohmann::json m =
        nlohmann::json::parse(ReadAll(state_ + "/manifest.json"), nullptr, false);
    Registry manifest;
    if (m.is_object() && m.contains("adapters")) {
      for (const auto& a : m["adapters"]) {
        manifest[a.value("name", "")] = {a.value("version", int64_t{0}), a.value("sha256", ""),
                                         a.value("merged", false)};
      }
    }
    EXPECT_EQ(manifest.size(), seen.size()) << "manifest.json and the server disagree";
    for (const auto& [name, r] : seen) {
      auto it = manifest.find(name);
      if (it == manifest.end()) {
        ADD_FAILURE() << name << " is served but not in manifest.json";
        continue;
      }
      EXPECT_EQ(it->second.version, r.version) << name;
      EXPECT_EQ(it->second.sha256, r.sha256) << name;
      EXPECT_EQ(it->second.merged, r.merged) << name << " (manifest merged vs served)";
    }
    return seen;
  }

  static std::string* root_;
  static std::map<std::string, Fixture>* fixtures_;
  static std::map<std::string, std::string>* by_sha_;  // sha256 -> folder
  static std::vector<int32_t>* base_ids_;
  std::string dir_, state_;
};
std::string* CrashE2eTest::root_ = nullptr;
std::map<std::string, CrashE2eTest::Fixture>* CrashE2eTest::fixtures_ = nullptr;
std::map<std::string, std::string>* CrashE2eTest::by_sha_ = nullptr;
std::vector<int32_t>* CrashE2eTest::base_ids_ = nullptr;

// --- kill -9 -------------------------------------------------------------------------------------

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
  explicit Killer(Server* s) : server_(s) {}
  void Kill() {
    std::lock_guard<std::mutex> lock(mu_);
    if (killed_.load()) return;
    killed_.store(true);  // before the signal: an error seen after it may be the kill's
    server_->Kill();
  }
  bool killed() const { return killed_.load(); }

 private:
  Server* server_;
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
          st = Upload(*s, op.name, F(op.folder).dir, op.replace,
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
  for (int m = 0; m < kModes; ++m) std::cout << (m ? ", " : "") << kModeNames[m] << " " << by_mode[m];
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

// --- full or failing disks -----------------------------------------------------------------------

// Which step of a registration an error message names.
std::string Step(const std::string& message) {
  if (message.find("manifest.json") != std::string::npos) return "manifest";
  if (message.find("the upload of") != std::string::npos) return "upload data";
  if (message.find("cannot copy") != std::string::npos) return "copy";
  if (message.find("staged files") != std::string::npos) return "staged fsync";
  return message.substr(0, message.find(' ', message.find(' ') + 1));
}

// The checks after a registration of "big" that hit the disk fault: a FAILED_PRECONDITION naming
// `what` (strerror of the fault), nothing of "big" listed, served or on disk, the rest unharmed.
void ExpectCleanRefusal(const grpc::Status& st, const std::string& what, const std::string& where) {
  EXPECT_EQ(st.error_code(), StatusCode::FAILED_PRECONDITION) << where << ": " << Describe(st);
  EXPECT_NE(st.error_message().find(what), std::string::npos)
      << where << ": the error does not name the disk problem (" << what
      << "): " << st.error_message();
}

class StateDirFaultTest : public CrashE2eTest {
 protected:
  // "keep" (upload of qv, merged) and "keep2" (load of rank1): what the faults must not harm.
  void RegisterKeepers(Server& s) {
    v1::AdapterInfo info;
    grpc::Status st = Upload(s, "keep", F("qv").dir, false, F("qv").sha256, &info);
    ASSERT_TRUE(st.ok()) << Describe(st);
    st = Load(s, "keep2", "rank1", false, &info);
    ASSERT_TRUE(st.ok()) << Describe(st);
    st = SetMode(s, "keep", true, &info);
    ASSERT_TRUE(st.ok()) << Describe(st);
    want_["keep"] = {1, F("qv").sha256, true};
    want_["keep2"] = {1, F("rank1").sha256, false};
  }
  // Registers "big" (all_linear) by upload or by path.
  grpc::Status RegisterBig(Server& s, bool upload, v1::AdapterInfo* info) {
    return upload ? Upload(s, "big", F("all_linear").dir, false, F("all_linear").sha256, info)
                  : Load(s, "big", "all_linear", false, info);
  }
  // After a refused registration of "big": not listed, not served, nothing on disk.
  void ExpectBigAbsent(Server& s) {
    ++checks_;
    v1::AdapterInfo info;
    grpc::Status st = Get(s, "big", &info);
    EXPECT_EQ(st.error_code(), StatusCode::NOT_FOUND) << Describe(st);
    EXPECT_EQ(Generate(s, "big").status.error_code(), StatusCode::NOT_FOUND);
    std::error_code ec;
    for (const std::string& f : VersionFolders()) {
      EXPECT_NE(f.rfind("big/", 0), 0u) << f << " left by a refused registration";
    }
    EXPECT_TRUE(fs::is_empty(state_ + "/staging", ec)) << "a refused registration left files";
    CheckServes(s, want_, &checks_);
  }

  Registry want_;
  int64_t checks_ = 0;
};

// The tmpfs holds at most this much: room for the keepers, the manifest and "big" with some to
// spare; the test fills the rest with a file to set the free space it wants.
constexpr int64_t kTmpfsBytes = 1 << 20;

// Free bytes of the filesystem at `path`.
int64_t FreeBytes(const std::string& path) {
  struct statvfs v = {};
  if (statvfs(path.c_str(), &v) != 0) return -1;
  return static_cast<int64_t>(v.f_bavail) * static_cast<int64_t>(v.f_frsize);
}

// Grows or shrinks the file `filler` (allocated, not sparse) until `path`'s filesystem has
// `target` bytes free. False when it cannot.
bool SetFree(const std::string& path, const std::string& filler, int64_t target) {
  const int fd = open(filler.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd < 0) return false;
  struct stat st = {};
  fstat(fd, &st);
  const int64_t diff = FreeBytes(path) - target;
  bool ok = true;
  if (diff > 0) {
    ok = fallocate(fd, 0, st.st_size, diff) == 0;
  } else if (diff < 0) {
    ok = ftruncate(fd, std::max<int64_t>(0, st.st_size + diff)) == 0;
  }
  close(fd);
  return ok && FreeBytes(path) == target;
}

TEST_F(StateDirFaultTest, FullTmpfsStateDirRefusesCleanlyAndRecovers) {
  if (mount("tmpfs", state_.c_str(), "tmpfs", 0,
            absl::StrCat("size=", kTmpfsBytes, ",mode=0755").c_str()) != 0) {
    GTEST_SKIP() << "cannot mount a tmpfs on " << state_ << " (" << std::strerror(errno)
                 << "): needs root or CAP_SYS_ADMIN; InjectedWriteFaults... makes the same checks "
                    "without privileges";
  }
  struct Unmount {
    std::string path;
    ~Unmount() { umount2(path.c_str(), MNT_DETACH); }
  } unmount{state_};
  const std::string filler = state_ + "/filler";  // the registry ignores files at the top
  auto s = Start();
  ASSERT_TRUE(s->ok());
  RegisterKeepers(*s);
  const int64_t page = sysconf(_SC_PAGESIZE);

  // From a full disk up, one page more each time, until a registration fits: every refusal must
  // be clean and must give back all the space it took.
  std::map<bool, int64_t> fitted;  // by upload/path: free bytes at the first success
  std::set<std::string> messages;
  int refusals = 0;
  for (int64_t free = 0; free <= 64 * page && fitted.size() < 2; free += page) {
    for (bool upload : {true, false}) {
      if (fitted.count(upload) > 0) continue;
      ASSERT_TRUE(SetFree(state_, filler, free)) << free << " bytes free: " << std::strerror(errno);
      v1::AdapterInfo info;
      grpc::Status st = RegisterBig(*s, upload, &info);
      if (st.ok()) {
        fitted[upload] = free;
        EXPECT_EQ(info.sha256(), F("all_linear").sha256);
        Generated g = Generate(*s, "big");
        EXPECT_EQ(g.ids, F("all_linear").ids);
        ASSERT_TRUE(SetFree(state_, filler, 32 * page));
        st = Unload(*s, "big");
        ASSERT_TRUE(st.ok()) << Describe(st);
        continue;
      }
      ++refusals;
      const std::string where =
          absl::StrCat(upload ? "upload" : "load", " with ", free, " bytes free");
      ExpectCleanRefusal(st, kNoSpace, where);
      messages.insert(Step(st.error_message()) + (upload ? " (upload)" : " (load)"));
      ExpectBigAbsent(*s);
      EXPECT_EQ(FreeBytes(state_), free) << where << ": the refused registration kept space";
      if (HasFailure()) return;
    }
  }
  ASSERT_EQ(fitted.size(), 2u) << "no registration fitted in 64 pages";
  // Each way in, the disk ran out both while the files were written and at the manifest, after
  // the version's folder was moved into place.
  for (const char* m : {"upload data (upload)", "manifest (upload)", "copy (load)",
                        "manifest (load)"}) {
    EXPECT_EQ(messages.count(m), 1u) << "no refusal at the step " << m;
  }
  std::cout << "tmpfs: " << refusals << " refusals; the upload fitted with " << fitted[true]
            << " bytes free, the load with " << fitted[false] << "; failing steps:";
  for (const std::string& m : messages) std::cout << " [" << m << "]";
  std::cout << std::endl;

  // Completely full: an unload cannot write the manifest either and is refused the same way.
  ASSERT_TRUE(SetFree(state_, filler, 0));
  ExpectCleanRefusal(Unload(*s, "keep2"), kNoSpace, "unload on a full disk");
  CheckServes(*s, want_, &checks_);

  // kill -9 and a restart on the full disk: everything that returned OK, "keep" merged again.
  s->Kill();
  s = Start();
  ASSERT_TRUE(s->ok());
  CheckRestarted(*s, want_, &checks_);
  v1::AdapterInfo info;
  ExpectCleanRefusal(RegisterBig(*s, true, &info), kNoSpace, "upload after the restart");
  ExpectBigAbsent(*s);

  // Space back: the registration succeeds, and survives a restart.
  std::error_code ec;
  fs::remove(filler, ec);
  grpc::Status st = RegisterBig(*s, true, &info);
  ASSERT_TRUE(st.ok()) << Describe(st);
  want_["big"] = {info.version(), F("all_linear").sha256, false};
  CheckServes(*s, want_, &checks_);
  s->Kill();
  s = Start();
  ASSERT_TRUE(s->ok());
  CheckRestarted(*s, want_, &checks_);
  s->Kill();
  std::cout << "tmpfs: " << checks_ << " checks" << std::endl;
}

TEST_F(StateDirFaultTest, InjectedWriteFaultsRefuseCleanlyAndRecover) {
  const std::string control = dir_ + "/faults";
  auto set_faults = [&control](const std::string& text) {
    std::ofstream(control + ".new") << text;
    fs::rename(control + ".new", control);  // a new file: the interposer re-reads it
  };
  auto hits = [&control] { return ReadAll(control + ".hits"); };
  set_faults("");
  std::string asan = "verify_asan_link_order=0";
  if (const char* a = std::getenv("ASAN_OPTIONS")) asan = absl::StrCat(a, ":", asan);
  const std::vector<std::pair<std::string, std::string>> env = {
      {"LD_PRELOAD", LP_FAULT_LIB}, {"LP_FAULT_CONTROL", control}, {"ASAN_OPTIONS", asan}};
  auto s = Start(env);
  ASSERT_TRUE(s->ok());
  RegisterKeepers(*s);
  const std::string prefix = "prefix=" + state_ + "\n";

  // Writes that run out after N bytes, N from 0 to past the whole registration: every step of
  // the write path (staged files, manifest) fails once.
  const int64_t total = F("all_linear").bytes;
  std::vector<int64_t> budgets = {0, 1, 100, int64_t{kChunk} - 1, int64_t{kChunk},
                                  total / 2, total - 1, total, total + 1};
  for (int64_t extra = 64; extra <= 4096; extra += 64) budgets.push_back(total + extra);
  int refusals = 0;
  std::set<std::string> steps;
  for (bool upload : {true, false}) {
    bool fitted = false;
    for (int64_t budget : budgets) {
      const std::string where =
          absl::StrCat(upload ? "upload" : "load", " with writes failing after ", budget, " bytes");
      const size_t hits_before = hits().size();
      set_faults(prefix + "write_after=" + std::to_string(budget) + "\n");
      v1::AdapterInfo info;
      grpc::Status st = RegisterBig(*s, upload, &info);
      set_faults("");
      if (st.ok()) {
        fitted = true;
        EXPECT_GT(budget, total) << where << ": succeeded, but its files did not fit";
        EXPECT_EQ(Generate(*s, "big").ids, F("all_linear").ids);
        st = Unload(*s, "big");
        ASSERT_TRUE(st.ok()) << Describe(st);
        break;
      }
      ++refusals;
      if (std::getenv("LP_CRASH_DEBUG")) std::cout << where << ": " << Describe(st) << std::endl;
      EXPECT_GT(hits().size(), hits_before) << where << ": refused, but not by the fault";
      ExpectCleanRefusal(st, kNoSpace, where);
      steps.insert(Step(st.error_message()) + (upload ? " (upload)" : " (load)"));
      ExpectBigAbsent(*s);
      if (HasFailure()) return;
    }
    EXPECT_TRUE(fitted) << (upload ? "upload" : "load") << " never fitted";
  }
  for (const char* m : {"upload data (upload)", "manifest (upload)", "copy (load)",
                        "manifest (load)"}) {
    EXPECT_EQ(steps.count(m), 1u) << "no refusal at the step " << m;
  }

  // One failing call of each other kind. The last one fails the directory fsync after the
  // manifest's rename, the point of no return: the answer is an error, but a restart may serve
  // the registration, so it is checked after the restart below.
  struct Fault {
    const char* what;
    std::string config;
    const char* message;
  };
  const std::vector<Fault> faults = {
      {"fsync of the staged files", "fsync_after=0\nfsync_path=\nprefix=" + state_ + "/staging\n",
       kIoError},
      {"file creation", prefix + "create_after=0\n", kNoSpace},
      {"rename into adapters/", "prefix=" + state_ + "/adapters\nrename_after=0\n", kIoError},
      {"rename of the manifest",
       prefix + "rename_after=0\nrename_path=" + state_ + "/manifest.json\n", kIoError},
      {"fsync of the manifest's temporary file",
       prefix + "fsync_after=0\nfsync_path=" + state_ + "/manifest.json.tmp\n", kIoError},
  };
  for (const Fault& f : faults) {
    for (bool upload : {true, false}) {
      const std::string where = absl::StrCat(upload ? "upload" : "load", ", failing ", f.what);
      const size_t hits_before = hits().size();
      set_faults(f.config);
      v1::AdapterInfo info;
      grpc::Status st = RegisterBig(*s, upload, &info);
      set_faults("");
      EXPECT_GT(hits().size(), hits_before) << where << ": the fault was not reached";
      ++refusals;
      ExpectCleanRefusal(st, f.message, where);
      ExpectBigAbsent(*s);
      if (HasFailure()) return;
    }
  }
  // The state directory's fsync after the manifest rename: refused, and not served now.
  {
    set_faults(prefix + "fsync_after=0\nfsync_path=" + state_ + "\n");
    const size_t hits_before = hits().size();
    v1::AdapterInfo info;
    grpc::Status st = RegisterBig(*s, true, &info);
    set_faults("");
    EXPECT_GT(hits().size(), hits_before) << "the state directory's fsync was not reached";
    ++refusals;
    ExpectCleanRefusal(st, kIoError, "upload, failing the state directory's fsync");
    v1::AdapterInfo got;
    EXPECT_EQ(Get(*s, "big", &got).error_code(), StatusCode::NOT_FOUND);
  }
  // Fault off: a new registration of the same name succeeds (its version must not collide with
  // what the failed one left for a restart).
  v1::AdapterInfo info;
  grpc::Status st = RegisterBig(*s, true, &info);
  ASSERT_TRUE(st.ok()) << "after the faults: " << Describe(st);
  EXPECT_EQ(Generate(*s, "big").ids, F("all_linear").ids);
  want_["big"] = {info.version(), F("all_linear").sha256, false};

  // kill -9, restart with every write under the state directory failing: the server starts and
  // serves everything that returned OK, "keep" merged again (nothing needs writing for that).
  s->Kill();
  set_faults(prefix + "write_after=0\ncreate_after=0\n");
  s = Start(env);
  ASSERT_TRUE(s->ok());
  CheckRestarted(*s, want_, &checks_);
  ExpectCleanRefusal(Upload(*s, "big2", F("layers").dir, false, "", &info), kNoSpace,
                     "upload on the failing disk after the restart");
  set_faults("");
  s->Kill();

  // The failed state-directory fsync never cost a restart (no DATA_LOSS) and a fault-free
  // restart serves the same.
  s = Start(env);
  ASSERT_TRUE(s->ok());
  CheckRestarted(*s, want_, &checks_);
  st = Upload(*s, "big2", F("layers").dir, false, F("layers").sha256, &info);
  ASSERT_TRUE(st.ok()) << Describe(st);
  want_["big2"] = {info.version(), F("layers").sha256, false};
  CheckServes(*s, want_, &checks_);
  s->Kill();
  std::cout << "injected faults: " << refusals << " refusals, " << checks_ << " checks"
            << std::endl;
}

// The fsync of the state directory after the manifest's rename fails (the point of no return):
// for a new name and for a replace, by upload and by path. The answer is an error and the old
// state keeps serving; after kill -9 the server starts (no DATA_LOSS) and serves either the old
// or the new version, whole; registering the same name again works before and after.
TEST_F(StateDirFaultTest, FailedFsyncAfterManifestRenameNeverCostsARestart) {
  const std::string control = dir_ + "/faults";
  auto set_faults = [&control](const std::string& text) {
    std::ofstream(control + ".new") << text;
    fs::rename(control + ".new", control);
  };
  set_faults("");
  std::string asan = "verify_asan_link_order=0";
  if (const char* a = std::getenv("ASAN_OPTIONS")) asan = absl::StrCat(a, ":", asan);
  const std::vector<std::pair<std::string, std::string>> env = {
      {"LD_PRELOAD", LP_FAULT_LIB}, {"LP_FAULT_CONTROL", control}, {"ASAN_OPTIONS", asan}};
  auto s = Start(env);
  ASSERT_TRUE(s->ok());
  RegisterKeepers(*s);
  int served_new = 0;
  for (bool upload : {true, false}) {
    for (const char* name : {"big", "keep2"}) {  // a new name, a replace
      const std::string folder = std::string(name) == "big" ? "all_linear" : "layers";
      const std::string where = absl::StrCat(upload ? "upload" : "load", " of ", name,
                                             ", failing the state directory's fsync");
      auto do_register = [&](const std::string& from, v1::AdapterInfo* info) {
        return upload ? Upload(*s, name, F(from).dir, true, F(from).sha256, info)
                      : Load(*s, name, from, true, info);
      };
      auto fail_once = [&] {
        set_faults("prefix=" + state_ + "\nfsync_after=0\nfsync_path=" + state_ + "\n");
        v1::AdapterInfo info;
        grpc::Status st = do_register(folder, &info);
        set_faults("");
        ExpectCleanRefusal(st, kIoError, where);
        CheckServes(*s, want_, &checks_);  // the old state, unchanged
      };
      auto register_again = [&](const std::string& from) {
        v1::AdapterInfo info;
        grpc::Status st = do_register(from, &info);
        ASSERT_TRUE(st.ok()) << where << ", then " << from << ": " << Describe(st);
        if (want_.count(name) > 0) {
          EXPECT_GT(info.version(), want_[name].version);
        }
        want_[name] = {info.version(), F(from).sha256, false};
        CheckServes(*s, want_, &checks_);
      };
      // In the same process: the next registration of the name must not collide with the folder
      // the failed one left for a restart.
      fail_once();
      register_again("regex");
      // Across kill -9: the restart serves the acknowledged version or the failed one, whole.
      fail_once();
      s->Kill();
      s = Start(env);
      ASSERT_TRUE(s->ok()) << where << ": the restart failed";
      Registry seen = CheckRestarted(*s, want_, &checks_, name, folder);
      if (seen.count(name) > 0 && seen[name].version != want_[name].version) ++served_new;
      ASSERT_EQ(seen.count(name), 1u) << where << ": lost " << name;
      want_[name] = seen[name];
      register_again("qv");
      if (HasFailure()) return;
    }
  }
  // Both outcomes are allowed; with a rename that reached the page cache it is the new version.
  std::cout << "fsync after the manifest rename: " << served_new << " of 4 served after kill -9, "
            << checks_ << " checks" << std::endl;
  s->Kill();
}

}  // namespace
}  // namespace loraplex
