// Tokenizer::FromHfDir: reads an HF tokenizer.json (BPE + ByteLevel) and tokenizer_config.json.
#include <fstream>
#include <sstream>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "model/tokenizer.h"
#include "model/tokenizer_internal.h"
#include "nlohmann/json.hpp"

namespace loraplex::model {
namespace {

using nlohmann::json;

// The Llama 3 pre-tokenizer regex as it appears in tokenizer.json (Split, behaviour Isolated).
constexpr std::string_view kLlama3HfPattern =
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| "
    "?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

absl::StatusOr<json> ReadJson(const std::string& path, bool* present) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *present = false;
    return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  }
  *present = true;
  std::stringstream ss;
  ss << in.rdbuf();
  json j = json::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError(absl::StrCat(path, ": not valid JSON"));
  return j;
}

bool GetBool(const json& j, const char* key, bool fallback) {
  auto it = j.find(key);
  return it != j.end() && it->is_boolean() ? it->get<bool>() : fallback;
}

// A ByteLevel pre-tokenizer object that we implement: regex on, no prefix space.
absl::Status CheckByteLevel(const json& p, const std::string& where, bool expect_regex) {
  if (GetBool(p, "add_prefix_space", false)) {
    return absl::UnimplementedError(absl::StrCat(where, ": ByteLevel add_prefix_space=true"));
  }
  if (GetBool(p, "use_regex", true) != expect_regex) {
    return absl::UnimplementedError(absl::StrCat(
        where, ": ByteLevel use_regex=", expect_regex ? "false" : "true", " in this position"));
  }
  return absl::OkStatus();
}

// Maps the pre_tokenizer object to a flavour name of TokenizerSpec::pre.
absl::StatusOr<std::string> PreFlavour(const json& pre, const std::string& file) {
  const std::string where = file + ": pre_tokenizer";
  if (!pre.is_object()) return absl::UnimplementedError(where + " is missing or null");
  const std::string type = pre.value("type", "");
  if (type == "ByteLevel") {
    LP_RETURN_IF_ERROR(CheckByteLevel(pre, where, true));
    return std::string("gpt2");
  }
  if (type == "Sequence" && pre.contains("pretokenizers") && pre["pretokenizers"].is_array() &&
      pre["pretokenizers"].size() == 2) {
    const json& a = pre["pretokenizers"][0];
    const json& b = pre["pretokenizers"][1];
    if (a.value("type", "") == "Digits" && GetBool(a, "individual_digits", false) &&
        b.value("type", "") == "ByteLevel") {
      LP_RETURN_IF_ERROR(CheckByteLevel(b, where, true));
      return std::string("smollm");
    }
    if (a.value("type", "") == "Split" && b.value("type", "") == "ByteLevel" &&
        a.contains("pattern") && a["pattern"].is_object() &&
        a["pattern"].value("Regex", "") == kLlama3HfPattern &&
        a.value("behavior", "") == "Isolated") {
      LP_RETURN_IF_ERROR(CheckByteLevel(b, where, false));
      return std::string("llama3");
    }
  }
  return absl::UnimplementedError(
      absl::StrCat(where, " ", pre.dump().substr(0, 200),
                   " is not one of ByteLevel, Digits+ByteLevel, Llama 3 Split+ByteLevel"));
}

