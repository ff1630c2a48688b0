// The adapter registry: which LoRA adapters a server serves, under which names and versions, which
// of them sit in compute memory, and the durable record of all that in the state directory
// (adapters/manifest.h). DESIGN.md section 4.
//
// Lifecycle of one version:  LOADING -> READY -> DRAINING -> gone
//   LOADING   files are being copied or uploaded into staging/ and validated (not visible to
//             Acquire; Get/List show it with the version it will get)
//   READY     the current version of its name: Acquire hands out leases on it
//   DRAINING  replaced by version N+1 or unloaded: no new leases; the version disappears (memory
//             and files) when its last lease is released
// Every running request holds a Lease (a refcount on its version). Replace is atomic: one mutex
// section swaps the current version, so an Acquire that starts after Register returned gets the
// new version, and leases taken before keep the old weights alive until they finish.
//
// Memory tiers: a version is either in compute memory (Residency::kDevice; on the CPU backend the
// compute memory is host RAM) or only on disk in the state directory (kDisk). The budget is
// max_loaded versions and/or memory_bytes of weights. When a version must come in and the budget is
// full, idle (no leases), unpinned, unmerged versions are evicted least-recently-used (pinned
// versions always stay in memory and do not count against the budget); if every
// loaded version is in use, Acquire waits (at most max_waiters callers, each at most
// acquire_timeout) until a lease is released. Evicted versions are re-read from the state
// directory by the next Acquire (that caller waits; others wanting the same version wait for the
// same read).
//
// Loading, copying, hashing and manifest writes happen on the caller's thread, never under the
// lock that Acquire and Release take, so admin work never stalls generation. AcquireAsync moves
// a reload (and any wait for room) onto the registry's loader threads, so a request for an
// evicted adapter does not hold the thread that asked.
//
// The last lease of a draining version deletes that version's folder (a few unlinks) on the
// releasing thread, usually the engine thread.
//
// Thread-safety: every method may be called from any thread. Admin operations (Register*, Upload
// commit, Unload, SetPinned) are serialised among themselves. Leases may be released on any thread
// (the engine thread releases most) and must not outlive the registry.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "adapters/lora_adapter.h"
#include "adapters/manifest.h"
#include "common/executor.h"
#include "model/llama_config.h"

