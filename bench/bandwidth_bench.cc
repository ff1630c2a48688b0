// Streaming read bandwidth of a 256 MiB buffer (far beyond L3), on 1 thread and on the kernels'
// whole ThreadPool::Default(). The decode GEMV streams its weights the same way, so its bytes/s
// over this figure is the fraction of the memory bound it reaches (docs/benchmarks.md).
#include <benchmark/benchmark.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "common/thread_pool.h"

namespace {

constexpr size_t kBytes = size_t{256} << 20;

const std::vector<float>& Buffer() {
  static const std::vector<float>* buffer = [] {
    auto* b = new std::vector<float>(kBytes / sizeof(float));
    for (size_t i = 0; i < b->size(); ++i) (*b)[i] = static_cast<float>(i & 1023);
    return b;
  }();
  return *buffer;
}

// Sums a range as kStreams interleaved sub-streams (like a GEMV tile reading several weight rows
// at once): one core's DRAM bandwidth is bound by how many misses it keeps in flight, and several
// streams give the hardware prefetchers more to run ahead on. 16 independent accumulators keep the
// adds off the critical path; the baseline vectoriser (SSE2) is plenty for DRAM speed.
constexpr int kStreams = 4;
float SumRange(const float* p, size_t n) {
  const size_t part = n / kStreams / 16 * 16;
  float acc[kStreams][16] = {};
  for (size_t i = 0; i < part; i += 16)
    for (int s = 0; s < kStreams; ++s)
      for (int l = 0; l < 16; ++l) acc[s][l] += p[s * part + i + l];
  float total = 0;
  for (int s = 0; s < kStreams; ++s)
    for (float a : acc[s]) total += a;
  for (size_t i = part * kStreams; i < n; ++i) total += p[i];
  return total;
}

void BM_StreamRead(benchmark::State& state) {
  const std::vector<float>& buf = Buffer();
  const bool all_threads = state.range(0) != 0;
  loraplex::ThreadPool& pool = loraplex::ThreadPool::Default();
  for (auto _ : state) {
    if (!all_threads) {
      benchmark::DoNotOptimize(SumRange(buf.data(), buf.size()));
    } else {
      std::vector<float> partial(pool.num_threads() * 16, 0.0f);  // padded: no false sharing
      const int64_t chunk = 1 << 16;
      const int64_t chunks = static_cast<int64_t>(buf.size() / chunk);
      pool.ParallelFor(chunks, [&](int64_t b, int64_t e) {
        float s = SumRange(buf.data() + b * chunk, (e - b) * chunk);
        partial[(b * pool.num_threads() / chunks) * 16] += s;
      });
      benchmark::DoNotOptimize(partial.data());
    }
  }
  state.SetBytesProcessed(static_cast<int64_t>(state.iterations()) * kBytes);
  state.SetLabel(all_threads ? "threads=" + std::to_string(pool.num_threads()) : "threads=1");
}
BENCHMARK(BM_StreamRead)->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();
