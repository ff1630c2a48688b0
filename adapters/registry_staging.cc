// The write side of the adapter registry: PEFT files copied or uploaded into the state
// directory's staging area, validated, fsynced and committed as a new version (adapters/registry.h
// documents the contract, adapters/manifest.h the files). Split from registry.cc, which keeps the
// names, lookups, leases and memory tiers.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "adapters/registry.h"
#include "adapters/registry_internal.h"
#include "common/logging.h"
#include "common/status.h"

namespace loraplex::adapters {

namespace fs = std::filesystem;
using internal::Describe;
using internal::FsError;
using internal::WithCompression;

namespace {

// The rank compression of a registration: 0 (none) or a rank >= 1.
absl::Status ValidateMaxRank(int64_t max_rank) {
  if (max_rank < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_rank must be 0 (serve as trained) or a rank >= 1, got ", max_rank));
  }
  return absl::OkStatus();
}

bool IsHex64(absl::string_view s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

// Whether `path` (normalised) is `root` or inside it.
bool Inside(const fs::path& path, const fs::path& root) {
  const std::string p = path.lexically_normal().string();
  std::string r = root.lexically_normal().string();
  if (!r.empty() && r.back() == '/') r.pop_back();
  return p == r || absl::StartsWith(p, r + "/");
}

// Copies `from` into the new file `to` and returns the open descriptor of `to`. The copy runs in
// the kernel (copy_file_range: no round trip through user space, and a clone on filesystems with
// reflinks), falling back to read/write where that is not possible (another filesystem, old
// kernels). Then starts the writeback without waiting for it: the caller fsyncs later, after the
// CPU work that the disk can overlap with. NOT_FOUND when `from` is missing.
absl::StatusOr<int> CopyStartingWriteback(const std::string& from, const std::string& to) {
  const int in = open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) {
    return errno == ENOENT ? absl::NotFoundError(absl::StrCat(from, ": missing"))
                           : absl::FailedPreconditionError(
                                 absl::StrCat("cannot open ", from, ": ", std::strerror(errno)));
  }
  const int out = open(to.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
  if (out < 0) {
    absl::Status s = absl::FailedPreconditionError(
        absl::StrCat("cannot create ", to, ": ", std::strerror(errno)));
    close(in);
    return s;
  }
  auto fail = [&](const char* what) {
    absl::Status s = absl::FailedPreconditionError(
        absl::StrCat("cannot copy ", from, " (", what, "): ", std::strerror(errno)));
    close(in);
    close(out);
    return s;
  };
  bool in_kernel = true;
  for (;;) {
    const ssize_t n = copy_file_range(in, nullptr, out, nullptr, size_t{1} << 30, 0);
    if (n == 0) break;
    if (n > 0) continue;
    if (errno == EINTR) continue;
    if (errno == EXDEV || errno == ENOSYS || errno == EINVAL || errno == EOPNOTSUPP) {
      in_kernel = false;  // continue from the current offsets with plain reads and writes
      break;
    }
    return fail("copy_file_range");
  }
  if (!in_kernel) {
    std::vector<char> buffer(1 << 20);
    for (;;) {
      const ssize_t n = read(in, buffer.data(), buffer.size());
      if (n == 0) break;
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return fail("read");
      for (ssize_t done = 0; done < n;) {
        const ssize_t w = write(out, buffer.data() + done, n - done);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return fail("write");
        done += w;
      }
    }
  }
  close(in);
  // A hint: errors here only mean the later fsync does all the work.
  sync_file_range(out, 0, 0, SYNC_FILE_RANGE_WRITE);
  return out;
}

}  // namespace

// --- PendingUpload -------------------------------------------------------------------------------

PendingUpload::~PendingUpload() {
  for (auto& [file, fd] : fds_) close(fd);
  if (!committed_ && !staging_.empty()) {
    std::error_code ec;
    fs::remove_all(staging_, ec);
  }
}

absl::Status PendingUpload::Append(absl::string_view file_name, absl::string_view data) {
  if (committed_) return absl::FailedPreconditionError("upload already committed");
  if (file_name != kAdapterConfigFile && file_name != kAdapterWeightsFile) {
    return absl::InvalidArgumentError(absl::StrCat("chunk file_name '", file_name, "': must be ",
                                                   kAdapterConfigFile, " or ",
                                                   kAdapterWeightsFile));
  }
  bytes_ += static_cast<int64_t>(data.size());
  if (bytes_ > registry_->options().max_upload_bytes) {
    return absl::ResourceExhaustedError(absl::StrCat("upload of '", name_, "' passes the limit of ",
                                                     registry_->options().max_upload_bytes,
                                                     " bytes (--max-adapter-bytes)"));
  }
  const std::string file(file_name);
  auto it = fds_.find(file);
  if (it == fds_.end()) {
    const std::string path = absl::StrCat(staging_, "/", file);
    const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot create ", path, ": ", std::strerror(errno)));
    }
    it = fds_.emplace(file, fd).first;
  }
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = write(it->second, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      return absl::FailedPreconditionError(
          absl::StrCat("cannot write the upload of '", name_, "': ", std::strerror(errno)));
    }
    done += static_cast<size_t>(n);
  }
  return absl::OkStatus();
}