namespace loraplex::adapters {

inline constexpr size_t kMaxAdapterNameLength = 128;

// How requests and admin calls name an adapter: "name" (its current version) or "name@version".
struct AdapterSpec {
  std::string name;
  int64_t version = 0;           // 0: the current one
  std::string ToString() const;  // the spec back: "name" or "name@version"
};
// The one parser of specs. INVALID_ARGUMENT for a bad name (ValidateAdapterName) or a version
// that is not a positive integer.
absl::StatusOr<AdapterSpec> ParseAdapterSpec(absl::string_view spec);

// OK when `name` is 1..128 characters of [A-Za-z0-9._-] and not "." or "..";
// INVALID_ARGUMENT naming the offending character otherwise.
absl::Status ValidateAdapterName(absl::string_view name);

enum class AdapterState { kLoading, kReady, kDraining };
// Where a version's weights are. kDevice: in compute layout in the memory the forward pass reads
// (host RAM on the CPU backend, which has no other tier). kDisk: only the files in the state
// directory; the next Acquire reads and converts them. kHost (a converted copy in host RAM behind a
// device budget) is for GPU backends; this registry never reports it.
enum class Residency { kDevice, kHost, kDisk };
const char* AdapterStateName(AdapterState s);  // "LOADING", "READY", "DRAINING"
const char* ResidencyName(Residency r);        // "DEVICE", "HOST", "DISK"

// A snapshot of one version (what AdapterInfo in the API carries).
struct AdapterInfo {
  std::string name;
  int64_t version = 0;
  AdapterState state = AdapterState::kReady;
  int64_t max_rank = 0;
  std::map<std::string, int64_t> ranks;  // module name -> largest rank there
  float alpha = 0;
  std::vector<std::string> target_modules;
  int64_t bytes = 0;                       // of A and B in compute layout
  Residency residency = Residency::kDisk;  // kDevice or kDisk; never kHost (see Residency)
  bool pinned = false;
  bool merged = false;
  bool auto_merged = false;     // merged by the server's merge policy (not kept across restarts)
  int64_t requests_served = 0;  // leases taken, over the name's versions since this process started
  absl::Time last_used = absl::InfinitePast();
  std::string sha256;  // of adapter_model.safetensors
  std::string source;
  int64_t leases = 0;  // running requests on this version now
  // Counters over the name's versions since this process started (for metrics).
  int64_t loads = 0;      // registrations that returned OK
  int64_t evictions = 0;  // times a version went from memory to disk
  int64_t reloads = 0;    // times a version came back from disk
  // Set when the version was registered with max_rank: the ranks above are the served ones, and
  // this says what the truncation cost (LoraAdapter::compression).
  std::optional<CompressionReport> compression;
  bool dora = false;  // use_dora (LoraAdapter::dora)
};

// Where the time of one registration went, from the call to READY (bench/adapter_load_bench.cc
// and the registration log line). Phases that run concurrently each show their own wall time, so
// they may add up to more than `total`.
struct RegistrationPhases {
  absl::Duration stage;   // the two files copied (or cloned) into staging/
  absl::Duration sync;    // fsync of the staged files
  absl::Duration load;    // parse, validate and convert to compute layout (LoraAdapter::Load)
  absl::Duration hash;    // SHA-256 of adapter_model.safetensors
  absl::Duration commit;  // rename into adapters/, directory fsyncs, manifest write
  absl::Duration total;
};

struct RegistryOptions {
  // Where files and the manifest live (created when missing). Required.
  std::string state_dir;
  // Root that RegisterFromPath paths are relative to. Empty: path registration is refused.
  std::string adapter_dir;
  model::LlamaConfig base;
  AdapterLoadOptions load;
  int64_t max_loaded = 0;                       // versions in compute memory at once; 0 = no limit
  int64_t memory_bytes = 0;                     // bytes of weights in compute memory; 0 = no limit
  int64_t max_upload_bytes = int64_t{1} << 30;  // both files of one upload together
  int64_t max_waiters = 256;                    // Acquire calls waiting for room at once
  absl::Duration acquire_timeout = absl::Seconds(60);
  int loader_threads = 4;  // threads that run AcquireAsync's reloads (and their waits for room)
  // Acquire of a name that is not registered registers <adapter_dir>/<name> first when that
  // folder holds an adapter_config.json (RegisterFromPath, version 1, not pinned), so replicas
  // sharing one adapter folder can each serve any adapter by name (docker/nginx.conf).
  bool load_on_demand = false;
};

class AdapterRegistry;
namespace internal {
struct RegistryVersion;  // one version's bookkeeping (registry.cc)
}  // namespace internal

// One holder's claim on one version: while it lives the version's weights stay in memory and the
// version is not removed. Released (refcount dropped) when destroyed.
class Lease {
 public:
  ~Lease();
  Lease(const Lease&) = delete;
  Lease& operator=(const Lease&) = delete;

  const std::string& name() const;
  int64_t version() const;
  const model::LoraWeightsView& view() const { return weights_->view(); }
  const LoraAdapter& adapter() const { return *weights_; }

 private:
  friend class AdapterRegistry;
  using Version = internal::RegistryVersion;
  Lease(AdapterRegistry* registry, std::shared_ptr<Version> version,
        std::shared_ptr<const LoraAdapter> weights)
      : registry_(registry), version_(std::move(version)), weights_(std::move(weights)) {}
  AdapterRegistry* registry_;
  std::shared_ptr<Version> version_;
  std::shared_ptr<const LoraAdapter> weights_;
};

// An upload in progress: chunks of the two files go to staging/, the commit validates and
// registers. Destroying it without Commit discards the staging folder. Not thread-safe (one
// client stream feeds it).
class PendingUpload {
 public:
  ~PendingUpload();
  // Appends to `file_name` (adapter_config.json or adapter_model.safetensors; INVALID_ARGUMENT
  // otherwise). RESOURCE_EXHAUSTED once the files together pass max_upload_bytes.
  absl::Status Append(absl::string_view file_name, absl::string_view data);
  // Fsyncs, checks the sha256 when the header gave one (INVALID_ARGUMENT on mismatch), then
  // registers as RegisterFromPath does (same codes). Call once. `abandoned` (may be empty) is
  // asked just before the version is moved into place and again just before the manifest that
  // names it is published; when it says true the upload is discarded instead (CANCELLED): the
  // client went away while the commit ran.
  absl::StatusOr<AdapterInfo> Commit(std::function<bool()> abandoned = nullptr);

