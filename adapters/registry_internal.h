// Internals of the adapter registry shared by its two source files: registry.cc (names, lookups,
// leases, memory tiers) and registry_staging.cc (files into the state directory: copies, uploads,
// validation and the commit of a registration). Not part of the contract; include only from those.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <system_error>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "adapters/registry.h"
#include "common/sync.h"

namespace loraplex::adapters {
namespace internal {

// One version of one name. Fields other than the immutable ones are guarded by the registry's mu_.
struct RegistryVersion {
  // Immutable after creation.
  std::string name;
  int64_t version = 0;
  std::string dir;  // in the state directory
  std::string sha256;
  std::string source;
  int64_t max_rank = 0;  // the rank compression every load applies (0: none)
  AdapterInfo meta;      // rank, alpha, modules, bytes: taken from the validated adapter
  // Guarded by AdapterRegistry::mu_.
  AdapterState state = AdapterState::kReady;
  bool pinned = false;
  std::shared_ptr<const LoraAdapter> weights;  // null while only on disk
  bool loading = false;  // a reload from disk is in flight (it holds a memory reservation)
  int64_t leases = 0;
  absl::Time last_used = absl::InfinitePast();
};

// Static facts of a validated adapter (rank, alpha, modules, bytes, compression).
AdapterInfo Describe(const LoraAdapter& a);

// `load` with the rank compression of one version.
inline AdapterLoadOptions WithCompression(AdapterLoadOptions load, int64_t max_rank) {
  load.compress_rank = max_rank;
  return load;
}

inline absl::Status FsError(const std::string& what, const std::error_code& ec) {
  return absl::FailedPreconditionError(absl::StrCat(what, ": ", ec.message()));
}

}  // namespace internal

struct AdapterRegistry::Name {
  std::shared_ptr<Version> current;                      // null after Unload
  std::map<int64_t, std::shared_ptr<Version>> draining;  // replaced or unloaded, still leased
  // Never reused within a process, so a draining folder and a new one never share a path. Kept
  // after the name is unloaded for the same reason.
  int64_t last_version = 0;
  int64_t requests = 0, loads = 0, evictions = 0, reloads = 0;
};

}  // namespace loraplex::adapters
