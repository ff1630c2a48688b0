// Helpers shared by the kernel tests: seeded random tensors and a fixture that runs a test once
// per CPU ISA table (scalar always, avx2 and avx512 where the CPU has them).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/kernels.h"

namespace loraplex::kernels::testing {

inline std::vector<float> RandomVector(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

inline std::vector<uint16_t> ToBf16(const std::vector<float>& v) {
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = F32ToBf16(v[i]);
  return out;
}

// Parameterised over the ISA name; skips when the CPU or build lacks it, and restores the
// automatic choice afterwards.
class IsaTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    saved_ = CpuKernelIsa();
    if (!cpu::SetActiveCpuOpsForTesting(GetParam().c_str())) {
      GTEST_SKIP() << "the " << GetParam()
                   << " table is not available: this CPU lacks the instructions (or the build has "
                      "no such table)";
    }
  }
  void TearDown() override { cpu::SetActiveCpuOpsForTesting(saved_.c_str()); }

 private:
  std::string saved_;
};

// Turns kernels::BatchInvariant() on for a scope, and off again at its end.
class BatchInvariantScope {
 public:
  BatchInvariantScope() { SetBatchInvariant(true); }
  ~BatchInvariantScope() { SetBatchInvariant(false); }
  BatchInvariantScope(const BatchInvariantScope&) = delete;
  BatchInvariantScope& operator=(const BatchInvariantScope&) = delete;
};

inline std::vector<std::string> AllIsas() { return {"scalar", "avx2", "avx512"}; }
// Also "amx": the avx512 table with the AMX quantized GEMMs (only the quantized GEMMs of
// cpu::AmxMinTokens() or more tokens differ from "avx512").
inline std::vector<std::string> AllChoices() { return {"scalar", "avx2", "avx512", "amx"}; }

}  // namespace loraplex::kernels::testing
