// What the crash-consistency e2e tests (crash_e2e_test.cc: kill -9; disk_fault_e2e_test.cc: full
// and failing disks) share: the stories260K fixtures copied under an adapter root with their
// sha256 and offline greedy outputs, the admin calls (most from admin_e2e.h), and the checks that a
// server serves exactly what returned OK, with a state directory on disk to match. Needs
// LP_SERVER_BINARY and LP_GENERATE_BINARY.
#pragma once

#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "adapters/manifest.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "loraplex/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/e2e/admin_e2e.h"
#include "tests/testing/server_process.h"
#include "tests/testing/testing.h"

namespace loraplex::crash_e2e {

namespace fs = std::filesystem;
using e2e::AdminServer;
using e2e::Generated;
using e2e::Get;
using e2e::List;
using e2e::Load;
using e2e::ReadAll;

constexpr int kTokens = 16;      // greedy tokens per comparison
constexpr size_t kChunk = 8192;  // upload chunk: several chunks per file, so kills land inside

// The fixtures the tests register (tests/fixtures/peft/stories260k): all fit the default limits.
inline constexpr const char* kFolders[] = {"qv",    "all_linear", "rank1", "layers",
                                           "regex", "patterns",   "rslora"};

inline std::string Tail(const std::string& text, size_t n = 3000) {
  return text.size() <= n ? text : text.substr(text.size() - n);
}

// Uploads the PEFT folder `dir` in kChunk pieces (e2e::UploadMessages) and half-closes. `step` (may
// be empty) runs after each message, with its index (0 = header; after the server ended the call
// the rest are not written but still counted), and once more with -1 after the half-close, before
// waiting for the answer.
inline grpc::Status UploadInChunks(AdminServer& s, const std::string& name, const std::string& dir,
                                   bool replace, const std::string& sha256, v1::AdapterInfo* info,
                                   const std::function<void(int)>& step = nullptr) {
  grpc::ClientContext ctx;
  e2e::Authorize(&ctx);
  auto writer = s.admin().UploadAdapter(&ctx, info);
  const std::vector<v1::UploadAdapterRequest> messages =
      e2e::UploadMessages(name, dir, replace, sha256, kChunk);
  bool open = true;
  for (size_t i = 0; i < messages.size(); ++i) {
    if (open) open = writer->Write(messages[i]);
    if (step) step(static_cast<int>(i));
  }
  writer->WritesDone();
  if (step) step(-1);
  return writer->Finish();
}

inline grpc::Status Unload(AdminServer& s, const std::string& name) {
  grpc::ClientContext ctx;
  e2e::Authorize(&ctx);
  v1::UnloadAdapterRequest req;
  req.set_name(name);
  v1::UnloadAdapterResponse resp;
  return s.admin().UnloadAdapter(&ctx, req, &resp);
}

inline grpc::Status SetMode(AdminServer& s, const std::string& name, bool merged,
                            v1::AdapterInfo* info) {
  grpc::ClientContext ctx;
  e2e::Authorize(&ctx);
  v1::SetAdapterModeRequest req;
  req.set_name(name);
  req.set_mode(merged ? v1::MERGED : v1::UNMERGED);
  return s.admin().SetAdapterMode(&ctx, req, info);
}

// Complete from BOS: kTokens greedy tokens within 30 s.
inline Generated Generate(AdminServer& s, const std::string& adapter) {
  return e2e::Complete(s, adapter, kTokens, 30);
}

inline std::string Describe(const grpc::Status& st) {
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
      Fixture f;
      f.dir = *root_ + "/adapters/" + folder;
      fs::copy(e2e::Fixture(folder), f.dir);
      const std::string weights = ReadAll(f.dir + "/" + adapters::kAdapterWeightsFile);
      f.sha256 = adapters::Sha256Hex(weights.data(), weights.size());
      f.bytes = static_cast<int64_t>(weights.size() +
                                     ReadAll(f.dir + "/" + adapters::kAdapterConfigFile).size());
      f.ids = testing::Stories260KGreedyIds(LP_GENERATE_BINARY, f.dir, kTokens);
      (*by_sha_)[f.sha256] = folder;
      (*fixtures_)[folder] = std::move(f);
    }
    base_ids_ =
        new std::vector<int32_t>(testing::Stories260KGreedyIds(LP_GENERATE_BINARY, "", kTokens));
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

  // A loraplex-server on state_ (--state-dir) and the fixtures' root (--adapter-dir), with the
  // admin token; port file and log in dir_. `env` is set for the child only.
  std::unique_ptr<AdminServer> Start(const e2e::Env& env = {}) {
    auto s = std::make_unique<AdminServer>(
        env, LP_SERVER_BINARY, dir_,
        std::vector<std::string>{"--state-dir=" + state_, "--adapter-dir=" + *root_ + "/adapters",
                                 std::string("--admin-token=") + e2e::kAdminToken});
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
  Registry CheckServes(AdminServer& s, const Registry& want, int64_t* checks,
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
      EXPECT_EQ(g.ids, F(fixture->second).ids)
          << name << " v" << r.version << " (" << fixture->second << ")";
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
  Registry CheckRestarted(AdminServer& s, const Registry& want, int64_t* checks,
                          const std::string& loose = "", const std::string& loose_folder = "",
                          bool loose_merged_may_flip = false) {
    Registry seen = CheckServes(s, want, checks, loose, loose_folder, loose_merged_may_flip);
    ++*checks;
    std::error_code ec;
    EXPECT_TRUE(fs::is_empty(state_ + "/staging", ec)) << "staging/ not emptied at start";
    std::set<std::string> listed;
    for (const auto& [name, r] : seen) listed.insert(absl::StrCat(name, "/v", r.version));
    EXPECT_EQ(VersionFolders(), listed) << "adapters/ holds other folders than the listed versions";
    nlohmann::json m = nlohmann::json::parse(ReadAll(state_ + "/manifest.json"), nullptr, false);
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

  static inline std::string* root_ = nullptr;
  static inline std::map<std::string, Fixture>* fixtures_ = nullptr;
  static inline std::map<std::string, std::string>* by_sha_ = nullptr;  // sha256 -> folder
  static inline std::vector<int32_t>* base_ids_ = nullptr;
  std::string dir_, state_;
};

}  // namespace loraplex::crash_e2e
