// End to end: the adapter state directory (docs/operations.md, "The state directory") on a full
// or failing disk, against a real loraplex-server on stories260K.
//
// FullTmpfsStateDir... and InjectedWriteFaults...: a state directory that runs out of space (a
// small tmpfs; skipped when mount is not permitted) and one whose writes, fsyncs, renames and
// file creations fail (the LD_PRELOAD interposer tests/e2e/fault_inject.cc): registrations that
// hit the fault fail with FAILED_PRECONDITION naming it (the code every disk error of the registry
// has: the server's disk must be fixed before a retry can succeed), nothing half-written is
// listed or served, the adapters already registered keep serving, the server keeps running, a
// registration succeeds once space is back, and a restart (also one with the fault still on)
// serves everything that returned OK, merged as it was.
//
// The kill -9 loop is crash_e2e_test.cc; what both share is crash_e2e_util.h.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "tests/e2e/crash_e2e_util.h"

namespace loraplex::crash_e2e {
namespace {

using grpc::StatusCode;

constexpr char kNoSpace[] = "No space left on device";
constexpr char kIoError[] = "Input/output error";

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
  // The LD_PRELOAD interposer (tests/e2e/fault_inject.cc) in front of the server, driven by the
  // control file FaultControl() ("" for no faults), which records each fault it injects in
  // FaultControl() + ".hits".
  std::string FaultControl() const { return dir_ + "/faults"; }
  void SetFaults(const std::string& text) {
    std::ofstream(FaultControl() + ".new") << text;
    fs::rename(FaultControl() + ".new", FaultControl());  // a new file: the interposer re-reads it
  }
  std::string FaultHits() const { return ReadAll(FaultControl() + ".hits"); }
  // Start() with the interposer preloaded.
  std::unique_ptr<AdminServer> StartWithFaults() {
    std::string asan = "verify_asan_link_order=0";
    if (const char* a = std::getenv("ASAN_OPTIONS")) asan = absl::StrCat(a, ":", asan);
    return Start({{"LD_PRELOAD", LP_FAULT_LIB},
                  {"LP_FAULT_CONTROL", FaultControl()},
                  {"ASAN_OPTIONS", asan}});
  }
  // "keep" (upload of qv, merged) and "keep2" (load of rank1): what the faults must not harm.
  void RegisterKeepers(AdminServer& s) {
    v1::AdapterInfo info;
    grpc::Status st = UploadInChunks(s, "keep", F("qv").dir, false, F("qv").sha256, &info);
    ASSERT_TRUE(st.ok()) << Describe(st);
    st = Load(s, "keep2", "rank1", false, &info);
    ASSERT_TRUE(st.ok()) << Describe(st);
    st = SetMode(s, "keep", true, &info);
    ASSERT_TRUE(st.ok()) << Describe(st);
    want_["keep"] = {1, F("qv").sha256, true};
    want_["keep2"] = {1, F("rank1").sha256, false};
  }
  // Registers "big" (all_linear) by upload or by path.
  grpc::Status RegisterBig(AdminServer& s, bool upload, v1::AdapterInfo* info) {
    return upload
               ? UploadInChunks(s, "big", F("all_linear").dir, false, F("all_linear").sha256, info)
               : Load(s, "big", "all_linear", false, info);
  }
  // After a refused registration of "big": not listed, not served, nothing on disk.
  void ExpectBigAbsent(AdminServer& s) {
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
  for (const char* m :
       {"upload data (upload)", "manifest (upload)", "copy (load)", "manifest (load)"}) {
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
  SetFaults("");
  auto s = StartWithFaults();
  ASSERT_TRUE(s->ok());
  RegisterKeepers(*s);
  const std::string prefix = "prefix=" + state_ + "\n";

  // Writes that run out after N bytes, N from 0 to past the whole registration: every step of
  // the write path (staged files, manifest) fails once.
  const int64_t total = F("all_linear").bytes;
  std::vector<int64_t> budgets = {
      0, 1, 100, int64_t{kChunk} - 1, int64_t{kChunk}, total / 2, total - 1, total, total + 1};
  for (int64_t extra = 64; extra <= 4096; extra += 64) budgets.push_back(total + extra);
  int refusals = 0;
  std::set<std::string> steps;
  for (bool upload : {true, false}) {
    bool fitted = false;
    for (int64_t budget : budgets) {
      const std::string where =
          absl::StrCat(upload ? "upload" : "load", " with writes failing after ", budget, " bytes");
      const size_t hits_before = FaultHits().size();
      SetFaults(prefix + "write_after=" + std::to_string(budget) + "\n");
      v1::AdapterInfo info;
      grpc::Status st = RegisterBig(*s, upload, &info);
      SetFaults("");
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
      EXPECT_GT(FaultHits().size(), hits_before) << where << ": refused, but not by the fault";
      ExpectCleanRefusal(st, kNoSpace, where);
      steps.insert(Step(st.error_message()) + (upload ? " (upload)" : " (load)"));
      ExpectBigAbsent(*s);
      if (HasFailure()) return;
    }
    EXPECT_TRUE(fitted) << (upload ? "upload" : "load") << " never fitted";
  }
  for (const char* m :
       {"upload data (upload)", "manifest (upload)", "copy (load)", "manifest (load)"}) {
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
      const size_t hits_before = FaultHits().size();
      SetFaults(f.config);
      v1::AdapterInfo info;
      grpc::Status st = RegisterBig(*s, upload, &info);
      SetFaults("");
      EXPECT_GT(FaultHits().size(), hits_before) << where << ": the fault was not reached";
      ++refusals;
      ExpectCleanRefusal(st, f.message, where);
      ExpectBigAbsent(*s);
      if (HasFailure()) return;
    }
  }
  // The state directory's fsync after the manifest rename: refused, and not served now.
  {
    SetFaults(prefix + "fsync_after=0\nfsync_path=" + state_ + "\n");
    const size_t hits_before = FaultHits().size();
    v1::AdapterInfo info;
    grpc::Status st = RegisterBig(*s, true, &info);
    SetFaults("");
    EXPECT_GT(FaultHits().size(), hits_before) << "the state directory's fsync was not reached";
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
  SetFaults(prefix + "write_after=0\ncreate_after=0\n");
  s = StartWithFaults();
  ASSERT_TRUE(s->ok());
  CheckRestarted(*s, want_, &checks_);
  ExpectCleanRefusal(UploadInChunks(*s, "big2", F("layers").dir, false, "", &info), kNoSpace,
                     "upload on the failing disk after the restart");
  SetFaults("");
  s->Kill();

  // The failed state-directory fsync never cost a restart (no DATA_LOSS) and a fault-free
  // restart serves the same.
  s = StartWithFaults();
  ASSERT_TRUE(s->ok());
  CheckRestarted(*s, want_, &checks_);
  st = UploadInChunks(*s, "big2", F("layers").dir, false, F("layers").sha256, &info);
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
  SetFaults("");
  auto s = StartWithFaults();
  ASSERT_TRUE(s->ok());
  RegisterKeepers(*s);
  int served_new = 0;
  for (bool upload : {true, false}) {
    for (const char* name : {"big", "keep2"}) {  // a new name, a replace
      const std::string folder = std::string(name) == "big" ? "all_linear" : "layers";
      const std::string where = absl::StrCat(upload ? "upload" : "load", " of ", name,
                                             ", failing the state directory's fsync");
      auto do_register = [&](const std::string& from, v1::AdapterInfo* info) {
        return upload ? UploadInChunks(*s, name, F(from).dir, true, F(from).sha256, info)
                      : Load(*s, name, from, true, info);
      };
      auto fail_once = [&] {
        SetFaults("prefix=" + state_ + "\nfsync_after=0\nfsync_path=" + state_ + "\n");
        v1::AdapterInfo info;
        grpc::Status st = do_register(folder, &info);
        SetFaults("");
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
      s = StartWithFaults();
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
}  // namespace loraplex::crash_e2e
