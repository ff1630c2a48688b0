#include "client/stats.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace loraplex::client {

double PercentileSorted(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  q = std::clamp(q, 0.0, 100.0);
  const double h = (static_cast<double>(sorted.size()) - 1) * q / 100.0;
  const size_t lo = static_cast<size_t>(std::floor(h));
  const size_t hi = std::min(lo + 1, sorted.size() - 1);
  return sorted[lo] + (h - static_cast<double>(lo)) * (sorted[hi] - sorted[lo]);
}

double Percentile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  return PercentileSorted(values, q);
}

Summary Summarize(std::vector<double> values) {
  Summary s;
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  s.count = static_cast<int64_t>(values.size());
  // Sum in ascending order: small values are not swallowed by large ones.
  s.mean = std::accumulate(values.begin(), values.end(), 0.0) / static_cast<double>(s.count);
  s.p50 = PercentileSorted(values, 50);
  s.p90 = PercentileSorted(values, 90);
  s.p99 = PercentileSorted(values, 99);
  s.min = values.front();
  s.max = values.back();
  return s;
}

LatencySamples CollectLatencies(const std::vector<RequestRecord>& records) {
  LatencySamples out;
  for (const RequestRecord& r : records) {
    if (r.grpc_code != 0) continue;
    out.e2e_ms.push_back((r.end_s - r.start_s) * 1e3);
    if (r.first_token_s < 0) continue;
    out.ttft_ms.push_back((r.first_token_s - r.start_s) * 1e3);
    if (r.output_tokens >= 2) {
      out.tpot_ms.push_back((r.end_s - r.first_token_s) * 1e3 /
                            static_cast<double>(r.output_tokens - 1));
    }
    for (size_t i = 1; i < r.chunk_times_s.size(); ++i) {
      out.itl_ms.push_back((r.chunk_times_s[i] - r.chunk_times_s[i - 1]) * 1e3);
    }
  }
  return out;
}

std::vector<RequestRecord> CutWarmup(const std::vector<RequestRecord>& records,
                                     double warmup_end_s) {
  std::vector<RequestRecord> kept;
  for (const RequestRecord& r : records) {
    if (r.start_s >= warmup_end_s) kept.push_back(r);
  }
  return kept;
}

double Rate(double events, double seconds) { return seconds > 0 ? events / seconds : 0; }

std::vector<double> TokensPerSecondSeries(const std::vector<RequestRecord>& records,
                                          double bucket_s) {
  std::vector<double> tokens;
  if (bucket_s <= 0) return tokens;
  auto add = [&](double t, double n) {
    const size_t i = static_cast<size_t>(std::max(0.0, std::floor(t / bucket_s)));
    if (tokens.size() <= i) tokens.resize(i + 1, 0);
    tokens[i] += n;
  };
  for (const RequestRecord& r : records) {
    if (r.output_tokens <= 0) continue;
    if (r.chunk_times_s.empty()) {
      add(r.end_s, static_cast<double>(r.output_tokens));
      continue;
    }
    if (r.chunk_tokens.size() == r.chunk_times_s.size()) {
      for (size_t i = 0; i < r.chunk_times_s.size(); ++i)
        add(r.chunk_times_s[i], r.chunk_tokens[i]);
      continue;
    }
    const double per =
        static_cast<double>(r.output_tokens) / static_cast<double>(r.chunk_times_s.size());
    for (double t : r.chunk_times_s) add(t, per);
  }
  for (double& v : tokens) v /= bucket_s;
  return tokens;
}

std::vector<std::pair<double, double>> CdfPoints(std::vector<double> values, int max_points) {
  std::vector<std::pair<double, double>> pts;
  if (values.empty() || max_points < 2) return pts;
  std::sort(values.begin(), values.end());
  const size_t n = values.size();
  const size_t step = std::max<size_t>(1, (n + max_points - 2) / (max_points - 1));
  for (size_t i = 0; i < n; i += step) {
    pts.emplace_back(values[i], static_cast<double>(i + 1) / static_cast<double>(n));
  }
  if (pts.back().second < 1.0) pts.emplace_back(values.back(), 1.0);
  return pts;
}

}  // namespace loraplex::client
