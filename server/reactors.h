// Helpers for our gRPC callback-API reactors: who keeps a reactor alive (RefCounted, RefPtr), and
// the happens-before edges of gRPC that ThreadSanitizer cannot see by itself (ReactorSync,
// IgnoreGrpc, CheckOurs), plus the reactor that only finishes (FinishNow).
//
// Lifetime. A reactor that other threads call into (the engine thread's
// output sink, a registry loader's adapter callback, an admin worker) must not be deleted by
// gRPC's OnDone while one of them is still inside it: OnDone can come on a gRPC thread the moment
// another thread has called Finish, and that thread may still be on its way out of the reactor.
// So the reactor counts its holders and the last one to let go deletes it:
//   - gRPC, from the handler's `new` until OnDone (the count starts at 1 for it);
//   - every RefPtr: an engine sink or a callback that may still run, and a ScopedRef around every
//     reaction.
// The count changes with acquire-release ordering, so all a holder did happens before the delete
// that another holder performs; ThreadSanitizer sees that edge too (it reads our atomics), which
// is why every reaction holds a ScopedRef even where gRPC itself orders it before OnDone.
//
// ThreadSanitizer edges: the happens-before edges of gRPC's callback API that TSan cannot see by
// itself.
//
// gRPC core (completion queues, callback executors) and Abseil come from Debian, built without
// TSan, so the handoffs inside them are invisible to a TSan build of ours: a reactor written on
// the engine thread before StartWrite and read in OnWriteDone on a gRPC thread would be reported
// as a race although gRPC orders the two. Three pieces make the server checkable instead of
// suppressing such reports wholesale:
//  - ReactorSync: every call that hands a reactor to gRPC (StartWrite, StartRead, Finish) runs
//    inside Handoff, and every reaction (OnWriteDone, OnReadDone, OnCancel, OnDone) starts with
//    Reacted. Handoff holds a mutex while gRPC serializes and queues the operation and Reacted
//    takes it, so what the handing-off thread did up to gRPC's return happens before the reaction
//    (gRPC guarantees this much: it starts the operation before it returns). gRPC never runs our
//    reactions inline in these calls (our reactors are not inlineable), so Reacted never waits on
//    its own thread.
//  - IgnoreGrpc: gRPC's inline header code is compiled into our objects with TSan while the rest
//    of gRPC is not, so TSan would see one half of gRPC's own handoffs. Inside Handoff and the
//    server interceptor's Proceed, TSan ignores this thread's memory accesses (not its
//    synchronization).
//  - CheckOurs: our handlers and reactions are checked again even when gRPC runs them inside an
//    IgnoreGrpc; on gRPC's threads, gRPC's code between our calls stays unchecked.
// In other builds Handoff just runs the call and the rest compiles to nothing. tests/tsan.supp
// lists what no annotation here can order, one comment per entry.
//
// Thread-safety: all methods may be called from any thread (Ref, Unref and RefPtr's copies and
// destruction too); IgnoreGrpc and CheckOurs are scopes of the calling thread.
#pragma once

#include <grpcpp/support/server_callback.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <utility>

#include "absl/synchronization/mutex.h"
#include "common/sync.h"

#ifdef LP_TSAN_ENABLED
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif

namespace loraplex::server {

class RefCounted {
 public:
  RefCounted() = default;
  RefCounted(const RefCounted&) = delete;
  RefCounted& operator=(const RefCounted&) = delete;

  void Ref() { refs_.fetch_add(1, std::memory_order_relaxed); }
  // Deletes the object when this was the last reference.
  void Unref() {
    if (refs_.fetch_sub(1, std::memory_order_acq_rel) == 1) delete this;
  }

 protected:
  virtual ~RefCounted() = default;

