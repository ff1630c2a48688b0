#include "common/executor.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace loraplex {

Executor::Executor(Options options) : options_(std::move(options)) {}

Executor::~Executor() { Shutdown(); }

absl::Status Executor::Submit(std::function<void()> job) {
  MutexLock lock(&mu_);
  if (shut_down_) return absl::UnavailableError(absl::StrCat(options_.name, " is shutting down"));
  if (jobs_ >= options_.max_jobs) {
    return absl::ResourceExhaustedError(
        absl::StrCat(jobs_, " ", options_.name, " jobs are in flight already; retry later"));
  }
  if (queue_.TryPush(std::move(job)) != Queue<std::function<void()>>::PushResult::kOk) {
    return absl::UnavailableError(absl::StrCat(options_.name, " is shutting down"));
  }
  ++jobs_;
  // A thread more when none is idle to take it (idle_ counts threads not yet back in Pop too,
  // so a burst never starts more threads than it has jobs).
  if (idle_ == 0 && static_cast<int64_t>(threads_.size()) < options_.max_threads) {
    threads_.emplace_back([this] { Work(); });
  } else if (idle_ > 0) {
    --idle_;
  }
  return absl::OkStatus();
}

void Executor::Work() {
  while (std::optional<std::function<void()>> job = queue_.Pop()) {
    (*job)();
    job.reset();  // what the job holds goes before Shutdown may return
    MutexLock lock(&mu_);
    --jobs_;
    ++idle_;
  }
}

void Executor::Shutdown() {
  std::vector<std::thread> threads;
  {
    MutexLock lock(&mu_);
    shut_down_ = true;
    queue_.Close();  // Pop drains what is queued, then returns nullopt
    threads.swap(threads_);
  }
  for (std::thread& t : threads) t.join();
}

int64_t Executor::jobs() const {
  MutexLock lock(&mu_);
  return jobs_;
}

}  // namespace loraplex
