// A fixed pool of worker threads for data-parallel loops in the compute kernels.
//
// ParallelFor splits [0, n) into contiguous ranges, one per thread, and runs them on the workers
// and the calling thread; it returns when all ranges are done. Only one ParallelFor runs on a pool
// at a time (calls from several threads are serialised by an internal mutex); a ParallelFor called
// from inside a worker runs inline. Workers spin briefly before sleeping so that the many short
// loops of a decode step do not pay a futex wake-up each.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"

namespace loraplex {

class ThreadPool {
 public:
  // num_threads <= 0 means the number of hardware threads (or LP_NUM_THREADS when set).
  explicit ThreadPool(int num_threads = 0);
  ~ThreadPool();
  ThreadPool(const ThreadPool&) = delete;
  ThreadPool& operator=(const ThreadPool&) = delete;

  int num_threads() const { return static_cast<int>(workers_.size()) + 1; }

  // fn(begin, end) over disjoint ranges covering [0, n). Ranges are at least `min_grain` long
  // (except the last) so tiny loops stay on one thread.
  void ParallelFor(int64_t n, const std::function<void(int64_t, int64_t)>& fn,
                   int64_t min_grain = 1);

  // The process-wide pool used by the kernels.
  static ThreadPool& Default();

 private:
  void WorkerLoop(int index);
  void RunShare(int share);

  std::vector<std::thread> workers_;
  std::mutex run_mu_;  // serialises ParallelFor callers

  // The current job, published by bumping generation_ (release) and read by workers (acquire).
  const std::function<void(int64_t, int64_t)>* job_fn_ = nullptr;
  int64_t job_n_ = 0;
  int job_shares_ = 0;
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> pending_{0};
  std::atomic<bool> stop_{false};

  std::mutex sleep_mu_;  // guards the sleep/wake handshake with sleep_cv_
  std::condition_variable sleep_cv_;
};

}  // namespace loraplex