 private:
  friend class AdapterRegistry;
  PendingUpload() = default;
  AdapterRegistry* registry_ = nullptr;
  std::string name_, sha256_, staging_;
  bool replace_ = false, pin_ = false, committed_ = false;
  int64_t max_rank_ = 0;
  int64_t bytes_ = 0;
  std::map<std::string, int> fds_;  // open staging files
};

class AdapterRegistry {
 public:
  // Opens (creating) the state directory, removes staging leftovers and unlisted version folders,
  // and registers the manifest's adapters at their versions (loaded while the budget allows, the
  // rest on disk). INVALID_ARGUMENT for bad options; FAILED_PRECONDITION when the directory cannot
  // be created or written; DATA_LOSS when the manifest or a listed version is damaged (the message
  // names it: restore it or remove it from the manifest).
  static absl::StatusOr<std::unique_ptr<AdapterRegistry>> Open(const RegistryOptions& options);
  ~AdapterRegistry();

  // Registers the PEFT folder <adapter_dir>/<rel_path> under `name`: copies its two files into the
  // state directory, validates them against the base, writes the manifest. Codes:
  //   INVALID_ARGUMENT   bad name; malformed files (LoraAdapter::Load's codes, .bin weights)
  //   PERMISSION_DENIED  no --adapter-dir, an absolute path, or one that resolves outside the root
  //                      (through .. or symlinks, also for the two files inside)
  //   NOT_FOUND          the folder or a file is missing
  //   ALREADY_EXISTS     the name is registered and replace is false
  //   FAILED_PRECONDITION the adapter does not fit the base (LoraAdapter::Load), disk errors
  //   RESOURCE_EXHAUSTED its weights alone exceed memory_bytes (unless pinned)
  // With replace, the result is version N+1 of an existing name (1 for a new one).
  // max_rank > 0 serves the adapter compressed to that rank (AdapterLoadOptions::compress_rank):
  // the manifest records it and every reload applies it; the files are kept as trained.
  // INVALID_ARGUMENT when it is negative.
  absl::StatusOr<AdapterInfo> RegisterFromPath(const std::string& name, const std::string& rel_path,
                                               bool replace, bool pin, int64_t max_rank = 0);
  // The same for a folder given by the operator (--adapter NAME=DIR): no root check.
  absl::StatusOr<AdapterInfo> RegisterFromDir(const std::string& name, const std::string& dir,
                                              bool replace, bool pin, int64_t max_rank = 0);
  // Starts an upload. INVALID_ARGUMENT for a bad name, a negative max_rank or a sha256 that is not
  // 64 hex digits; ALREADY_EXISTS when the name is taken and replace is false (checked again at
  // commit).
  absl::StatusOr<std::unique_ptr<PendingUpload>> BeginUpload(const std::string& name, bool replace,
                                                             const std::string& sha256, bool pin,
                                                             int64_t max_rank = 0);

  // Removes `name` from the manifest; its version drains (NOT_FOUND to new Acquires). Returns the
  // version's info in state DRAINING. NOT_FOUND when the name is not registered.
  absl::StatusOr<AdapterInfo> Unload(const std::string& name);

  // "name" (the current version) or "name@version". NOT_FOUND for unknown names or versions
  // (draining versions included); INVALID_ARGUMENT for a malformed spec.
  absl::StatusOr<AdapterInfo> Get(absl::string_view spec) const;
  // Every registered name's current version plus draining versions, by name then version.
  std::vector<AdapterInfo> List() const;

