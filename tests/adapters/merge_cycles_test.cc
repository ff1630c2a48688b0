// Merge and unmerge restore the pristine base bit for bit, however many times they run
// (DESIGN.md section 3), in both storage dtypes.
#include <cstring>

#include "adapters/lora_adapter.h"
#include "model/llama_model.h"
#include "tests/testing/testing.h"

namespace loraplex::adapters {
namespace {

using ::loraplex::testing::FixturesDir;
using ::loraplex::testing::StatusIs;
using ::loraplex::testing::Stories260KDir;

// Bytes of every linear weight of the model, in order.
std::string Snapshot(const model::LlamaModel& m) {
  std::string out;
  for (int64_t l = 0; l < m.config().num_layers; ++l) {
    for (int i = 0; i < model::kNumLinearModules; ++i) {
      kernels::WeightView w = m.LinearWeight(l, static_cast<model::LinearModule>(i));
      const size_t bytes = w.rows * w.cols * (w.dtype == kernels::DType::kF32 ? 4 : 2);
      out.append(static_cast<const char*>(w.data), bytes);
    }
  }
  return out;
}

// stories260K and the all_linear and qv fixtures, in the dtype of the parameter.
class MergeCyclesTest : public ::testing::TestWithParam<kernels::DType> {
 protected:
  void SetUp() override {
    ASSERT_OK_AND_ASSIGN(
        model_, model::LlamaModel::Load(Stories260KDir() + "/stories260K.gguf", {GetParam()}));
    AdapterLoadOptions opts;
    opts.dtype = GetParam();
    ASSERT_OK_AND_ASSIGN(all_, LoraAdapter::Load(FixturesDir() + "/peft/stories260k/all_linear",
                                                 model_->config(), opts));
    ASSERT_OK_AND_ASSIGN(
        qv_, LoraAdapter::Load(FixturesDir() + "/peft/stories260k/qv", model_->config(), opts));
  }

  std::unique_ptr<model::LlamaModel> model_;
  std::unique_ptr<LoraAdapter> all_, qv_;
};

TEST_P(MergeCyclesTest, ThousandCyclesLeaveTheBaseBitIdentical) {
  model::LlamaModel* m = model_.get();
  const LoraAdapter* all = all_.get();
  const LoraAdapter* qv = qv_.get();
  const std::string pristine = Snapshot(*m);
  std::string merged_once;
  for (int cycle = 0; cycle < 1000; ++cycle) {
    const LoraAdapter& a = cycle % 2 ? *qv : *all;
    ASSERT_OK(m->Merge(&a.view()));
    if (cycle == 0) {
      merged_once = Snapshot(*m);
      ASSERT_NE(merged_once, pristine);  // the merge really changed the weights
    } else if (cycle % 2 == 0) {
      ASSERT_EQ(Snapshot(*m), merged_once) << "cycle " << cycle;  // merging is deterministic
    }
    ASSERT_OK(m->Unmerge());
  }
  EXPECT_TRUE(Snapshot(*m) == pristine);
}

TEST_P(MergeCyclesTest, OneMergeAtATime) {
  model::LlamaModel* m = model_.get();
  const LoraAdapter* qv = qv_.get();
  EXPECT_THAT(m->Unmerge(), StatusIs(absl::StatusCode::kFailedPrecondition));
  ASSERT_OK(m->Merge(&qv->view()));
  EXPECT_EQ(m->merged(), &qv->view());
  EXPECT_THAT(m->Merge(&qv->view()), StatusIs(absl::StatusCode::kFailedPrecondition, "already"));
  ASSERT_OK(m->Unmerge());
  EXPECT_EQ(m->merged(), nullptr);
}

TEST_P(MergeCyclesTest, APreparedMergeGivesTheSameBitsAndIsRefusedOnAMergedBase) {
  model::LlamaModel* m = model_.get();
  const LoraAdapter* all = all_.get();
  const LoraAdapter* qv = qv_.get();
  EXPECT_TRUE(m->prepares_merge_anywhere());  // the CPU backend's weights are host memory
  const std::string pristine = Snapshot(*m);
  ASSERT_OK(m->Merge(&all->view()));
  const std::string merged_directly = Snapshot(*m);
  ASSERT_OK(m->Unmerge());

  ASSERT_OK_AND_ASSIGN(model::LlamaModel::PreparedMerge prepared, m->PrepareMerge(&all->view()));
  EXPECT_EQ(prepared.adapter(), &all->view());
  EXPECT_TRUE(Snapshot(*m) == pristine);  // preparing leaves the model alone
  // A second one prepared meanwhile, for qv: a merged base refuses it later.
  ASSERT_OK_AND_ASSIGN(model::LlamaModel::PreparedMerge other, m->PrepareMerge(&qv->view()));
  ASSERT_OK(m->Merge(std::move(prepared)));
  EXPECT_EQ(m->merged(), &all->view());
  EXPECT_TRUE(Snapshot(*m) == merged_directly);
  EXPECT_THAT(m->Merge(std::move(other)),
              StatusIs(absl::StatusCode::kFailedPrecondition, "already merged"));
  EXPECT_THAT(m->PrepareMerge(&qv->view()).status(),
              StatusIs(absl::StatusCode::kFailedPrecondition, "already merged"));
  EXPECT_TRUE(Snapshot(*m) == merged_directly);  // the refusals changed nothing
  EXPECT_EQ(m->merged(), &all->view());
  ASSERT_OK(m->Unmerge());
  EXPECT_TRUE(Snapshot(*m) == pristine);
  // The merged copies Unmerge took out wait for FreeUnmerged: every linear matrix, for all_linear.
  EXPECT_EQ(m->FreeUnmerged(), static_cast<int64_t>(pristine.size()));
  EXPECT_EQ(m->FreeUnmerged(), 0);
  EXPECT_TRUE(Snapshot(*m) == pristine);
}

INSTANTIATE_TEST_SUITE_P(Dtypes, MergeCyclesTest,
                         ::testing::Values(kernels::DType::kF32, kernels::DType::kBF16));

}  // namespace
}  // namespace loraplex::adapters
