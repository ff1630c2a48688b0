#include "adapters/peft_config.h"

#include <cmath>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "re2/re2.h"

namespace loraplex::adapters {
namespace {

// Keys keep their file order: rank_pattern / alpha_pattern are first-match-wins.
using Json = nlohmann::ordered_json;

bool EndsWithDot(const std::string& key, const std::string& suffix) {
  return key == suffix || (key.size() > suffix.size() &&
                           key.compare(key.size() - suffix.size(), suffix.size(), suffix) == 0 &&
                           key[key.size() - suffix.size() - 1] == '.');
}

bool FullMatch(const std::string& pattern, const std::string& key) {
  RE2 re(pattern, RE2::Quiet);
  return re.ok() && RE2::FullMatch(key, re);
}

// Python's "truthy" for the JSON values PEFT writes.
bool Truthy(const Json& v) {
  if (v.is_null()) return false;
  if (v.is_boolean()) return v.get<bool>();
  if (v.is_number()) return v.get<double>() != 0.0;
  if (v.is_string() || v.is_array() || v.is_object()) return !v.empty();
  return true;
}

absl::Status Field(const std::string& source, const std::string& field, const std::string& why) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": field '", field, "' ", why));
}

absl::Status CheckRegex(const std::string& source, const std::string& field,
                        const std::string& pattern) {
  RE2 re(pattern, RE2::Quiet);
  if (!re.ok()) return Field(source, field, absl::StrCat("is not a valid regex: ", re.error()));
  return absl::OkStatus();
}

absl::Status ReadStringOrList(const Json& v, const std::string& source, const std::string& field,
                              std::vector<std::string>* list, std::string* single,
                              bool* is_single) {
  *is_single = false;
  if (v.is_null()) return absl::OkStatus();
  if (v.is_string()) {
    *single = v.get<std::string>();
    *is_single = true;
    return absl::OkStatus();
  }
  if (!v.is_array()) return Field(source, field, "must be a string or a list of strings");
  for (const Json& e : v) {
    if (!e.is_string()) return Field(source, field, "must be a string or a list of strings");
    list->push_back(e.get<std::string>());
  }
  return absl::OkStatus();
}

bool IsEmbeddingOrHead(const std::string& name) {
  return name == "lm_head" || name == "embed_tokens" || EndsWithDot(name, "lm_head") ||
         EndsWithDot(name, "embed_tokens");
}

}  // namespace

