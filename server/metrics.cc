#include "server/metrics.h"

#include <dlfcn.h>
#include <prometheus/counter.h>
#include <prometheus/exposer.h>
#include <prometheus/gauge.h>
#include <prometheus/histogram.h>
#include <prometheus/registry.h>
#include <pthread.h>

#include <algorithm>
#include <cerrno>
#include <exception>

#include "absl/strings/str_cat.h"

// civetweb (the HTTP server under prometheus-cpp's Exposer) creates its threads with a fixed stack
// size compiled into Debian's build (about 100 KiB). glibc carves the static TLS of every loaded
// library out of each new thread's stack, and cuBLASLt alone, linked for the CUDA backend, has
// 92 KiB of it, so pthread_create fails with EINVAL and the metrics endpoint cannot start ("null
// context when constructing CivetServer"). This definition, exported from the executable (see
// server/CMakeLists.txt), takes precedence over libc's for every library in the process and raises
// small stacks to 1 MiB; larger requests pass through unchanged.
extern "C" int pthread_attr_setstacksize(pthread_attr_t* attr, size_t size) {
  using Fn = int (*)(pthread_attr_t*, size_t);
  static const Fn real = reinterpret_cast<Fn>(dlsym(RTLD_NEXT, "pthread_attr_setstacksize"));
  if (real == nullptr) return ENOSYS;
  constexpr size_t kMinStack = size_t{1} << 20;
  return real(attr, std::max(size, kMinStack));
}

