// The weight shapes of SmolLM2-135M's matrices (hidden 576, intermediate 1536, 9 query heads / 3
// kv heads of 64, vocab 49152), shared by the GEMM benchmarks.
#pragma once

#include <cstdint>

namespace loraplex::bench {

struct Shape {
  const char* name;
  int64_t n, k;  // weight [n, k]
};
inline constexpr Shape kSmolLm2Shapes[] = {{"q_o", 576, 576},
                                           {"k_v", 192, 576},
                                           {"gate_up", 1536, 576},
                                           {"down", 576, 1536},
                                           {"lm_head", 49152, 576}};

}  // namespace loraplex::bench
