#include "adapters/registry.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <random>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "common/status.h"

namespace loraplex::adapters {

namespace fs = std::filesystem;

namespace {

// absl::MutexLock that ThreadSanitizer can see through: Debian's Abseil is not built with TSan, so
// without these edges every handoff through mu_ is reported as a race. The same helper as
// engine/tsan_lock.h, which adapters/ cannot include (it sits below engine/ in the layering).
#if defined(__SANITIZE_THREAD__)
#define LP_REGISTRY_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define LP_REGISTRY_TSAN 1
#endif
#endif
#ifdef LP_REGISTRY_TSAN
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
void TsanAcquire(absl::Mutex* mu) { __tsan_acquire(mu); }
void TsanRelease(absl::Mutex* mu) { __tsan_release(mu); }
#else
void TsanAcquire(absl::Mutex*) {}
void TsanRelease(absl::Mutex*) {}
#endif

class ABSL_SCOPED_LOCKABLE TsanLock {
 public:
  explicit TsanLock(absl::Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) {
    mu_->Lock();
    TsanAcquire(mu_);
  }
  ~TsanLock() ABSL_UNLOCK_FUNCTION() {
    TsanRelease(mu_);
    mu_->Unlock();
  }
  TsanLock(const TsanLock&) = delete;
  TsanLock& operator=(const TsanLock&) = delete;

 private:
  absl::Mutex* const mu_;
};

}  // namespace

namespace internal {

// One version of one name. Fields other than the immutable ones are guarded by the registry's mu_.
struct RegistryVersion {
  // Immutable after creation.
  std::string name;
  int64_t version = 0;
  std::string dir;  // in the state directory
  std::string sha256;
  std::string source;
  AdapterInfo meta;  // rank, alpha, modules, bytes: taken from the validated adapter
  // Guarded by AdapterRegistry::mu_.
  AdapterState state = AdapterState::kReady;
  bool pinned = false;
  bool merged = false;
  std::shared_ptr<const LoraAdapter> weights;  // null while only on disk
  bool loading = false;  // a reload from disk is in flight (it holds a memory reservation)
  int64_t leases = 0;
  absl::Time last_used = absl::InfinitePast();
};

}  // namespace internal

struct AdapterRegistry::Name {
  std::shared_ptr<Version> current;                      // null after Unload
  std::map<int64_t, std::shared_ptr<Version>> draining;  // replaced or unloaded, still leased
  // Never reused within a process, so a draining folder and a new one never share a path. Kept
  // after the name is unloaded for the same reason.
  int64_t last_version = 0;
  int64_t requests = 0, loads = 0, evictions = 0, reloads = 0;
};

namespace {

bool IsHex64(absl::string_view s) {
  if (s.size() != 64) return false;
  for (char c : s) {
    if (!absl::ascii_isxdigit(static_cast<unsigned char>(c))) return false;
  }
  return true;
}

// Parses "name" or "name@version" (version 0: the current one).
absl::Status ParseSpec(absl::string_view spec, std::string* name, int64_t* version) {
  *version = 0;
  absl::string_view n = spec;
  if (size_t at = spec.rfind('@'); at != absl::string_view::npos) {
    n = spec.substr(0, at);
    if (!absl::SimpleAtoi(spec.substr(at + 1), version) || *version < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter '", spec, "': the version after '@' must be a positive integer"));
    }
  }
  LP_RETURN_IF_ERROR(ValidateAdapterName(n));
  *name = std::string(n);
  return absl::OkStatus();
}

// Static facts of a validated adapter.
AdapterInfo Describe(const LoraAdapter& a) {
  AdapterInfo info;
  info.max_rank = a.max_rank();
  info.alpha = a.config().lora_alpha;
  info.target_modules = a.target_modules();
  info.bytes = a.bytes();
  for (const auto& layer : a.view().layers) {
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      if (layer[m] == nullptr) continue;
      int64_t& r = info.ranks[model::LinearModuleName(static_cast<model::LinearModule>(m))];
      r = std::max(r, layer[m]->rank);
    }
  }
  return info;
}

absl::Status FsError(const std::string& what, const std::error_code& ec) {
  return absl::FailedPreconditionError(absl::StrCat(what, ": ", ec.message()));
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

absl::Status ValidateAdapterName(absl::string_view name) {
  if (name.empty() || name.size() > kMaxAdapterNameLength) {
    return absl::InvalidArgumentError(absl::StrCat(
        "adapter name must have 1 to ", kMaxAdapterNameLength, " characters, got ", name.size()));
  }
  if (name == "." || name == "..") {
    return absl::InvalidArgumentError(absl::StrCat("adapter name '", name, "' is reserved"));
  }
  for (size_t i = 0; i < name.size(); ++i) {
    const unsigned char c = static_cast<unsigned char>(name[i]);
    if (!absl::ascii_isalnum(c) && c != '.' && c != '_' && c != '-') {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter name may hold only [A-Za-z0-9._-]; character ", i, " is ",
                       absl::ascii_isprint(c) ? absl::StrCat("'", std::string(1, c), "'")
                                              : absl::StrCat("byte ", static_cast<int>(c))));
    }
  }
  return absl::OkStatus();
}