absl::StatusOr<PeftConfig> ParsePeftConfig(const std::string& json_text,
                                           const std::string& source) {
  Json j = Json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  }
  PeftConfig c;
  auto get = [&](const char* key) -> const Json& {
    static const Json kNull;
    auto it = j.find(key);
    return it == j.end() ? kNull : *it;
  };

  // Features that change the math and are not implemented: refuse, naming the field.
  if (const Json& t = get("peft_type");
      !t.is_null() && (!t.is_string() || t.get<std::string>() != "LORA")) {
    return Field(source, "peft_type", absl::StrCat("is ", t.dump(), "; only LORA is supported"));
  }
  for (const char* field :
       {"modules_to_save", "lora_bias", "trainable_token_indices", "layer_replication",
        "target_parameters", "use_qalora", "alora_invocation_tokens", "megatron_config"}) {
    if (Truthy(get(field))) {
      return Field(source, field, absl::StrCat("is set (", get(field).dump(), "); not supported"));
    }
  }
  if (const Json& b = get("bias");
      !b.is_null() && (!b.is_string() || b.get<std::string>() != "none")) {
    return Field(source, "bias", absl::StrCat("is ", b.dump(), "; only \"none\" is supported"));
  }

  const Json& r = get("r");
  if (!r.is_number_integer() || r.get<int64_t>() < 1) {
    return Field(source, "r", "must be an integer >= 1");
  }
  c.r = r.get<int64_t>();
  const Json& alpha = get("lora_alpha");
  if (alpha.is_null()) {
    c.lora_alpha = 8.0f;  // PEFT's default
  } else if (!alpha.is_number()) {
    return Field(source, "lora_alpha", "must be a number");
  } else {
    c.lora_alpha = alpha.get<float>();
  }
  if (const Json& v = get("use_rslora"); !v.is_null()) {
    if (!v.is_boolean()) return Field(source, "use_rslora", "must be true or false");
    c.use_rslora = v.get<bool>();
  }
  if (const Json& v = get("use_dora"); !v.is_null()) {
    if (!v.is_boolean()) return Field(source, "use_dora", "must be true or false");
    c.use_dora = v.get<bool>();
  }
  if (const Json& v = get("fan_in_fan_out"); !v.is_null()) {
    if (!v.is_boolean()) return Field(source, "fan_in_fan_out", "must be true or false");
    c.fan_in_fan_out = v.get<bool>();
  }
  if (const Json& v = get("base_model_name_or_path"); v.is_string()) {
    c.base_model_name_or_path = v.get<std::string>();
  }

  // target_modules
  {
    std::string single;
    bool is_single = false;
    const Json& t = get("target_modules");
    if (t.is_null()) {
      return Field(source, "target_modules",
                   "is missing (PEFT's per-architecture default is not "
                   "supported; name the modules)");
    }
    if (auto s = ReadStringOrList(t, source, "target_modules", &c.target_list, &single, &is_single);
        !s.ok()) {
      return s;
    }
    if (is_single) {
      std::string lower = single;
      for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
      if (lower == "all-linear") {
        c.target_kind = PeftConfig::TargetKind::kAllLinear;
      } else {
        c.target_kind = PeftConfig::TargetKind::kRegex;
        c.target_regex = single;
        if (auto s = CheckRegex(source, "target_modules", single); !s.ok()) return s;
      }
    } else {
      for (const std::string& name : c.target_list) {
        if (name == "all-linear") c.target_kind = PeftConfig::TargetKind::kAllLinear;
      }
    }
    for (const std::string& name : c.target_list) {
      if (IsEmbeddingOrHead(name)) {
        return Field(
            source, "target_modules",
            absl::StrCat("names '", name, "': embedding and lm_head LoRA are not supported"));
      }
    }
    if (c.target_kind == PeftConfig::TargetKind::kRegex) {
      for (const char* key : {"lm_head", "model.embed_tokens"}) {
        if (FullMatch(c.target_regex, key)) {
          return Field(
              source, "target_modules",
              absl::StrCat("matches '", key, "': embedding and lm_head LoRA are not supported"));
        }
      }
    }
  }
  {
    std::string single;
    bool is_single = false;
    if (auto s = ReadStringOrList(get("exclude_modules"), source, "exclude_modules",
                                  &c.exclude_list, &single, &is_single);
        !s.ok()) {
      return s;
    }
    if (is_single) {
      c.exclude_regex = single;
      if (auto s = CheckRegex(source, "exclude_modules", single); !s.ok()) return s;
    }
  }

  // rank_pattern / alpha_pattern
  for (const char* field : {"rank_pattern", "alpha_pattern"}) {
    const Json& p = get(field);
    if (p.is_null()) continue;
    if (!p.is_object()) return Field(source, field, "must be an object");
    const bool is_rank = std::string(field) == "rank_pattern";
    for (auto it = p.begin(); it != p.end(); ++it) {
      if (auto s = CheckRegex(source, field, absl::StrCat("(.*\\.)?(", it.key(), ")")); !s.ok()) {
        return s;
      }
      if (is_rank) {
        if (!it.value().is_number_integer() || it.value().get<int64_t>() < 1) {
          return Field(source, field, absl::StrCat("'", it.key(), "' must be an integer >= 1"));
        }
        c.rank_pattern.emplace_back(it.key(), it.value().get<int64_t>());
      } else {
        if (!it.value().is_number()) {
          return Field(source, field, absl::StrCat("'", it.key(), "' must be a number"));
        }
        c.alpha_pattern.emplace_back(it.key(), it.value().get<float>());
      }
    }
  }

  // layers_to_transform (int or list) / layers_pattern (string or list)
  if (const Json& l = get("layers_to_transform"); !l.is_null()) {
    if (l.is_number_integer()) {
      c.layers_to_transform.push_back(l.get<int64_t>());
    } else if (l.is_array()) {
      for (const Json& e : l) {
        if (!e.is_number_integer()) {
          return Field(source, "layers_to_transform", "must be an integer or a list of integers");
        }
        c.layers_to_transform.push_back(e.get<int64_t>());
      }
    } else {
      return Field(source, "layers_to_transform", "must be an integer or a list of integers");
    }
  }
  {
    std::string single;
    bool is_single = false;
    if (auto s = ReadStringOrList(get("layers_pattern"), source, "layers_pattern",
                                  &c.layers_pattern, &single, &is_single);
        !s.ok()) {
      return s;
    }
    if (is_single && !single.empty()) c.layers_pattern.push_back(single);
    for (const std::string& p : c.layers_pattern) {
      if (auto s = CheckRegex(source, "layers_pattern", p); !s.ok()) return s;
      // PEFT reads the layer index as group 1 of "...{pattern}\.(\d+)\.", so a group of the
      // pattern's own would be read as the index (int() fails there; Targets would crash here).
      if (RE2(p, RE2::Quiet).NumberOfCapturingGroups() > 0) {
        return Field(source, "layers_pattern",
                     absl::StrCat("'", p, "' has a capturing group; use (?:...)"));
      }
    }
  }
  return c;
}

