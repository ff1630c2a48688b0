#include "adapters/registry.h"

#include <algorithm>
#include <filesystem>
#include <set>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "adapters/registry_internal.h"
#include "common/logging.h"
#include "common/status.h"

namespace loraplex::adapters {

namespace fs = std::filesystem;
using internal::Describe;
using internal::FsError;
using internal::WithCompression;

absl::StatusOr<AdapterSpec> ParseAdapterSpec(absl::string_view spec) {
  AdapterSpec out;
  absl::string_view name = spec;
  if (size_t at = spec.rfind('@'); at != absl::string_view::npos) {
    name = spec.substr(0, at);
    if (!absl::SimpleAtoi(spec.substr(at + 1), &out.version) || out.version < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter '", spec, "': the version after '@' must be a positive integer"));
    }
  }
  LP_RETURN_IF_ERROR(ValidateAdapterName(name));
  out.name = std::string(name);
  return out;
}

std::string AdapterSpec::ToString() const {
  return version == 0 ? name : absl::StrCat(name, "@", version);
}

namespace internal {

// Static facts of a validated adapter.
AdapterInfo Describe(const LoraAdapter& a) {
  AdapterInfo info;
  info.max_rank = a.max_rank();
  info.alpha = a.config().lora_alpha;
  info.target_modules = a.target_modules();
  info.bytes = a.bytes();
  info.compression = a.compression();
  info.dora = a.dora();
  for (const auto& layer : a.view().layers) {
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      if (layer[m] == nullptr) continue;
      int64_t& r = info.ranks[model::LinearModuleName(static_cast<model::LinearModule>(m))];
      r = std::max(r, layer[m]->rank);
    }
  }
  return info;
}

}  // namespace internal

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
  // Uploads and copies a crash interrupted: never registered, never served. Emptied rather than
  // removed and made again: on a full disk a new directory may not fit, and the server must start.
  for (const fs::directory_entry& e : fs::directory_iterator(fs::path(root) / "staging", ec)) {
    std::error_code ec2;
    fs::remove_all(e.path(), ec2);
  }
  ec.clear();
  fs::create_directories(fs::path(root) / "staging", ec);
  if (ec) return FsError(absl::StrCat("--state-dir ", root, "/staging"), ec);

  LP_ASSIGN_OR_RETURN(std::vector<ManifestEntry> entries, ReadManifest(root));
  std::set<std::string> listed;
  for (const ManifestEntry& e : entries) {
    const std::string where =
        absl::StrCat(root, "/manifest.json: adapter '", e.name, "' v", e.version);
    bool repeated;
    {
      MutexLock lock(&registry->mu_);
      repeated = registry->names_.count(e.name) > 0;
    }
    if (!ValidateAdapterName(e.name).ok() || repeated) {
      return absl::DataLossError(absl::StrCat(where, ": bad or repeated name"));
    }
    const std::string dir = VersionDir(root, e.name, e.version);
    absl::StatusOr<std::unique_ptr<LoraAdapter>> adapter =
        LoraAdapter::Load(dir, options.base, WithCompression(options.load, e.max_rank));
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
    v->max_rank = e.max_rank;
    v->meta = Describe(**adapter);
    v->pinned = e.pinned;
    auto name = std::make_unique<Name>();
    name->last_version = e.version;
    name->current = v;
    MutexLock lock(&registry->mu_);
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

AdapterRegistry::AdapterRegistry(RegistryOptions options)
    : options_(std::move(options)),
      loaders_(Executor::Options{.name = "adapter reload",
                                 .max_threads = std::max(1, options_.loader_threads)}) {}

AdapterRegistry::~AdapterRegistry() {
  std::shared_ptr<const Lease> merged;
  {
    MutexLock lock(&mu_);
    merged = std::move(merged_);
    merged_ = nullptr;
  }
  merged.reset();  // its Release takes mu_
  {
    MutexLock lock(&mu_);
    stopping_ = true;  // queued and waiting AcquireAsync calls end with UNAVAILABLE
    changed_.SignalAll();
  }
  loaders_.Shutdown();  // the queued reloads run (and refuse at once) before the rest goes
}

int64_t AdapterRegistry::loaded_count() const {
  MutexLock lock(&mu_);
  return loaded_count_;
}

int64_t AdapterRegistry::loaded_bytes() const {
  MutexLock lock(&mu_);
  return loaded_bytes_;
}

RegistrationPhases AdapterRegistry::last_registration() const {
  MutexLock lock(&mu_);
  return last_registration_;
}

absl::StatusOr<AdapterInfo> AdapterRegistry::Unload(const std::string& name) {
  LP_RETURN_IF_ERROR(ValidateAdapterName(name));
  MutexLock admin(&admin_mu_);
  std::vector<ManifestEntry> manifest;
  {
    MutexLock lock(&mu_);
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
    MutexLock lock(&mu_);
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
    const bool merged = (IsMergedLocked(v) && !merged_automatic_) ||
                        merge_to_restore_ == absl::StrCat(v.name, "@", v.version);
    out.push_back({v.name, v.version, v.sha256, v.pinned, v.source, merged, v.max_rank});
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
  info.merged = IsMergedLocked(v);
  info.auto_merged = info.merged && merged_automatic_;
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
  LP_ASSIGN_OR_RETURN(AdapterSpec parsed, ParseAdapterSpec(spec));
  const std::string& name = parsed.name;
  const int64_t version = parsed.version;
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
  MutexLock lock(&mu_);
  LP_ASSIGN_OR_RETURN(std::shared_ptr<Version> v, FindLocked(spec));
  return InfoLocked(*v);
}

std::vector<AdapterInfo> AdapterRegistry::List() const {
  MutexLock lock(&mu_);
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
          IsMergedLocked(*v)) {
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

bool AdapterRegistry::OnDemandCandidate(absl::string_view spec) const {
  if (!options_.load_on_demand || options_.adapter_dir.empty()) return false;
  absl::StatusOr<AdapterSpec> parsed = ParseAdapterSpec(spec);
  if (!parsed.ok() || parsed->version != 0) return false;
  {
    MutexLock lock(&mu_);
    auto it = names_.find(parsed->name);
    if (it != names_.end() && it->second->current != nullptr) return false;
  }
  // ParseAdapterSpec validated the name: one path component, no "..".
  std::error_code ec;
  return fs::is_regular_file(fs::path(options_.adapter_dir) / parsed->name / kAdapterConfigFile,
                             ec);
}

absl::Status AdapterRegistry::LoadOnDemand(absl::string_view spec) {
  if (!OnDemandCandidate(spec)) return absl::OkStatus();
  const std::string name = ParseAdapterSpec(spec)->name;
  absl::StatusOr<AdapterInfo> info = RegisterFromPath(name, name, /*replace=*/false, /*pin=*/false);
  if (info.ok()) {
    LP_LOG(INFO) << "adapter '" << name << "' loaded on demand from --adapter-dir";
    return absl::OkStatus();
  }
  if (absl::IsAlreadyExists(info.status())) return absl::OkStatus();  // another request's load
  return Annotate(info.status(),
                  absl::StrCat("loading adapter '", name, "' on demand from --adapter-dir"));
}

absl::StatusOr<std::shared_ptr<const Lease>> AdapterRegistry::Acquire(absl::string_view spec,
                                                                      bool count_request) {
  LP_RETURN_IF_ERROR(LoadOnDemand(spec));
  const absl::Time deadline = absl::Now() + options_.acquire_timeout;
  std::shared_ptr<Version> v;
  std::shared_ptr<const LoraAdapter> weights;
  {
    MutexLock lock(&mu_);
    LP_ASSIGN_OR_RETURN(v, FindLocked(spec));
    const bool names_version = ParseAdapterSpec(spec)->version != 0;  // FindLocked parsed it
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
            names_version ? absl::NotFoundError("") : FindLocked(spec);
        if (next.ok()) {
          ++(*next)->leases;
          (*next)->last_used = absl::Now();
          std::swap(v, *next);
          DropLeaseLocked(*std::move(next));
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
        absl::StatusOr<std::unique_ptr<LoraAdapter>> loaded;
        {
          MutexUnlock unlock(&mu_);
          loaded =
              LoraAdapter::Load(v->dir, options_.base, WithCompression(options_.load, v->max_rank));
        }
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
        if (waited) --waiters_;
        DropLeaseLocked(std::move(v));
        return refused;
      }
      if (!waited) {
        waited = true;
        ++waiters_;
      }
      CondWaitWithDeadline(&changed_, &mu_, deadline);
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
    MutexLock lock(&mu_);
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
      queued = true;
    }
  }
  // A name to register from adapter_dir first: that is file work, for a loader thread.
  if (!queued && absl::IsNotFound(now.status()) && OnDemandCandidate(spec)) queued = true;
  if (queued) {
    // The caller's callback travels in a shared_ptr: a refused job is destroyed unrun, and then
    // the callback still has to answer.
    auto pending = std::make_shared<AcquireCallback>(std::move(done));
    absl::Status submitted =
        loaders_.Submit([this, spec = std::string(spec), pending, count_request] {
          (*pending)(Acquire(spec, count_request));
        });
    if (submitted.ok()) return;
    done = std::move(*pending);
    now = absl::UnavailableError("the adapter registry is shutting down");
  }
  done(std::move(now));  // outside mu_: dropping a lease takes it
}

void AdapterRegistry::Release(const std::shared_ptr<Version>& v) {
  MutexLock lock(&mu_);
  DropLeaseLocked(v);
}

void AdapterRegistry::DropLeaseLocked(std::shared_ptr<Version> v) {
  if (--v->leases > 0) return;
  changed_.SignalAll();  // an idle version may now be evicted to make room for a waiter
  if (v->state != AdapterState::kDraining) return;
  MutexUnlock unlock(&mu_);  // RemoveDrained deletes files
  RemoveDrained(v);
}

void AdapterRegistry::RemoveDrained(const std::shared_ptr<Version>& v) {
  {
    MutexLock lock(&mu_);
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

bool AdapterRegistry::IsMergedLocked(const Version& v) const {
  return merged_ != nullptr && merged_->version_.get() == &v;
}

std::shared_ptr<const Lease> AdapterRegistry::merged() const {
  MutexLock lock(&mu_);
  return merged_;
}

absl::Status AdapterRegistry::SetMerged(std::shared_ptr<const Lease> lease, bool automatic) {
  MutexLock admin(&admin_mu_);
  std::vector<ManifestEntry> manifest;
  {
    MutexLock lock(&mu_);
    if (merged_ != nullptr) {
      if (merged_->version_ == lease->version_) return absl::OkStatus();
      return absl::FailedPreconditionError(
          absl::StrCat("adapter '", merged_->name(), "' v", merged_->version(),
                       " is merged; set it UNMERGED first (one merged adapter at a time)"));
    }
    merged_ = std::move(lease);
    merged_automatic_ = automatic;
    if (automatic) return absl::OkStatus();  // a runtime decision: not for the manifest
    const Version& v = *merged_->version_;
    // The restart's merge of what the manifest already records as merged: nothing to write, so
    // that it also comes back on a full disk.
    if (merge_to_restore_ == absl::StrCat(v.name, "@", v.version)) {
      merge_to_restore_.clear();
      return absl::OkStatus();
    }
    auto it = names_.find(v.name);
    // A replaced or unloaded version is no longer in the manifest: nothing to record.
    if (it == names_.end() || it->second->current.get() != &v) return absl::OkStatus();
    manifest = ManifestLocked();
  }
  return WriteManifest(options_.state_dir, manifest);
}

absl::Status AdapterRegistry::ClearMerged() {
  MutexLock admin(&admin_mu_);
  std::shared_ptr<const Lease> was;
  std::vector<ManifestEntry> manifest;
  bool write = false;
  {
    MutexLock lock(&mu_);
    was = std::move(merged_);
    merged_ = nullptr;
    if (was == nullptr) return absl::OkStatus();
    const Version& v = *was->version_;
    auto it = names_.find(v.name);
    // An automatic merge was never in the manifest.
    write = !merged_automatic_ && it != names_.end() && it->second->current.get() == &v;
    merged_automatic_ = false;
    if (write) manifest = ManifestLocked();
  }
  was.reset();  // outside mu_: a drained version's last lease removes its files
  return write ? WriteManifest(options_.state_dir, manifest) : absl::OkStatus();
}

std::string AdapterRegistry::merge_to_restore() const {
  MutexLock lock(&mu_);
  return merge_to_restore_;
}

}  // namespace loraplex::adapters