  // A lease on the current READY version of `spec` ("name" or "name@version"; the version must be
  // the current one). Brings an evicted version back first, waiting for room; with
  // load_on_demand, registers an unknown name from adapter_dir first (RegisterFromPath's codes,
  // prefixed with what was tried). Codes: NOT_FOUND,
  // INVALID_ARGUMENT (malformed spec), RESOURCE_EXHAUSTED (max_waiters already waiting, no room
  // within acquire_timeout, or larger than the whole memory budget), DATA_LOSS (the state directory
  // copy cannot be read back). `count_request`: whether this counts as a served request (false for
  // internal holders such as a merge).
  absl::StatusOr<std::shared_ptr<const Lease>> Acquire(absl::string_view spec,
                                                       bool count_request = true);

  // Acquire without blocking the caller (a gRPC callback thread, say). When the version is in
  // memory, or the spec is malformed or unknown (and not to be loaded on demand), `done` runs on
  // this thread before AcquireAsync returns. Otherwise Acquire runs on one of the registry's loader
  // threads (at most options().loader_threads, started on first use, FIFO), which then calls
  // `done`; the caller's thread returns at once. Codes as Acquire's, plus UNAVAILABLE once the
  // registry is being destroyed. `done` must be quick (it holds up other reloads) and may drop the
  // lease at once.
  using AcquireCallback = std::function<void(absl::StatusOr<std::shared_ptr<const Lease>>)>;
  void AcquireAsync(absl::string_view spec, AcquireCallback done, bool count_request = true);

  // Which version is merged into the base weights: the registry is the one record of it (the
  // model only knows which delta its weights hold). The caller merges and unmerges on the engine
  // thread and tells the registry here.
  //
  // The merged version, or null. The registry holds this lease from SetMerged to ClearMerged, so
  // the version stays in memory (never evicted), and it shows merged = true.
  std::shared_ptr<const Lease> merged() const;
  // Records `lease`'s version as merged (the caller has merged it). When the version is its name's
  // current one the manifest records it, so that a restart merges it again (merge_to_restore).
  // FAILED_PRECONDITION when that write fails (the record is kept all the same: it must follow
  // the model's weights), or when another version is merged (nothing changes then). OK when this
  // version is merged already. With `automatic` (the merge policy's merge) the manifest never
  // records it and AdapterInfo says auto_merged.
  absl::Status SetMerged(std::shared_ptr<const Lease> lease, bool automatic = false);
  // Forgets the merged version (the caller has unmerged it) and drops its lease; the manifest
  // stops recording it. FAILED_PRECONDITION when that write fails. OK when nothing is merged.
  absl::Status ClearMerged();
  // "name@version" of the version the manifest recorded as merged when the registry was opened,
  // until SetMerged is called for it; empty when none. The server merges it again after the
  // engine starts (the manifest keeps recording it meanwhile).
  std::string merge_to_restore() const;

  const RegistryOptions& options() const { return options_; }
  // Unpinned versions in compute memory (counting reloads in flight) and their bytes now; pinned
  // versions stay in memory outside the budget.
  int64_t loaded_count() const;
  int64_t loaded_bytes() const;
  // The phases of the last registration that returned OK (zero before the first).
  RegistrationPhases last_registration() const;

 private:
  friend class Lease;
  friend class PendingUpload;
  using Version = internal::RegistryVersion;
  struct Name;  // one registered name: its versions and counters

  explicit AdapterRegistry(RegistryOptions options);