// "bos_token": "<s>" or {"content": "<s>", ...}.
std::string TokenText(const json& config, const char* key) {
  auto it = config.find(key);
  if (it == config.end()) return "";
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object()) return it->value("content", "");
  return "";
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromHfDir(const std::string& dir) {
  const std::string file = dir + "/tokenizer.json";
  bool present = false;
  LP_ASSIGN_OR_RETURN(json tj, ReadJson(file, &present));
  if (!tj.is_object() || !tj.contains("model") || !tj["model"].is_object()) {
    return absl::InvalidArgumentError(file + ": no 'model' object");
  }
  const json& model = tj["model"];
  if (model.value("type", "") != "BPE") {
    return absl::UnimplementedError(
        absl::StrCat(file, ": model.type '", model.value("type", ""), "' (only BPE is read)"));
  }
  if (GetBool(model, "byte_fallback", false)) {
    return absl::UnimplementedError(file + ": model.byte_fallback=true (SentencePiece-style BPE)");
  }
  if (tj.contains("normalizer") && !tj["normalizer"].is_null()) {
    return absl::UnimplementedError(file + ": normalizer " +
                                    tj["normalizer"].dump().substr(0, 100));
  }
  TokenizerSpec spec;
  spec.kind = TokenizerSpec::Kind::kByteLevelBpe;
  spec.add_space_prefix = false;
  LP_ASSIGN_OR_RETURN(spec.pre, PreFlavour(tj.value("pre_tokenizer", json()), file));
  spec.ignore_merges = GetBool(model, "ignore_merges", false);

  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return absl::InvalidArgumentError(file + ": model.vocab is not an object");
  }
  // id -> piece from the vocabulary and the added tokens; every id must be filled exactly once.
  std::vector<std::string> tokens;
  std::vector<bool> filled;
  std::vector<int32_t> types;
  auto place = [&](int64_t id, const std::string& piece, int32_t type,
                   bool may_repeat) -> absl::Status {
    if (id < 0 || id >= (int64_t{1} << 24)) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": token '", piece, "' has id ", id, " outside [0, 2^24)"));
    }
    if (id >= static_cast<int64_t>(tokens.size())) {
      tokens.resize(id + 1);
      filled.resize(id + 1, false);
      types.resize(id + 1, TokenizerSpec::kNormal);
    }
    if (filled[id] && !(may_repeat && tokens[id] == piece)) {
      return absl::InvalidArgumentError(absl::StrCat(file, ": id ", id, " is given to both '",
                                                     tokens[id], "' and '", piece, "'"));
    }
    tokens[id] = piece;
    filled[id] = true;
    types[id] = type;
    return absl::OkStatus();
  };
  for (const auto& [piece, id] : model["vocab"].items()) {
    if (!id.is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat(file, ": model.vocab['", piece, "'] is not an integer"));
    }
    LP_RETURN_IF_ERROR(place(id.get<int64_t>(), piece, TokenizerSpec::kNormal, false));
  }
  if (tj.contains("added_tokens") && tj["added_tokens"].is_array()) {
    for (const json& t : tj["added_tokens"]) {
      if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() ||
          !t.contains("content") || !t["content"].is_string()) {
        return absl::InvalidArgumentError(
            file + ": added_tokens entry without integer id and string content");
      }
      // Added tokens usually repeat a vocabulary entry; they are matched literally in the text.
      LP_RETURN_IF_ERROR(place(
          t["id"].get<int64_t>(), t["content"].get<std::string>(),
          GetBool(t, "special", false) ? TokenizerSpec::kControl : TokenizerSpec::kUserDefined,
          true));
    }
  }
  for (size_t id = 0; id < filled.size(); ++id) {
    if (!filled[id]) {
      return absl::InvalidArgumentError(absl::StrCat(file, ": no token has id ", id));
    }
  }
  spec.tokens = std::move(tokens);
  spec.token_types = std::move(types);
  if (model.contains("merges") && model["merges"].is_array()) {
    for (const json& m : model["merges"]) {
      if (m.is_string()) {
        spec.merges.push_back(m.get<std::string>());
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        spec.merges.push_back(m[0].get<std::string>() + " " + m[1].get<std::string>());
      } else {
        return absl::InvalidArgumentError(file + ": model.merges entry " + m.dump().substr(0, 80) +
                                          " is neither \"a b\" nor [a, b]");
      }
    }
  }

  // tokenizer_config.json: optional, carries the chat template and the BOS/EOS names.
  const std::string config_file = dir + "/tokenizer_config.json";
  json config = json::object();
  auto config_or = ReadJson(config_file, &present);
  if (present && !config_or.ok()) return config_or.status();
  if (config_or.ok()) config = *std::move(config_or);
  std::unordered_map<std::string, int32_t> ids;
  for (size_t i = 0; i < spec.tokens.size(); ++i) ids.emplace(spec.tokens[i], i);
  auto id_of = [&](const char* key, int32_t* out) -> absl::Status {
    const std::string text = TokenText(config, key);
    if (text.empty()) return absl::OkStatus();
    auto it = ids.find(text);
    if (it == ids.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(config_file, ": ", key, " '", text, "' is not in the vocabulary"));
    }
    *out = it->second;
    return absl::OkStatus();
  };
  LP_RETURN_IF_ERROR(id_of("bos_token", &spec.bos_id));
  LP_RETURN_IF_ERROR(id_of("eos_token", &spec.eos_id));
  LP_RETURN_IF_ERROR(id_of("unk_token", &spec.unk_id));
  LP_RETURN_IF_ERROR(id_of("pad_token", &spec.pad_id));
  if (config.contains("add_bos_token") && config["add_bos_token"].is_boolean()) {
    spec.add_bos = config["add_bos_token"].get<bool>();
  } else if (spec.bos_id >= 0 && tj.contains("post_processor") &&
             tj["post_processor"].is_object()) {
    // Llama 3 style: the post-processor template starts with the BOS special token.
    const json& single = tj["post_processor"].value("single", json::array());
    spec.add_bos = single.is_array() && !single.empty() && single[0].contains("SpecialToken") &&
                   single[0]["SpecialToken"].value("id", "") == spec.tokens[spec.bos_id];
  }
  if (config.contains("chat_template")) {
    const json& ct = config["chat_template"];
    if (ct.is_string()) {
      spec.chat_template = ct.get<std::string>();
    } else if (ct.is_array()) {  // named templates: take "default"
      for (const json& t : ct) {
        if (t.is_object() && t.value("name", "") == "default") {
          spec.chat_template = t.value("template", "");
        }
      }
    }
  }
  internal::AddEndOfGenerationIds(&spec);
  auto tokenizer = Create(std::move(spec));
  if (!tokenizer.ok()) return Annotate(tokenizer.status(), file);
  return tokenizer;
}

}  // namespace loraplex::model
