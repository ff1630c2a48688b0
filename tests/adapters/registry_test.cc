// The adapter registry (adapters/registry.h): names, versions and leases, path confinement,
// uploads with size and sha256 checks, eviction and reload under a budget, and recovery of the
// state directory. Adapters are the stories260K PEFT fixtures of tests/fixtures/peft/stories260k
// (tools/make_peft_goldens.py); the expected bytes and ranks come from those files, not from the
// code under test.
#include "adapters/registry.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "tests/testing/testing.h"

namespace loraplex::adapters {
namespace {

namespace fs = std::filesystem;
using ::loraplex::testing::FixturesDir;
using ::loraplex::testing::IsOk;
using ::loraplex::testing::MakeTempDir;
using ::loraplex::testing::StatusIs;
using ::loraplex::testing::Stories260KDir;

std::string Fixture(const std::string& name) { return FixturesDir() + "/peft/stories260k/" + name; }

std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

class RegistryTest : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = MakeTempDir("lp-registry");
    adapter_dir_ = root_ + "/adapters";
    state_dir_ = root_ + "/state";
    fs::create_directories(adapter_dir_);
    for (const char* name : {"qv", "all_linear", "rank1", "rank64", "layers", "regex"}) {
      fs::copy(Fixture(name), adapter_dir_ + "/" + name);
    }
    auto config = model::LlamaConfig::FromHfJson(Stories260KDir() + "/config.json");
    ASSERT_TRUE(config.ok()) << config.status().ToString();
    options_.state_dir = state_dir_;
    options_.adapter_dir = adapter_dir_;
    options_.base = *config;
    options_.load.dtype = kernels::DType::kF32;
    options_.load.max_rank = 64;
    options_.acquire_timeout = absl::Seconds(10);
  }
  void TearDown() override { fs::remove_all(root_); }

  std::unique_ptr<AdapterRegistry> Open() {
    auto r = AdapterRegistry::Open(options_);
    EXPECT_TRUE(r.ok()) << r.status().ToString();
    return r.ok() ? *std::move(r) : nullptr;
  }

  std::string root_, adapter_dir_, state_dir_;
  RegistryOptions options_;
};