 private:
  std::atomic<int> refs_{1};  // gRPC's, until OnDone
};

// A counted reference to a reactor; copyable, so that it can live in a std::function.
template <typename T>
class RefPtr {
 public:
  explicit RefPtr(T* p) : p_(p) { p_->Ref(); }
  RefPtr(const RefPtr& o) : p_(o.p_) { p_->Ref(); }
  RefPtr(RefPtr&& o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
  RefPtr& operator=(const RefPtr&) = delete;
  RefPtr& operator=(RefPtr&&) = delete;
  ~RefPtr() {
    if (p_ != nullptr) p_->Unref();
  }
  T* operator->() const { return p_; }
  T& operator*() const { return *p_; }

 private:
  T* p_;
};

// Held for the length of one reaction: `ScopedRef<MyReactor> reacting(this);`.
template <typename T>
using ScopedRef = const RefPtr<T>;

namespace tsan_internal {
// How many ignores this thread has begun and not ended (TSan's own counter is not readable). A
// gRPC thread ends in gRPC's code, with one begun (CheckOurs): the destructor ends it before TSan
// finishes the thread, which it would otherwise report.
struct IgnoreDepth {
  int n = 0;
  ~IgnoreDepth() {
#ifdef LP_TSAN_ENABLED
    for (; n > 0; --n) __tsan_ignore_thread_end();
#endif
  }
};
inline thread_local IgnoreDepth ignore_depth;
}  // namespace tsan_internal

// While alive, TSan ignores this thread's memory accesses (not its synchronization): for gRPC's
// own code, whose inline parts are compiled into our objects (with TSan) while the rest of it is
// not, so that TSan would see one half of gRPC's handoffs and report them. Wraps every call into
// gRPC that may run gRPC code on gRPC's objects: the Handoff calls below and the server
// interceptor's Proceed (server/server.cc), under which gRPC also runs our handlers.
class IgnoreGrpc {
 public:
  IgnoreGrpc() {
#ifdef LP_TSAN_ENABLED
    ++tsan_internal::ignore_depth.n;
    __tsan_ignore_thread_begin();
#endif
  }
  ~IgnoreGrpc() {
#ifdef LP_TSAN_ENABLED
    __tsan_ignore_thread_end();
    --tsan_internal::ignore_depth.n;
#endif
  }
  IgnoreGrpc(const IgnoreGrpc&) = delete;
  IgnoreGrpc& operator=(const IgnoreGrpc&) = delete;
};

// The opposite, for our code that gRPC calls on its threads (handlers, reactions, the server
// interceptor): TSan checks it again, also when gRPC runs it under an IgnoreGrpc. When it returns,
// the thread goes back to gRPC's code unchecked and stays so until gRPC calls us again: what gRPC
// does after a reaction (OnDone's clean-up, the next completion) is gRPC's alone, and its
// handoffs are the ones TSan cannot see. So on gRPC's threads TSan checks only our code.
class CheckOurs {
 public:
  CheckOurs() {
#ifdef LP_TSAN_ENABLED
    saved_ = tsan_internal::ignore_depth.n;
    for (int i = 0; i < saved_; ++i) __tsan_ignore_thread_end();
    tsan_internal::ignore_depth.n = 0;
#endif
  }
  ~CheckOurs() {
#ifdef LP_TSAN_ENABLED
    // The main thread is ours (it starts and stops the server; gRPC may run a clean-up of its own
    // on it during Shutdown): it goes back to being checked. Our other threads call into gRPC
    // only through Handoff, so saved_ > 0 there.
    const int depth = saved_ > 0 ? saved_ : (gettid() == getpid() ? 0 : 1);
    for (int i = 0; i < depth; ++i) __tsan_ignore_thread_begin();
    tsan_internal::ignore_depth.n = depth;
#endif
  }
  CheckOurs(const CheckOurs&) = delete;
  CheckOurs& operator=(const CheckOurs&) = delete;

 private:
  int saved_ = 0;
};

class ReactorSync {
 public:
  // Runs `op`, a call that hands the reactor to gRPC. The reactor may be deleted as soon as the
  // next reaction has started (OnDone after Finish), which Reacted holds back until this returns.
  template <typename Op>
  void Handoff(Op&& op) {
#ifdef LP_TSAN_ENABLED
    absl::Mutex& mu = Stripe();
    mu.Lock();
    {
      IgnoreGrpc ignore;
      std::forward<Op>(op)();
    }
    TsanRelease(this);
    mu.Unlock();
#else
    std::forward<Op>(op)();
#endif
  }

  // For a reactor returned to gRPC by its handler without a Handoff: what the handler did happens
  // before the reactions.
  void Publish() {
    Handoff([] {});
  }

  // First thing in every reaction, with a CheckOurs before it for the whole reaction:
  //   CheckOurs checked;
  //   sync_.Reacted();
  void Reacted() {
#ifdef LP_TSAN_ENABLED
    absl::Mutex& mu = Stripe();
    mu.Lock();
    TsanAcquire(this);
    mu.Unlock();
#endif
  }

 private:
#ifdef LP_TSAN_ENABLED
  // The mutex lives outside the reactor (it must outlast a Finish that lets OnDone delete it) and
  // orders only; the edge itself is on this object's address, so reactors sharing a stripe gain
  // no happens-before from each other.
  absl::Mutex& Stripe() const {
    static absl::Mutex stripes[64];
    return stripes[(reinterpret_cast<uintptr_t>(this) >> 4) % 64];
  }
#endif
};

// A reactor that only finishes: a unary call's (in place of the callback API's DefaultReactor,
// whose OnDone is gRPC's own and so cannot start with Reacted) or a stream refused before it
// starts. FinishWith may come from any thread, once; the reactor deletes itself in OnDone.
template <typename Base>
class FinishOnlyReactor final : public Base {
 public:
  void FinishWith(grpc::Status status) {
    sync_.Handoff([&] { this->Finish(std::move(status)); });
  }
  void OnDone() override {
    CheckOurs checked;
    sync_.Reacted();
    delete this;
  }

 private:
  ReactorSync sync_;
};
using FinishingReactor = FinishOnlyReactor<grpc::ServerUnaryReactor>;

// A unary call answered at once with `status`.
inline grpc::ServerUnaryReactor* FinishNow(grpc::Status status) {
  auto* reactor = new FinishingReactor();
  reactor->FinishWith(std::move(status));
  return reactor;
}

}  // namespace loraplex::server
