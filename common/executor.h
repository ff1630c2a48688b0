// Background work off the caller's thread: the adapter registry's reloads (AcquireAsync) and the
// Adapters service's admin operations (loads, upload commits, unloads, merges) run on executors,
// so that no gRPC callback thread and no engine thread ever waits for a disk or for another
// thread.
//
// An executor runs jobs in submission order on at most max_threads threads of its own, started
// when work arrives and no thread is idle (none exist before the first job), kept until the
// executor is destroyed. Jobs wait in a common/queue.h Queue; Submit never blocks.
//
// Thread-safety: every method may be called from any thread. A job may Submit further jobs.
#pragma once

#include <cstdint>
#include <functional>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "common/queue.h"
#include "common/sync.h"

namespace loraplex {

class Executor {
 public:
  struct Options {
    std::string name = "executor";  // in error messages
    int max_threads = 4;            // jobs running at once (>= 1)
    // Jobs queued or running at once; Submit refuses beyond (RESOURCE_EXHAUSTED).
    int64_t max_jobs = std::numeric_limits<int64_t>::max();
  };
  explicit Executor(Options options);
  // Shutdown().
  ~Executor();
  Executor(const Executor&) = delete;
  Executor& operator=(const Executor&) = delete;

  // Queues `job`. RESOURCE_EXHAUSTED when max_jobs are queued or running; UNAVAILABLE after
  // Shutdown began. A refused job is destroyed before Submit returns, without running.
  absl::Status Submit(std::function<void()> job);

  // Refuses new jobs, lets the queued ones run, and returns when every job has run and been
  // destroyed (what a job holds is released before Shutdown returns) and the threads are joined.
  // Idempotent. Must not be called from a job.
  void Shutdown();

  // Jobs queued or running now.
  int64_t jobs() const;

 private:
  void Work();

  const Options options_;
  Queue<std::function<void()>> queue_;
  mutable absl::Mutex mu_;  // guards the counters and threads_
  int64_t jobs_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t idle_ ABSL_GUARDED_BY(mu_) = 0;  // threads waiting for a job
  std::vector<std::thread> threads_ ABSL_GUARDED_BY(mu_);
  bool shut_down_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace loraplex