const char* AdapterStateName(AdapterState s) {
  switch (s) {
    case AdapterState::kLoading:
      return "LOADING";
    case AdapterState::kReady:
      return "READY";
    case AdapterState::kDraining:
      return "DRAINING";
  }
  return "?";
}

const char* ResidencyName(Residency r) {
  switch (r) {
    case Residency::kDevice:
      return "DEVICE";
    case Residency::kHost:
      return "HOST";
    case Residency::kDisk:
      return "DISK";
  }
  return "?";
}

// --- Lease ---------------------------------------------------------------------------------------

Lease::~Lease() { registry_->Release(version_); }
const std::string& Lease::name() const { return version_->name; }
int64_t Lease::version() const { return version_->version; }

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

absl::StatusOr<AdapterInfo> PendingUpload::Commit() {
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
  return registry_->Commit(name_, std::move(staged), replace_, pin_, "upload",
                           absl::AsciiStrToLower(sha256_), RegistrationPhases(), start);
}

// --- AdapterRegistry -----------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<AdapterRegistry>> AdapterRegistry::Open(
    const RegistryOptions& options) {
  if (options.state_dir.empty()) {
    return absl::InvalidArgumentError("adapter registry: no state directory");
  }
  if (options.max_loaded < 0 || options.memory_bytes < 0 || options.max_upload_bytes < 1 ||
      options.max_waiters < 0 || options.loader_threads < 1) {
    return absl::InvalidArgumentError(
        "adapter registry: max_loaded, memory_bytes and max_waiters must be >= 0, "
        "max_upload_bytes and loader_threads >= 1");
  }
  auto registry = std::unique_ptr<AdapterRegistry>(new AdapterRegistry(options));
  const std::string& root = options.state_dir;
  std::error_code ec;
  fs::create_directories(fs::path(root) / "adapters", ec);
  if (ec) return FsError(absl::StrCat("--state-dir ", root), ec);
  // Uploads and copies a crash interrupted: never registered, never served.
  fs::remove_all(fs::path(root) / "staging", ec);
  fs::create_directories(fs::path(root) / "staging", ec);
  if (ec) return FsError(absl::StrCat("--state-dir ", root, "/staging"), ec);

  LP_ASSIGN_OR_RETURN(std::vector<ManifestEntry> entries, ReadManifest(root));
  std::set<std::string> listed;
  for (const ManifestEntry& e : entries) {
    const std::string where =
        absl::StrCat(root, "/manifest.json: adapter '", e.name, "' v", e.version);
    if (!ValidateAdapterName(e.name).ok() || registry->names_.count(e.name) > 0) {
      return absl::DataLossError(absl::StrCat(where, ": bad or repeated name"));
    }
    const std::string dir = VersionDir(root, e.name, e.version);
    absl::StatusOr<std::unique_ptr<LoraAdapter>> adapter =
        LoraAdapter::Load(dir, options.base, options.load);
    if (!adapter.ok()) {
      return absl::DataLossError(absl::StrCat(where, ": ", adapter.status().message()));
    }
    absl::StatusOr<std::string> sha = Sha256OfFile(absl::StrCat(dir, "/", kAdapterWeightsFile));
    if (!sha.ok() || *sha != e.sha256) {
      return absl::DataLossError(
          absl::StrCat(where, ": ", kAdapterWeightsFile, " does not match the recorded sha256"));
    }
    auto v = std::make_shared<Version>();
    v->name = e.name;
    v->version = e.version;
    v->dir = dir;
    v->sha256 = e.sha256;
    v->source = e.source;
    v->meta = Describe(**adapter);
    v->pinned = e.pinned;
    auto name = std::make_unique<Name>();
    name->last_version = e.version;
    name->current = v;
    TsanLock lock(&registry->mu_);
    if (v->pinned || registry->FitsLocked(v->meta.bytes)) {
      v->weights = *std::move(adapter);
      registry->ChargeLocked(*v, +1);
    }
    registry->names_.emplace(e.name, std::move(name));
    if (e.merged) registry->merge_to_restore_ = absl::StrCat(e.name, "@", e.version);
    listed.insert(dir);
  }
  // Folders the manifest does not list: drained versions a crash left, or registrations that never
  // returned OK.
  for (const fs::directory_entry& name_dir :
       fs::directory_iterator(fs::path(root) / "adapters", ec)) {
    std::error_code ec2;
    bool any = false;
    for (const fs::directory_entry& v : fs::directory_iterator(name_dir.path(), ec2)) {
      if (listed.count(v.path().string()) > 0) {
        any = true;
      } else {
        fs::remove_all(v.path(), ec2);
      }
    }
    if (!any) fs::remove_all(name_dir.path(), ec2);
  }
  // Entries of adapters/ a crashed process created without fsyncing it: registrations skip that
  // fsync when their name's folder already exists.
  LP_RETURN_IF_ERROR(SyncPath((fs::path(root) / "adapters").string()));
  LP_LOG(INFO) << "adapter registry in " << root << ": " << entries.size() << " adapters, "
               << registry->loaded_count() << " in memory";
  return registry;
}

