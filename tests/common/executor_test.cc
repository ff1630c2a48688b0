// common/executor.h: order, the thread and job bounds, and Shutdown's guarantees.
#include "common/executor.h"

#include <gtest/gtest.h>

#include <atomic>
#include <memory>
#include <vector>

#include "absl/synchronization/notification.h"
#include "absl/time/clock.h"
#include "tests/testing/testing.h"

namespace loraplex {
namespace {

using ::loraplex::testing::IsOk;
using ::loraplex::testing::StatusIs;

TEST(ExecutorTest, OneThreadRunsJobsInSubmissionOrder) {
  std::vector<int> order;
  {
    Executor ex({.name = "test", .max_threads = 1});
    for (int i = 0; i < 50; ++i)
      ASSERT_THAT(ex.Submit([&order, i] { order.push_back(i); }), IsOk());
  }  // the destructor runs what is queued
  ASSERT_EQ(order.size(), 50u);
  for (int i = 0; i < 50; ++i) EXPECT_EQ(order[i], i);
}

TEST(ExecutorTest, NeverRunsMoreThanMaxThreadsAtOnce) {
  std::atomic<int> running{0}, most{0};
  Executor ex({.name = "test", .max_threads = 3});
  for (int i = 0; i < 30; ++i) {
    ASSERT_THAT(ex.Submit([&] {
      const int now = running.fetch_add(1) + 1;
      int seen = most.load();
      while (now > seen && !most.compare_exchange_weak(seen, now)) {
      }
      absl::SleepFor(absl::Milliseconds(2));
      running.fetch_sub(1);
    }),
                IsOk());
  }
  ex.Shutdown();
  EXPECT_LE(most.load(), 3);
  EXPECT_GE(most.load(), 2) << "jobs should overlap on several threads";
}

TEST(ExecutorTest, RefusesBeyondMaxJobsAndAfterShutdown) {
  absl::Notification release;
  Executor ex({.name = "admin", .max_threads = 2, .max_jobs = 2});
  ASSERT_THAT(ex.Submit([&] { release.WaitForNotification(); }), IsOk());
  ASSERT_THAT(ex.Submit([&] { release.WaitForNotification(); }), IsOk());
  auto held = std::make_shared<int>(7);
  EXPECT_THAT(ex.Submit([held] {}), StatusIs(absl::StatusCode::kResourceExhausted, "admin"));
  EXPECT_EQ(held.use_count(), 1) << "a refused job is destroyed before Submit returns";
  EXPECT_EQ(ex.jobs(), 2);
  release.Notify();
  ex.Shutdown();
  EXPECT_EQ(ex.jobs(), 0);
  EXPECT_THAT(ex.Submit([] {}), StatusIs(absl::StatusCode::kUnavailable));
}

TEST(ExecutorTest, ShutdownWaitsForJobsAndWhatTheyHold) {
  auto held = std::make_shared<int>(1);
  std::atomic<bool> ran{false};
  Executor ex({.name = "test", .max_threads = 1});
  ASSERT_THAT(ex.Submit([held, &ran] {
    absl::SleepFor(absl::Milliseconds(20));
    ran = true;
  }),
              IsOk());
  ASSERT_THAT(ex.Submit([held] {}), IsOk());
  ex.Shutdown();
  EXPECT_TRUE(ran.load());
  EXPECT_EQ(held.use_count(), 1) << "every job was destroyed before Shutdown returned";
}

TEST(ExecutorTest, AJobMaySubmitAnother) {
  std::atomic<int> ran{0};
  Executor ex({.name = "test", .max_threads = 2});
  ASSERT_THAT(ex.Submit([&] {
    ++ran;
    ASSERT_THAT(ex.Submit([&] { ++ran; }), IsOk());
  }),
              IsOk());
  for (int i = 0; i < 200 && ran.load() < 2; ++i) absl::SleepFor(absl::Milliseconds(5));
  ex.Shutdown();
  EXPECT_EQ(ran.load(), 2);
}

}  // namespace
}  // namespace loraplex
