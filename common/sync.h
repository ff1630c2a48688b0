// The one set of synchronization helpers of loraplex: an absl::Mutex lock, unlock and condition
// waits that ThreadSanitizer can see through, for every mutex of engine/, adapters/ and server/.
//
// Debian's Abseil is built without TSan, so the happens-before edges of absl::Mutex are invisible
// to a TSan build of ours and every handoff through a Mutex would be reported as a race. These
// helpers tell TSan about the edges themselves (acquire after locking, release before unlocking,
// on the mutex's address); in other builds they are exactly the absl calls they wrap. Never call
// mu.Lock(), mu.Unlock(), cv.Wait() or mu.Await() directly: use the helpers. (The one exception is
// server/reactors.h's ReactorSync, whose mutex only orders and whose edge is on another address.)
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

namespace loraplex {

// A happens-before edge on `addr`: what a thread did before TsanRelease(addr) is visible to a
// thread after its TsanAcquire(addr). For objects handed between threads by code TSan cannot see
// (gRPC's, Abseil's).
inline void TsanAcquire(const void* addr) {
#ifdef LP_TSAN_ENABLED
  __tsan_acquire(const_cast<void*>(addr));
#else
  (void)addr;
#endif
}
inline void TsanRelease(const void* addr) {
#ifdef LP_TSAN_ENABLED
  __tsan_release(const_cast<void*>(addr));
#else
  (void)addr;
#endif
}

// absl::MutexLock with the edges.
class ABSL_SCOPED_LOCKABLE MutexLock {
 public:
  explicit MutexLock(absl::Mutex* mu) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu) : mu_(mu) {
    mu_->Lock();
    TsanAcquire(mu_);
  }
  ~MutexLock() ABSL_UNLOCK_FUNCTION() {
    TsanRelease(mu_);
    mu_->Unlock();
  }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  absl::Mutex* const mu_;
};

// Clang's analysis treats a scoped capability whose constructor releases `mu` *exclusively* as
// an unlock scope (its destructor relocks); Abseil's ABSL_UNLOCK_FUNCTION is the generic release,
// which it does not, so MutexUnlock spells the attribute itself.
#if defined(__clang__)
#define LP_RELEASE_EXCLUSIVE(...) __attribute__((release_capability(__VA_ARGS__)))
#else
#define LP_RELEASE_EXCLUSIVE(...)
#endif

// The reverse: unlocks a held mutex for its scope (file IO, a callback) and locks it again.
class ABSL_SCOPED_LOCKABLE MutexUnlock {
 public:
  explicit MutexUnlock(absl::Mutex* mu) LP_RELEASE_EXCLUSIVE(mu) : mu_(mu) {
    TsanRelease(mu_);
    mu_->Unlock();
  }
  ~MutexUnlock() LP_RELEASE_EXCLUSIVE() {
    mu_->Lock();
    TsanAcquire(mu_);
  }
  MutexUnlock(const MutexUnlock&) = delete;
  MutexUnlock& operator=(const MutexUnlock&) = delete;

 private:
  absl::Mutex* const mu_;
};

// cv->Wait(mu) with the edges of the unlock and relock inside it.
inline void CondWait(absl::CondVar* cv, absl::Mutex* mu) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
  TsanRelease(mu);
  cv->Wait(mu);
  TsanAcquire(mu);
}

// cv->WaitWithDeadline(mu, deadline) with the edges; true when the deadline passed.
inline bool CondWaitWithDeadline(absl::CondVar* cv, absl::Mutex* mu, absl::Time deadline)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
  TsanRelease(mu);
  const bool timed_out = cv->WaitWithDeadline(mu, deadline);
  TsanAcquire(mu);
  return timed_out;
}

// mu->Await(condition) with the edges.
inline void Await(absl::Mutex* mu, const absl::Condition& condition)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
  TsanRelease(mu);
  mu->Await(condition);
  TsanAcquire(mu);
}

// mu->AwaitWithTimeout(condition, timeout) with the edges; true when the condition holds.
inline bool AwaitWithTimeout(absl::Mutex* mu, const absl::Condition& condition,
                             absl::Duration timeout) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu) {
  TsanRelease(mu);
  const bool holds = mu->AwaitWithTimeout(condition, timeout);
  TsanAcquire(mu);
  return holds;
}

}  // namespace loraplex
