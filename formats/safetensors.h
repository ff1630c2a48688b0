// Reader for Hugging Face safetensors files, single-file or sharded
// (`model.safetensors.index.json`). Memory-mapped; the header JSON is parsed with nlohmann-json and
// every offset and shape is checked against the file size and dtype before any tensor is exposed.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "common/mapped_file.h"
#include "formats/tensor_info.h"

namespace loraplex::formats {

// Immutable once opened: const methods may be called from any number of threads. TensorInfo::data
// points into the mapping and lives as long as the file; it need not be 4-byte aligned (the data
// section starts right after the JSON header), so read it with memcpy or DequantizeToF32.
class SafetensorsFile {
 public:
  // Opens one .safetensors file. Errors (INVALID_ARGUMENT unless the file cannot be opened) name
  // the file and, where one is at fault, the tensor: header length past the end, malformed JSON,
  // unknown dtype, shape/byte-size mismatch, offsets out of range or overlapping.
  // Supported dtypes: F32, F16, BF16.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  // nullptr when absent.
  const TensorInfo* Find(const std::string& name) const;
  // The optional "__metadata__" string map of the header.
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const std::string& path() const { return file_->path(); }

 private:
  std::unique_ptr<MappedFile> file_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// All the tensors of a model: a single `model.safetensors`, or the shards listed by
// `model.safetensors.index.json` in `dir`. Tensor names must be unique across shards.
class SafetensorsModel {
 public:
  // `path` is a directory (looked up: model.safetensors.index.json, then model.safetensors), an
  // index .json file, or a single .safetensors file. NOT_FOUND when neither exists.
  // INVALID_ARGUMENT (naming the index or shard) for a malformed index, a shard name that is not a
  // plain file name beside the index, a weight_map entry whose shard does not hold the tensor, a
  // tensor in two shards, or any error of SafetensorsFile::Open.
  static absl::StatusOr<std::unique_ptr<SafetensorsModel>> Open(const std::string& path);

  const TensorInfo* Find(const std::string& name) const;
  std::vector<std::string> Names() const;

 private:
  std::vector<std::unique_ptr<SafetensorsFile>> shards_;
  std::map<std::string, const TensorInfo*> index_;
};

}  // namespace loraplex::formats
