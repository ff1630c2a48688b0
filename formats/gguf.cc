#include "formats/gguf.h"

#include <algorithm>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/status.h"
#include "formats/dequantize.h"

namespace loraplex::formats {
namespace {

// GGUF metadata value-type codes (gguf spec, GGUFValueType in the gguf package).
enum ValueType : uint32_t {
  kU8 = 0,
  kI8 = 1,
  kU16 = 2,
  kI16 = 3,
  kU32 = 4,
  kI32 = 5,
  kF32 = 6,
  kBool = 7,
  kString = 8,
  kArray = 9,
  kU64 = 10,
  kI64 = 11,
  kF64 = 12,
};

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian uint32
constexpr uint64_t kDefaultAlignment = 32;
constexpr uint32_t kMaxDims = 4;  // GGML_MAX_DIMS
// Real files nest arrays at most once or twice; the cap keeps a hostile file from recursing deep
// enough to overflow the stack.
constexpr int kMaxArrayDepth = 16;
// A parsed value takes ~40 bytes however few the file spends on it (one for a uint8), so a file
// whose bytes are all one huge array could ask for 40x its size. Real vocabularies with their
// merges hold well under a million elements; 16M bounds the worst case near 1 GB.
constexpr uint64_t kMaxArrayElements = uint64_t{1} << 24;
// Real models have a few thousand tensors at most.
constexpr uint64_t kMaxTensors = uint64_t{1} << 20;

const char* ValueTypeName(uint32_t type) {
  static const char* kNames[] = {"uint8",  "int8",    "uint16", "int16",  "uint32",
                                 "int32",  "float32", "bool",   "string", "array",
                                 "uint64", "int64",   "float64"};
  return type < std::size(kNames) ? kNames[type] : "unknown";
}

// Smallest number of bytes one value of `type` takes in the file (array: its type and count).
// 0 for unknown types.
uint64_t MinEncodedSize(uint32_t type) {
  switch (type) {
    case kU8:
    case kI8:
    case kBool:
      return 1;
    case kU16:
    case kI16:
      return 2;
    case kU32:
    case kI32:
    case kF32:
      return 4;
    case kU64:
    case kI64:
    case kF64:
    case kString:
      return 8;
    case kArray:
      return 12;
    default:
      return 0;
  }
}

// ggml type ids (ggml.h enum ggml_type) -> our StoredType; names of the rest for error messages.
bool StoredTypeFromGgml(uint32_t id, StoredType* out) {
  switch (id) {
    case 0:
      *out = StoredType::kF32;
      return true;
    case 1:
      *out = StoredType::kF16;
      return true;
    case 2:
      *out = StoredType::kQ4_0;
      return true;
    case 3:
      *out = StoredType::kQ4_1;
      return true;
    case 8:
      *out = StoredType::kQ8_0;
      return true;
    case 12:
      *out = StoredType::kQ4_K;
      return true;
    case 13:
      *out = StoredType::kQ5_K;
      return true;
    case 14:
      *out = StoredType::kQ6_K;
      return true;
    case 30:
      *out = StoredType::kBF16;
      return true;
    default:
      return false;
  }
}

std::string GgmlTypeName(uint32_t id) {
  static const char* kNames[] = {
      "F32",     "F16",    "Q4_0",    "Q4_1",  "Q4_2",   "Q4_3",  "Q5_0",  "Q5_1",
      "Q8_0",    "Q8_1",   "Q2_K",    "Q3_K",  "Q4_K",   "Q5_K",  "Q6_K",  "Q8_K",
      "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS",
      "I8",      "I16",    "I32",     "I64",   "F64",    "IQ1_M", "BF16"};
  if (id < std::size(kNames)) return absl::StrCat(kNames[id], " (id ", id, ")");
  return absl::StrCat("id ", id);
}

// Bytes-and-bounds reader over the mapped file. Every read checks the remaining length first.
class Cursor {
 public:
  Cursor(const uint8_t* data, uint64_t size) : data_(data), size_(size) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return size_ - pos_; }

  absl::Status Need(uint64_t n, std::string_view what) const {
    if (n > remaining()) {
      return absl::InvalidArgumentError(absl::StrCat("truncated: ", std::string(what), " needs ", n,
                                                     " bytes at offset ", pos_, " but ",
                                                     remaining(), " remain"));
    }
    return absl::OkStatus();
  }

