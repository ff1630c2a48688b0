// What the format readers say about one stored tensor: its name, storage dtype, shape and bytes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace loraplex::formats {

// Storage types the readers understand. Quantized types are GGUF block formats.
enum class StoredType { kF32, kF16, kBF16, kQ8_0, kQ4_0, kQ4_1, kQ4_K, kQ5_K, kQ6_K };

std::string_view StoredTypeName(StoredType t);

struct TensorInfo {
  std::string name;
  StoredType type = StoredType::kF32;
  // Shape in row-major order as the model code thinks of it, outermost first:
  // a linear weight is {out_features, in_features}. (GGUF stores dims innermost first; the GGUF
  // reader reverses them.)
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;  // into the mapped file, valid while the reader lives
  size_t nbytes = 0;

  int64_t NumElements() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

}  // namespace loraplex::formats