TEST(AdapterNameTest, AcceptsTheAllowedAlphabetUpTo128) {
  EXPECT_THAT(ValidateAdapterName("a-B_9.x"), IsOk());
  EXPECT_THAT(ValidateAdapterName(std::string(128, 'a')), IsOk());
  EXPECT_THAT(ValidateAdapterName(std::string(129, 'a')),
              StatusIs(absl::StatusCode::kInvalidArgument, "1 to 128"));
  EXPECT_THAT(ValidateAdapterName(""), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateAdapterName("a/b"), StatusIs(absl::StatusCode::kInvalidArgument, "'/'"));
  EXPECT_THAT(ValidateAdapterName(".."), StatusIs(absl::StatusCode::kInvalidArgument, "reserved"));
  EXPECT_THAT(ValidateAdapterName("a b"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ValidateAdapterName("a@1"), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(AdapterSpecTest, ParsesNameAndOptionalVersion) {
  ASSERT_OK_AND_ASSIGN(AdapterSpec plain, ParseAdapterSpec("sql"));
  EXPECT_EQ(plain.name, "sql");
  EXPECT_EQ(plain.version, 0);
  EXPECT_EQ(plain.ToString(), "sql");
  ASSERT_OK_AND_ASSIGN(AdapterSpec versioned, ParseAdapterSpec("sql@12"));
  EXPECT_EQ(versioned.name, "sql");
  EXPECT_EQ(versioned.version, 12);
  EXPECT_EQ(versioned.ToString(), "sql@12");
  for (const char* bad : {"sql@", "sql@0", "sql@-1", "sql@x", "sql@99999999999999999999", "@1", "",
                          "a/b@1", "a@1@2"}) {
    EXPECT_THAT(ParseAdapterSpec(bad), StatusIs(absl::StatusCode::kInvalidArgument)) << bad;
  }
}

TEST_F(RegistryTest, RegisterDescribesTheAdapterAndRefusesADuplicateName) {
  auto r = Open();
  ASSERT_NE(r, nullptr);
  ASSERT_OK_AND_ASSIGN(AdapterInfo info, r->RegisterFromPath("x", "qv", false, false));
  EXPECT_EQ(info.name, "x");
  EXPECT_EQ(info.version, 1);
  EXPECT_EQ(info.state, AdapterState::kReady);
  EXPECT_EQ(info.max_rank, 8);  // adapter_config.json: r = 8, q_proj and v_proj
  EXPECT_EQ(info.alpha, 16.0f);
  EXPECT_EQ(info.target_modules, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(info.ranks.at("q_proj"), 8);
  EXPECT_EQ(info.residency, Residency::kDevice);
  EXPECT_EQ(info.sha256, Sha256Hex(ReadAll(Fixture("qv/adapter_model.safetensors")).data(),
                                   ReadAll(Fixture("qv/adapter_model.safetensors")).size()));
  EXPECT_THAT(r->RegisterFromPath("x", "all_linear", false, false),
              StatusIs(absl::StatusCode::kAlreadyExists, "replace"));
  ASSERT_OK_AND_ASSIGN(AdapterInfo got, r->Get("x"));
  EXPECT_EQ(got.version, 1);
  EXPECT_EQ(got.max_rank, 8);  // unchanged by the refused load
  EXPECT_THAT(r->Get("y"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(r->Get("x@2"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(r->Get("x@zero"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(r->Get("x@1"), IsOk());
}

TEST_F(RegistryTest, ReplaceMakesTheNextVersionWhileLeasesKeepTheOldOne) {
  auto r = Open();
  ASSERT_NE(r, nullptr);
  ASSERT_THAT(r->RegisterFromPath("x", "qv", false, false), IsOk());
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> v1, r->Acquire("x"));
  ASSERT_OK_AND_ASSIGN(AdapterInfo info, r->RegisterFromPath("x", "all_linear", true, false));
  EXPECT_EQ(info.version, 2);
  // New leases get version 2 at once; the old lease still holds version 1's weights.
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> v2, r->Acquire("x"));
  EXPECT_EQ(v2->version(), 2);
  EXPECT_EQ(v2->adapter().max_rank(), 4);  // all_linear: r = 4 on all seven modules
  EXPECT_EQ(v1->version(), 1);
  EXPECT_EQ(v1->adapter().max_rank(), 8);
  EXPECT_THAT(r->Acquire("x@1"), StatusIs(absl::StatusCode::kNotFound, "serving version 2"));
  std::vector<AdapterInfo> list = r->List();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].version, 1);
  EXPECT_EQ(list[0].state, AdapterState::kDraining);
  EXPECT_EQ(list[0].leases, 1);
  EXPECT_EQ(list[1].state, AdapterState::kReady);
  const std::string v1_dir = VersionDir(state_dir_, "x", 1);
  EXPECT_TRUE(fs::exists(v1_dir));
  v1.reset();  // the last request on version 1 finishes: it is gone, files included
  EXPECT_FALSE(fs::exists(v1_dir));
  EXPECT_EQ(r->List().size(), 1u);
  EXPECT_EQ(r->loaded_count(), 1);
}

TEST_F(RegistryTest, UnloadDrainsAndNewAcquiresGetNotFound) {
  auto r = Open();
  ASSERT_NE(r, nullptr);
  ASSERT_THAT(r->RegisterFromPath("x", "qv", false, false), IsOk());
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> lease, r->Acquire("x"));
  ASSERT_OK_AND_ASSIGN(AdapterInfo info, r->Unload("x"));
  EXPECT_EQ(info.state, AdapterState::kDraining);
  EXPECT_EQ(info.leases, 1);
  EXPECT_THAT(r->Acquire("x"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(r->Unload("x"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_EQ(lease->adapter().max_rank(), 8);  // the running request keeps its weights
  lease.reset();
  EXPECT_TRUE(r->List().empty());
  EXPECT_EQ(r->loaded_count(), 0);
  // A name registered again after an unload continues the numbering within the process.
  ASSERT_OK_AND_ASSIGN(AdapterInfo again, r->RegisterFromPath("x", "rank1", false, false));
  EXPECT_EQ(again.version, 2);
}

TEST_F(RegistryTest, PathsOutsideTheAdapterDirAreRefused) {
  auto r = Open();
  ASSERT_NE(r, nullptr);
  fs::create_directories(root_ + "/outside");
  fs::copy(Fixture("qv"), root_ + "/outside/qv");
  fs::create_directory_symlink(root_ + "/outside/qv", adapter_dir_ + "/link");
  fs::create_directories(adapter_dir_ + "/filelink");
  fs::copy_file(Fixture("qv/adapter_config.json"), adapter_dir_ + "/filelink/adapter_config.json");
  fs::create_symlink(root_ + "/outside/qv/adapter_model.safetensors",
                     adapter_dir_ + "/filelink/adapter_model.safetensors");
  EXPECT_THAT(r->RegisterFromPath("a", "../outside/qv", false, false),
              StatusIs(absl::StatusCode::kPermissionDenied, "outside"));
  EXPECT_THAT(r->RegisterFromPath("a", "qv/../../outside/qv", false, false),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(r->RegisterFromPath("a", "link", false, false),
              StatusIs(absl::StatusCode::kPermissionDenied));
  EXPECT_THAT(r->RegisterFromPath("a", "filelink", false, false),
              StatusIs(absl::StatusCode::kPermissionDenied, "adapter_model.safetensors"));
  EXPECT_THAT(r->RegisterFromPath("a", root_ + "/outside/qv", false, false),
              StatusIs(absl::StatusCode::kPermissionDenied, "relative"));
  EXPECT_THAT(r->RegisterFromPath("a", "missing", false, false),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(r->RegisterFromPath("a/b", "qv", false, false),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_TRUE(r->List().empty());
  options_.adapter_dir = "";
  auto no_root = Open();
  ASSERT_NE(no_root, nullptr);
  EXPECT_THAT(no_root->RegisterFromPath("b", "qv", false, false),
              StatusIs(absl::StatusCode::kPermissionDenied, "--adapter-dir"));
}

TEST_F(RegistryTest, BadAdaptersChangeNothing) {
  auto r = Open();
  ASSERT_NE(r, nullptr);
  ASSERT_THAT(r->RegisterFromPath("x", "qv", false, false), IsOk());
  auto make = [&](const std::string& name, const std::string& config, const std::string& weights) {
    fs::create_directories(adapter_dir_ + "/" + name);
    if (!config.empty())
      std::ofstream(adapter_dir_ + "/" + name + "/adapter_config.json") << config;
    if (!weights.empty()) {
      std::ofstream(adapter_dir_ + "/" + name + "/adapter_model.safetensors", std::ios::binary)
          << weights;
    }
  };
  const std::string config = ReadAll(Fixture("qv/adapter_config.json"));
  const std::string weights = ReadAll(Fixture("qv/adapter_model.safetensors"));
  make("badjson", "{\"r\": 8,", weights);
  make("noweights", config, "");
  make("truncated", config, weights.substr(0, weights.size() / 2));
  std::string dora = config;
  dora.replace(dora.find("\"use_dora\": false"), 17, "\"use_dora\": true");
  make("dora", dora, weights);
  EXPECT_THAT(r->RegisterFromPath("x", "badjson", true, false),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(r->RegisterFromPath("x", "noweights", true, false),
              StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(r->RegisterFromPath("x", "truncated", true, false),
              StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(r->RegisterFromPath("x", "dora", true, false),
              StatusIs(absl::StatusCode::kInvalidArgument, "use_dora"));
  options_.load.max_rank = 16;
  auto low = Open();  // the same state directory, a lower --max-lora-rank
  r.reset();
  ASSERT_NE(low, nullptr);
  EXPECT_THAT(low->RegisterFromPath("x", "rank64", true, false),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  ASSERT_OK_AND_ASSIGN(AdapterInfo info, low->Get("x"));
  EXPECT_EQ(info.version, 1);
  EXPECT_EQ(info.max_rank, 8);
  EXPECT_TRUE(fs::is_empty(state_dir_ + "/staging"));
}

TEST_F(RegistryTest, UploadChecksSizeAndSha256) {
  options_.max_upload_bytes = 64 * 1024;
  auto r = Open();
  ASSERT_NE(r, nullptr);
  const std::string config = ReadAll(Fixture("qv/adapter_config.json"));
  const std::string weights = ReadAll(Fixture("qv/adapter_model.safetensors"));
  const std::string sha = Sha256Hex(weights.data(), weights.size());
  {
    ASSERT_OK_AND_ASSIGN(auto up, r->BeginUpload("up", false, sha, false));
    ASSERT_THAT(up->Append("adapter_config.json", config), IsOk());
    for (size_t at = 0; at < weights.size(); at += 4096) {
      ASSERT_THAT(up->Append("adapter_model.safetensors", weights.substr(at, 4096)), IsOk());
    }
    ASSERT_OK_AND_ASSIGN(AdapterInfo info, up->Commit());
    EXPECT_EQ(info.version, 1);
    EXPECT_EQ(info.sha256, sha);
    EXPECT_EQ(info.source, "upload");
  }
  {
    std::string wrong = sha;
    wrong[0] = wrong[0] == '0' ? '1' : '0';
    ASSERT_OK_AND_ASSIGN(auto up, r->BeginUpload("up", true, wrong, false));
    ASSERT_THAT(up->Append("adapter_config.json", config), IsOk());
    ASSERT_THAT(up->Append("adapter_model.safetensors", weights), IsOk());
    EXPECT_THAT(up->Commit(), StatusIs(absl::StatusCode::kInvalidArgument, "sha256"));
  }
  {
    ASSERT_OK_AND_ASSIGN(auto up, r->BeginUpload("big", false, "", false));
    ASSERT_THAT(up->Append("adapter_config.json", config), IsOk());
    absl::Status s = up->Append("adapter_model.safetensors", std::string(64 * 1024, 'x'));
    EXPECT_THAT(s, StatusIs(absl::StatusCode::kResourceExhausted, "--max-adapter-bytes"));
    EXPECT_THAT(up->Append("other.bin", "x"), StatusIs(absl::StatusCode::kInvalidArgument));
  }  // dropped without commit: discarded
  EXPECT_THAT(r->BeginUpload("up", false, "", false), StatusIs(absl::StatusCode::kAlreadyExists));
  EXPECT_THAT(r->BeginUpload("up", true, "abc", false),
              StatusIs(absl::StatusCode::kInvalidArgument, "64 hex"));
  EXPECT_THAT(r->Get("big"), StatusIs(absl::StatusCode::kNotFound));
  ASSERT_OK_AND_ASSIGN(AdapterInfo info, r->Get("up"));
  EXPECT_EQ(info.version, 1);
  EXPECT_TRUE(fs::is_empty(state_dir_ + "/staging"));
}

TEST_F(RegistryTest, EvictsLeastRecentlyUsedAndReloadsOnDemand) {
  options_.max_loaded = 2;
  auto r = Open();
  ASSERT_NE(r, nullptr);
  const std::vector<std::string> names = {"qv", "all_linear", "rank1", "layers"};
  for (const std::string& n : names) ASSERT_THAT(r->RegisterFromPath(n, n, false, false), IsOk());
  EXPECT_EQ(r->loaded_count(), 2);
  for (int round = 0; round < 3; ++round) {
    for (const std::string& n : names) {
      ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> lease, r->Acquire(n));
      EXPECT_EQ(lease->name(), n);
      EXPECT_LE(r->loaded_count(), 2);
      ASSERT_OK_AND_ASSIGN(AdapterInfo info, r->Get(n));
      EXPECT_EQ(info.residency, Residency::kDevice);
    }
  }
  int64_t evictions = 0, reloads = 0;
  for (const AdapterInfo& info : r->List()) {
    evictions += info.evictions;
    reloads += info.reloads;
  }
  // Round robin over 4 with room for 2, least recently used out: from the second round on every
  // acquire is a reload. In memory = registered + reloaded - evicted = 2.
  EXPECT_GE(reloads, 8);
  EXPECT_EQ(evictions, 4 + reloads - 2);
}

TEST_F(RegistryTest, AllInUseWaitsForARelease) {
  options_.max_loaded = 1;
  options_.acquire_timeout = absl::Milliseconds(300);
  auto r = Open();
  ASSERT_NE(r, nullptr);
  ASSERT_THAT(r->RegisterFromPath("a", "qv", false, false), IsOk());
  ASSERT_THAT(r->RegisterFromPath("b", "rank1", false, false), IsOk());
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> b, r->Acquire("b"));
  // a cannot come in while b is in use: it times out...
  EXPECT_THAT(r->Acquire("a"), StatusIs(absl::StatusCode::kResourceExhausted, "in use"));
  // ...and gets in once b is released by another thread.
  std::thread releaser([&b] {
    absl::SleepFor(absl::Milliseconds(50));
    b.reset();
  });
  auto a = r->Acquire("a");
  releaser.join();
  ASSERT_THAT(a, IsOk());
  EXPECT_EQ((*a)->name(), "a");
  ASSERT_OK_AND_ASSIGN(AdapterInfo info, r->Get("b"));
  EXPECT_EQ(info.residency, Residency::kDisk);
  // A pinned adapter is never evicted, even beyond the budget.
  ASSERT_THAT(r->RegisterFromPath("p", "layers", false, /*pin=*/true), IsOk());
  a->reset();
  ASSERT_THAT(r->Acquire("b"), IsOk());
  ASSERT_OK_AND_ASSIGN(AdapterInfo p, r->Get("p"));
  EXPECT_EQ(p.residency, Residency::kDevice);
  EXPECT_EQ(r->loaded_count(), 1);  // b; p is outside the budget
}

TEST_F(RegistryTest, MemoryBudgetCountsBytes) {
  auto probe = Open();
  ASSERT_NE(probe, nullptr);
  ASSERT_OK_AND_ASSIGN(AdapterInfo qv, probe->RegisterFromPath("qv", "qv", false, false));
  ASSERT_OK_AND_ASSIGN(AdapterInfo r1, probe->RegisterFromPath("r1", "rank1", false, false));
  ASSERT_OK_AND_ASSIGN(AdapterInfo all, probe->RegisterFromPath("all", "all_linear", false, false));
  probe.reset();
  fs::remove_all(state_dir_);
  ASSERT_LT(r1.bytes, qv.bytes);
  // Room for qv and all_linear together: adding rank1 as well pushes the oldest (qv) out.
  options_.memory_bytes = qv.bytes + all.bytes;
  auto r = Open();
  ASSERT_NE(r, nullptr);
  ASSERT_THAT(r->RegisterFromPath("qv", "qv", false, false), IsOk());
  ASSERT_THAT(r->RegisterFromPath("all", "all_linear", false, false), IsOk());
  EXPECT_EQ(r->loaded_bytes(), qv.bytes + all.bytes);
  ASSERT_THAT(r->RegisterFromPath("r1", "rank1", false, false), IsOk());
  EXPECT_EQ(r->loaded_bytes(), all.bytes + r1.bytes);
  ASSERT_OK_AND_ASSIGN(AdapterInfo q, r->Get("qv"));
  EXPECT_EQ(q.residency, Residency::kDisk);
  // An adapter larger than the whole budget can never be served: refused at registration.
  options_.memory_bytes = all.bytes - 1;
  fs::remove_all(state_dir_);
  auto small = Open();
  ASSERT_NE(small, nullptr);
  EXPECT_THAT(small->RegisterFromPath("all", "all_linear", false, false),
              StatusIs(absl::StatusCode::kResourceExhausted, "--adapter-memory"));
  EXPECT_THAT(small->RegisterFromPath("all", "all_linear", false, /*pin=*/true), IsOk());
}

// A waiter that gives up (timeout) no longer counts against max_waiters: the next caller waits
// and gets in once there is room.
TEST_F(RegistryTest, WaitersThatGiveUpLeaveTheirPlace) {
  options_.max_loaded = 1;
  options_.max_waiters = 1;
  options_.acquire_timeout = absl::Milliseconds(100);
  auto r = Open();
  ASSERT_NE(r, nullptr);
  ASSERT_THAT(r->RegisterFromPath("a", "qv", false, false), IsOk());
  ASSERT_THAT(r->RegisterFromPath("b", "rank1", false, false), IsOk());
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> b, r->Acquire("b"));
  for (int i = 0; i < 3; ++i) {
    EXPECT_THAT(r->Acquire("a"), StatusIs(absl::StatusCode::kResourceExhausted, "in use")) << i;
  }
  std::thread releaser([&b] {
    absl::SleepFor(absl::Milliseconds(30));
    b.reset();
  });
  auto a = r->Acquire("a");
  releaser.join();
  ASSERT_THAT(a, IsOk());
}

TEST_F(RegistryTest, TooManyWaitersAreRefused) {
  options_.max_loaded = 1;
  options_.max_waiters = 0;
  auto r = Open();
  ASSERT_NE(r, nullptr);
  ASSERT_THAT(r->RegisterFromPath("a", "qv", false, false), IsOk());
  ASSERT_THAT(r->RegisterFromPath("b", "rank1", false, false), IsOk());
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> b, r->Acquire("b"));
  EXPECT_THAT(r->Acquire("a"), StatusIs(absl::StatusCode::kResourceExhausted, "retry later"));
}

TEST_F(RegistryTest, ReopenServesTheSameVersionsAndDropsLeftovers) {
  {
    auto r = Open();
    ASSERT_NE(r, nullptr);
    ASSERT_THAT(r->RegisterFromPath("x", "qv", false, false), IsOk());
    ASSERT_THAT(r->RegisterFromPath("x", "all_linear", true, false), IsOk());
    ASSERT_THAT(r->RegisterFromPath("y", "rank1", false, true), IsOk());
    ASSERT_THAT(r->RegisterFromPath("z", "layers", false, false), IsOk());
    ASSERT_THAT(r->Unload("z"), IsOk());
    // What a crash leaves: a half-written upload and an unlisted version folder.
    ASSERT_OK_AND_ASSIGN(auto up, r->BeginUpload("w", false, "", false));
    ASSERT_THAT(up->Append("adapter_config.json", "{"), IsOk());
    fs::create_directories(state_dir_ + "/staging/crash");
    fs::copy(Fixture("qv"), VersionDir(state_dir_, "x", 7));
    // Never committed nor discarded, as after kill -9. Held by a global so that LeakSanitizer (the
    // ASan stage) sees it reachable (volatile: not optimized away); never destroyed, as its
    // registry is gone.
    static PendingUpload* volatile crashed_upload = nullptr;
    crashed_upload = up.release();
  }
  auto r = Open();
  ASSERT_NE(r, nullptr);
  std::vector<AdapterInfo> list = r->List();
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].name, "x");
  EXPECT_EQ(list[0].version, 2);
  EXPECT_EQ(list[0].max_rank, 4);
  EXPECT_EQ(list[1].name, "y");
  EXPECT_TRUE(list[1].pinned);
  EXPECT_TRUE(fs::is_empty(state_dir_ + "/staging"));
  EXPECT_FALSE(fs::exists(VersionDir(state_dir_, "x", 7)));
  EXPECT_FALSE(fs::exists(VersionDir(state_dir_, "x", 1)));
  EXPECT_FALSE(fs::exists(state_dir_ + "/adapters/z"));
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> lease, r->Acquire("x@2"));
  EXPECT_EQ(lease->adapter().max_rank(), 4);
  // Numbering continues from the manifest.
  ASSERT_OK_AND_ASSIGN(AdapterInfo v3, r->RegisterFromPath("x", "qv", true, false));
  EXPECT_EQ(v3.version, 3);
}

// max_rank at registration: the version serves the compressed adapter, reports what it cost,
// and stays compressed through an eviction and reload and across a restart (the manifest records
// it; the files stay as trained). A negative one is refused and registers nothing.
TEST_F(RegistryTest, CompressedRegistrationSurvivesReloadAndRestart) {
  options_.max_loaded = 1;
  options_.load.max_rank = 16;  // rank64 fits only compressed
  {
    auto r = Open();
    ASSERT_NE(r, nullptr);
    EXPECT_EQ(r->RegisterFromPath("big", "rank64", false, false).status().code(),
              absl::StatusCode::kFailedPrecondition);
    EXPECT_EQ(r->RegisterFromPath("big", "rank64", false, false, -2).status().code(),
              absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(r->List().empty());
    ASSERT_OK_AND_ASSIGN(AdapterInfo info, r->RegisterFromPath("big", "rank64", false, false, 8));
    EXPECT_EQ(info.max_rank, 8);
    EXPECT_EQ(info.ranks.at("q_proj"), 8);
    ASSERT_TRUE(info.compression.has_value());
    EXPECT_EQ(info.compression->max_rank, 8);
    EXPECT_EQ(info.compression->trained_max_rank, 64);
    EXPECT_GT(info.compression->relative_error, 0.0);
    EXPECT_LT(info.compression->relative_error, 1.0);
    const double error = info.compression->relative_error;
    // An upload takes the same field.
    const std::string config = ReadAll(Fixture("all_linear/adapter_config.json"));
    const std::string weights = ReadAll(Fixture("all_linear/adapter_model.safetensors"));
    ASSERT_OK_AND_ASSIGN(auto up, r->BeginUpload("small", false, "", false, 1));
    EXPECT_EQ(r->BeginUpload("bad", false, "", false, -1).status().code(),
              absl::StatusCode::kInvalidArgument);
    ASSERT_THAT(up->Append("adapter_config.json", config), IsOk());
    ASSERT_THAT(up->Append("adapter_model.safetensors", weights), IsOk());
    ASSERT_OK_AND_ASSIGN(AdapterInfo small, up->Commit());
    EXPECT_EQ(small.max_rank, 1);
    ASSERT_TRUE(small.compression.has_value());
    // Room for one: acquiring "big" evicts "small" and reloads "big" from disk, compressed again.
    ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> lease, r->Acquire("big"));
    EXPECT_EQ(lease->adapter().max_rank(), 8);
    ASSERT_OK_AND_ASSIGN(AdapterInfo again, r->Get("big"));
    EXPECT_GE(again.reloads, 1);
    EXPECT_EQ(again.compression->relative_error, error);
    // Replacing without max_rank serves the next version as trained (here: refused, rank 64 >
    // 16), and the compressed version stays current.
    EXPECT_EQ(r->RegisterFromPath("big", "rank64", true, false).status().code(),
              absl::StatusCode::kFailedPrecondition);
    ASSERT_OK_AND_ASSIGN(AdapterInfo still, r->Get("big"));
    EXPECT_EQ(still.version, 1);
  }
  auto r = Open();
  ASSERT_NE(r, nullptr);
  ASSERT_OK_AND_ASSIGN(AdapterInfo info, r->Get("big"));
  EXPECT_EQ(info.max_rank, 8);
  ASSERT_TRUE(info.compression.has_value());
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> lease, r->Acquire("big"));
  EXPECT_EQ(lease->adapter().max_rank(), 8);
  ASSERT_OK_AND_ASSIGN(AdapterInfo small, r->Get("small"));
  EXPECT_EQ(small.max_rank, 1);
  // The files in the state directory are the trained ones.
  EXPECT_EQ(ReadAll(VersionDir(state_dir_, "big", 1) + "/adapter_model.safetensors"),
            ReadAll(Fixture("rank64/adapter_model.safetensors")));
}

TEST_F(RegistryTest, DamagedStateIsDataLoss) {
  {
    auto r = Open();
    ASSERT_NE(r, nullptr);
    ASSERT_THAT(r->RegisterFromPath("x", "qv", false, false), IsOk());
  }
  std::ofstream(VersionDir(state_dir_, "x", 1) + "/adapter_model.safetensors", std::ios::app)
      << "tail";
  EXPECT_THAT(AdapterRegistry::Open(options_), StatusIs(absl::StatusCode::kDataLoss, "'x'"));
  std::ofstream(state_dir_ + "/manifest.json") << "{\"format\": 1";
  EXPECT_THAT(AdapterRegistry::Open(options_),
              StatusIs(absl::StatusCode::kDataLoss, "manifest.json"));
}

// SetMerged records the merge in the manifest; a reopened registry offers it back to be merged
// again, keeps recording it until then, and forgets it once unmerged.
TEST_F(RegistryTest, MergeIsRecordedAndOfferedBackAfterReopen) {
  {
    auto r = Open();
    ASSERT_NE(r, nullptr);
    ASSERT_THAT(r->RegisterFromPath("m", "qv", false, false), IsOk());
    ASSERT_THAT(r->RegisterFromPath("o", "rank1", false, false), IsOk());
    ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> lease, r->Acquire("m", false));
    ASSERT_THAT(r->SetMerged(lease), IsOk());
    EXPECT_EQ(r->merged(), lease);
    EXPECT_EQ(r->merge_to_restore(), "");
    ASSERT_OK_AND_ASSIGN(AdapterInfo m, r->Get("m"));
    EXPECT_TRUE(m.merged);
    // One merged version at a time.
    ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> other, r->Acquire("o", false));
    EXPECT_THAT(r->SetMerged(other), StatusIs(absl::StatusCode::kFailedPrecondition, "'m' v1"));
    EXPECT_EQ(r->merged(), lease);
    // The registry's own lease keeps the version in memory once the caller's is gone.
    lease.reset();
    ASSERT_OK_AND_ASSIGN(m, r->Get("m"));
    EXPECT_EQ(m.leases, 1);
  }
  {
    auto r = Open();
    ASSERT_NE(r, nullptr);
    EXPECT_EQ(r->merge_to_restore(), "m@1");
    ASSERT_OK_AND_ASSIGN(AdapterInfo m, r->Get("m"));
    EXPECT_FALSE(m.merged) << "not merged into any weights yet";
    // A registration before the merge is restored keeps the record.
    ASSERT_THAT(r->RegisterFromPath("p", "layers", false, false), IsOk());
    ASSERT_OK_AND_ASSIGN(std::vector<ManifestEntry> manifest, ReadManifest(state_dir_));
    ASSERT_EQ(manifest.size(), 3u);
    EXPECT_TRUE(manifest[0].merged);
    EXPECT_FALSE(manifest[1].merged);
    ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> lease, r->Acquire("m", false));
    ASSERT_THAT(r->SetMerged(lease), IsOk());
    EXPECT_EQ(r->merge_to_restore(), "");
    ASSERT_THAT(r->ClearMerged(), IsOk());
    EXPECT_EQ(r->merged(), nullptr);
    ASSERT_OK_AND_ASSIGN(m, r->Get("m"));
    EXPECT_FALSE(m.merged);
  }
  auto r = Open();
  ASSERT_NE(r, nullptr);
  EXPECT_EQ(r->merge_to_restore(), "");
}

// AcquireAsync answers a resident version (and a bad spec) on the caller's thread before it
// returns; an evicted one is read back on a loader thread while the caller goes on. The reload is
// held up by making the state directory's adapter_config.json a FIFO that nothing writes yet.
TEST_F(RegistryTest, AcquireAsyncReloadsOffTheCallersThread) {
  options_.max_loaded = 1;
  auto r = Open();
  ASSERT_NE(r, nullptr);
  ASSERT_THAT(r->RegisterFromPath("a", "qv", false, false), IsOk());
  ASSERT_THAT(r->RegisterFromPath("b", "rank1", false, false), IsOk());  // evicts a
  ASSERT_OK_AND_ASSIGN(AdapterInfo a_info, r->Get("a"));
  ASSERT_EQ(a_info.residency, Residency::kDisk);

  bool inline_done = false;
  r->AcquireAsync("b", [&](absl::StatusOr<std::shared_ptr<const Lease>> lease) {
    inline_done = true;
    EXPECT_THAT(lease, IsOk());
  });
  EXPECT_TRUE(inline_done) << "a resident version must be answered at once";
  inline_done = false;
  r->AcquireAsync("nope", [&](absl::StatusOr<std::shared_ptr<const Lease>> lease) {
    inline_done = true;
    EXPECT_THAT(lease, StatusIs(absl::StatusCode::kNotFound));
  });
  EXPECT_TRUE(inline_done);

  const std::string config = VersionDir(state_dir_, "a", 1) + "/adapter_config.json";
  const std::string text = ReadAll(config);
  ASSERT_TRUE(fs::remove(config));
  ASSERT_EQ(mkfifo(config.c_str(), 0600), 0);
  std::atomic<bool> done{false};
  std::shared_ptr<const Lease> a;
  const std::thread::id caller = std::this_thread::get_id();
  std::thread::id loader;
  r->AcquireAsync("a", [&](absl::StatusOr<std::shared_ptr<const Lease>> lease) {
    loader = std::this_thread::get_id();
    if (lease.ok()) a = *lease;
    EXPECT_THAT(lease, IsOk());
    done.store(true);
  });
  absl::SleepFor(absl::Milliseconds(200));
  EXPECT_FALSE(done.load()) << "the reload should be waiting on the FIFO";
  {
    std::ofstream fifo(config);  // opens once the loader has it open for reading
    fifo << text;
  }
  for (int i = 0; i < 1000 && !done.load(); ++i) absl::SleepFor(absl::Milliseconds(10));
  ASSERT_TRUE(done.load());
  EXPECT_NE(loader, caller);
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->version(), 1);
  EXPECT_EQ(a->adapter().max_rank(), 8);  // qv
}

// --load-on-demand: a name that is not registered is registered from <adapter_dir>/<name> by the
// first Acquire (once, however many ask at the same time, and off the AcquireAsync caller's
// thread); names without such a folder, versioned specs and a registry without the option answer
// NOT_FOUND as before.
TEST_F(RegistryTest, LoadOnDemandRegistersAFolderOfTheSameNameOnce) {
  {
    auto off = Open();
    ASSERT_NE(off, nullptr);
    EXPECT_THAT(off->Acquire("qv"), StatusIs(absl::StatusCode::kNotFound));
  }
  options_.load_on_demand = true;
  auto r = Open();
  ASSERT_NE(r, nullptr);
  EXPECT_THAT(r->Acquire("nope"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(r->Acquire("qv@1"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_TRUE(r->List().empty()) << "nothing is registered by a failed lookup";

  constexpr int kCallers = 8;
  std::atomic<int> ok{0}, answered{0};
  std::vector<std::thread::id> threads(kCallers);
  for (int i = 0; i < kCallers; ++i) {
    r->AcquireAsync("rank1", [&, i](absl::StatusOr<std::shared_ptr<const Lease>> lease) {
      threads[i] = std::this_thread::get_id();
      if (lease.ok() && (*lease)->version() == 1) ok.fetch_add(1);
      answered.fetch_add(1);
    });
  }
  for (int i = 0; i < 1000 && answered.load() < kCallers; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(answered.load(), kCallers);
  EXPECT_EQ(ok.load(), kCallers);
  for (const std::thread::id& t : threads) EXPECT_NE(t, std::this_thread::get_id());
  ASSERT_OK_AND_ASSIGN(std::shared_ptr<const Lease> qv, r->Acquire("qv"));
  EXPECT_EQ(qv->adapter().max_rank(), 8);
  const std::vector<AdapterInfo> all = r->List();
  ASSERT_EQ(all.size(), 2u);
  EXPECT_EQ(all[0].name, "qv");
  EXPECT_EQ(all[1].name, "rank1");
  EXPECT_EQ(all[1].version, 1);

  // Unloaded, the name is loaded again on the next request, as a new version.
  qv = nullptr;
  ASSERT_THAT(r->Unload("qv"), IsOk());
  ASSERT_OK_AND_ASSIGN(qv, r->Acquire("qv"));
  EXPECT_EQ(qv->version(), 2);
}

// A manifest written before the "merged" field existed loads with every adapter unmerged; the
// field round-trips; two merged entries or a non-boolean are damage.
TEST(ManifestTest, MergedFieldIsOptionalAndAtMostOnce) {
  const std::string dir = MakeTempDir("lp-manifest");
  std::ofstream(dir + "/manifest.json") << R"({"format": "loraplex-adapter-manifest",
      "format_version": 1, "adapters": [
      {"name": "a", "version": 2, "sha256": "ab", "pinned": true, "source": "upload"},
      {"name": "b", "version": 1, "sha256": "cd"}]})";
  ASSERT_OK_AND_ASSIGN(std::vector<ManifestEntry> old, ReadManifest(dir));
  ASSERT_EQ(old.size(), 2u);
  EXPECT_FALSE(old[0].merged);
  EXPECT_FALSE(old[1].merged);
  EXPECT_TRUE(old[0].pinned);

  old[1].merged = true;
  ASSERT_THAT(WriteManifest(dir, old), IsOk());
  ASSERT_OK_AND_ASSIGN(std::vector<ManifestEntry> back, ReadManifest(dir));
  ASSERT_EQ(back.size(), 2u);
  EXPECT_FALSE(back[0].merged);
  EXPECT_TRUE(back[1].merged);
  EXPECT_EQ(back[1].name, "b");

  back[0].merged = true;
  ASSERT_THAT(WriteManifest(dir, back), IsOk());
  EXPECT_THAT(ReadManifest(dir), StatusIs(absl::StatusCode::kDataLoss, "second adapter marked"));
  std::ofstream(dir + "/manifest.json") << R"({"format": "loraplex-adapter-manifest",
      "format_version": 1, "adapters": [{"name": "a", "version": 1, "sha256": "ab",
      "merged": "yes"}]})";
  EXPECT_THAT(ReadManifest(dir), StatusIs(absl::StatusCode::kDataLoss, "adapters[0].merged"));
  fs::remove_all(dir);
}

// max_rank (the rank compression of a version) is optional (older manifests: 0), round-trips,
// and must be an integer >= 0.
TEST(ManifestTest, MaxRankFieldIsOptionalAndNonNegative) {
  const std::string dir = MakeTempDir("lp-manifest");
  std::ofstream(dir + "/manifest.json") << R"({"format": "loraplex-adapter-manifest",
      "format_version": 1, "adapters": [{"name": "a", "version": 2, "sha256": "ab"}]})";
  ASSERT_OK_AND_ASSIGN(std::vector<ManifestEntry> old, ReadManifest(dir));
  ASSERT_EQ(old.size(), 1u);
  EXPECT_EQ(old[0].max_rank, 0);
  old[0].max_rank = 8;
  ASSERT_THAT(WriteManifest(dir, old), IsOk());
  ASSERT_OK_AND_ASSIGN(std::vector<ManifestEntry> back, ReadManifest(dir));
  EXPECT_EQ(back[0].max_rank, 8);
  for (const char* bad : {"-1", "2.5", "\"8\""}) {
    std::ofstream(dir + "/manifest.json") << R"({"format": "loraplex-adapter-manifest",
        "format_version": 1, "adapters": [{"name": "a", "version": 1, "sha256": "ab",
        "max_rank": )" << bad << "}]}";
    EXPECT_THAT(ReadManifest(dir), StatusIs(absl::StatusCode::kDataLoss, "adapters[0].max_rank"))
        << bad;
  }
  fs::remove_all(dir);
}

// Found by fuzz/manifest_fuzz.cc: a manifest naming version INT64_MAX opened, and the next replace
// overflowed the version counter (signed overflow). Versions from 2^53 on are damage.
TEST(ManifestTest, VersionOutsideOneToTwoPow53IsDamage) {
  const std::string dir = MakeTempDir("lp-manifest");
  auto write = [&](const std::string& version) {
    std::ofstream(dir + "/manifest.json")
        << R"({"format": "loraplex-adapter-manifest", "format_version": 1, "adapters": [)"
        << R"({"name": "a", "version": )" << version << R"(, "sha256": "ab"}]})";
  };
  for (const char* v :
       {"0", "-1", "9007199254740992", "9223372036854775807", "18446744073709551615"}) {
    write(v);
    EXPECT_THAT(ReadManifest(dir), StatusIs(absl::StatusCode::kDataLoss, "adapters[0].version"))
        << v;
  }
  write("9007199254740991");
  ASSERT_OK_AND_ASSIGN(std::vector<ManifestEntry> entries, ReadManifest(dir));
  EXPECT_EQ(entries[0].version, (int64_t{1} << 53) - 1);
  fs::remove_all(dir);
}

// Many threads lease while another replaces: a lease taken after a replace returned is never on
// an older version, and every lease sees the weights of its own version. Run under TSan.
TEST_F(RegistryTest, ConcurrentLeasesDuringReplaces) {
  options_.max_loaded = 2;
  auto r = Open();
  ASSERT_NE(r, nullptr);
  ASSERT_THAT(r->RegisterFromPath("x", "qv", false, false), IsOk());
  ASSERT_THAT(r->RegisterFromPath("other", "layers", false, false), IsOk());
  std::atomic<int64_t> published{1};  // the version whose Register has returned
  std::atomic<bool> stop{false};
  std::atomic<int> failures{0}, leases{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 6; ++t) {
    threads.emplace_back([&, t] {
      while (!stop.load()) {
        const int64_t floor = published.load();
        auto lease = r->Acquire(t % 3 == 2 ? "other" : "x");
        if (!lease.ok()) {
          failures.fetch_add(1);
          continue;
        }
        leases.fetch_add(1);
        if ((*lease)->name() == "x") {
          // qv (odd versions) has rank 8, all_linear (even versions) rank 4.
          const int64_t v = (*lease)->version();
          if (v < floor || (*lease)->adapter().max_rank() != (v % 2 == 1 ? 8 : 4)) {
            failures.fetch_add(1);
          }
        }
      }
    });
  }
  for (int i = 2; i <= 21; ++i) {
    auto info = r->RegisterFromPath("x", i % 2 == 1 ? "qv" : "all_linear", true, false);
    ASSERT_THAT(info, IsOk());
    ASSERT_EQ(info->version, i);
    published.store(i);
  }
  stop.store(true);
  for (std::thread& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);
  EXPECT_GT(leases.load(), 0);
  EXPECT_EQ(r->List().size(), 2u);  // every replaced version drained
  EXPECT_LE(r->loaded_count(), 2);
}

}  // namespace
}  // namespace loraplex::adapters
