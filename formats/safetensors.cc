#include "formats/safetensors.h"

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <set>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "formats/dequantize.h"
#include "nlohmann/json.hpp"

namespace loraplex::formats {
namespace {

using nlohmann::json;

// The reference implementation (huggingface/safetensors) refuses headers above 100 MB; so do we,
// which also bounds what a corrupt length field can make us parse.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// Maps a safetensors dtype string to a StoredType. Dtypes that exist in the format but that no
// model path here consumes get their own message, so that a user sees "not supported" rather than
// "unknown".
absl::StatusOr<StoredType> ParseDtype(const std::string& dtype) {
  if (dtype == "F32") return StoredType::kF32;
  if (dtype == "F16") return StoredType::kF16;
  if (dtype == "BF16") return StoredType::kBF16;
  static const std::set<std::string> kKnown = {
      "BOOL", "U8",  "I8",  "F8_E5M2", "F8_E4M3", "I16", "U16",     "I32",
      "U32",  "F64", "I64", "U64",     "F8_E8M0", "F4",  "F6_E2M3", "F6_E3M2"};
  if (kKnown.count(dtype)) {
    return absl::InvalidArgumentError(
        absl::StrCat("dtype '", dtype, "' is not supported (F32, F16 and BF16 are)"));
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown dtype '", dtype, "'"));
}

// A JSON number that is a non-negative integer, as uint64.
bool AsUnsigned(const json& j, uint64_t* out) {
  if (j.is_number_unsigned()) {
    *out = j.get<uint64_t>();
    return true;
  }
  if (j.is_number_integer() && j.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(j.get<int64_t>());
    return true;
  }
  return false;
}

// Parses one header entry {"dtype", "shape", "data_offsets"} into `t` (data not yet set) and the
// [begin, end) byte range relative to the data section. Errors carry no file/tensor prefix.
absl::Status ParseEntry(const json& entry, uint64_t data_size, TensorInfo* t, uint64_t* begin,
                        uint64_t* end) {
  if (!entry.is_object()) return absl::InvalidArgumentError("entry is not a JSON object");
  auto dtype_it = entry.find("dtype");
  if (dtype_it == entry.end() || !dtype_it->is_string()) {
    return absl::InvalidArgumentError("missing or non-string 'dtype'");
  }
  LP_ASSIGN_OR_RETURN(t->type, ParseDtype(dtype_it->get<std::string>()));

  auto shape_it = entry.find("shape");
  if (shape_it == entry.end() || !shape_it->is_array()) {
    return absl::InvalidArgumentError("missing or non-array 'shape'");
  }
  // No real tensor has more dims than this; the cap keeps a hostile header from making us
  // allocate a huge shape vector.
  if (shape_it->size() > 16) {
    return absl::InvalidArgumentError(absl::StrCat("shape has ", shape_it->size(), " dims"));
  }
  t->shape.clear();
  for (const json& d : *shape_it) {
    uint64_t v;
    if (!AsUnsigned(d, &v) || v > static_cast<uint64_t>(INT64_MAX)) {
      return absl::InvalidArgumentError(absl::StrCat("bad dim ", d.dump(), " in shape"));
    }
    t->shape.push_back(static_cast<int64_t>(v));
  }
  auto want = StoredByteSize(t->type, t->shape.data(), t->shape.size());
  if (!want.ok()) return Annotate(want.status(), "shape");

  auto off_it = entry.find("data_offsets");
  if (off_it == entry.end() || !off_it->is_array() || off_it->size() != 2 ||
      !AsUnsigned((*off_it)[0], begin) || !AsUnsigned((*off_it)[1], end)) {
    return absl::InvalidArgumentError("'data_offsets' must be [begin, end] non-negative integers");
  }
  if (*begin > *end || *end > data_size) {
    return absl::InvalidArgumentError(absl::StrCat("data_offsets [", *begin, ", ", *end,
                                                   "] outside the data section of ", data_size,
                                                   " bytes"));
  }
  if (*end - *begin != *want) {
    return absl::InvalidArgumentError(absl::StrCat("data_offsets [", *begin, ", ", *end, "] span ",
                                                   *end - *begin,
                                                   " bytes but shape and dtype need ", *want));
  }
  t->nbytes = static_cast<size_t>(*want);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  LP_ASSIGN_OR_RETURN(std::unique_ptr<MappedFile> file, MappedFile::Open(path));
  const uint8_t* base = file->data();
  const uint64_t size = file->size();
  auto fail = [&](const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": ", msg));
  };
  if (size < 8) return fail(absl::StrCat("file of ", size, " bytes has no 8-byte header length"));
  uint64_t header_len;
  std::memcpy(&header_len, base, sizeof(header_len));  // little-endian, as are our hosts
  if (header_len > kMaxHeaderBytes) {
    return fail(absl::StrCat("header length ", header_len, " exceeds the 100 MB limit"));
  }
  if (header_len > size - 8) {
    return fail(absl::StrCat("header length ", header_len, " runs past the end of the file (", size,
                             " bytes)"));
  }
  const char* hbegin = reinterpret_cast<const char*>(base + 8);
  // nlohmann keeps the last of two equal keys; a header naming a tensor twice would silently lose
  // one, so the parse callback notes the first repeated top-level key.
  std::set<std::string> top_keys;
  std::string duplicate;
  json::parser_callback_t note_duplicates = [&](int depth, json::parse_event_t event,
                                                json& parsed) {
    if (event == json::parse_event_t::key && depth == 1 && parsed.is_string() &&
        !top_keys.insert(parsed.get<std::string>()).second && duplicate.empty()) {
      duplicate = parsed.get<std::string>();
    }
    return true;
  };
  json header =
      json::parse(hbegin, hbegin + header_len, note_duplicates, /*allow_exceptions=*/false);
  if (header.is_discarded()) return fail("header is not valid JSON");
  if (!header.is_object()) return fail("header JSON is not an object");
  if (!duplicate.empty()) return fail(absl::StrCat("header names '", duplicate, "' twice"));

