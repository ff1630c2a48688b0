#include "common/queue.h"

#include <gtest/gtest.h>

#include <thread>
#include <vector>

namespace loraplex {
namespace {

using Result = Queue<int>::PushResult;

TEST(QueueTest, FifoAndCapacity) {
  Queue<int> q(2);
  int a = 1, b = 2, c = 3;
  EXPECT_EQ(q.TryPush(std::move(a)), Result::kOk);
  EXPECT_EQ(q.TryPush(std::move(b)), Result::kOk);
  EXPECT_EQ(q.TryPush(std::move(c)), Result::kFull);
  EXPECT_EQ(c, 3);  // a refused value is left to the caller
  EXPECT_EQ(q.size(), 2u);
  EXPECT_EQ(q.Pop(), 1);
  EXPECT_EQ(q.Pop(), 2);
  EXPECT_EQ(q.Pop(absl::Milliseconds(1)), std::nullopt);
}

TEST(QueueTest, CloseRefusesPushesButDrains) {
  Queue<int> q;
  EXPECT_EQ(q.TryPush(7), Result::kOk);
  q.Close();
  EXPECT_TRUE(q.closed());
  EXPECT_EQ(q.TryPush(8), Result::kClosed);
  EXPECT_EQ(q.Pop(), 7);
  EXPECT_EQ(q.Pop(), std::nullopt);  // closed and empty: no wait
}

TEST(QueueTest, PopWaitsForAPush) {
  Queue<int> q;
  std::thread producer([&] {
    absl::SleepFor(absl::Milliseconds(20));
    q.TryPush(42);
  });
  EXPECT_EQ(q.Pop(absl::Seconds(10)), 42);
  producer.join();
}

TEST(QueueTest, CloseWakesAWaitingConsumer) {
  Queue<int> q;
  std::thread closer([&] {
    absl::SleepFor(absl::Milliseconds(20));
    q.Close();
  });
  EXPECT_EQ(q.Pop(), std::nullopt);
  closer.join();
}

TEST(QueueTest, ManyProducersOneConsumerLoseNothing) {
  Queue<int> q;
  constexpr int kThreads = 4, kEach = 2000;
  std::vector<std::thread> producers;
  for (int t = 0; t < kThreads; ++t) {
    producers.emplace_back([&q, t] {
      for (int i = 0; i < kEach; ++i) ASSERT_EQ(q.TryPush(t * kEach + i), Result::kOk);
    });
  }
  std::vector<int> seen(kThreads * kEach, 0);
  std::vector<int> last(kThreads, -1);
  int received = 0;
  while (received < kThreads * kEach) {
    for (int v : q.PopAll()) {
      ++seen[v];
      // Items of one producer arrive in the order it pushed them.
      EXPECT_GT(v % kEach, last[v / kEach]);
      last[v / kEach] = v % kEach;
      ++received;
    }
  }
  for (auto& p : producers) p.join();
  for (int count : seen) EXPECT_EQ(count, 1);
}

}  // namespace
}  // namespace loraplex
