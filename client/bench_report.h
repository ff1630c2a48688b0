// Results of `loraplex bench`: the JSON summary of a phase (results.json) and the self-contained
// HTML report with inline SVG charts (report.html: no scripts, no fonts or files fetched).
#pragma once

#include <string>
#include <vector>

#include "client/bench.h"
#include "nlohmann/json.hpp"

namespace loraplex::client {

// The summary of one phase. Latencies in milliseconds:
//   ttft, tpot, itl, e2e: {mean, p50, p90, p99, min, max, count} over measured successful requests
//   requests: measured requests (started after the warm-up), = completed + errors
//   completed, errors, errors_by_code {"NOT_FOUND": n, ...}, error_examples (a few messages)
//   warmup_requests, sent (= requests + warmup_requests), warmup_s
//   duration_s: from the end of the warm-up to the last measured request's end
//   requests_per_s = completed / duration_s, output_tokens, output_tokens_per_s =
//   output_tokens / duration_s (measured requests only), prompt_tokens, prompt_tokens_per_s
//   per_adapter {name or "(base)": {requests, errors, output_tokens, ttft, tpot, e2e}}
//   throughput_over_time {bucket_s, output_tokens_per_s[], requests_done_per_s[]} (all requests)
nlohmann::json PhaseSummary(const PhaseRun& run);

// The whole report page. `results` is what results.json holds (a phase summary plus "config",
// and optionally "phases" and "ratios"); `runs` are the phases' raw records, in the order of
// results["phases"] (or one run for a single phase); `names` their names.
std::string RenderHtmlReport(const nlohmann::json& results, const std::vector<PhaseRun>& runs,
                             const std::vector<std::string>& names);

}  // namespace loraplex::client
