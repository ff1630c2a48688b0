#include "client/bench_report.h"

#include <algorithm>
#include <cmath>
#include <map>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/format.h"
#include "client/rpc.h"

namespace loraplex::client {
namespace {

nlohmann::json SummaryJson(const Summary& s) {
  return {{"mean", s.mean}, {"p50", s.p50}, {"p90", s.p90},    {"p99", s.p99},
          {"min", s.min},   {"max", s.max}, {"count", s.count}};
}

std::string Esc(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '&':
        out += "&amp;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out += c;
    }
  }
  return out;
}

// Tick positions 1/2/5 x 10^k covering [0, hi].
std::vector<double> Ticks(double hi, int target = 5) {
  if (!(hi > 0)) hi = 1;
  const double raw = hi / target;
  const double mag = std::pow(10, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 5.0, 10.0}) {
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  }
  std::vector<double> t;
  for (double v = 0; v <= hi * 1.0001; v += step) t.push_back(v);
  return t;
}

std::string TickLabel(double v) {
  if (v == 0) return "0";
  if (std::fabs(v) >= 1000) return absl::StrFormat("%.0f", v);
  if (std::fabs(v) >= 10) return Num(v, 0);
  return Num(v, 2);
}

const char* kColors[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"};

struct Series {
  std::string name;
  std::vector<std::pair<double, double>> pts;
  bool step = false;  // draw as a step function (CDFs)
};

// A line chart as an inline SVG element. `shade` greys [shade_lo, shade_hi] on x (warm-up).
std::string LineChart(const std::string& title, const std::string& xlabel,
                      const std::string& ylabel, const std::vector<Series>& series,
                      double y_max_fixed = 0, double shade_lo = 0, double shade_hi = 0) {
  const double W = 560, H = 300, L = 64, R = 16, T = 34, B = 46;
  double xmax = 0, ymax = y_max_fixed;
  for (const Series& s : series) {
    for (const auto& [x, y] : s.pts) {
      xmax = std::max(xmax, x);
      if (y_max_fixed <= 0) ymax = std::max(ymax, y);
    }
  }
  const std::vector<double> xt = Ticks(xmax), yt = Ticks(ymax);
  xmax = std::max(xmax, xt.back());
  ymax = std::max(ymax, yt.back());
  auto X = [&](double x) { return L + (W - L - R) * (xmax > 0 ? x / xmax : 0); };
  auto Y = [&](double y) { return H - B - (H - T - B) * (ymax > 0 ? y / ymax : 0); };
  std::string svg = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart\" width=\"%.0f\" height=\"%.0f\" "
      "viewBox=\"0 0 %.0f %.0f\" role=\"img\" aria-label=\"%s\">"
      "<text x=\"%.0f\" y=\"20\" class=\"title\">%s</text>",
      W, H, W, H, Esc(title), L, Esc(title));
  if (shade_hi > shade_lo) {
    absl::StrAppendFormat(
        &svg,
        "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
        "fill=\"#eee\"/><text x=\"%.1f\" y=\"%.1f\" class=\"note\">warm-up</text>",
        X(shade_lo), Y(ymax), X(std::min(shade_hi, xmax)) - X(shade_lo), Y(0) - Y(ymax),
        X(shade_lo) + 4, Y(ymax) + 12);
  }
  for (double v : yt) {
    absl::StrAppendFormat(
        &svg,
        "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" class=\"grid\"/>"
        "<text x=\"%.1f\" y=\"%.1f\" class=\"tick\" text-anchor=\"end\">%s</text>",
        L, W - R, Y(v), Y(v), L - 6, Y(v) + 4, TickLabel(v));
  }
  for (double v : xt) {
    absl::StrAppendFormat(
        &svg,
        "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" class=\"axis\"/>"
        "<text x=\"%.1f\" y=\"%.1f\" class=\"tick\" text-anchor=\"middle\">%s</text>",
        X(v), X(v), Y(0), Y(0) + 4, X(v), Y(0) + 17, TickLabel(v));
  }
  absl::StrAppendFormat(&svg,
                        "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" class=\"axis\"/>"
                        "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" class=\"axis\"/>",
                        L, W - R, Y(0), Y(0), L, L, Y(0), Y(ymax));
  absl::StrAppendFormat(
      &svg,
      "<text x=\"%.1f\" y=\"%.1f\" class=\"label\" text-anchor=\"middle\">%s</text>"
      "<text transform=\"translate(14 %.1f) rotate(-90)\" class=\"label\" "
      "text-anchor=\"middle\">%s</text>",
      (L + W - R) / 2, H - 8, Esc(xlabel), (T + H - B) / 2, Esc(ylabel));
  for (size_t i = 0; i < series.size(); ++i) {
    const Series& s = series[i];
    if (s.pts.empty()) continue;
    std::string d;
    double prev_y = 0;
    for (size_t j = 0; j < s.pts.size(); ++j) {
      const auto& [x, y] = s.pts[j];
      if (j == 0) {
        absl::StrAppendFormat(&d, "M%.1f %.1f", X(x), Y(s.step ? 0 : y));
        if (s.step) absl::StrAppendFormat(&d, " L%.1f %.1f", X(x), Y(y));
      } else if (s.step) {
        absl::StrAppendFormat(&d, " L%.1f %.1f L%.1f %.1f", X(x), Y(prev_y), X(x), Y(y));
      } else {
        absl::StrAppendFormat(&d, " L%.1f %.1f", X(x), Y(y));
      }
      prev_y = y;
    }
    const char* color = kColors[i % 6];
    absl::StrAppendFormat(&svg, "<path d=\"%s\" fill=\"none\" stroke=\"%s\" stroke-width=\"2\"/>",
                          d, color);
    // Legend, top right.
    const double ly = T + 4 + 16 * i;
    absl::StrAppendFormat(&svg,
                          "<rect x=\"%.1f\" y=\"%.1f\" width=\"12\" height=\"3\" fill=\"%s\"/>"
                          "<text x=\"%.1f\" y=\"%.1f\" class=\"legend\">%s</text>",
                          W - R - 150, ly + 4, color, W - R - 134, ly + 9, Esc(s.name));
  }
  return svg + "</svg>";
}