  template <typename T>
  absl::StatusOr<T> Read(std::string_view what) {
    static_assert(std::is_trivially_copyable_v<T>);
    LP_RETURN_IF_ERROR(Need(sizeof(T), what));
    T v;
    std::memcpy(&v, data_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }

  absl::StatusOr<std::string> ReadString(std::string_view what) {
    LP_ASSIGN_OR_RETURN(uint64_t len, Read<uint64_t>(what));
    if (len > remaining()) {
      return absl::InvalidArgumentError(
          absl::StrCat(std::string(what), ": string length ", len, " at offset ", pos_ - 8,
                       " runs past the end (", remaining(), " bytes remain)"));
    }
    std::string s(reinterpret_cast<const char*>(data_ + pos_), static_cast<size_t>(len));
    pos_ += len;
    return s;
  }

 private:
  const uint8_t* data_;
  uint64_t size_;
  uint64_t pos_ = 0;
};

template <typename T>
absl::StatusOr<GgufValue> ReadScalar(Cursor& c, std::string_view what) {
  LP_ASSIGN_OR_RETURN(T v, c.Read<T>(what));
  return GgufValue{v};
}

// `element_budget` is what is left of kMaxArrayElements for the whole file.
absl::StatusOr<GgufValue> ReadValue(Cursor& c, uint32_t type, int depth, std::string_view what,
                                    uint64_t* element_budget) {
  switch (type) {
    case kU8:
      return ReadScalar<uint8_t>(c, what);
    case kI8:
      return ReadScalar<int8_t>(c, what);
    case kU16:
      return ReadScalar<uint16_t>(c, what);
    case kI16:
      return ReadScalar<int16_t>(c, what);
    case kU32:
      return ReadScalar<uint32_t>(c, what);
    case kI32:
      return ReadScalar<int32_t>(c, what);
    case kF32:
      return ReadScalar<float>(c, what);
    case kU64:
      return ReadScalar<uint64_t>(c, what);
    case kI64:
      return ReadScalar<int64_t>(c, what);
    case kF64:
      return ReadScalar<double>(c, what);
    case kBool: {
      LP_ASSIGN_OR_RETURN(uint8_t b, c.Read<uint8_t>(what));
      if (b > 1) {
        return absl::InvalidArgumentError(absl::StrCat(std::string(what), ": bool byte is ",
                                                       static_cast<int>(b), ", not 0 or 1"));
      }
      return GgufValue{b == 1};
    }
    case kString: {
      LP_ASSIGN_OR_RETURN(std::string s, c.ReadString(what));
      return GgufValue{std::move(s)};
    }
    case kArray: {
      if (depth >= kMaxArrayDepth) {
        return absl::InvalidArgumentError(
            absl::StrCat(std::string(what), ": arrays nested deeper than ", kMaxArrayDepth));
      }
      LP_ASSIGN_OR_RETURN(uint32_t elem_type, c.Read<uint32_t>(what));
      LP_ASSIGN_OR_RETURN(uint64_t count, c.Read<uint64_t>(what));
      const uint64_t min_size = MinEncodedSize(elem_type);
      if (min_size == 0) {
        return absl::InvalidArgumentError(
            absl::StrCat(std::string(what), ": unknown array element type ", elem_type));
      }
      // Never size anything from an unchecked count: each element takes at least min_size bytes.
      if (count > c.remaining() / min_size) {
        return absl::InvalidArgumentError(
            absl::StrCat(std::string(what), ": array of ", count, " ", ValueTypeName(elem_type),
                         " elements cannot fit in the ", c.remaining(), " bytes that remain"));
      }
      if (count > *element_budget) {
        return absl::InvalidArgumentError(absl::StrCat(std::string(what),
                                                       ": metadata arrays hold more than ",
                                                       kMaxArrayElements, " elements in total"));
      }
      *element_budget -= count;
      auto arr = std::make_shared<GgufValue::Array>();
      arr->element_type = elem_type;
      arr->values.reserve(static_cast<size_t>(count));
      for (uint64_t i = 0; i < count; ++i) {
        LP_ASSIGN_OR_RETURN(GgufValue v, ReadValue(c, elem_type, depth + 1, what, element_budget));
        arr->values.push_back(std::move(v));
      }
      return GgufValue{std::move(arr)};
    }
    default:
      return absl::InvalidArgumentError(
          absl::StrCat(std::string(what), ": unknown value type ", type));
  }
}

// Name of the type held by a value, for "is a X, not a Y" messages.
std::string HeldTypeName(const GgufValue& v) {
  return std::visit(
      [](const auto& x) -> std::string {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_same_v<T, uint8_t>) return "uint8";
        if constexpr (std::is_same_v<T, int8_t>) return "int8";
        if constexpr (std::is_same_v<T, uint16_t>) return "uint16";
        if constexpr (std::is_same_v<T, int16_t>) return "int16";
        if constexpr (std::is_same_v<T, uint32_t>) return "uint32";
        if constexpr (std::is_same_v<T, int32_t>) return "int32";
        if constexpr (std::is_same_v<T, float>) return "float32";
        if constexpr (std::is_same_v<T, bool>) return "bool";
        if constexpr (std::is_same_v<T, std::string>) return "string";
        if constexpr (std::is_same_v<T, uint64_t>) return "uint64";
        if constexpr (std::is_same_v<T, int64_t>) return "int64";
        if constexpr (std::is_same_v<T, double>) return "float64";
        if constexpr (std::is_same_v<T, std::shared_ptr<GgufValue::Array>>) {
          return absl::StrCat("array of ", ValueTypeName(x->element_type));
        }
        return "unknown";
      },
      v.v);
}

}  // namespace