  auto out = std::unique_ptr<SafetensorsFile>(new SafetensorsFile());
  const uint8_t* data = base + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  struct Range {
    uint64_t begin, end;
    size_t tensor;
  };
  std::vector<Range> ranges;
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    if (name == "__metadata__") {
      if (!it->is_object()) return fail("__metadata__ is not an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) {
          return fail(absl::StrCat("__metadata__ value of '", m.key(), "' is not a string"));
        }
        out->metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    TensorInfo t;
    t.name = name;
    uint64_t begin = 0, end = 0;
    absl::Status s = ParseEntry(*it, data_size, &t, &begin, &end);
    if (!s.ok()) return fail(absl::StrCat("tensor '", name, "': ", std::string(s.message())));
    t.data = data + begin;
    if (begin < end) ranges.push_back({begin, end, out->tensors_.size()});
    out->index_[name] = out->tensors_.size();
    out->tensors_.push_back(std::move(t));
  }
  std::sort(ranges.begin(), ranges.end(),
            [](const Range& a, const Range& b) { return a.begin < b.begin; });
  for (size_t i = 1; i < ranges.size(); ++i) {
    if (ranges[i].begin < ranges[i - 1].end) {
      return fail(absl::StrCat("tensor '", out->tensors_[ranges[i].tensor].name,
                               "' overlaps tensor '", out->tensors_[ranges[i - 1].tensor].name,
                               "'"));
    }
  }
  out->file_ = std::move(file);
  return out;
}

const TensorInfo* SafetensorsFile::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

namespace {

// Opens the shards named by an index.json and checks its weight_map against what they hold.
absl::Status OpenIndex(const std::filesystem::path& index_path,
                       std::vector<std::unique_ptr<SafetensorsFile>>* shards) {
  const std::string ipath = index_path.string();
  auto fail = [&](const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrCat(ipath, ": ", msg));
  };
  LP_ASSIGN_OR_RETURN(std::string text, ReadFileToString(ipath));
  json index = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (index.is_discarded()) return fail("not valid JSON");
  if (!index.is_object()) return fail("JSON is not an object");
  auto wm = index.find("weight_map");
  if (wm == index.end() || !wm->is_object()) return fail("missing or non-object 'weight_map'");

