// Reader for GGUF v3 files (llama.cpp's model format): metadata of every value type, tensor
// directory, and dequantization of F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K to f32.
// Memory-mapped; every count, string length, offset and size is checked before use, so a truncated
// or corrupt file is an INVALID_ARGUMENT naming the file (and tensor or key), never a crash.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <variant>
#include <vector>

#include "absl/status/statusor.h"
#include "common/mapped_file.h"
#include "formats/tensor_info.h"

namespace loraplex::formats {

// One metadata value. Arrays hold values of one element type (nested arrays allowed).
struct GgufValue {
  struct Array;
  using Storage = std::variant<uint8_t, int8_t, uint16_t, int16_t, uint32_t, int32_t, float, bool,
                               std::string, uint64_t, int64_t, double, std::shared_ptr<Array>>;
  Storage v;

  // Integer-ish values widened; INVALID_ARGUMENT when not an integer type.
  absl::StatusOr<int64_t> AsInt() const;
  absl::StatusOr<double> AsFloat() const;  // float, double or integer types
  absl::StatusOr<std::string> AsString() const;
  const Array* AsArray() const;  // nullptr when not an array
};

struct GgufValue::Array {
  uint32_t element_type = 0;  // GGUF value-type code of the elements
  std::vector<GgufValue> values;
};

// Immutable once opened: const methods may be called from any number of threads. TensorInfo::data
// points into the mapping (aligned to general.alignment, default 32) and lives as long as the file.
class GgufFile {
 public:
  // NOT_FOUND / PERMISSION_DENIED when the file cannot be opened; INVALID_ARGUMENT (naming the
  // file, and the key or tensor at fault) for a bad magic, a version other than 2 or 3, truncation,
  // counts or string lengths past the end, unknown value or ggml types (the id is named), more
  // than 4 dims, zero or overflowing dims, data outside the file, misaligned, overlapping or
  // duplicate tensors, and duplicate keys.
  static absl::StatusOr<std::unique_ptr<GgufFile>> Open(const std::string& path);

  uint32_t version() const { return version_; }
  const std::map<std::string, GgufValue>& metadata() const { return metadata_; }
  const GgufValue* FindMetadata(const std::string& key) const;  // nullptr when absent

  // Typed look-ups: NOT_FOUND when the key is absent, INVALID_ARGUMENT when of another type.
  absl::StatusOr<int64_t> GetInt(const std::string& key) const;
  absl::StatusOr<double> GetFloat(const std::string& key) const;
  absl::StatusOr<std::string> GetString(const std::string& key) const;
  absl::StatusOr<std::vector<std::string>> GetStringArray(const std::string& key) const;
  absl::StatusOr<std::vector<float>> GetFloatArray(const std::string& key) const;
  absl::StatusOr<std::vector<int64_t>> GetIntArray(const std::string& key) const;

  // Tensor shapes are reported outermost first ({rows, cols}), see TensorInfo.
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(const std::string& name) const;
  const std::string& path() const { return file_->path(); }
  // The mapping every TensorInfo::data points into.
  const MappedFile& mapping() const { return *file_; }

 private:
  uint32_t version_ = 0;
  std::unique_ptr<MappedFile> file_;
  std::map<std::string, GgufValue> metadata_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  friend class GgufParser;
};

// Dequantizes / widens a tensor of any supported StoredType into `out` (NumElements() floats),
// with the arithmetic of the gguf Python package (bit-exact against it). INVALID_ARGUMENT naming
// the tensor when nbytes does not match its shape and type. Row ranges and block sizes:
// formats/dequantize.h.
absl::Status DequantizeToF32(const TensorInfo& t, float* out);
absl::StatusOr<std::vector<float>> DequantizeToF32(const TensorInfo& t);

}  // namespace loraplex::formats