// ---- GgufValue
// -----------------------------------------------------------------------------------

absl::StatusOr<int64_t> GgufValue::AsInt() const {
  if (const uint64_t* u = std::get_if<uint64_t>(&v)) {
    if (*u > static_cast<uint64_t>(INT64_MAX)) {
      return absl::InvalidArgumentError(absl::StrCat("uint64 value ", *u, " exceeds int64"));
    }
    return static_cast<int64_t>(*u);
  }
  return std::visit(
      [this](const auto& x) -> absl::StatusOr<int64_t> {
        using T = std::decay_t<decltype(x)>;
        if constexpr (std::is_integral_v<T> && !std::is_same_v<T, bool>) {
          return static_cast<int64_t>(x);
        } else {
          return absl::InvalidArgumentError(
              absl::StrCat("value is a ", HeldTypeName(*this), ", not an integer"));
        }
      },
      v);
}

absl::StatusOr<double> GgufValue::AsFloat() const {
  if (const float* f = std::get_if<float>(&v)) return static_cast<double>(*f);
  if (const double* d = std::get_if<double>(&v)) return *d;
  auto i = AsInt();
  if (i.ok()) return static_cast<double>(*i);
  if (const uint64_t* u = std::get_if<uint64_t>(&v)) return static_cast<double>(*u);
  return absl::InvalidArgumentError(
      absl::StrCat("value is a ", HeldTypeName(*this), ", not a number"));
}

absl::StatusOr<std::string> GgufValue::AsString() const {
  if (const std::string* s = std::get_if<std::string>(&v)) return *s;
  return absl::InvalidArgumentError(
      absl::StrCat("value is a ", HeldTypeName(*this), ", not a string"));
}

const GgufValue::Array* GgufValue::AsArray() const {
  if (const auto* a = std::get_if<std::shared_ptr<Array>>(&v)) return a->get();
  return nullptr;
}

// ---- GgufParser
// ----------------------------------------------------------------------------------

