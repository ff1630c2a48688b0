#include "common/thread_pool.h"

#include <algorithm>
#include <cstdlib>

namespace loraplex {
namespace {

// True on pool workers and on a caller while it runs its own share: a nested ParallelFor then
// runs inline instead of deadlocking on run_mu_.
thread_local bool tls_in_parallel = false;
constexpr int kSpinIterations = 20000;

int DefaultThreadCount() {
  if (const char* env = std::getenv("LP_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n > 0) return n;
  }
  unsigned hw = std::thread::hardware_concurrency();
  return hw == 0 ? 1 : static_cast<int>(hw);
}

}  // namespace

ThreadPool::ThreadPool(int num_threads) {
  int n = num_threads > 0 ? num_threads : DefaultThreadCount();
  for (int i = 0; i + 1 < n; ++i) workers_.emplace_back([this, i] { WorkerLoop(i); });
}

ThreadPool::~ThreadPool() {
  {
    std::lock_guard<std::mutex> lock(sleep_mu_);
    stop_.store(true);
    generation_.fetch_add(1, std::memory_order_release);
  }
  sleep_cv_.notify_all();
  for (auto& t : workers_) t.join();
}

ThreadPool& ThreadPool::Default() {
  static ThreadPool* pool = new ThreadPool(0);
  return *pool;
}

void ThreadPool::RunShare(int share) {
  int64_t per = (job_n_ + job_shares_ - 1) / job_shares_;
  int64_t begin = per * share;
  int64_t end = std::min(job_n_, begin + per);
  if (begin < end) (*job_fn_)(begin, end);
}

void ThreadPool::WorkerLoop(int index) {
  tls_in_parallel = true;
  uint64_t seen = 0;
  while (true) {
    uint64_t gen = generation_.load(std::memory_order_acquire);
    for (int spin = 0; gen == seen && spin < kSpinIterations; ++spin) {
      std::this_thread::yield();
      gen = generation_.load(std::memory_order_acquire);
    }
    if (gen == seen) {
      std::unique_lock<std::mutex> lock(sleep_mu_);
      sleep_cv_.wait(lock, [&] { return generation_.load(std::memory_order_acquire) != seen; });
      gen = generation_.load(std::memory_order_acquire);
    }
    seen = gen;
    if (stop_.load()) return;
    // Share 0 is the caller's; worker i runs share i + 1 when the job has that many.
    if (index + 1 < job_shares_) RunShare(index + 1);
    pending_.fetch_sub(1, std::memory_order_acq_rel);
  }
}

void ThreadPool::ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn,
                             int64_t min_grain) {
  if (n <= 0) return;
  int64_t max_shares = std::max<int64_t>(1, n / std::max<int64_t>(1, min_grain));
  int shares = static_cast<int>(std::min<int64_t>(num_threads(), max_shares));
  if (shares <= 1 || tls_in_parallel || workers_.empty()) {
    fn(0, n);
    return;
  }
  std::lock_guard<std::mutex> run_lock(run_mu_);
  job_fn_ = &fn;
  job_n_ = n;
  job_shares_ = shares;
  pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
  {
    std::lock_guard<std::mutex> lock(sleep_mu_);
    generation_.fetch_add(1, std::memory_order_release);
  }
  sleep_cv_.notify_all();
  tls_in_parallel = true;
  RunShare(0);
  tls_in_parallel = false;
  while (pending_.load(std::memory_order_acquire) != 0) std::this_thread::yield();
  job_fn_ = nullptr;
}

}  // namespace loraplex
