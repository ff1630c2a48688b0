// Prometheus metrics of the server, served over HTTP at /metrics on --metrics-listen:
//   loraplex_requests_total{adapter, code}        finished generation requests by gRPC code
//   loraplex_time_to_first_token_seconds          histogram, submission to first token
//   loraplex_inter_token_latency_seconds          histogram, between streamed tokens
//   loraplex_generated_tokens_total
//   loraplex_queue_length, loraplex_running_batch_size, loraplex_kv_blocks_used,
//   loraplex_kv_blocks_free, loraplex_tokens_per_second   gauges from the engine
//   loraplex_prefix_cache_blocks                  gauge: KV blocks in the prefix cache
//   loraplex_prefix_cache_hit_tokens_total, loraplex_prefix_cache_lookup_tokens_total
//                                                 prompt tokens found cached, of those looked up
//   loraplex_adapter_loads_total{adapter}, loraplex_adapter_evictions_total{adapter},
//   loraplex_adapter_reloads_total{adapter}, loraplex_adapter_requests_total{adapter}
//                                                 registry counters (since the process started)
//   loraplex_adapter_resident{adapter}, loraplex_adapter_merged{adapter}   0/1 gauges
//   loraplex_adapter_merge_transitions_total{adapter, direction="merge"|"unmerge"}
//                                                 by SetAdapterMode and by the merge policy
//   loraplex_memory_bytes{part="weights"|"kv_pool"|"scratch"|"adapters"}   what the server holds
//                                                 by design, to set against its resident size
// The adapter label is "base" for the base model and "-" for requests refused before their adapter
// was resolved (so that made-up names cannot grow the label set).
//
// Thread-safety: all methods may be called from any thread.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "adapters/registry.h"
#include "engine/engine.h"

namespace loraplex::server {

class Metrics {
 public:
  // `listen` is HOST:PORT (port 0 picks a free one) or empty to keep metrics without serving them.
  // UNAVAILABLE when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<Metrics>> Create(const std::string& listen);
  ~Metrics();

  // The bound HTTP port, 0 when not serving.
  int port() const;

  void RecordRequest(const std::string& adapter, const std::string& code);
  void ObserveTimeToFirstToken(double seconds);
  void ObserveInterTokenLatency(double seconds);
  void AddGeneratedTokens(int64_t n);
  // One merge or unmerge of `adapter` (direction "merge" or "unmerge").
  void RecordMergeTransition(const std::string& adapter, const std::string& direction);
  void UpdateEngine(const engine::EngineStats& stats);
  // Copies the registry's per-adapter counters and states (READY versions only).
  void UpdateAdapters(const std::vector<adapters::AdapterInfo>& adapters);

  struct Impl;

 private:
  explicit Metrics(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace loraplex::server