// Horizontal bars: p50 and p99 of a latency per adapter.
std::string AdapterBars(const std::string& title, const nlohmann::json& per_adapter,
                        const std::string& metric) {
  std::vector<std::pair<std::string, nlohmann::json>> rows;
  for (auto it = per_adapter.begin(); it != per_adapter.end(); ++it) {
    rows.emplace_back(it.key(), it.value());
  }
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) {
    return a.second["requests"].template get<int64_t>() >
           b.second["requests"].template get<int64_t>();
  });
  if (rows.size() > 24) rows.resize(24);
  const double W = 560, L = 150, R = 70, row_h = 20, T = 44;
  const double H = T + row_h * rows.size() + 34;
  double vmax = 0;
  for (const auto& [name, j] : rows) vmax = std::max(vmax, j[metric]["p99"].get<double>());
  const std::vector<double> xt = Ticks(vmax);
  vmax = std::max(vmax, xt.back());
  auto X = [&](double v) { return L + (W - L - R) * (vmax > 0 ? v / vmax : 0); };
  std::string svg = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" class=\"chart\" width=\"%.0f\" height=\"%.0f\" "
      "viewBox=\"0 0 %.0f %.0f\" role=\"img\" aria-label=\"%s\">"
      "<text x=\"10\" y=\"20\" class=\"title\">%s</text>"
      "<rect x=\"%.0f\" y=\"27\" width=\"12\" height=\"8\" fill=\"%s\"/>"
      "<text x=\"%.0f\" y=\"35\" class=\"legend\">p50</text>"
      "<rect x=\"%.0f\" y=\"27\" width=\"12\" height=\"8\" fill=\"%s\" opacity=\"0.35\"/>"
      "<text x=\"%.0f\" y=\"35\" class=\"legend\">p99 (label: requests)</text>",
      W, H, W, H, Esc(title), Esc(title), L, kColors[0], L + 16, L + 50, kColors[0], L + 66);
  for (double v : xt) {
    absl::StrAppendFormat(
        &svg,
        "<line x1=\"%.1f\" x2=\"%.1f\" y1=\"%.1f\" y2=\"%.1f\" class=\"grid\"/>"
        "<text x=\"%.1f\" y=\"%.1f\" class=\"tick\" text-anchor=\"middle\">%s</text>",
        X(v), X(v), T - 2, H - 30, X(v), H - 16, TickLabel(v));
  }
  for (size_t i = 0; i < rows.size(); ++i) {
    const auto& [name, j] = rows[i];
    const double y = T + row_h * i;
    const double p50 = j[metric]["p50"].get<double>(), p99 = j[metric]["p99"].get<double>();
    absl::StrAppendFormat(
        &svg,
        "<text x=\"%.1f\" y=\"%.1f\" class=\"tick\" text-anchor=\"end\">%s</text>"
        "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"14\" fill=\"%s\" opacity=\"0.35\"/>"
        "<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"14\" fill=\"%s\"/>"
        "<text x=\"%.1f\" y=\"%.1f\" class=\"tick\">%s</text>",
        L - 6, y + 11, Esc(name.size() > 22 ? name.substr(0, 21) + "~" : name), L, y, X(p99) - L,
        kColors[0], L, y, X(p50) - L, kColors[0], X(p99) + 4, y + 11,
        absl::StrCat(j["requests"].get<int64_t>()));
  }
  absl::StrAppendFormat(&svg,
                        "<text x=\"%.1f\" y=\"%.1f\" class=\"label\" text-anchor=\"middle\">%s "
                        "(ms)</text></svg>",
                        (L + W - R) / 2, H - 2, metric);
  return svg;
}

