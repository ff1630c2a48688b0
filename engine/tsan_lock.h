// absl::MutexLock that ThreadSanitizer can see through.
//
// Debian's Abseil is built without TSan, so the happens-before edges of absl::Mutex are invisible
// to a TSan build of ours and every handoff through a Mutex is reported as a race. This lock tells
// TSan about the edges itself (acquire after locking, release before unlocking, on the mutex's
// address); in other builds it is exactly absl::MutexLock. Use it, and the Wait helpers below, for
// every mutex of engine/ and server/ so that a TSan run reports real races only.
#pragma once

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

#if defined(__SANITIZE_THREAD__)
#define LP_TSAN_ENABLED 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define LP_TSAN_ENABLED 1
#endif
#endif

#ifdef LP_TSAN_ENABLED
extern "C" void __tsan_acquire(void* addr);
extern "C" void __tsan_release(void* addr);
#endif

namespace loraplex::engine {

inline void TsanAcquire(absl::Mutex* mu) {
#ifdef LP_TSAN_ENABLED
  __tsan_acquire(mu);
#endif
}
inline void TsanRelease(absl::Mutex* mu) {
#ifdef LP_TSAN_ENABLED
  __tsan_release(mu);
#endif
}

// The same edges on any address (an object handed between threads by code TSan cannot see).
inline void TsanAcquireAddress(const void* addr) {
#ifdef LP_TSAN_ENABLED
  __tsan_acquire(const_cast<void*>(addr));
#endif
}
inline void TsanReleaseAddress(const void* addr) {
#ifdef LP_TSAN_ENABLED
  __tsan_release(const_cast<void*>(addr));
#endif
}

class ABSL_SCOPED_LOCKABLE TsanMutexLock {
 public:
  explicit TsanMutexLock(absl::Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) {
    mu_->Lock();
    TsanAcquire(mu_);
  }
  ~TsanMutexLock() ABSL_UNLOCK_FUNCTION() {
    TsanRelease(mu_);
    mu_->Unlock();
  }
  TsanMutexLock(const TsanMutexLock&) = delete;
  TsanMutexLock& operator=(const TsanMutexLock&) = delete;

 private:
  absl::Mutex* const mu_;
};

// cv->WaitWithDeadline(mu, deadline) with the edges of the unlock/relock inside it.
inline bool TsanWaitWithDeadline(absl::CondVar* cv, absl::Mutex* mu, absl::Time deadline)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
  TsanRelease(mu);
  const bool timed_out = cv->WaitWithDeadline(mu, deadline);
  TsanAcquire(mu);
  return timed_out;
}

}  // namespace loraplex::engine
