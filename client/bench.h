// The load generator of `loraplex bench`: one phase of traffic against a server, closed loop
// (a fixed number of requests in flight) or open loop (arrivals at a rate), over the gRPC callback
// API so that no thread waits per request. The CLI around it (flags, scenarios, adapters made for
// the run, output files) is in bench.cc's RunBench.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "client/bench_workload.h"
#include "client/rpc.h"
#include "client/stats.h"
#include "loraplex/v1/inference.grpc.pb.h"

namespace loraplex::client {

struct LoadSpec {
  int64_t concurrency = 0;            // > 0: closed loop
  std::optional<Arrivals> arrivals;   // set: open loop
  std::vector<std::string> adapters;  // empty: the base model
  Popularity popularity;
  LengthDist prompt_tokens;  // random token ids, unless prompts is non-empty
  // > 0: every random prompt starts with its adapter's "system prompt" of this many random ids
  // (the same for every request naming the adapter, different across adapters), then
  // prompt_tokens ids of its own.
  int64_t system_prompt_tokens = 0;
  bool record_outputs = false;  // keep each request's generated token ids (RequestRecord)
  LengthDist max_tokens;
  std::vector<PromptLine> prompts;  // from --prompts-file
  bool ignore_eos = true;           // outputs of exactly max_tokens
  int64_t requests = 0;             // measured requests to send (0: no bound)
  double duration_s = 0;            // seconds to send measured requests (0: no bound)
  double warmup_s = 0;              // requests started before this are warm-up
  int32_t vocab_size = 0;           // random prompt ids are drawn from [3, vocab_size)
  uint64_t seed = 0;
  double request_deadline_s = 600;
  // A request that fails with UNAVAILABLE, or with INTERNAL or UNKNOWN (what a proxy reports when
  // its upstream dies mid-stream), is sent again up to this many times, after 0.1 s, 0.2 s, ...
  int retries = 0;
};

// What a phase produced. Times are seconds since the phase began.
struct PhaseRun {
  std::vector<RequestRecord> records;  // every request, warm-up included, in completion order
  double warmup_end_s = 0;
  double wall_s = 0;  // until the last request finished
};

// Live counters a progress printer reads while the phase runs (relaxed atomics).
struct Progress {
  std::atomic<int64_t> started{0}, done{0}, errors{0}, in_flight{0}, output_tokens{0};
};

// Runs one phase to completion: stops starting requests when `requests` measured ones have
// started or `duration_s` has passed after the warm-up (at least one bound must be set), then
// waits for those in flight. `progress` may be null. Thread-safe to call from one thread at a time.
PhaseRun RunPhase(v1::Inference::Stub& stub, const ConnectionOptions& conn, const LoadSpec& spec,
                  Progress* progress);

}  // namespace loraplex::client
