// Who keeps a gRPC reactor alive. A reactor that other threads call into (the engine thread's
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
// Thread-safety: Ref, Unref and RefPtr's copies and destruction may happen on any thread.
#pragma once

#include <atomic>
#include <utility>

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

}  // namespace loraplex::server