// Fills a GgufFile from its mapped bytes. A class (not free functions) only because GgufFile
// befriends it.
class GgufParser {
 public:
  static absl::Status Parse(GgufFile* f) {
    Cursor c(f->file_->data(), f->file_->size());
    const uint64_t file_size = f->file_->size();

    LP_ASSIGN_OR_RETURN(uint32_t magic, c.Read<uint32_t>("magic"));
    if (magic != kMagic) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad magic 0x", absl::Hex(magic), ", not a GGUF file"));
    }
    LP_ASSIGN_OR_RETURN(uint32_t version, c.Read<uint32_t>("version"));
    if (version == 1) {
      return absl::InvalidArgumentError("GGUF version 1 is not supported (2 and 3 are)");
    }
    if (version != 2 && version != 3) {
      if ((version & 0xFFFF) == 0 && (version >> 16) != 0) {
        return absl::InvalidArgumentError(absl::StrCat("version field 0x", absl::Hex(version),
                                                       " looks big-endian; only "
                                                       "little-endian GGUF is supported"));
      }
      return absl::InvalidArgumentError(absl::StrCat("unsupported GGUF version ", version));
    }
    f->version_ = version;
    LP_ASSIGN_OR_RETURN(uint64_t n_tensors, c.Read<uint64_t>("tensor count"));
    LP_ASSIGN_OR_RETURN(uint64_t n_kv, c.Read<uint64_t>("metadata count"));
    if (n_tensors > kMaxTensors) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor count ", n_tensors, " exceeds the limit of ", kMaxTensors));
    }
    // Smallest key/value: key length (8) + value type (4) + one byte. Smallest tensor info:
    // name length (8) + n_dims (4) + type (4) + offset (8).
    if (n_kv > c.remaining() / 13) {
      return absl::InvalidArgumentError(absl::StrCat("metadata count ", n_kv, " cannot fit in the ",
                                                     c.remaining(), " bytes that remain"));
    }
    if (n_tensors > c.remaining() / 24) {
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor count ", n_tensors, " cannot fit in the ", c.remaining(), " bytes that remain"));
    }

    uint64_t element_budget = kMaxArrayElements;
    for (uint64_t i = 0; i < n_kv; ++i) {
      LP_ASSIGN_OR_RETURN(std::string key, c.ReadString(absl::StrCat("metadata key #", i)));
      const std::string what = absl::StrCat("metadata '", key, "'");
      LP_ASSIGN_OR_RETURN(uint32_t type, c.Read<uint32_t>(what));
      LP_ASSIGN_OR_RETURN(GgufValue value, ReadValue(c, type, 0, what, &element_budget));
      if (!f->metadata_.emplace(key, std::move(value)).second) {
        return absl::InvalidArgumentError(absl::StrCat("duplicate ", what));
      }
    }

    uint64_t alignment = kDefaultAlignment;
    if (const GgufValue* a = f->FindMetadata("general.alignment")) {
      auto v = a->AsInt();
      if (!v.ok() || *v <= 0 || (*v & (*v - 1)) != 0 || *v > (int64_t{1} << 30)) {
        return absl::InvalidArgumentError(
            "general.alignment must be a power-of-two integer no larger than 2^30");
      }
      alignment = static_cast<uint64_t>(*v);
    }

    struct Placed {
      uint64_t offset;  // relative to the data section
      size_t tensor;
    };
    std::vector<Placed> placed;
    std::vector<uint64_t> offsets;
    f->tensors_.reserve(static_cast<size_t>(n_tensors));
    for (uint64_t i = 0; i < n_tensors; ++i) {
      TensorInfo t;
      LP_ASSIGN_OR_RETURN(t.name, c.ReadString(absl::StrCat("tensor name #", i)));
      const std::string what = absl::StrCat("tensor '", t.name, "'");
      LP_ASSIGN_OR_RETURN(uint32_t n_dims, c.Read<uint32_t>(what));
      if (n_dims > kMaxDims) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": ", n_dims, " dims (at most ", kMaxDims, ")"));
      }
      uint64_t ne[kMaxDims];
      for (uint32_t d = 0; d < n_dims; ++d) {
        LP_ASSIGN_OR_RETURN(ne[d], c.Read<uint64_t>(what));
        if (ne[d] == 0 || ne[d] > static_cast<uint64_t>(INT64_MAX)) {
          return absl::InvalidArgumentError(absl::StrCat(what, ": dim ", d, " is ", ne[d]));
        }
      }
      // GGUF lists ne[0] (the contiguous dim) first; we report outermost first.
      for (uint32_t d = n_dims; d-- > 0;) t.shape.push_back(static_cast<int64_t>(ne[d]));
      LP_ASSIGN_OR_RETURN(uint32_t ggml_type, c.Read<uint32_t>(what));
      if (!StoredTypeFromGgml(ggml_type, &t.type)) {
        return absl::InvalidArgumentError(
            absl::StrCat(what, ": unsupported ggml type ", GgmlTypeName(ggml_type)));
      }
      auto nbytes = StoredByteSize(t.type, t.shape.data(), t.shape.size());
      if (!nbytes.ok()) return Annotate(nbytes.status(), what);
      t.nbytes = *nbytes;
      LP_ASSIGN_OR_RETURN(uint64_t offset, c.Read<uint64_t>(what));
      if (offset % alignment != 0) {
        return absl::InvalidArgumentError(absl::StrCat(
            what, ": data offset ", offset, " is not a multiple of the alignment ", alignment));
      }
      placed.push_back({offset, f->tensors_.size()});
      if (!f->index_.emplace(t.name, f->tensors_.size()).second) {
        return absl::InvalidArgumentError(absl::StrCat("duplicate ", what));
      }
      f->tensors_.push_back(std::move(t));
    }

    // The data section starts at the next multiple of the alignment after the directory.
    const uint64_t data_start = (c.pos() + alignment - 1) / alignment * alignment;
    const uint64_t data_size = data_start <= file_size ? file_size - data_start : 0;
    for (const Placed& p : placed) {
      TensorInfo& t = f->tensors_[p.tensor];
      if (p.offset > data_size || t.nbytes > data_size - p.offset) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", t.name, "': data [", p.offset, ", +", t.nbytes,
            ") lies outside the data section of ", data_size, " bytes starting at ", data_start));
      }
      t.data = f->file_->data() + data_start + p.offset;
    }
    // Stable, so that of two tensors at one offset the later in the directory is the one named.
    std::stable_sort(placed.begin(), placed.end(),
                     [](const Placed& a, const Placed& b) { return a.offset < b.offset; });
    for (size_t i = 1; i < placed.size(); ++i) {
      const TensorInfo& prev = f->tensors_[placed[i - 1].tensor];
      if (placed[i].offset < placed[i - 1].offset + prev.nbytes) {
        return absl::InvalidArgumentError(absl::StrCat(
            "tensor '", f->tensors_[placed[i].tensor].name, "' overlaps tensor '", prev.name, "'"));
      }
    }
    return absl::OkStatus();
  }
};

