// The whole model on each CPU loop table (kernels/cpu/cpu_ops.h): with f32 weights every table must
// reproduce the 60-token greedy story of stories260K
// (../shared/models/stories260K/golden-greedy.json, made by llama2.c, not by this code); with bf16
// weights, where no outside reference exists, every table must produce the story the portable
// scalar loops produce.
#include <gtest/gtest.h>

#include <fstream>
#include <string>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/kernels.h"
#include "model/generate.h"
#include "model/llama_model.h"
#include "nlohmann/json.hpp"
#include "tests/testing/testing.h"

namespace loraplex::model {
namespace {

using ::loraplex::testing::Stories260KDir;

std::vector<int32_t> GoldenIds() {
  std::ifstream in(Stories260KDir() + "/golden-greedy.json");
  nlohmann::json j = nlohmann::json::parse(in);
  return j["greedy_ids_after_bos"].get<std::vector<int32_t>>();
}

// 60 greedy tokens after BOS with the model's weights stored as `dtype`.
std::vector<int32_t> Story(kernels::DType dtype) {
  auto m = LlamaModel::Load(Stories260KDir() + "/stories260K.gguf", LoadOptions{dtype});
  EXPECT_OK(m);
  if (!m.ok()) return {};
  GenerateOptions o;
  o.max_tokens = 60;
  o.ignore_eos = true;
  auto r = Generate(**m, {1}, o);
  EXPECT_OK(r);
  if (!r.ok()) return {};
  std::vector<int32_t> ids;
  for (const auto& t : r->tokens) ids.push_back(t.token_id);
  return ids;
}

// Selects the table named by the parameter for one test; skips where the CPU lacks it.
class CpuIsaStoryTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    saved_ = kernels::CpuKernelIsa();
    if (!kernels::cpu::SetActiveCpuOpsForTesting(GetParam().c_str())) {
      GTEST_SKIP() << "the " << GetParam()
                   << " table is not available: this CPU lacks the instructions (or the build has "
                      "no such table)";
    }
  }
  void TearDown() override { kernels::cpu::SetActiveCpuOpsForTesting(saved_.c_str()); }

 private:
  std::string saved_;
};

TEST_P(CpuIsaStoryTest, F32WeightsReproduceGoldenGreedyStory) {
  ASSERT_EQ(kernels::CpuKernelIsa(), GetParam());
  EXPECT_EQ(Story(kernels::DType::kF32), GoldenIds());
}

TEST_P(CpuIsaStoryTest, Bf16WeightsGiveTheScalarTablesStory) {
  const std::vector<int32_t> ids = Story(kernels::DType::kBF16);
  ASSERT_TRUE(kernels::cpu::SetActiveCpuOpsForTesting("scalar"));
  const std::vector<int32_t> scalar_ids = Story(kernels::DType::kBF16);
  ASSERT_EQ(scalar_ids.size(), 60u);
  EXPECT_EQ(ids, scalar_ids);
}

INSTANTIATE_TEST_SUITE_P(Isa, CpuIsaStoryTest, ::testing::Values("scalar", "avx2", "avx512"),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace loraplex::model
