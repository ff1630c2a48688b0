// loraplex_memory_bytes on /metrics: the pieces of the server's memory an operator adds up against
// its resident size (docs/benchmarks.md, resident memory). Served over real HTTP from Metrics.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "server/metrics.h"
#include "tests/testing/server_process.h"
#include "tests/testing/testing.h"

namespace loraplex::server {
namespace {

// The value of `loraplex_memory_bytes{part="PART"}` in a metrics page, or -1 when absent.
double MemoryGauge(const std::string& page, const std::string& part) {
  const std::string key = "loraplex_memory_bytes{part=\"" + part + "\"} ";
  const size_t at = page.find(key);
  if (at == std::string::npos) return -1;
  return std::stod(page.substr(at + key.size()));
}

adapters::AdapterInfo Adapter(const std::string& name, int64_t version, int64_t bytes,
                              adapters::AdapterState state, adapters::Residency residency) {
  adapters::AdapterInfo a;
  a.name = name;
  a.version = version;
  a.bytes = bytes;
  a.state = state;
  a.residency = residency;
  return a;
}

TEST(MemoryMetricsTest, EnginePartsAndResidentAdapterBytes) {
  auto metrics = Metrics::Create("127.0.0.1:0");
  ASSERT_TRUE(metrics.ok()) << metrics.status();
  Metrics& m = **metrics;
  ASSERT_GT(m.port(), 0);

  std::string page = testing::FetchMetrics(m.port());
  for (const char* part : {"weights", "kv_pool", "scratch", "adapters"}) {
    EXPECT_EQ(MemoryGauge(page, part), 0) << part << " in\n" << page;
  }

  engine::EngineStats stats;
  stats.weight_bytes = 269'000'000;
  stats.kv_pool_bytes = 402'000'000;
  stats.scratch_bytes = 23'500'000;
  m.UpdateEngine(stats);
  using adapters::AdapterState;
  using adapters::Residency;
  m.UpdateAdapters({Adapter("a", 1, 3'686'400, AdapterState::kReady, Residency::kDevice)});
  page = testing::FetchMetrics(m.port());
  EXPECT_EQ(MemoryGauge(page, "weights"), 269'000'000);
  EXPECT_EQ(MemoryGauge(page, "kv_pool"), 402'000'000);
  EXPECT_EQ(MemoryGauge(page, "scratch"), 23'500'000);
  EXPECT_EQ(MemoryGauge(page, "adapters"), 3'686'400);

  // A second adapter loads: the sum grows by its bytes. A version replaced but still draining
  // holds its memory too; one evicted to disk holds none; one still loading none yet.
  m.UpdateAdapters({Adapter("a", 1, 3'686'400, AdapterState::kDraining, Residency::kDevice),
                    Adapter("a", 2, 3'686'400, AdapterState::kReady, Residency::kDevice),
                    Adapter("b", 1, 1'000'000, AdapterState::kReady, Residency::kDevice),
                    Adapter("c", 1, 5'000'000, AdapterState::kReady, Residency::kDisk),
                    Adapter("d", 1, 7'000'000, AdapterState::kLoading, Residency::kDisk)});
  page = testing::FetchMetrics(m.port());
  EXPECT_EQ(MemoryGauge(page, "adapters"), 2 * 3'686'400 + 1'000'000);

  // All evicted: nothing resident.
  m.UpdateAdapters({Adapter("a", 2, 3'686'400, AdapterState::kReady, Residency::kDisk)});
  page = testing::FetchMetrics(m.port());
  EXPECT_EQ(MemoryGauge(page, "adapters"), 0);
}

}  // namespace
}  // namespace loraplex::server