  std::vector<std::string> shard_names;  // in order of first appearance
  std::map<std::string, size_t> shard_of_name;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it->is_string()) return fail(absl::StrCat("weight_map['", it.key(), "'] is not a string"));
    std::string shard = it->get<std::string>();
    std::filesystem::path sp(shard);
    // Shards live beside the index; anything else would let a model folder read arbitrary files.
    if (shard.empty() || sp.is_absolute() || sp.has_parent_path() || shard == "." ||
        shard == "..") {
      return fail(absl::StrCat("weight_map['", it.key(), "'] names '", shard,
                               "', which is not a file name beside the index"));
    }
    if (!shard_of_name.count(shard)) {
      shard_of_name[shard] = shard_names.size();
      shard_names.push_back(shard);
    }
  }
  if (shard_names.empty()) return fail("'weight_map' is empty");
  const std::filesystem::path dir = index_path.parent_path();
  for (const std::string& shard : shard_names) {
    auto f = SafetensorsFile::Open((dir / shard).string());
    if (!f.ok()) {
      return absl::Status(
          f.status().code(),
          absl::StrCat(ipath, ": shard '", shard, "': ", std::string(f.status().message())));
    }
    shards->push_back(std::move(f).value());
  }
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    const std::string shard = it->get<std::string>();
    if ((*shards)[shard_of_name[shard]]->Find(it.key()) == nullptr) {
      return fail(absl::StrCat("tensor '", it.key(), "' is mapped to shard '", shard,
                               "' which does not hold it"));
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::unique_ptr<SafetensorsModel>> SafetensorsModel::Open(const std::string& path) {
  namespace fs = std::filesystem;
  auto model = std::unique_ptr<SafetensorsModel>(new SafetensorsModel());
  std::error_code ec;
  const fs::path p(path);
  fs::path index_path, single_path;
  if (fs::is_directory(p, ec)) {
    if (fs::exists(p / "model.safetensors.index.json", ec)) {
      index_path = p / "model.safetensors.index.json";
    } else if (fs::exists(p / "model.safetensors", ec)) {
      single_path = p / "model.safetensors";
    } else {
      return absl::NotFoundError(absl::StrCat(
          path, ": neither model.safetensors.index.json nor model.safetensors exists"));
    }
  } else if (p.extension() == ".json") {
    index_path = p;
  } else {
    single_path = p;
  }
  if (!index_path.empty()) {
    LP_RETURN_IF_ERROR(OpenIndex(index_path, &model->shards_));
  } else {
    LP_ASSIGN_OR_RETURN(auto f, SafetensorsFile::Open(single_path.string()));
    model->shards_.push_back(std::move(f));
  }
  for (const auto& shard : model->shards_) {
    for (const TensorInfo& t : shard->tensors()) {
      auto [it, inserted] = model->index_.emplace(t.name, &t);
      if (!inserted) {
        std::string other;
        for (const auto& s : model->shards_) {
          if (s->Find(t.name) == it->second) other = s->path();
        }
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", t.name, "' appears in two shards: ", other, " and ", shard->path()));
      }
    }
  }
  return model;
}

const TensorInfo* SafetensorsModel::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second;
}

std::vector<std::string> SafetensorsModel::Names() const {
  std::vector<std::string> names;
  names.reserve(index_.size());
  for (const auto& [name, t] : index_) names.push_back(name);
  return names;
}

}  // namespace loraplex::formats