  // Files written into a staging folder and not yet fsynced: Commit fsyncs them on a thread of
  // their own while it parses and hashes, so that the disk's work overlaps the CPU's. The
  // destructor closes what is still open.
  struct Staged {
    std::string dir;
    std::vector<int> fds;
    Staged() = default;
    Staged(Staged&& o) noexcept : dir(std::move(o.dir)), fds(std::move(o.fds)) { o.fds.clear(); }
    Staged(const Staged&) = delete;
    ~Staged();
  };
  // Validates the staged folder (LoraAdapter::Load, and the SHA-256 against `expected_sha256`
  // when not empty: INVALID_ARGUMENT on mismatch), fsyncs it, moves it into adapters/<name>/v<N>,
  // updates the manifest and makes it current. Removes the staging folder on failure. `phases`
  // holds what the caller measured (stage) and `start` the start time of the call.
  // `abandoned`: see PendingUpload::Commit.
  absl::StatusOr<AdapterInfo> Commit(const std::string& name, Staged staged, bool replace, bool pin,
                                     int64_t max_rank, const std::string& source,
                                     const std::string& expected_sha256, RegistrationPhases phases,
                                     absl::Time start,
                                     const std::function<bool()>& abandoned = nullptr);
  absl::StatusOr<std::string> NewStagingDir();
  // Copies the two PEFT files of `dir` into a new staging folder (in the kernel, writeback
  // started, not yet fsynced).
  absl::StatusOr<Staged> StageCopy(const std::string& dir, RegistrationPhases* phases);
  std::vector<ManifestEntry> ManifestLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // ALREADY_EXISTS when `name` has a current version and replace is false.
  absl::Status CheckNewVersionAllowedLocked(const std::string& name, bool replace) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  AdapterInfo InfoLocked(const Version& v) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Evicts idle versions until one more of `bytes` fits. False when it cannot.
  bool MakeRoomLocked(int64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool FitsLocked(int64_t bytes) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void EvictLocked(Version* v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Adds (sign +1) or removes (-1) an unpinned version's weights to the memory accounting.
  void ChargeLocked(const Version& v, int sign) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Finds the version a spec names. NOT_FOUND / INVALID_ARGUMENT.
  absl::StatusOr<std::shared_ptr<Version>> FindLocked(absl::string_view spec) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // With load_on_demand: whether `spec` names no version of a name that is not registered and
  // whose folder under adapter_dir holds an adapter config (so Acquire would register it).
  bool OnDemandCandidate(absl::string_view spec) const ABSL_LOCKS_EXCLUDED(mu_);
  // Registers that folder when OnDemandCandidate; OK when there is nothing to register or another
  // caller registered it first, the registration's error otherwise.
  absl::Status LoadOnDemand(absl::string_view spec) ABSL_LOCKS_EXCLUDED(mu_);
  void Release(const std::shared_ptr<Version>& v);
  // Drops one lease of `v` (mu_ held); a drained version's files go with its last lease
  // (RemoveDrained, with mu_ released meanwhile).
  void DropLeaseLocked(std::shared_ptr<Version> v) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool IsMergedLocked(const Version& v) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Forgets a drained version and deletes its folder.
  void RemoveDrained(const std::shared_ptr<Version>& v);

  const RegistryOptions options_;

  // Serialises admin operations (registration commits, unloads) and manifest writes, so that the
  // manifest on disk is always written from a consistent state. Never held while waiting on mu_'s
  // conditions; taken before mu_ when both are needed.
  absl::Mutex admin_mu_ ABSL_ACQUIRED_BEFORE(mu_);
  // Guards the names, versions, refcounts and the memory accounting below; held only briefly,
  // never across file IO.
  mutable absl::Mutex mu_;
  std::map<std::string, std::unique_ptr<Name>> names_ ABSL_GUARDED_BY(mu_);
  int64_t loaded_count_ ABSL_GUARDED_BY(mu_) = 0;  // unpinned; includes reloads in flight
  int64_t loaded_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t waiters_ ABSL_GUARDED_BY(mu_) = 0;
  // Names being registered right now (shown as LOADING by List), with how many registrations.
  std::map<std::string, int> loading_ ABSL_GUARDED_BY(mu_);
  // Signalled when a lease is released, a reload finishes or a version leaves memory.
  absl::CondVar changed_;
  int64_t staging_counter_ ABSL_GUARDED_BY(mu_) = 0;
  RegistrationPhases last_registration_ ABSL_GUARDED_BY(mu_);
  std::string merge_to_restore_ ABSL_GUARDED_BY(mu_);         // see merge_to_restore()
  std::shared_ptr<const Lease> merged_ ABSL_GUARDED_BY(mu_);  // see merged()
  bool merged_automatic_ ABSL_GUARDED_BY(mu_) = false;        // SetMerged's `automatic`
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;                // the destructor has begun
  // AcquireAsync's reloads (and their waits for room): loader_threads threads, FIFO. Last, so
  // that its jobs have finished before the members they use go.
  Executor loaders_;
};

}  // namespace loraplex::adapters