absl::StatusOr<AdapterInfo> PendingUpload::Commit(std::function<bool()> abandoned) {
  if (committed_) return absl::FailedPreconditionError("upload already committed");
  committed_ = true;  // from here on Commit owns (and on failure removes) the staging folder
  const absl::Time start = absl::Now();
  AdapterRegistry::Staged staged;  // the chunks were written as they came: no stage phase
  staged.dir = staging_;
  for (auto& [file, fd] : fds_) {
    sync_file_range(fd, 0, 0, SYNC_FILE_RANGE_WRITE);  // what the kernel has not started yet
    staged.fds.push_back(fd);
  }
  fds_.clear();
  return registry_->Commit(name_, std::move(staged), replace_, pin_, max_rank_, "upload",
                           absl::AsciiStrToLower(sha256_), RegistrationPhases(), start, abandoned);
}

absl::StatusOr<std::string> AdapterRegistry::NewStagingDir() {
  int64_t n;
  {
    MutexLock lock(&mu_);
    n = ++staging_counter_;
  }
  std::random_device rd;
  const std::string dir =
      absl::StrCat(options_.state_dir, "/staging/", n, "-", static_cast<uint32_t>(rd()));
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) return FsError(absl::StrCat("cannot create ", dir), ec);
  return dir;
}

AdapterRegistry::Staged::~Staged() {
  for (int fd : fds) close(fd);
}

absl::StatusOr<AdapterRegistry::Staged> AdapterRegistry::StageCopy(const std::string& dir,
                                                                   RegistrationPhases* phases) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) {
    return absl::NotFoundError(absl::StrCat(dir, ": no such adapter folder"));
  }
  if (!fs::exists(fs::path(dir) / kAdapterWeightsFile, ec) &&
      fs::exists(fs::path(dir) / "adapter_model.bin", ec)) {
    return absl::InvalidArgumentError(absl::StrCat(
        dir,
        "/adapter_model.bin: pickled weights are not loaded (code execution risk); save the "
        "adapter with safe_serialization=True to get ",
        kAdapterWeightsFile));
  }
  // A copy, never a hard link: the operator's file may later be rewritten in place (PEFT's
  // save_pretrained truncates and rewrites), which must not change a registered version.
  const absl::Time t = absl::Now();
  Staged staged;
  LP_ASSIGN_OR_RETURN(staged.dir, NewStagingDir());
  for (const char* file : {kAdapterConfigFile, kAdapterWeightsFile}) {
    absl::StatusOr<int> fd =
        CopyStartingWriteback(absl::StrCat(dir, "/", file), absl::StrCat(staged.dir, "/", file));
    if (absl::IsNotFound(fd.status())) continue;  // LoraAdapter::Load names what is missing
    if (!fd.ok()) {
      fs::remove_all(staged.dir, ec);
      return fd.status();
    }
    staged.fds.push_back(*fd);
  }
  phases->stage = absl::Now() - t;
  return staged;
}

// Checked early (before any bytes are copied) and again at commit, where it decides.
absl::Status AdapterRegistry::CheckNewVersionAllowedLocked(const std::string& name,
                                                           bool replace) const {
  auto it = names_.find(name);
  if (!replace && it != names_.end() && it->second->current != nullptr) {
    return absl::AlreadyExistsError(absl::StrCat("adapter '", name, "' exists (version ",
                                                 it->second->current->version,
                                                 "); set replace to make a new version"));
  }
  return absl::OkStatus();
}

