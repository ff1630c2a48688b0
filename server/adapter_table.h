// The adapters the server can serve, by name, resolved to engine handles before a request is
// submitted. With a registry (UseRegistry; the server always sets one) Resolve takes a lease from
// adapters::AdapterRegistry::Acquire, which may wait while an evicted adapter is read back;
// ResolveAsync (what the Inference service uses) takes it from AcquireAsync, which never waits on
// the caller's thread. The handle owns the lease: the request holds its version until the engine
// drops the handle.
// Resolve hands out a shared_ptr, so a later Replace or Remove never pulls weights from under a
// running request.
//
// Thread-safety: all methods may be called from any thread.
#pragma once

#include <functional>
#include <map>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "adapters/registry.h"
#include "engine/request.h"

namespace loraplex::server {

class AdapterTable {
 public:
  // `spec` is "name" (the current version) or "name@version". Empty spec: the base model (null).
  // NOT_FOUND naming the adapter (or version) when it is not served; INVALID_ARGUMENT for a
  // malformed version.
  absl::StatusOr<std::shared_ptr<const engine::AdapterHandle>> Resolve(
      absl::string_view spec) const;

  // Resolve without blocking the caller: `done` runs before ResolveAsync returns when the adapter
  // is in memory (or the spec is empty, malformed or unknown); otherwise on a registry loader
  // thread once the adapter is back in memory (adapters::AdapterRegistry::AcquireAsync). Same
  // codes as Resolve.
  using ResolveCallback =
      std::function<void(absl::StatusOr<std::shared_ptr<const engine::AdapterHandle>>)>;
  void ResolveAsync(absl::string_view spec, ResolveCallback done) const;

  // From now on Resolve serves from `registry` (not owned; must outlive the table and every
  // handle) and Put is unused. Codes of Resolve are then Acquire's.
  void UseRegistry(adapters::AdapterRegistry* registry) { registry_ = registry; }

  // Serves `handle` under handle->name as its current version (replacing an older one).
  void Put(std::shared_ptr<const engine::AdapterHandle> handle);
  size_t size() const;

 private:
  adapters::AdapterRegistry* registry_ = nullptr;  // set before serving, then read-only
  mutable absl::Mutex mu_;                         // guards adapters_
  std::map<std::string, std::shared_ptr<const engine::AdapterHandle>> adapters_
      ABSL_GUARDED_BY(mu_);
};

}  // namespace loraplex::server