bool PeftConfig::Targets(const std::string& key) const {
  // exclude_modules wins over everything.
  if (!exclude_regex.empty() && FullMatch(exclude_regex, key)) return false;
  for (const std::string& e : exclude_list) {
    if (EndsWithDot(key, e)) return false;
  }
  static const char* const kLinear[] = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                        "gate_proj", "up_proj", "down_proj"};
  switch (target_kind) {
    case TargetKind::kAllLinear:
      for (const char* name : kLinear) {
        if (EndsWithDot(key, name)) return true;
      }
      return false;
    case TargetKind::kRegex:
      // PEFT ignores layers_to_transform for a regex target_modules.
      return FullMatch(target_regex, key);
    case TargetKind::kList:
      break;
  }
  bool found = false;
  for (const std::string& t : target_list) found |= EndsWithDot(key, t);
  if (!found || layers_to_transform.empty()) return found;

  // The layer index: PEFT takes the first "<pattern>.<N>." (lazy prefix), or with no
  // layers_pattern the first "<anything>.<N>." after the first dot.
  int64_t index = -1;
  std::string digits;
  if (layers_pattern.empty()) {
    if (RE2::PartialMatch(key, R"(^.*?\.[^.]*\.(\d+)\.)", &digits) &&
        !absl::SimpleAtoi(digits, &index)) {
      index = -1;  // more digits than int64 holds: no layer of any model
    }
  } else {
    for (const std::string& p : layers_pattern) {
      RE2 re(absl::StrCat(R"(^(?:.*?\.)?)", p, R"(\.(\d+)\.)"), RE2::Quiet);
      if (re.ok() && RE2::PartialMatch(key, re, &digits)) {
        if (!absl::SimpleAtoi(digits, &index)) index = -1;
        break;
      }
    }
  }
  if (index < 0) return false;
  for (int64_t l : layers_to_transform) {
    if (l == index) return true;
  }
  return false;
}

namespace {
template <typename T>
const T* PatternValue(const std::vector<std::pair<std::string, T>>& patterns,
                      const std::string& key) {
  for (const auto& [pattern, value] : patterns) {
    if (FullMatch(absl::StrCat("(.*\\.)?(", pattern, ")"), key)) return &value;
  }
  return nullptr;
}
}  // namespace

int64_t PeftConfig::RankFor(const std::string& key) const {
  const int64_t* v = PatternValue(rank_pattern, key);
  return v ? *v : r;
}

float PeftConfig::AlphaFor(const std::string& key) const {
  const float* v = PatternValue(alpha_pattern, key);
  return v ? *v : lora_alpha;
}

float PeftConfig::ScaleFor(const std::string& key) const {
  // Python floats are doubles: compute as PEFT does, round once.
  const double rank = static_cast<double>(RankFor(key));
  const double alpha = AlphaFor(key);
  return static_cast<float>(use_rslora ? alpha / std::sqrt(rank) : alpha / rank);
}

int64_t PeftConfig::MaxRank() const {
  int64_t m = r;
  for (const auto& [k, v] : rank_pattern) m = std::max(m, v);
  return m;
}

}  // namespace loraplex::adapters