absl::StatusOr<AdapterInfo> AdapterRegistry::RegisterFromPath(const std::string& name,
                                                              const std::string& rel_path,
                                                              bool replace, bool pin,
                                                              int64_t max_rank) {
  const absl::Time start = absl::Now();
  LP_RETURN_IF_ERROR(ValidateAdapterName(name));
  LP_RETURN_IF_ERROR(ValidateMaxRank(max_rank));
  if (options_.adapter_dir.empty()) {
    return absl::PermissionDeniedError(
        "this server has no --adapter-dir, so LoadAdapter by path is off; use UploadAdapter");
  }
  if (rel_path.empty() || fs::path(rel_path).is_absolute()) {
    return absl::PermissionDeniedError(absl::StrCat(
        "path '", rel_path, "' must be a non-empty path relative to the server's --adapter-dir"));
  }
  std::error_code ec;
  const fs::path root = fs::weakly_canonical(options_.adapter_dir, ec);
  if (ec) return FsError(absl::StrCat("--adapter-dir ", options_.adapter_dir), ec);
  // weakly_canonical resolves every symlink and ".." of the part that exists, so a link pointing
  // out of the root is caught before anything is read.
  const fs::path dir = fs::weakly_canonical(root / rel_path, ec);
  if (ec || !Inside(dir, root)) {
    return absl::PermissionDeniedError(
        absl::StrCat("path '", rel_path, "' resolves outside the server's --adapter-dir"));
  }
  for (const char* file : {kAdapterConfigFile, kAdapterWeightsFile}) {
    const fs::path f = fs::weakly_canonical(dir / file, ec);
    if (ec || !Inside(f, root)) {
      return absl::PermissionDeniedError(absl::StrCat(
          "path '", rel_path, "/", file, "' resolves outside the server's --adapter-dir"));
    }
  }
  {
    MutexLock lock(&mu_);
    LP_RETURN_IF_ERROR(CheckNewVersionAllowedLocked(name, replace));
  }
  RegistrationPhases phases;
  LP_ASSIGN_OR_RETURN(Staged staged, StageCopy(dir.string(), &phases));
  return Commit(name, std::move(staged), replace, pin, max_rank, absl::StrCat("path:", rel_path),
                "", phases, start);
}

absl::StatusOr<AdapterInfo> AdapterRegistry::RegisterFromDir(const std::string& name,
                                                             const std::string& dir, bool replace,
                                                             bool pin, int64_t max_rank) {
  LP_RETURN_IF_ERROR(ValidateAdapterName(name));
  LP_RETURN_IF_ERROR(ValidateMaxRank(max_rank));
  const absl::Time start = absl::Now();
  RegistrationPhases phases;
  LP_ASSIGN_OR_RETURN(Staged staged, StageCopy(dir, &phases));
  return Commit(name, std::move(staged), replace, pin, max_rank, absl::StrCat("dir:", dir), "",
                phases, start);
}

absl::StatusOr<std::unique_ptr<PendingUpload>> AdapterRegistry::BeginUpload(
    const std::string& name, bool replace, const std::string& sha256, bool pin, int64_t max_rank) {
  LP_RETURN_IF_ERROR(ValidateAdapterName(name));
  LP_RETURN_IF_ERROR(ValidateMaxRank(max_rank));
  if (!sha256.empty() && !IsHex64(sha256)) {
    return absl::InvalidArgumentError(
        absl::StrCat("header.sha256 must be 64 hex digits, got ", sha256.size(), " characters"));
  }
  {
    MutexLock lock(&mu_);
    LP_RETURN_IF_ERROR(CheckNewVersionAllowedLocked(name, replace));
  }
  LP_ASSIGN_OR_RETURN(std::string staging, NewStagingDir());
  auto upload = std::unique_ptr<PendingUpload>(new PendingUpload());
  upload->registry_ = this;
  upload->name_ = name;
  upload->sha256_ = sha256;
  upload->staging_ = staging;
  upload->replace_ = replace;
  upload->pin_ = pin;
  upload->max_rank_ = max_rank;
  return upload;
}

