#include "client/bench_workload.h"

#include <algorithm>
#include <cmath>
#include <fstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"

namespace loraplex::client {

absl::StatusOr<Popularity> ParsePopularity(const std::string& text) {
  Popularity p;
  if (text == "distinct") {
    p.kind = Popularity::Kind::kDistinct;
  } else if (text == "uniform") {
    p.kind = Popularity::Kind::kUniform;
  } else if (text == "identical") {
    p.kind = Popularity::Kind::kIdentical;
  } else if (text == "zipf" || text.rfind("zipf:", 0) == 0) {
    p.kind = Popularity::Kind::kZipf;
    if (text.size() > 5 && (!absl::SimpleAtod(text.substr(5), &p.alpha) || !(p.alpha > 0) ||
                            !std::isfinite(p.alpha))) {
      return absl::InvalidArgumentError(
          absl::StrCat("--popularity: '", text, "': zipf wants a positive ALPHA, e.g. zipf:1.0"));
    }
  } else if (text.rfind("hot:", 0) == 0) {
    p.kind = Popularity::Kind::kHot;
    if (!absl::SimpleAtod(text.substr(4), &p.alpha) || !(p.alpha > 0) || !(p.alpha <= 1)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--popularity: '", text, "': hot wants a probability 0 < P <= 1, e.g. hot:0.9"));
    }
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--popularity: '", text,
                     "' is not one of distinct, uniform, zipf:ALPHA, identical, hot:P"));
  }
  return p;
}

std::string PopularityName(const Popularity& p) {
  switch (p.kind) {
    case Popularity::Kind::kDistinct:
      return "distinct";
    case Popularity::Kind::kUniform:
      return "uniform";
    case Popularity::Kind::kIdentical:
      return "identical";
    case Popularity::Kind::kZipf:
      return absl::StrCat("zipf:", p.alpha);
    case Popularity::Kind::kHot:
      return absl::StrCat("hot:", p.alpha);
  }
  return "?";
}

AdapterPicker::AdapterPicker(Popularity pop, int n, uint64_t seed)
    : pop_(pop), n_(std::max(1, n)), rng_(seed), probs_(n_, 0.0) {
  switch (pop_.kind) {
    case Popularity::Kind::kIdentical:
      probs_[0] = 1;
      break;
    case Popularity::Kind::kDistinct:
    case Popularity::Kind::kUniform:
      std::fill(probs_.begin(), probs_.end(), 1.0 / n_);
      break;
    case Popularity::Kind::kZipf: {
      double total = 0;
      for (int k = 0; k < n_; ++k) total += probs_[k] = 1.0 / std::pow(k + 1.0, pop_.alpha);
      for (double& v : probs_) v /= total;
      break;
    }
    case Popularity::Kind::kHot:
      if (n_ == 1) {
        probs_[0] = 1;
        break;
      }
      probs_[0] = pop_.alpha;
      for (int k = 1; k < n_; ++k) probs_[k] = (1 - pop_.alpha) / (n_ - 1);
      break;
  }
  double acc = 0;
  for (double v : probs_) cdf_.push_back(acc += v);
  cdf_.back() = 1.0;
}

int AdapterPicker::Pick(int64_t request_index) {
  switch (pop_.kind) {
    case Popularity::Kind::kIdentical:
      return 0;
    case Popularity::Kind::kDistinct:
      return static_cast<int>(request_index % n_);
    case Popularity::Kind::kUniform:
      return std::uniform_int_distribution<int>(0, n_ - 1)(rng_);
    case Popularity::Kind::kZipf:
    case Popularity::Kind::kHot: {
      const double u = std::uniform_real_distribution<double>(0, 1)(rng_);
      const auto it = std::upper_bound(cdf_.begin(), cdf_.end(), u);
      return std::min<int>(n_ - 1, static_cast<int>(it - cdf_.begin()));
    }
  }
  return 0;
}

int64_t LengthDist::Sample(std::mt19937_64& rng) const {
  return lo == hi ? lo : std::uniform_int_distribution<int64_t>(lo, hi)(rng);
}

absl::StatusOr<LengthDist> ParseLengthDist(const std::string& flag, const std::string& text) {
  LengthDist d;
  auto bad = [&]() {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", flag, ": '", text, "' is not N or uniform:MIN:MAX with 1 <= MIN <= MAX"));
  };
  if (text.rfind("uniform:", 0) == 0) {
    std::vector<std::string> parts = absl::StrSplit(text.substr(8), ':');
    if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &d.lo) ||
        !absl::SimpleAtoi(parts[1], &d.hi)) {
      return bad();
    }
  } else if (absl::SimpleAtoi(text, &d.lo)) {
    d.hi = d.lo;
  } else {
    return bad();
  }
  if (d.lo < 1 || d.hi < d.lo) return bad();
  return d;
}

std::string Arrivals::Name() const {
  return shape == 1.0 ? "poisson" : absl::StrCat("gamma:", shape);
}

double Arrivals::NextGap(std::mt19937_64& rng) const {
  if (shape == 1.0) return std::exponential_distribution<double>(rate)(rng);
  // Gamma(shape, scale) has mean shape*scale; scale = 1/(rate*shape) keeps the mean gap 1/rate.
  return std::gamma_distribution<double>(shape, 1.0 / (rate * shape))(rng);
}

absl::StatusOr<Arrivals> ParseArrivals(const std::string& text, double rate) {
  Arrivals a;
  if (!(rate > 0) || !std::isfinite(rate)) {
    return absl::InvalidArgumentError("--rate must be a positive number of requests per second");
  }
  a.rate = rate;
  if (text == "poisson") return a;
  if (text.rfind("gamma:", 0) == 0 && absl::SimpleAtod(text.substr(6), &a.shape) && a.shape > 0 &&
      std::isfinite(a.shape)) {
    return a;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--arrival: '", text, "' is not poisson or gamma:SHAPE (SHAPE > 0)"));
}

absl::StatusOr<std::vector<PromptLine>> ReadPromptsJsonl(const std::string& path) {
  std::ifstream f(path);
  if (!f) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::vector<PromptLine> out;
  std::string line;
  for (int n = 1; std::getline(f, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("prompt") || !j["prompt"].is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", n, ": want a JSON object with a string \"prompt\""));
    }
    PromptLine p;
    p.prompt = j["prompt"];
    if (j.contains("max_tokens")) {
      if (!j["max_tokens"].is_number_integer() || j["max_tokens"].get<int64_t>() < 1) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ":", n, ": \"max_tokens\" must be a positive integer"));
      }
      p.max_tokens = j["max_tokens"];
    }
    out.push_back(std::move(p));
  }
  if (out.empty()) return absl::InvalidArgumentError(absl::StrCat(path, ": no prompts"));
  return out;
}

}  // namespace loraplex::client