// ---- GgufFile
// ------------------------------------------------------------------------------------

absl::StatusOr<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path) {
  auto f = std::unique_ptr<GgufFile>(new GgufFile());
  LP_ASSIGN_OR_RETURN(f->file_, MappedFile::Open(path));
  LP_RETURN_IF_ERROR(Annotate(GgufParser::Parse(f.get()), path));
  return f;
}

const GgufValue* GgufFile::FindMetadata(const std::string& key) const {
  auto it = metadata_.find(key);
  return it == metadata_.end() ? nullptr : &it->second;
}

const TensorInfo* GgufFile::Find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

namespace {

// Looks up `key` and applies `conv`; errors name the file and key.
template <typename Fn>
auto Lookup(const GgufFile& f, const std::string& key, Fn conv)
    -> decltype(conv(std::declval<const GgufValue&>())) {
  const GgufValue* v = f.FindMetadata(key);
  if (v == nullptr) {
    return absl::NotFoundError(absl::StrCat(f.path(), ": no metadata key '", key, "'"));
  }
  auto r = conv(*v);
  if (!r.ok()) return Annotate(r.status(), absl::StrCat(f.path(), ": metadata '", key, "'"));
  return r;
}

// Converts every element of an array value with `conv` (a GgufValue member returning StatusOr<T>).
template <typename T, typename Conv>
absl::StatusOr<std::vector<T>> ArrayOf(const GgufValue& v, Conv conv) {
  const GgufValue::Array* a = v.AsArray();
  if (a == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("value is a ", HeldTypeName(v), ", not an array"));
  }
  std::vector<T> out;
  out.reserve(a->values.size());
  for (size_t i = 0; i < a->values.size(); ++i) {
    auto e = (a->values[i].*conv)();
    if (!e.ok()) return Annotate(e.status(), absl::StrCat("element ", i));
    out.push_back(static_cast<T>(*e));
  }
  return out;
}

}  // namespace

absl::StatusOr<int64_t> GgufFile::GetInt(const std::string& key) const {
  return Lookup(*this, key, [](const GgufValue& v) { return v.AsInt(); });
}

absl::StatusOr<double> GgufFile::GetFloat(const std::string& key) const {
  return Lookup(*this, key, [](const GgufValue& v) { return v.AsFloat(); });
}

absl::StatusOr<std::string> GgufFile::GetString(const std::string& key) const {
  return Lookup(*this, key, [](const GgufValue& v) { return v.AsString(); });
}

absl::StatusOr<std::vector<std::string>> GgufFile::GetStringArray(const std::string& key) const {
  return Lookup(*this, key,
                [](const GgufValue& v) { return ArrayOf<std::string>(v, &GgufValue::AsString); });
}

absl::StatusOr<std::vector<float>> GgufFile::GetFloatArray(const std::string& key) const {
  return Lookup(*this, key,
                [](const GgufValue& v) { return ArrayOf<float>(v, &GgufValue::AsFloat); });
}

absl::StatusOr<std::vector<int64_t>> GgufFile::GetIntArray(const std::string& key) const {
  return Lookup(*this, key,
                [](const GgufValue& v) { return ArrayOf<int64_t>(v, &GgufValue::AsInt); });
}

}  // namespace loraplex::formats
