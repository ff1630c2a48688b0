// Hand-made PEFT files for tests that need adapters of a chosen shape (mismatched, oversized)
// rather than the fixtures PEFT wrote. Header-only: the soak driver uses it without GoogleTest.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace loraplex::testing {

// An adapter_model.safetensors of f32 tensors (every value 0.01) for the `layers` decoder layers
// (stories260K has 5): "base_model.model.model.layers.<l>.self_attn.<key>.weight" -> shape.
inline std::string SelfAttnSafetensors(
    const std::vector<std::pair<std::string, std::vector<int64_t>>>& tensors, int layers = 5) {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (int layer = 0; layer < layers; ++layer) {
    for (const auto& [key, shape] : tensors) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      std::vector<float> values(n, 0.01f);
      const size_t begin = data.size();
      data.append(reinterpret_cast<const char*>(values.data()), values.size() * sizeof(float));
      header[absl::StrCat("base_model.model.model.layers.", layer, ".self_attn.", key, ".weight")] =
          {{"dtype", "F32"}, {"shape", shape}, {"data_offsets", {begin, data.size()}}};
    }
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h += ' ';
  const uint64_t len = h.size();
  return std::string(reinterpret_cast<const char*>(&len), 8) + h + data;
}

}  // namespace loraplex::testing
