#include "client/adapter_inspect.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "client/format.h"

namespace loraplex::client {
namespace {

// "model.layers.12.self_attn.q_proj" -> 12 and "q_proj"; -1 and the whole name when it is not one.
std::pair<int64_t, std::string> LayerAndKind(const std::string& module) {
  const std::string prefix = "model.layers.";
  if (module.rfind(prefix, 0) == 0) {
    const size_t dot = module.find('.', prefix.size());
    if (dot != std::string::npos) {
      int64_t layer = 0;
      for (size_t i = prefix.size(); i < dot; ++i) {
        if (module[i] < '0' || module[i] > '9') return {-1, module};
        layer = layer * 10 + (module[i] - '0');
      }
      return {layer, module.substr(module.rfind('.') + 1)};
    }
  }
  return {-1, module};
}

std::string Sci(double v) { return absl::StrFormat("%.3g", v); }

}  // namespace

nlohmann::json InspectionJson(const v1::InspectAdapterResponse& r) {
  nlohmann::json j;
  j["adapter"] = r.name();
  j["version"] = r.version();
  if (!r.against().empty()) {
    j["against"] = r.against();
    j["against_version"] = r.against_version();
  }
  j["modules"] = nlohmann::json::array();
  for (const v1::ModuleInspection& m : r.modules()) {
    nlohmann::json e;
    e["module"] = m.module();
    e["rank"] = m.rank();
    e["singular_values"] =
        std::vector<double>(m.singular_values().begin(), m.singular_values().end());
    e["fro_norm"] = m.fro_norm();
    e["relative_norm"] = m.relative_norm();
    e["effective_rank"] = m.effective_rank();
    e["amplification"] = m.amplification();
    if (m.has_similarity()) e["similarity"] = m.similarity();
    j["modules"].push_back(std::move(e));
  }
  return j;
}

std::string InspectionTable(const v1::InspectAdapterResponse& r) {
  const bool against = !r.against().empty();
  std::vector<std::vector<std::string>> rows = {
      {"MODULE", "RANK", "|dW|_F", "|dW|/|W|", "EFF.RANK", "AMPLIFICATION", "TOP SINGULAR VALUES"}};
  if (against) rows[0].push_back("SIMILARITY");
  for (const v1::ModuleInspection& m : r.modules()) {
    std::vector<std::string> top;
    for (int i = 0; i < std::min(3, m.singular_values_size()); ++i) {
      top.push_back(Sci(m.singular_values(i)));
    }
    if (m.singular_values_size() > 3) top.push_back("...");
    rows.push_back({m.module(), absl::StrCat(m.rank()), Sci(m.fro_norm()), Sci(m.relative_norm()),
                    absl::StrCat(m.effective_rank()), Num(m.amplification()),
                    absl::StrJoin(top, " ")});
    if (against) rows.back().push_back(m.has_similarity() ? Num(m.similarity(), 3) : "-");
  }
  std::string out = absl::StrCat(r.name(), " v", r.version());
  if (against) absl::StrAppend(&out, " against ", r.against(), " v", r.against_version());
  absl::StrAppend(&out, ": ", r.modules_size(), " modules\n", FormatTable(rows));
  return out;
}

absl::Status WriteSpectraSvg(const v1::InspectAdapterResponse& r, const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  std::map<int64_t, std::vector<const v1::ModuleInspection*>> by_layer;
  for (const v1::ModuleInspection& m : r.modules()) {
    by_layer[LayerAndKind(m.module()).first].push_back(&m);
  }
  static const char* kColors[] = {"#1f77b4", "#ff7f0e", "#2ca02c", "#d62728",
                                  "#9467bd", "#8c564b", "#e377c2"};
  constexpr double kW = 640, kH = 360, kLeft = 60, kRight = 130, kTop = 30, kBottom = 40;
  for (const auto& [layer, modules] : by_layer) {
    // log10 range over the positive singular values of the layer; zeros are left out.
    double lo = std::numeric_limits<double>::infinity(), hi = -lo;
    int max_rank = 1;
    for (const v1::ModuleInspection* m : modules) {
      max_rank = std::max(max_rank, m->singular_values_size());
      for (double s : m->singular_values()) {
        if (s > 0) lo = std::min(lo, std::log10(s)), hi = std::max(hi, std::log10(s));
      }
    }
    if (!(hi >= lo)) lo = -1, hi = 0;
    lo = std::floor(lo), hi = std::ceil(hi);
    if (hi == lo) hi = lo + 1;
    const double plot_w = kW - kLeft - kRight, plot_h = kH - kTop - kBottom;
    auto x_of = [&](int i) { return kLeft + (max_rank > 1 ? plot_w * i / (max_rank - 1) : 0); };
    auto y_of = [&](double s) { return kTop + plot_h * (hi - std::log10(s)) / (hi - lo); };
    std::string svg = absl::StrFormat(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%g\" height=\"%g\" "
        "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%%\" height=\"100%%\" "
        "fill=\"white\"/>\n<text x=\"%g\" y=\"18\">%s v%d, layer %d: singular values of dW "
        "(log scale) by index</text>\n",
        kW, kH, kLeft, r.name(), r.version(), layer);
    absl::StrAppendFormat(&svg,
                          "<rect x=\"%g\" y=\"%g\" width=\"%g\" height=\"%g\" fill=\"none\" "
                          "stroke=\"#888\"/>\n",
                          kLeft, kTop, plot_w, plot_h);
    for (double e = lo; e <= hi; e += 1) {
      absl::StrAppendFormat(&svg, "<text x=\"%g\" y=\"%g\" text-anchor=\"end\">1e%d</text>\n",
                            kLeft - 6, y_of(std::pow(10.0, e)) + 4, static_cast<int>(e));
    }
    absl::StrAppendFormat(&svg,
                          "<text x=\"%g\" y=\"%g\">1</text><text x=\"%g\" y=\"%g\" "
                          "text-anchor=\"end\">%d</text>\n",
                          kLeft, kH - kBottom + 16, kLeft + plot_w, kH - kBottom + 16, max_rank);
    for (size_t i = 0; i < modules.size(); ++i) {
      const v1::ModuleInspection& m = *modules[i];
      const char* color = kColors[i % 7];
      std::vector<std::string> points;
      for (int k = 0; k < m.singular_values_size(); ++k) {
        if (m.singular_values(k) <= 0) break;
        points.push_back(absl::StrFormat("%.1f,%.1f", x_of(k), y_of(m.singular_values(k))));
      }
      if (!points.empty()) {
        absl::StrAppendFormat(&svg,
                              "<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"1.5\" "
                              "points=\"%s\"/>\n",
                              color, absl::StrJoin(points, " "));
      }
      absl::StrAppendFormat(&svg, "<text x=\"%g\" y=\"%g\" fill=\"%s\">%s (r=%d)</text>\n",
                            kW - kRight + 8, kTop + 14 + 16 * static_cast<double>(i), color,
                            LayerAndKind(m.module()).second, m.rank());
    }
    svg += "</svg>\n";
    const std::string path =
        absl::StrCat(dir, "/", layer >= 0 ? absl::StrCat("layer-", layer) : "other", ".svg");
    std::ofstream out(path);
    out << svg;
    if (!out.good()) return absl::InternalError(absl::StrCat("cannot write ", path));
  }
  return absl::OkStatus();
}

}  // namespace loraplex::client