AdapterRegistry::AdapterRegistry(RegistryOptions options) : options_(std::move(options)) {}
AdapterRegistry::~AdapterRegistry() {
  std::vector<std::thread> loaders;
  {
    TsanLock lock(&mu_);
    stopping_ = true;  // queued and waiting AcquireAsync calls end with UNAVAILABLE
    loaders.swap(loaders_);
    load_work_.SignalAll();
    changed_.SignalAll();
  }
  for (std::thread& t : loaders) t.join();
}

int64_t AdapterRegistry::loaded_count() const {
  TsanLock lock(&mu_);
  return loaded_count_;
}

int64_t AdapterRegistry::loaded_bytes() const {
  TsanLock lock(&mu_);
  return loaded_bytes_;
}

RegistrationPhases AdapterRegistry::last_registration() const {
  TsanLock lock(&mu_);
  return last_registration_;
}

absl::StatusOr<std::string> AdapterRegistry::NewStagingDir() {
  int64_t n;
  {
    TsanLock lock(&mu_);
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
    absl::StatusOr<int> fd = CopyStartingWriteback(absl::StrCat(dir, "/", file),
                                                   absl::StrCat(staged.dir, "/", file));
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

absl::StatusOr<AdapterInfo> AdapterRegistry::RegisterFromPath(const std::string& name,
                                                              const std::string& rel_path,
                                                              bool replace, bool pin) {
  const absl::Time start = absl::Now();
  LP_RETURN_IF_ERROR(ValidateAdapterName(name));
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
    TsanLock lock(&mu_);
    auto it = names_.find(name);
    if (!replace && it != names_.end() && it->second->current != nullptr) {
      return absl::AlreadyExistsError(absl::StrCat("adapter '", name, "' exists (version ",
                                                   it->second->current->version,
                                                   "); set replace to make a new version"));
    }
  }
  RegistrationPhases phases;
  LP_ASSIGN_OR_RETURN(Staged staged, StageCopy(dir.string(), &phases));
  return Commit(name, std::move(staged), replace, pin, absl::StrCat("path:", rel_path), "",
                phases, start);
}

absl::StatusOr<AdapterInfo> AdapterRegistry::RegisterFromDir(const std::string& name,
                                                             const std::string& dir, bool replace,
                                                             bool pin) {
  LP_RETURN_IF_ERROR(ValidateAdapterName(name));
  const absl::Time start = absl::Now();
  RegistrationPhases phases;
  LP_ASSIGN_OR_RETURN(Staged staged, StageCopy(dir, &phases));
  return Commit(name, std::move(staged), replace, pin, absl::StrCat("dir:", dir), "", phases,
                start);
}

absl::StatusOr<std::unique_ptr<PendingUpload>> AdapterRegistry::BeginUpload(
    const std::string& name, bool replace, const std::string& sha256, bool pin) {
  LP_RETURN_IF_ERROR(ValidateAdapterName(name));
  if (!sha256.empty() && !IsHex64(sha256)) {
    return absl::InvalidArgumentError(
        absl::StrCat("header.sha256 must be 64 hex digits, got ", sha256.size(), " characters"));
  }
  {
    TsanLock lock(&mu_);
    auto it = names_.find(name);
    if (!replace && it != names_.end() && it->second->current != nullptr) {
      return absl::AlreadyExistsError(absl::StrCat("adapter '", name, "' exists (version ",
                                                   it->second->current->version,
                                                   "); set replace to make a new version"));
    }
  }
  LP_ASSIGN_OR_RETURN(std::string staging, NewStagingDir());
  auto upload = std::unique_ptr<PendingUpload>(new PendingUpload());
  upload->registry_ = this;
  upload->name_ = name;
  upload->sha256_ = sha256;
  upload->staging_ = staging;
  upload->replace_ = replace;
  upload->pin_ = pin;
  return upload;
}

absl::StatusOr<AdapterInfo> AdapterRegistry::Commit(const std::string& name, Staged staged,
                                                    bool replace, bool pin,
                                                    const std::string& source,
                                                    const std::string& expected_sha256,
                                                    RegistrationPhases phases, absl::Time start) {
  const std::string staging = staged.dir;
  auto discard = [&staging](absl::Status s) {
    std::error_code ec;
    fs::remove_all(staging, ec);
    return s;
  };
  {
    TsanLock lock(&mu_);
    ++loading_[name];
  }
  struct Unmark {
    AdapterRegistry* r;
    const std::string& name;
    ~Unmark() {
      TsanLock lock(&r->mu_);
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
        data_synced = absl::FailedPreconditionError(absl::StrCat(
            "cannot fsync the staged files of '", name, "': ", std::strerror(errno)));
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
      LoraAdapter::Load(staging, options_.base, options_.load);
  phases.load = absl::Now() - t;
  hasher.join();
  syncer.join();
  if (!expected_sha256.empty()) {
    if (!sha.ok()) {
      return discard(absl::InvalidArgumentError(
          absl::StrCat("upload of '", name, "' has no ", kAdapterWeightsFile)));
    }
    if (*sha != expected_sha256) {
      return discard(absl::InvalidArgumentError(absl::StrCat("upload of '", name, "': sha256 of ",
                                                             kAdapterWeightsFile, " is ", *sha,
                                                             ", the header said ",
                                                             expected_sha256)));
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

  TsanLock admin(&admin_mu_);
  const absl::Time commit_start = absl::Now();
  int64_t version = 1;
  std::vector<ManifestEntry> manifest;
  {
    TsanLock lock(&mu_);
    auto it = names_.find(name);
    if (it != names_.end()) {
      if (!replace && it->second->current != nullptr) {
        return discard(absl::AlreadyExistsError(
            absl::StrCat("adapter '", name, "' exists (version ", it->second->current->version,
                         "); set replace to make a new version")));
      }
      version = it->second->last_version + 1;
    }
    manifest = ManifestLocked();
  }
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
  if (synced.ok()) synced = PublishManifest(options_.state_dir);
  if (!synced.ok()) {
    fs::remove_all(dir, ec);
    return synced;
  }

  auto v = std::make_shared<Version>();
  v->name = name;
  v->version = version;
  v->dir = dir;
  v->sha256 = *sha;
  v->source = source;
  v->meta = Describe(**adapter);
  v->pinned = pin;
  v->last_used = absl::Now();  // newest first in line for memory, oldest registrations leave first
  std::shared_ptr<Version> drained;  // the replaced version, when nothing leases it
  AdapterInfo info;
  {
    TsanLock lock(&mu_);
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
  LP_LOG(INFO) << "adapter " << name << " v" << version << " registered from " << source
               << ": rank " << info.max_rank << ", " << info.bytes << " bytes, "
               << ResidencyName(info.residency) << ", READY in " << phases.total << " (stage "
               << phases.stage << ", sync " << phases.sync << ", load " << phases.load << ", hash "
               << phases.hash << ", commit " << phases.commit << ")";
  return info;
}

absl::StatusOr<AdapterInfo> AdapterRegistry::Unload(const std::string& name) {
  LP_RETURN_IF_ERROR(ValidateAdapterName(name));
  TsanLock admin(&admin_mu_);
  std::vector<ManifestEntry> manifest;
  {
    TsanLock lock(&mu_);
    auto it = names_.find(name);
    if (it == names_.end() || it->second->current == nullptr) {
      return absl::NotFoundError(absl::StrCat("adapter '", name, "' is not registered"));
    }
    manifest = ManifestLocked();
  }
  manifest.erase(std::remove_if(manifest.begin(), manifest.end(),
                                [&](const ManifestEntry& e) { return e.name == name; }),
                 manifest.end());
  LP_RETURN_IF_ERROR(WriteManifest(options_.state_dir, manifest));
  std::shared_ptr<Version> drained;
  AdapterInfo info;
  {
    TsanLock lock(&mu_);
    Name& n = *names_[name];
    std::shared_ptr<Version> v = std::move(n.current);
    v->state = AdapterState::kDraining;
    info = InfoLocked(*v);
    if (v->leases == 0) {
      if (v->weights != nullptr) EvictLocked(v.get());
      drained = v;
    } else {
      n.draining[v->version] = v;
    }
    changed_.SignalAll();  // waiters for this version give up with NOT_FOUND
  }
  if (drained != nullptr) {
    std::error_code ec;
    fs::remove_all(drained->dir, ec);
  }
  LP_LOG(INFO) << "adapter " << name << " v" << info.version << " unloaded (draining "
               << info.leases << " requests)";
  return info;
}

std::vector<ManifestEntry> AdapterRegistry::ManifestLocked() const {
  std::vector<ManifestEntry> out;
  for (const auto& [name, n] : names_) {
    if (n->current == nullptr) continue;
    const Version& v = *n->current;
    const bool merged = v.merged || merge_to_restore_ == absl::StrCat(v.name, "@", v.version);
    out.push_back({v.name, v.version, v.sha256, v.pinned, v.source, merged});
  }
  return out;
}

AdapterInfo AdapterRegistry::InfoLocked(const Version& v) const {
  AdapterInfo info = v.meta;
  info.name = v.name;
  info.version = v.version;
  info.state = v.state;
  info.residency = v.weights != nullptr ? Residency::kDevice : Residency::kDisk;
  info.pinned = v.pinned;
  info.merged = v.merged;
  info.last_used = v.last_used;
  info.sha256 = v.sha256;
  info.source = v.source;
  info.leases = v.leases;
  if (auto it = names_.find(v.name); it != names_.end()) {
    info.requests_served = it->second->requests;
    info.loads = it->second->loads;
    info.evictions = it->second->evictions;
    info.reloads = it->second->reloads;
  }
  return info;
}

absl::StatusOr<std::shared_ptr<AdapterRegistry::Version>> AdapterRegistry::FindLocked(
    absl::string_view spec) const {
  std::string name;
  int64_t version = 0;
  LP_RETURN_IF_ERROR(ParseSpec(spec, &name, &version));
  auto it = names_.find(name);
  if (it == names_.end() || it->second->current == nullptr) {
    return absl::NotFoundError(absl::StrCat("adapter '", name, "' is not loaded on this server"));
  }
  const std::shared_ptr<Version>& current = it->second->current;
  if (version != 0 && version != current->version) {
    return absl::NotFoundError(absl::StrCat(
        "adapter '", name, "' has no version ", version, " to serve (serving version ",
        current->version, version < current->version ? "; older ones drain" : "", ")"));
  }
  return current;
}

absl::StatusOr<AdapterInfo> AdapterRegistry::Get(absl::string_view spec) const {
  TsanLock lock(&mu_);
  LP_ASSIGN_OR_RETURN(std::shared_ptr<Version> v, FindLocked(spec));
  return InfoLocked(*v);
}

std::vector<AdapterInfo> AdapterRegistry::List() const {
  TsanLock lock(&mu_);
  std::vector<AdapterInfo> out;
  for (const auto& [name, n] : names_) {
    for (const auto& [version, v] : n->draining) out.push_back(InfoLocked(*v));
    if (n->current != nullptr) out.push_back(InfoLocked(*n->current));
  }
  for (const auto& [name, count] : loading_) {
    AdapterInfo info;
    info.name = name;
    info.state = AdapterState::kLoading;
    out.push_back(std::move(info));
  }
  return out;
}

void AdapterRegistry::ChargeLocked(const Version& v, int sign) {
  if (v.pinned) return;  // pinned versions stay in memory outside the budget
  loaded_count_ += sign;
  loaded_bytes_ += sign * v.meta.bytes;
}

bool AdapterRegistry::FitsLocked(int64_t bytes) const {
  if (options_.max_loaded > 0 && loaded_count_ + 1 > options_.max_loaded) return false;
  if (options_.memory_bytes > 0 && loaded_bytes_ + bytes > options_.memory_bytes) return false;
  return true;
}

void AdapterRegistry::EvictLocked(Version* v) {
  v->weights.reset();  // leases hold their own references; none exist for evicted versions
  ChargeLocked(*v, -1);
  if (v->state == AdapterState::kReady) {
    if (auto it = names_.find(v->name); it != names_.end()) ++it->second->evictions;
  }
  changed_.SignalAll();
}

bool AdapterRegistry::MakeRoomLocked(int64_t bytes) {
  while (!FitsLocked(bytes)) {
    Version* lru = nullptr;
    for (const auto& [name, n] : names_) {
      Version* v = n->current.get();
      if (v == nullptr || v->weights == nullptr || v->loading || v->leases > 0 || v->pinned ||
          v->merged) {
        continue;
      }
      if (lru == nullptr || v->last_used < lru->last_used) lru = v;
    }
    if (lru == nullptr) return false;
    LP_LOG(INFO) << "adapter " << lru->name << " v" << lru->version
                 << " evicted to disk (least recently used)";
    EvictLocked(lru);
  }
  return true;
}

absl::StatusOr<std::shared_ptr<const Lease>> AdapterRegistry::Acquire(absl::string_view spec,
                                                                      bool count_request) {
  const absl::Time deadline = absl::Now() + options_.acquire_timeout;
  std::shared_ptr<Version> v;
  std::shared_ptr<const LoraAdapter> weights;
  {
    TsanLock lock(&mu_);
    LP_ASSIGN_OR_RETURN(v, FindLocked(spec));
    ++v->leases;  // from here on the version cannot be evicted or removed under us
    v->last_used = absl::Now();
    if (count_request) ++names_[v->name]->requests;
    bool waited = false;
    while (v->weights == nullptr) {
      absl::Status refused;
      if (v->state != AdapterState::kReady) {
        // Replaced while we waited: a request that named no version follows the name to its new
        // current version (the replace returned after this request started, so it must not run
        // on the old one anyway).
        absl::StatusOr<std::shared_ptr<Version>> next =
            absl::StrContains(spec, '@') ? absl::NotFoundError("") : FindLocked(spec);
        if (next.ok()) {
          ++(*next)->leases;
          (*next)->last_used = absl::Now();
          std::swap(v, *next);
          if (--(*next)->leases == 0) {
            changed_.SignalAll();
            if ((*next)->state == AdapterState::kDraining) {
              std::shared_ptr<Version> old = *next;
              TsanRelease(&mu_);
              mu_.Unlock();
              RemoveDrained(old);
              mu_.Lock();
              TsanAcquire(&mu_);
            }
          }
          continue;
        }
        refused =
            absl::NotFoundError(absl::StrCat("adapter '", v->name, "' v", v->version,
                                             " was unloaded or replaced "
                                             "while this request waited for it to be loaded"));
      } else if (stopping_) {
        refused = absl::UnavailableError(
            absl::StrCat("adapter '", v->name, "': the server is shutting down"));
      } else if (!v->loading && MakeRoomLocked(v->meta.bytes)) {
        // Reload from the state directory outside the lock; the reservation keeps the room.
        v->loading = true;
        ChargeLocked(*v, +1);
        TsanRelease(&mu_);
        mu_.Unlock();
        absl::StatusOr<std::unique_ptr<LoraAdapter>> loaded =
            LoraAdapter::Load(v->dir, options_.base, options_.load);
        mu_.Lock();
        TsanAcquire(&mu_);
        v->loading = false;
        changed_.SignalAll();
        if (loaded.ok()) {
          v->weights = *std::move(loaded);
          ++names_[v->name]->reloads;
          LP_LOG(INFO) << "adapter " << v->name << " v" << v->version << " reloaded from disk";
          break;
        }
        ChargeLocked(*v, -1);
        refused = absl::DataLossError(absl::StrCat("adapter '", v->name, "' v", v->version,
                                                   ": cannot read it back from the state "
                                                   "directory: ",
                                                   loaded.status().message()));
      } else if (options_.memory_bytes > 0 && v->meta.bytes > options_.memory_bytes) {
        // Registered under a larger budget (before a restart): it can never come in now.
        refused = absl::ResourceExhaustedError(
            absl::StrCat("adapter '", v->name, "' needs ", v->meta.bytes,
                         " bytes, more than the whole "
                         "adapter memory budget of ",
                         options_.memory_bytes, " (--adapter-memory)"));
      } else if (absl::Now() >= deadline) {
        refused = absl::ResourceExhaustedError(absl::StrCat(
            "adapter '", v->name, "' could not be brought into memory within ",
            absl::FormatDuration(options_.acquire_timeout),
            ": every loaded adapter is in use (--max-loaded-adapters / --adapter-memory)"));
      } else if (!v->loading && !waited && waiters_ >= options_.max_waiters) {
        refused = absl::ResourceExhaustedError(
            absl::StrCat("adapter '", v->name, "' is not in memory and ", waiters_,
                         " requests already wait for room (--max-queue); retry later"));
      }
      if (!refused.ok()) {
        --v->leases;
        const bool gone = v->leases == 0 && v->state == AdapterState::kDraining;
        if (v->leases == 0) changed_.SignalAll();
        if (gone) {
          TsanRelease(&mu_);
          mu_.Unlock();
          RemoveDrained(v);
          mu_.Lock();
          TsanAcquire(&mu_);
        }
        return refused;
      }
      if (!waited) {
        waited = true;
        ++waiters_;
      }
      TsanRelease(&mu_);
      changed_.WaitWithDeadline(&mu_, deadline);
      TsanAcquire(&mu_);
    }
    if (waited) --waiters_;
    weights = v->weights;
  }
  return std::shared_ptr<const Lease>(new Lease(this, std::move(v), std::move(weights)));
}

void AdapterRegistry::AcquireAsync(absl::string_view spec, AcquireCallback done,
                                   bool count_request) {
  absl::StatusOr<std::shared_ptr<const Lease>> now = absl::UnavailableError("");
  bool queued = false;
  {
    TsanLock lock(&mu_);
    absl::StatusOr<std::shared_ptr<Version>> v = FindLocked(spec);
    if (!v.ok()) {
      now = v.status();
    } else if ((*v)->weights != nullptr) {
      // Acquire's fast path: in memory, so no reload and no wait.
      ++(*v)->leases;
      (*v)->last_used = absl::Now();
      if (count_request) ++names_[(*v)->name]->requests;
      now = std::shared_ptr<const Lease>(new Lease(this, *v, (*v)->weights));
    } else if (stopping_) {
      now = absl::UnavailableError("the adapter registry is shutting down");
    } else {
      load_queue_.push_back(
          [this, spec = std::string(spec), done = std::move(done), count_request] {
            done(Acquire(spec, count_request));
          });
      queued = true;
      if (idle_loaders_ == 0 && static_cast<int>(loaders_.size()) < options_.loader_threads) {
        loaders_.emplace_back([this] { LoaderLoop(); });
      } else {
        load_work_.Signal();
      }
    }
  }
  if (!queued) done(std::move(now));  // outside mu_: dropping a lease takes it
}

void AdapterRegistry::LoaderLoop() {
  for (;;) {
    std::function<void()> job;
    {
      TsanLock lock(&mu_);
      ++idle_loaders_;
      while (load_queue_.empty() && !stopping_) {
        TsanRelease(&mu_);
        load_work_.Wait(&mu_);
        TsanAcquire(&mu_);
      }
      --idle_loaders_;
      if (load_queue_.empty()) return;  // stopping, and nothing left to answer
      job = std::move(load_queue_.front());
      load_queue_.pop_front();
    }
    job();  // Acquire refuses at once with UNAVAILABLE once stopping_
  }
}

void AdapterRegistry::Release(const std::shared_ptr<Version>& v) {
  bool gone = false;
  {
    TsanLock lock(&mu_);
    if (--v->leases > 0) return;
    changed_.SignalAll();  // an idle version may now be evicted to make room for a waiter
    gone = v->state == AdapterState::kDraining;
  }
  if (gone) RemoveDrained(v);
}

void AdapterRegistry::RemoveDrained(const std::shared_ptr<Version>& v) {
  {
    TsanLock lock(&mu_);
    if (v->leases > 0) return;
    auto it = names_.find(v->name);
    if (it == names_.end() || it->second->draining.erase(v->version) == 0) return;  // done
    if (v->weights != nullptr) EvictLocked(v.get());
  }
  // Version numbers are never reused in a process, so nobody else writes this folder.
  std::error_code ec;
  fs::remove_all(v->dir, ec);
  LP_LOG(INFO) << "adapter " << v->name << " v" << v->version << " drained and removed";
}

absl::Status AdapterRegistry::SetMerged(const Lease& lease, bool merged) {
  TsanLock admin(&admin_mu_);
  std::vector<ManifestEntry> manifest;
  {
    TsanLock lock(&mu_);
    Version& v = *lease.version_;
    v.merged = merged;
    if (merge_to_restore_ == absl::StrCat(v.name, "@", v.version)) merge_to_restore_.clear();
    auto it = names_.find(v.name);
    // A replaced or unloaded version is no longer in the manifest: nothing to record.
    if (it == names_.end() || it->second->current.get() != &v) return absl::OkStatus();
    manifest = ManifestLocked();
  }
  return WriteManifest(options_.state_dir, manifest);
}

std::string AdapterRegistry::merge_to_restore() const {
  TsanLock lock(&mu_);
  return merge_to_restore_;
}

}  // namespace loraplex::adapters