namespace loraplex::server {

struct Metrics::Impl {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<prometheus::Exposer> exposer;
  prometheus::Family<prometheus::Counter>* requests = nullptr;
  prometheus::Histogram* ttft = nullptr;
  prometheus::Histogram* itl = nullptr;
  prometheus::Counter* tokens = nullptr;
  prometheus::Gauge* queue = nullptr;
  prometheus::Gauge* running = nullptr;
  prometheus::Gauge* kv_used = nullptr;
  prometheus::Gauge* kv_free = nullptr;
  prometheus::Gauge* tokens_per_s = nullptr;
  prometheus::Gauge* prefix_blocks = nullptr;
  prometheus::Counter* prefix_hit_tokens = nullptr;
  prometheus::Counter* prefix_lookup_tokens = nullptr;
  prometheus::Family<prometheus::Counter>* adapter_loads = nullptr;
  prometheus::Family<prometheus::Counter>* adapter_evictions = nullptr;
  prometheus::Family<prometheus::Counter>* adapter_reloads = nullptr;
  prometheus::Family<prometheus::Counter>* adapter_requests = nullptr;
  prometheus::Family<prometheus::Gauge>* adapter_resident = nullptr;
  prometheus::Family<prometheus::Gauge>* adapter_merged = nullptr;
  prometheus::Family<prometheus::Counter>* merge_transitions = nullptr;
  prometheus::Gauge* memory_weights = nullptr;
  prometheus::Gauge* memory_kv_pool = nullptr;
  prometheus::Gauge* memory_scratch = nullptr;
  prometheus::Gauge* memory_adapters = nullptr;
};

absl::StatusOr<std::unique_ptr<Metrics>> Metrics::Create(const std::string& listen) {
  auto impl = std::make_unique<Impl>();
  prometheus::Registry& r = *impl->registry;
  impl->requests = &prometheus::BuildCounter()
                        .Name("loraplex_requests_total")
                        .Help("Generation requests by adapter and gRPC status code")
                        .Register(r);
  // Latencies from a millisecond (decode steps of tiny models) to a minute (long queues).
  const prometheus::Histogram::BucketBoundaries latency = {
      0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60};
  impl->ttft = &prometheus::BuildHistogram()
                    .Name("loraplex_time_to_first_token_seconds")
                    .Help("Time from submission to the first generated token")
                    .Register(r)
                    .Add({}, latency);
  impl->itl = &prometheus::BuildHistogram()
                   .Name("loraplex_inter_token_latency_seconds")
                   .Help("Time between consecutive generated tokens of one request")
                   .Register(r)
                   .Add({}, latency);
  impl->tokens = &prometheus::BuildCounter()
                      .Name("loraplex_generated_tokens_total")
                      .Help("Tokens generated")
                      .Register(r)
                      .Add({});
  auto gauge = [&r](const char* name, const char* help) {
    return &prometheus::BuildGauge().Name(name).Help(help).Register(r).Add({});
  };
  impl->queue = gauge("loraplex_queue_length", "Requests waiting for admission");
  impl->running = gauge("loraplex_running_batch_size", "Sequences in the running batch");
  impl->kv_used = gauge("loraplex_kv_blocks_used", "KV cache blocks in use");
  impl->kv_free = gauge("loraplex_kv_blocks_free", "KV cache blocks free");
  impl->tokens_per_s = gauge("loraplex_tokens_per_second", "Generated tokens per second, recent");
  impl->prefix_blocks =
      gauge("loraplex_prefix_cache_blocks", "KV blocks in the prefix cache (held or idle)");
  impl->prefix_hit_tokens =
      &prometheus::BuildCounter()
           .Name("loraplex_prefix_cache_hit_tokens_total")
           .Help("Tokens whose K/V admitted requests found in the prefix cache")
           .Register(r)
           .Add({});
  impl->prefix_lookup_tokens = &prometheus::BuildCounter()
                                    .Name("loraplex_prefix_cache_lookup_tokens_total")
                                    .Help("Tokens whose K/V admitted requests looked up")
                                    .Register(r)
                                    .Add({});
  auto counters = [&r](const char* name, const char* help) {
    return &prometheus::BuildCounter().Name(name).Help(help).Register(r);
  };
  impl->adapter_loads = counters("loraplex_adapter_loads_total", "Registrations that returned OK");
  impl->adapter_evictions =
      counters("loraplex_adapter_evictions_total", "Times an adapter was evicted to disk");
  impl->adapter_reloads =
      counters("loraplex_adapter_reloads_total", "Times an evicted adapter was read back");
  impl->adapter_requests =
      counters("loraplex_adapter_requests_total", "Requests that took a lease on the adapter");
  impl->adapter_resident = &prometheus::BuildGauge()
                                .Name("loraplex_adapter_resident")
                                .Help("1 when the adapter's current version is in compute memory")
                                .Register(r);
  impl->adapter_merged = &prometheus::BuildGauge()
                              .Name("loraplex_adapter_merged")
                              .Help("1 when the adapter is merged into the base weights")
                              .Register(r);
  impl->merge_transitions =
      counters("loraplex_adapter_merge_transitions_total",
               "Merges and unmerges of the adapter, by SetAdapterMode and by the merge policy");
  auto& memory = prometheus::BuildGauge()
                     .Name("loraplex_memory_bytes")
                     .Help(
                         "Bytes held by the model weights, the KV pool (all blocks), the "
                         "forward-pass scratch and the adapters in compute memory")
                     .Register(r);
  impl->memory_weights = &memory.Add({{"part", "weights"}});
  impl->memory_kv_pool = &memory.Add({{"part", "kv_pool"}});
  impl->memory_scratch = &memory.Add({{"part", "scratch"}});
  impl->memory_adapters = &memory.Add({{"part", "adapters"}});
  if (!listen.empty()) {
    try {
      impl->exposer = std::make_unique<prometheus::Exposer>(listen, 1);
    } catch (const std::exception& e) {
      // prometheus-cpp (civetweb) reports bind failures by throwing.
      return absl::UnavailableError(
          absl::StrCat("--metrics-listen ", listen, ": cannot serve metrics: ", e.what()));
    }
    impl->exposer->RegisterCollectable(impl->registry);
  }
  return std::unique_ptr<Metrics>(new Metrics(std::move(impl)));
}

Metrics::Metrics(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Metrics::~Metrics() = default;

int Metrics::port() const {
  if (impl_->exposer == nullptr) return 0;
  std::vector<int> ports = impl_->exposer->GetListeningPorts();
  return ports.empty() ? 0 : ports[0];
}

void Metrics::RecordRequest(const std::string& adapter, const std::string& code) {
  impl_->requests->Add({{"adapter", adapter}, {"code", code}}).Increment();
}
void Metrics::ObserveTimeToFirstToken(double seconds) { impl_->ttft->Observe(seconds); }
void Metrics::ObserveInterTokenLatency(double seconds) { impl_->itl->Observe(seconds); }
void Metrics::AddGeneratedTokens(int64_t n) { impl_->tokens->Increment(static_cast<double>(n)); }

void Metrics::RecordMergeTransition(const std::string& adapter, const std::string& direction) {
  impl_->merge_transitions->Add({{"adapter", adapter}, {"direction", direction}}).Increment();
}

void Metrics::UpdateEngine(const engine::EngineStats& stats) {
  impl_->queue->Set(static_cast<double>(stats.waiting));
  impl_->running->Set(static_cast<double>(stats.running));
  impl_->kv_used->Set(static_cast<double>(stats.kv_blocks_used));
  impl_->kv_free->Set(static_cast<double>(stats.kv_blocks_free));
  impl_->tokens_per_s->Set(stats.tokens_per_second);
  impl_->prefix_blocks->Set(static_cast<double>(stats.prefix_cache_blocks));
  // The engine keeps running totals; counters only move forward, by the difference.
  for (auto [counter, total] :
       {std::pair{impl_->prefix_hit_tokens, stats.prefix_cache_hit_tokens},
        std::pair{impl_->prefix_lookup_tokens, stats.prefix_cache_lookup_tokens}}) {
    const double delta = static_cast<double>(total) - counter->Value();
    if (delta > 0) counter->Increment(delta);
  }
  impl_->memory_weights->Set(static_cast<double>(stats.weight_bytes));
  impl_->memory_kv_pool->Set(static_cast<double>(stats.kv_pool_bytes));
  impl_->memory_scratch->Set(static_cast<double>(stats.scratch_bytes));
}

}  // namespace loraplex::server

namespace loraplex::server {

void Metrics::UpdateAdapters(const std::vector<adapters::AdapterInfo>& adapters) {
  // The registry keeps running totals; counters only move forward, by the difference.
  auto advance = [](prometheus::Counter& c, int64_t total) {
    const double delta = static_cast<double>(total) - c.Value();
    if (delta > 0) c.Increment(delta);
  };
  int64_t resident_bytes = 0;  // every version in memory, draining ones included
  for (const adapters::AdapterInfo& a : adapters) {
    if (a.residency != adapters::Residency::kDisk) resident_bytes += a.bytes;
    if (a.state != adapters::AdapterState::kReady) continue;
    const std::map<std::string, std::string> label = {{"adapter", a.name}};
    advance(impl_->adapter_loads->Add(label), a.loads);
    advance(impl_->adapter_evictions->Add(label), a.evictions);
    advance(impl_->adapter_reloads->Add(label), a.reloads);
    advance(impl_->adapter_requests->Add(label), a.requests_served);
    impl_->adapter_resident->Add(label).Set(a.residency == adapters::Residency::kDisk ? 0 : 1);
    impl_->adapter_merged->Add(label).Set(a.merged ? 1 : 0);
  }
  impl_->memory_adapters->Set(static_cast<double>(resident_bytes));
}

}  // namespace loraplex::server
