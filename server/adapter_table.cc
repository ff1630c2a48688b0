#include "server/adapter_table.h"

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "engine/tsan_lock.h"

namespace loraplex::server {

namespace {

// An engine handle that owns `lease`.
absl::StatusOr<std::shared_ptr<const engine::AdapterHandle>> HandleFor(
    absl::StatusOr<std::shared_ptr<const adapters::Lease>> lease) {
  if (!lease.ok()) return lease.status();
  auto handle = std::make_shared<engine::AdapterHandle>();
  handle->name = (*lease)->name();
  handle->version = (*lease)->version();
  handle->weights = &(*lease)->view();
  handle->owner = *std::move(lease);
  return handle;
}

}  // namespace

absl::StatusOr<std::shared_ptr<const engine::AdapterHandle>> AdapterTable::Resolve(
    absl::string_view spec) const {
  if (spec.empty()) return std::shared_ptr<const engine::AdapterHandle>();
  if (registry_ != nullptr) return HandleFor(registry_->Acquire(spec));
  absl::string_view name = spec;
  int64_t version = 0;  // 0: the current one
  if (size_t at = spec.rfind('@'); at != absl::string_view::npos) {
    name = spec.substr(0, at);
    if (!absl::SimpleAtoi(spec.substr(at + 1), &version) || version < 1) {
      return absl::InvalidArgumentError(
          absl::StrCat("adapter '", spec, "': the version after '@' must be a positive integer"));
    }
  }
  engine::TsanMutexLock lock(&mu_);
  auto it = adapters_.find(std::string(name));
  if (it == adapters_.end()) {
    return absl::NotFoundError(absl::StrCat("adapter '", name, "' is not loaded on this server"));
  }
  if (version != 0 && it->second->version != version) {
    return absl::NotFoundError(absl::StrCat("adapter '", name, "' has no version ", version,
                                            " (serving version ", it->second->version, ")"));
  }
  return it->second;
}

void AdapterTable::ResolveAsync(absl::string_view spec, ResolveCallback done) const {
  if (spec.empty() || registry_ == nullptr) {
    done(Resolve(spec));  // nothing here can block
    return;
  }
  registry_->AcquireAsync(
      spec, [done = std::move(done)](absl::StatusOr<std::shared_ptr<const adapters::Lease>> lease) {
        done(HandleFor(std::move(lease)));
      });
}

void AdapterTable::Put(std::shared_ptr<const engine::AdapterHandle> handle) {
  engine::TsanMutexLock lock(&mu_);
  adapters_[handle->name] = std::move(handle);
}

size_t AdapterTable::size() const {
  engine::TsanMutexLock lock(&mu_);
  return adapters_.size();
}

}  // namespace loraplex::server