std::string Cell(const nlohmann::json& v) {
  if (v.is_number_float()) return Num(v.get<double>(), 2);
  if (v.is_string()) return Esc(v.get<std::string>());
  return Esc(v.dump());
}

std::string LatencyTable(const nlohmann::json& r) {
  std::string t =
      "<table><tr><th>latency (ms)</th><th>mean</th><th>p50</th><th>p90</th>"
      "<th>p99</th><th>max</th><th>samples</th></tr>";
  for (const char* k : {"ttft", "tpot", "itl", "e2e"}) {
    const auto& s = r[k];
    absl::StrAppend(&t, "<tr><td>", k, "</td>");
    for (const char* f : {"mean", "p50", "p90", "p99", "max"}) {
      absl::StrAppend(&t, "<td>", Num(s[f].get<double>(), 2), "</td>");
    }
    absl::StrAppend(&t, "<td>", s["count"].get<int64_t>(), "</td></tr>");
  }
  return t + "</table>";
}

std::string KeyValueTable(const nlohmann::json& obj) {
  std::string t = "<table>";
  for (auto it = obj.begin(); it != obj.end(); ++it) {
    absl::StrAppend(&t, "<tr><th>", Esc(it.key()), "</th><td>", Cell(it.value()), "</td></tr>");
  }
  return t + "</table>";
}

}  // namespace

nlohmann::json PhaseSummary(const PhaseRun& run) {
  const std::vector<RequestRecord> measured = CutWarmup(run.records, run.warmup_end_s);
  const LatencySamples lat = CollectLatencies(measured);
  nlohmann::json j;
  int64_t completed = 0, errors = 0, out_tokens = 0, prompt_tokens = 0, retries = 0;
  std::map<std::string, int64_t> retried_by_code;
  double last_end = run.warmup_end_s;
  std::map<std::string, int64_t> by_code;
  nlohmann::json examples = nlohmann::json::array();
  std::map<std::string, std::vector<RequestRecord>> per_adapter;
  for (const RequestRecord& r : measured) {
    last_end = std::max(last_end, r.end_s);
    per_adapter[r.adapter.empty() ? "(base)" : r.adapter].push_back(r);
    retries += r.retries;
    for (const std::string& e : r.retried_errors) ++retried_by_code[e.substr(0, e.find(':'))];
    if (r.grpc_code == 0) {
      ++completed;
      out_tokens += r.output_tokens;
      prompt_tokens += r.prompt_tokens;
    } else {
      ++errors;
      ++by_code[CodeName(static_cast<grpc::StatusCode>(r.grpc_code))];
      if (examples.size() < 5) {
        examples.push_back(CodeName(static_cast<grpc::StatusCode>(r.grpc_code)) + ": " + r.error);
      }
    }
  }
  const double duration = last_end - run.warmup_end_s;
  j["requests"] = static_cast<int64_t>(measured.size());
  j["completed"] = completed;
  j["errors"] = errors;
  j["errors_by_code"] = by_code;
  j["error_examples"] = examples;
  j["retries"] = retries;  // failed attempts sent again (--retries); not counted as errors
  j["retried_by_code"] = retried_by_code;
  j["warmup_requests"] = static_cast<int64_t>(run.records.size() - measured.size());
  j["sent"] = static_cast<int64_t>(run.records.size());
  j["warmup_s"] = run.warmup_end_s;
  j["duration_s"] = duration;
  j["requests_per_s"] = Rate(completed, duration);
  j["output_tokens"] = out_tokens;
  j["output_tokens_per_s"] = Rate(out_tokens, duration);
  j["prompt_tokens"] = prompt_tokens;
  j["prompt_tokens_per_s"] = Rate(prompt_tokens, duration);
  j["latency_unit"] = "ms";
  j["ttft"] = SummaryJson(Summarize(lat.ttft_ms));
  j["tpot"] = SummaryJson(Summarize(lat.tpot_ms));
  j["itl"] = SummaryJson(Summarize(lat.itl_ms));
  j["e2e"] = SummaryJson(Summarize(lat.e2e_ms));
  nlohmann::json pa = nlohmann::json::object();
  for (const auto& [name, recs] : per_adapter) {
    const LatencySamples l = CollectLatencies(recs);
    int64_t errs = 0, toks = 0;
    for (const auto& r : recs) {
      if (r.grpc_code != 0)
        ++errs;
      else
        toks += r.output_tokens;
    }
    pa[name] = {{"requests", static_cast<int64_t>(recs.size())},
                {"errors", errs},
                {"output_tokens", toks},
                {"ttft", SummaryJson(Summarize(l.ttft_ms))},
                {"tpot", SummaryJson(Summarize(l.tpot_ms))},
                {"e2e", SummaryJson(Summarize(l.e2e_ms))}};
  }
  j["per_adapter"] = pa;
  const double bucket = run.wall_s > 60 ? 5.0 : run.wall_s > 20 ? 1.0 : 0.5;
  std::vector<double> done_rate;
  for (const RequestRecord& r : run.records) {
    const size_t i = static_cast<size_t>(r.end_s / bucket);
    if (done_rate.size() <= i) done_rate.resize(i + 1, 0);
    done_rate[i] += 1 / bucket;
  }
  j["throughput_over_time"] = {{"bucket_s", bucket},
                               {"output_tokens_per_s", TokensPerSecondSeries(run.records, bucket)},
                               {"requests_done_per_s", done_rate}};
  return j;
}