absl::StatusOr<AdapterInfo> AdapterRegistry::Commit(const std::string& name, Staged staged,
                                                    bool replace, bool pin, int64_t max_rank,
                                                    const std::string& source,
                                                    const std::string& expected_sha256,
                                                    RegistrationPhases phases, absl::Time start,
                                                    const std::function<bool()>& abandoned) {
  const std::string staging = staged.dir;
  auto cancelled = [&abandoned, &name] {
    return abandoned && abandoned()
               ? absl::CancelledError(absl::StrCat("the upload of '", name,
                                                   "' was cancelled; nothing was registered"))
               : absl::OkStatus();
  };
  auto discard = [&staging](absl::Status s) {
    std::error_code ec;
    fs::remove_all(staging, ec);
    return s;
  };
  {
    MutexLock lock(&mu_);
    ++loading_[name];
  }
  struct Unmark {
    AdapterRegistry* r;
    const std::string& name;
    ~Unmark() {
      MutexLock lock(&r->mu_);
      if (--r->loading_[name] == 0) r->loading_.erase(name);
    }
  } unmark{this, name};

  // Validation is the slow part: done before taking admin_mu_, so registrations of different
  // adapters overlap and nothing here blocks Acquire. Three things overlap: the parse and
  // conversion (this thread), the hash (a second thread, reading the staged file from the page
  // cache) and the fsync of the staged files (a third, mostly waiting on the disk). The files are
  // durable before the rename below makes them a version.
  absl::Status data_synced;
  std::thread syncer([&staged, &data_synced, &phases, &name] {
    const absl::Time t = absl::Now();
    for (int fd : staged.fds) {
      if (fsync(fd) != 0 && data_synced.ok()) {
        data_synced = absl::FailedPreconditionError(
            absl::StrCat("cannot fsync the staged files of '", name, "': ", std::strerror(errno)));
      }
      close(fd);
    }
    staged.fds.clear();
    phases.sync = absl::Now() - t;
  });
  const std::string weights_path = absl::StrCat(staging, "/", kAdapterWeightsFile);
  absl::StatusOr<std::string> sha;
  std::thread hasher([&sha, &phases, &weights_path] {
    const absl::Time t = absl::Now();
    sha = Sha256OfFile(weights_path);
    phases.hash = absl::Now() - t;
  });
  const absl::Time t = absl::Now();
  absl::StatusOr<std::unique_ptr<LoraAdapter>> adapter =
      LoraAdapter::Load(staging, options_.base, WithCompression(options_.load, max_rank));
  phases.load = absl::Now() - t;
  hasher.join();
  syncer.join();
  if (!expected_sha256.empty()) {
    if (!sha.ok()) {
      return discard(absl::InvalidArgumentError(
          absl::StrCat("upload of '", name, "' has no ", kAdapterWeightsFile)));
    }
    if (*sha != expected_sha256) {
      return discard(absl::InvalidArgumentError(
          absl::StrCat("upload of '", name, "': sha256 of ", kAdapterWeightsFile, " is ", *sha,
                       ", the header said ", expected_sha256)));
    }
  }
  if (!adapter.ok())
    return discard(Annotate(adapter.status(), absl::StrCat("adapter '", name, "'")));
  if (!sha.ok()) return discard(sha.status());
  if (!data_synced.ok()) return discard(data_synced);
  if (!pin && options_.memory_bytes > 0 && (*adapter)->bytes() > options_.memory_bytes) {
    return discard(absl::ResourceExhaustedError(
        absl::StrCat("adapter '", name, "' needs ", (*adapter)->bytes(),
                     " bytes, more than the whole adapter "
                     "memory budget of ",
                     options_.memory_bytes, " (--adapter-memory); pin it or raise it")));
  }

  MutexLock admin(&admin_mu_);
  const absl::Time commit_start = absl::Now();
  int64_t version = 1;
  std::vector<ManifestEntry> manifest;
  {
    MutexLock lock(&mu_);
    if (absl::Status allowed = CheckNewVersionAllowedLocked(name, replace); !allowed.ok()) {
      return discard(std::move(allowed));
    }
    if (auto it = names_.find(name); it != names_.end()) version = it->second->last_version + 1;
    manifest = ManifestLocked();
  }
  if (absl::Status c = cancelled(); !c.ok()) return discard(std::move(c));
  const std::string dir = VersionDir(options_.state_dir, name, version);
  const std::string parent = absl::StrCat(options_.state_dir, "/adapters/", name);
  std::error_code ec;
  const bool new_parent = !fs::exists(parent, ec);
  fs::create_directories(parent, ec);
  if (ec) return discard(FsError(absl::StrCat("cannot create ", parent), ec));
  fs::rename(staging, dir, ec);
  if (ec) return discard(FsError(absl::StrCat("cannot move the adapter into ", dir), ec));
  // The rename lives in `parent` (itself a new entry of adapters/ only the first time). That
  // directory and the new manifest's temporary file are fsynced side by side; the manifest is
  // renamed into place only after both, so it never names a folder a crash could lose.
  absl::Status dir_synced;
  std::thread dir_syncer([&] {
    dir_synced = SyncPath(parent);
    if (dir_synced.ok() && new_parent) {
      dir_synced = SyncPath(absl::StrCat(options_.state_dir, "/adapters"));
    }
  });
  ManifestEntry entry{name, version, *sha, pin, source};
  entry.max_rank = max_rank;
  auto pos = std::find_if(manifest.begin(), manifest.end(),
                          [&](const ManifestEntry& e) { return e.name == name; });
  if (pos != manifest.end()) {
    *pos = entry;
  } else {
    manifest.push_back(entry);
  }
  absl::Status synced = StageManifest(options_.state_dir, manifest);
  dir_syncer.join();
  if (synced.ok()) synced = dir_synced;
  // The last moment a cancel can still undo the upload: publishing the manifest is the commit.
  if (synced.ok()) synced = cancelled();
  if (synced.ok()) synced = PublishManifest(options_.state_dir);
  if (!synced.ok()) {
    // When only the fsync after the manifest's rename failed, manifest.json names the new folder
    // already: keep it (a restart then serves this version instead of refusing to start with
    // DATA_LOSS), and never hand its version number out again in this process.
    absl::StatusOr<std::vector<ManifestEntry>> on_disk = ReadManifest(options_.state_dir);
    if (on_disk.ok() && std::any_of(on_disk->begin(), on_disk->end(), [&](const ManifestEntry& e) {
          return e.name == name && e.version == version;
        })) {
      LP_LOG(WARNING) << "adapter " << name << " v" << version << ": " << synced
                      << "; manifest.json names it, so a restart may serve it";
      MutexLock lock(&mu_);
      std::unique_ptr<Name>& n = names_[name];
      if (n == nullptr) n = std::make_unique<Name>();
      n->last_version = std::max(n->last_version, version);
      return synced;
    }
    fs::remove_all(dir, ec);
    return synced;
  }

  auto v = std::make_shared<Version>();
  v->name = name;
  v->version = version;
  v->dir = dir;
  v->sha256 = *sha;
  v->source = source;
  v->max_rank = max_rank;
  v->meta = Describe(**adapter);
  v->pinned = pin;
  v->last_used = absl::Now();  // newest first in line for memory, oldest registrations leave first
  std::shared_ptr<Version> drained;  // the replaced version, when nothing leases it
  AdapterInfo info;
  {
    MutexLock lock(&mu_);
    std::unique_ptr<Name>& n = names_[name];
    if (n == nullptr) n = std::make_unique<Name>();
    n->last_version = version;
    ++n->loads;
    if (std::shared_ptr<Version> old = std::move(n->current)) {
      old->state = AdapterState::kDraining;
      if (old->leases == 0) {
        if (old->weights != nullptr) EvictLocked(old.get());
        drained = old;
      } else {
        n->draining[old->version] = old;
      }
    }
    n->current = v;
    if (pin || MakeRoomLocked(v->meta.bytes)) {
      v->weights = *std::move(adapter);
      ChargeLocked(*v, +1);
    }
    info = InfoLocked(*v);
    phases.commit = absl::Now() - commit_start;
    phases.total = absl::Now() - start;
    last_registration_ = phases;
  }
  if (drained != nullptr) fs::remove_all(drained->dir, ec);
  const std::string compressed =
      info.compression ? absl::StrCat(" (compressed from rank ", info.compression->trained_max_rank,
                                      ", relative error ", info.compression->relative_error, ")")
                       : "";
  LP_LOG(INFO) << "adapter " << name << " v" << version << " registered from " << source
               << ": rank " << info.max_rank << compressed << (info.dora ? ", DoRA" : "") << ", "
               << info.bytes << " bytes, " << ResidencyName(info.residency) << ", READY in "
               << phases.total << " (stage " << phases.stage << ", sync " << phases.sync
               << ", load " << phases.load << ", hash " << phases.hash << ", commit "
               << phases.commit << ")";
  return info;
}

}  // namespace loraplex::adapters
