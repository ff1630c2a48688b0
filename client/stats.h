// Load-test statistics for `loraplex bench`: percentiles, latency summaries, rates, the warm-up cut
// and throughput buckets. Pure functions over plain vectors, no gRPC: unit-tested against
// hand-computed values in tests/client/stats_test.cc. Thread-compatible (no shared state).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace loraplex::client {

// The q-th percentile (q in [0, 100]) of `values` by linear interpolation between closest ranks,
// the definition of numpy.percentile's default ("linear"): with the values sorted as v[0..n-1],
// position h = (n-1) q/100, result v[floor h] + (h - floor h)(v[floor h + 1] - v[floor h]).
// Empty input gives 0 (callers report count 0 beside it). `values` need not be sorted.
double Percentile(std::vector<double> values, double q);
// The same on an already sorted vector (no copy); precondition: ascending order.
double PercentileSorted(const std::vector<double>& sorted, double q);

// mean/p50/p90/p99 (and count/min/max) of one latency metric, in the unit of the input (ms).
struct Summary {
  int64_t count = 0;
  double mean = 0;
  double p50 = 0;
  double p90 = 0;
  double p99 = 0;
  double min = 0;
  double max = 0;
};
Summary Summarize(std::vector<double> values);

// What one finished (or failed) request looked like, times in seconds since the run began.
struct RequestRecord {
  double start_s = 0;
  double first_token_s = -1;  // <0: no token arrived
  double end_s = 0;
  int64_t prompt_tokens = 0;
  int64_t output_tokens = 0;
  std::vector<double> chunk_times_s;  // arrival time of every streamed message holding tokens
  std::vector<int32_t> chunk_tokens;  // tokens in each of those messages (same length, or empty)
  std::string adapter;                // "" = base model
  int64_t index = 0;                  // the request's number in its phase (0, 1, ...; warm-up too)
  std::vector<int32_t> output_ids;    // the generated ids, when LoadSpec::record_outputs
  int grpc_code = 0;                  // grpc::StatusCode; 0 = OK
  std::string error;                  // the server's message when grpc_code != 0
  // Attempts that failed and were sent again (LoadSpec::retries); the times above are the whole
  // request's, from its first attempt's start, and the fields of the last attempt.
  int retries = 0;
  std::vector<std::string> retried_errors;  // "CODE: message" of each failed attempt
};

// Per-request latency samples in milliseconds, from successful records only.
// TTFT = first token - start; E2E = end - start; TPOT = (end - first token) / (output_tokens - 1)
// for requests with at least 2 output tokens (vLLM's definition); ITL = the gaps between
// consecutive streamed messages holding tokens, pooled over requests.
struct LatencySamples {
  std::vector<double> ttft_ms, tpot_ms, itl_ms, e2e_ms;
};
LatencySamples CollectLatencies(const std::vector<RequestRecord>& records);

// Keeps the records whose request started at or after `warmup_end_s` (the measured ones); the
// requests started during warm-up are dropped, however late they finish.
std::vector<RequestRecord> CutWarmup(const std::vector<RequestRecord>& records,
                                     double warmup_end_s);

// events / seconds, 0 when seconds <= 0.
double Rate(double events, double seconds);

// Output tokens per second in consecutive buckets of `bucket_s` starting at time 0: a message with
// k tokens counts k at its arrival time (without chunk_tokens, output_tokens is spread evenly over
// the messages; without chunk times, all tokens count at end_s). Failed requests count too: the
// tokens did stream. Bucket i covers [i*bucket_s, (i+1)*bucket_s); the result has
// ceil(end/bucket_s) entries where end is the latest time seen, and each entry is tokens /
// bucket_s.
std::vector<double> TokensPerSecondSeries(const std::vector<RequestRecord>& records,
                                          double bucket_s);

// The empirical CDF reduced to at most `max_points` (x, y) points for plotting: x sorted
// ascending, y = fraction of values <= x. Keeps the first and last points.
std::vector<std::pair<double, double>> CdfPoints(std::vector<double> values, int max_points);

}  // namespace loraplex::client