std::string RenderHtmlReport(const nlohmann::json& results, const std::vector<PhaseRun>& runs,
                             const std::vector<std::string>& names) {
  std::string h =
      "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
      "<title>loraplex bench report</title><style>"
      "body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1200px}"
      "h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}"
      "table{border-collapse:collapse;margin:8px 0;font-size:13px}"
      "td,th{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f5f5f5}"
      ".grid{display:flex;flex-wrap:wrap;gap:12px}"
      "svg.chart{border:1px solid #eee;background:#fff}"
      "svg .title{font-size:14px;font-weight:600}svg .tick{font-size:11px;fill:#444}"
      "svg .label{font-size:12px;fill:#222}svg .legend{font-size:11px}svg "
      ".note{font-size:11px;fill:#888}"
      "svg line.grid{stroke:#eee}svg line.axis{stroke:#888}"
      ".big{font-size:20px;font-weight:600}.kpi{display:inline-block;margin-right:28px}"
      "</style></head><body>";
  const nlohmann::json& cfg = results.value("config", nlohmann::json::object());
  absl::StrAppend(&h, "<h1>loraplex bench",
                  cfg.contains("scenario") && !cfg["scenario"].get<std::string>().empty()
                      ? " &mdash; scenario " + Esc(cfg["scenario"].get<std::string>())
                      : "",
                  "</h1>");
  auto kpi = [&](const std::string& label, const std::string& value) {
    absl::StrAppend(&h, "<div class=\"kpi\"><div>", Esc(label), "</div><div class=\"big\">",
                    Esc(value), "</div></div>");
  };
  kpi("output tok/s", Num(results["output_tokens_per_s"].get<double>(), 1));
  kpi("requests/s", Num(results["requests_per_s"].get<double>(), 2));
  kpi("requests", absl::StrCat(results["requests"].get<int64_t>()));
  kpi("errors", absl::StrCat(results["errors"].get<int64_t>()));
  kpi("TTFT p50 / p99 ms", absl::StrCat(Num(results["ttft"]["p50"].get<double>(), 1), " / ",
                                        Num(results["ttft"]["p99"].get<double>(), 1)));
  kpi("TPOT p50 / p99 ms", absl::StrCat(Num(results["tpot"]["p50"].get<double>(), 1), " / ",
                                        Num(results["tpot"]["p99"].get<double>(), 1)));
  absl::StrAppend(&h, "<h2>Latency</h2>", LatencyTable(results));
  if (results.contains("phases")) {
    absl::StrAppend(&h,
                    "<h2>Phases</h2><table><tr><th>phase</th><th>requests</th><th>errors</th>"
                    "<th>output tok/s</th><th>TTFT p50</th><th>TPOT p50</th><th>e2e p50</th>"
                    "<th>e2e p99</th></tr>");
    for (const auto& p : results["phases"]) {
      absl::StrAppend(&h, "<tr><td>", Esc(p["name"].get<std::string>()), "</td><td>",
                      p["requests"].get<int64_t>(), "</td><td>", p["errors"].get<int64_t>(),
                      "</td><td>", Num(p["output_tokens_per_s"].get<double>(), 1), "</td><td>",
                      Num(p["ttft"]["p50"].get<double>(), 1), "</td><td>",
                      Num(p["tpot"]["p50"].get<double>(), 2), "</td><td>",
                      Num(p["e2e"]["p50"].get<double>(), 1), "</td><td>",
                      Num(p["e2e"]["p99"].get<double>(), 1), "</td></tr>");
    }
    absl::StrAppend(&h, "</table>");
    if (results.contains("ratios")) absl::StrAppend(&h, KeyValueTable(results["ratios"]));
  }
  // Charts of the main phase (the last run) and, for several phases, CDFs side by side.
  absl::StrAppend(&h, "<h2>Latency CDFs</h2><div class=\"grid\">");
  for (const char* metric : {"ttft", "tpot", "itl", "e2e"}) {
    std::vector<Series> series;
    for (size_t i = 0; i < runs.size(); ++i) {
      const LatencySamples lat = CollectLatencies(CutWarmup(runs[i].records, runs[i].warmup_end_s));
      const std::vector<double>& v = std::string(metric) == "ttft"   ? lat.ttft_ms
                                     : std::string(metric) == "tpot" ? lat.tpot_ms
                                     : std::string(metric) == "itl"  ? lat.itl_ms
                                                                     : lat.e2e_ms;
      series.push_back({names[i], CdfPoints(v, 400), /*step=*/true});
    }
    const std::string upper = absl::AsciiStrToUpper(metric);
    absl::StrAppend(
        &h, LineChart(upper + " CDF", upper + " (ms)", "fraction of requests", series, 1.0));
  }
  absl::StrAppend(&h, "</div><h2>Throughput over time</h2><div class=\"grid\">");
  {
    std::vector<Series> tok, req;
    double warm = 0;
    for (size_t i = 0; i < runs.size(); ++i) {
      const nlohmann::json s = PhaseSummary(runs[i]);
      const double b = s["throughput_over_time"]["bucket_s"];
      Series ts{names[i], {}}, rs{names[i], {}};
      const auto& tv = s["throughput_over_time"]["output_tokens_per_s"];
      const auto& rv = s["throughput_over_time"]["requests_done_per_s"];
      for (size_t k = 0; k < tv.size(); ++k)
        ts.pts.emplace_back((k + 0.5) * b, tv[k].get<double>());
      for (size_t k = 0; k < rv.size(); ++k)
        rs.pts.emplace_back((k + 0.5) * b, rv[k].get<double>());
      tok.push_back(ts);
      req.push_back(rs);
      warm = std::max(warm, runs[i].warmup_end_s);
    }
    absl::StrAppend(&h, LineChart("Output tokens per second", "time since start (s)", "tok/s", tok,
                                  0, 0, warm));
    absl::StrAppend(&h, LineChart("Requests finished per second", "time since start (s)", "req/s",
                                  req, 0, 0, warm));
  }
  absl::StrAppend(&h, "</div><h2>Per-adapter latency</h2><div class=\"grid\">",
                  AdapterBars("End-to-end latency by adapter", results["per_adapter"], "e2e"),
                  AdapterBars("TTFT by adapter", results["per_adapter"], "ttft"), "</div>");
  absl::StrAppend(&h, "<h2>Counts</h2>");
  nlohmann::json counts;
  for (const char* k :
       {"requests", "completed", "errors", "retries", "warmup_requests", "sent", "warmup_s",
        "duration_s", "output_tokens", "prompt_tokens", "requests_per_s", "output_tokens_per_s"}) {
    counts[k] = results[k];
  }
  absl::StrAppend(&h, KeyValueTable(counts));
  if (results["errors"].get<int64_t>() > 0) {
    absl::StrAppend(&h, "<h2>Errors</h2>", KeyValueTable(results["errors_by_code"]), "<ul>");
    for (const auto& e : results["error_examples"]) {
      absl::StrAppend(&h, "<li>", Esc(e.get<std::string>()), "</li>");
    }
    absl::StrAppend(&h, "</ul>");
  }
  if (results.contains("swaps"))
    absl::StrAppend(&h, "<h2>Hot swaps</h2>", KeyValueTable(results["swaps"]));
  absl::StrAppend(&h, "<h2>Configuration</h2>", KeyValueTable(cfg), "</body></html>\n");
  return h;
}

}  // namespace loraplex::client
