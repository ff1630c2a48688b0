// The one cross-thread handoff type of loraplex: a FIFO of values guarded by an absl::Mutex, with a
// capacity and a close flag. Requests and cancellations reach the engine thread through one, and
// background jobs reach their threads through one (common/executor.h). Producers never block
// (TryPush reports a full or closed queue, so a gRPC thread can answer RESOURCE_EXHAUSTED or
// UNAVAILABLE at once); consumers may wait.
//
// Thread-safety: every method may be called from any thread at any time.
#pragma once

#include <cstddef>
#include <deque>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/sync.h"

namespace loraplex {

template <typename T>
class Queue {
 public:
  // capacity: the most items held at once (0 is treated as 1).
  explicit Queue(size_t capacity = std::numeric_limits<size_t>::max())
      : capacity_(capacity == 0 ? 1 : capacity) {}
  Queue(const Queue&) = delete;
  Queue& operator=(const Queue&) = delete;

  enum class PushResult { kOk, kFull, kClosed };

  // Appends `value` unless the queue is full or closed; never blocks. On failure `value` is left
  // untouched (it is taken by rvalue reference, not moved from).
  PushResult TryPush(T&& value) {
    MutexLock lock(&mu_);
    if (closed_) return PushResult::kClosed;
    if (items_.size() >= capacity_) return PushResult::kFull;
    items_.push_back(std::move(value));
    cv_.Signal();
    return PushResult::kOk;
  }

  // Waits until an item is there (returns it), the queue is closed and empty (nullopt), or
  // `timeout` passes (nullopt).
  std::optional<T> Pop(absl::Duration timeout = absl::InfiniteDuration()) {
    MutexLock lock(&mu_);
    const absl::Time deadline = absl::Now() + timeout;
    while (items_.empty() && !closed_) {
      if (CondWaitWithDeadline(&cv_, &mu_, deadline)) break;  // true: deadline passed
    }
    if (items_.empty()) return std::nullopt;
    T value = std::move(items_.front());
    items_.pop_front();
    return value;
  }

  // Takes every item present without waiting, oldest first.
  std::vector<T> PopAll() {
    MutexLock lock(&mu_);
    std::vector<T> out;
    out.reserve(items_.size());
    for (T& item : items_) out.push_back(std::move(item));
    items_.clear();
    return out;
  }

  // After Close, TryPush fails with kClosed; items already queued can still be popped.
  void Close() {
    MutexLock lock(&mu_);
    closed_ = true;
    cv_.SignalAll();
  }

  bool closed() const {
    MutexLock lock(&mu_);
    return closed_;
  }
  size_t size() const {
    MutexLock lock(&mu_);
    return items_.size();
  }
  size_t capacity() const { return capacity_; }

 private:
  const size_t capacity_;
  mutable absl::Mutex mu_;  // guards items_ and closed_
  absl::CondVar cv_;        // signalled on push and close
  std::deque<T> items_ ABSL_GUARDED_BY(mu_);
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace loraplex
