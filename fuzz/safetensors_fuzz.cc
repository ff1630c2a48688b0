// Fuzzes the safetensors reader (formats/safetensors.h) on whole files: 8-byte header length, JSON
// header, data section. Bad input must be INVALID_ARGUMENT naming the file; an accepted file must
// expose tensors that lie inside it, that Find returns, and that all dequantize.
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "formats/gguf.h"
#include "formats/safetensors.h"
#include "fuzz/fuzz_util.h"

using loraplex::formats::SafetensorsFile;
using loraplex::formats::SafetensorsModel;
using loraplex::formats::TensorInfo;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::string path = loraplex::fuzz::ScratchDir("safetensors") + "/model.safetensors";
  loraplex::fuzz::WriteFileOrDie(path, std::string_view(reinterpret_cast<const char*>(data), size));

  auto file = SafetensorsFile::Open(path);
  if (!file.ok()) {
    LP_FUZZ_CHECK(file.status().code() == absl::StatusCode::kInvalidArgument);
    LP_FUZZ_CHECK(file.status().message().find(path) != std::string_view::npos);
  } else {
    uint64_t covered = 0;
    for (const TensorInfo& t : (*file)->tensors()) {
      LP_FUZZ_CHECK((*file)->Find(t.name) == &t);
      LP_FUZZ_CHECK(t.nbytes <= size);
      covered += t.nbytes;
      // Tensors do not overlap, so together they fit in the file.
      LP_FUZZ_CHECK(covered <= size);
      LP_FUZZ_CHECK(t.NumElements() >= 0);
      if (t.NumElements() <= (int64_t{1} << 22)) {
        auto values = loraplex::formats::DequantizeToF32(t);
        LP_FUZZ_CHECK_OK(values.status());
        LP_FUZZ_CHECK(static_cast<int64_t>(values->size()) == t.NumElements());
      }
    }
  }
  // The model-level reader takes a lone .safetensors the same way.
  auto model = SafetensorsModel::Open(path);
  LP_FUZZ_CHECK(model.ok() == file.ok());
  if (model.ok()) {
    for (const std::string& name : (*model)->Names())
      LP_FUZZ_CHECK((*model)->Find(name) != nullptr);
  }
  return 0;
}
