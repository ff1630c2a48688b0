// Adapter inspection (adapters/inspect.h) against numpy's float64 SVD of the dense dW
// (tests/fixtures/peft/stories260k/inspection.json, made by tools/make_inspection_goldens.py from
// the HF copy of stories260K and the PEFT fixtures): every module's singular values, norms,
// effective rank and amplification, and the subspace similarity of pairs of adapters, within 1e-4
// relative.

#include "adapters/inspect.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <string>

#include "adapters/lora_adapter.h"
#include "common/status.h"
#include "model/llama_model.h"
#include "tests/testing/testing.h"

namespace loraplex::adapters {
namespace {

using ::loraplex::testing::FixturesDir;
using ::loraplex::testing::StatusIs;
using ::loraplex::testing::Stories260KDir;

std::string Fixture(const std::string& name) { return FixturesDir() + "/peft/stories260k/" + name; }

nlohmann::json Golden() {
  std::ifstream in(Fixture("inspection.json"));
  EXPECT_TRUE(in.good()) << Fixture("inspection.json");
  return nlohmann::json::parse(in);
}

// Relative to the larger magnitude, with an absolute floor for values that are zero in exact
// arithmetic (singular values past rank(dW)).
void ExpectNear(double actual, double expected, const std::string& what) {
  const double scale = std::max(std::abs(expected), 1e-6);
  EXPECT_LE(std::abs(actual - expected), 1e-4 * scale)
      << what << ": " << actual << " vs " << expected;
}

class InspectTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_OK_AND_ASSIGN(model_, model::LlamaModel::Load(Stories260KDir() + "/stories260K.gguf",
                                                         {kernels::DType::kF32}));
  }

  std::unique_ptr<LoraAdapter> Adapter(const std::string& name) {
    AdapterLoadOptions options;
    options.dtype = kernels::DType::kF32;
    auto loaded = LoraAdapter::Load(Fixture(name), model_->config(), options);
    EXPECT_TRUE(loaded.ok()) << loaded.status();
    return loaded.ok() ? *std::move(loaded) : nullptr;
  }

  BaseWeights Base() {
    return [this](int64_t layer, const std::array<bool, model::kNumLinearModules>& wanted,
                  std::array<std::vector<float>, model::kNumLinearModules>* weights) {
      ++base_calls_;
      for (int m = 0; m < model::kNumLinearModules; ++m) {
        if (!wanted[m]) continue;
        LP_ASSIGN_OR_RETURN((*weights)[m],
                            model_->BaseLinearF32(layer, static_cast<model::LinearModule>(m)));
      }
      return absl::OkStatus();
    };
  }

  std::unique_ptr<model::LlamaModel> model_;
  int base_calls_ = 0;
};

TEST_F(InspectTest, EveryModuleMatchesNumpysDenseSvd) {
  const nlohmann::json golden = Golden();
  ASSERT_EQ(golden["format"], "loraplex-inspection-golden/1");
  int checked = 0;
  for (const auto& [name, expected] : golden["adapters"].items()) {
    SCOPED_TRACE(name);
    std::unique_ptr<LoraAdapter> adapter = Adapter(name);
    ASSERT_NE(adapter, nullptr);
    base_calls_ = 0;
    ASSERT_OK_AND_ASSIGN(std::vector<ModuleInspection> got,
                         InspectAdapter(adapter->view(), model_->config(), Base()));
    EXPECT_EQ(base_calls_, model_->config().num_layers) << "one base read per layer";
    ASSERT_EQ(got.size(), expected["modules"].size());
    for (size_t i = 0; i < got.size(); ++i) {
      const nlohmann::json& e = expected["modules"][i];
      const ModuleInspection& g = got[i];
      SCOPED_TRACE(g.module);
      EXPECT_EQ(g.module, e["module"].get<std::string>());
      EXPECT_EQ(g.rank, e["rank"].get<int64_t>());
      ASSERT_EQ(g.singular_values.size(), e["singular_values"].size());
      const double top = e["singular_values"][0].get<double>();
      for (size_t k = 0; k < g.singular_values.size(); ++k) {
        const double want = e["singular_values"][k].get<double>();
        // Past rank(dW) numpy's values are rounding noise around 0: compare against the top one.
        const double tolerance = 1e-4 * std::max(std::abs(want), 1e-3 * top);
        EXPECT_LE(std::abs(g.singular_values[k] - want), tolerance) << "sigma " << k;
      }
      ExpectNear(g.fro_norm, e["fro_norm"].get<double>(), "fro_norm");
      ExpectNear(g.relative_norm, e["relative_norm"].get<double>(), "relative_norm");
      ExpectNear(g.amplification, e["amplification"].get<double>(), "amplification");
      EXPECT_EQ(g.effective_rank, e["effective_rank"].get<int64_t>());
      EXPECT_FALSE(g.similarity.has_value());
      ++checked;
    }
  }
  EXPECT_EQ(checked, 35 + 10 + 10);
}

TEST_F(InspectTest, SimilarityOfPairsMatchesNumpy) {
  const nlohmann::json golden = Golden();
  int checked = 0;
  for (const auto& [pair, expected] : golden["similarity"].items()) {
    SCOPED_TRACE(pair);
    const std::string first = pair.substr(0, pair.find(':'));
    const std::string second = pair.substr(pair.find(':') + 1);
    std::unique_ptr<LoraAdapter> a = Adapter(first), b = Adapter(second);
    ASSERT_NE(a, nullptr);
    ASSERT_NE(b, nullptr);
    ASSERT_OK_AND_ASSIGN(std::vector<ModuleInspection> got,
                         InspectAdapter(a->view(), model_->config(), Base(), &b->view()));
    std::map<std::string, double> by_module;
    for (const ModuleInspection& g : got) {
      if (g.similarity.has_value()) by_module[g.module] = *g.similarity;
    }
    EXPECT_EQ(by_module.size(), expected.size()) << "modules both adapters have";
    for (const auto& [module, value] : expected.items()) {
      ASSERT_TRUE(by_module.count(module)) << module;
      ExpectNear(by_module[module], value.get<double>(), module);
      ++checked;
    }
  }
  EXPECT_GT(checked, 0);
}

// The base weight is the pristine one while an adapter is merged (its delta is not in W twice).
TEST_F(InspectTest, AMergedAdapterDoesNotChangeTheBaseItIsMeasuredAgainst) {
  std::unique_ptr<LoraAdapter> all = Adapter("all_linear");
  ASSERT_NE(all, nullptr);
  ASSERT_OK_AND_ASSIGN(std::vector<ModuleInspection> before,
                       InspectAdapter(all->view(), model_->config(), Base()));
  ASSERT_OK(model_->Merge(&all->view()));
  ASSERT_OK_AND_ASSIGN(std::vector<ModuleInspection> merged,
                       InspectAdapter(all->view(), model_->config(), Base()));
  ASSERT_OK(model_->Unmerge());
  ASSERT_EQ(before.size(), merged.size());
  for (size_t i = 0; i < before.size(); ++i) {
    EXPECT_EQ(before[i].relative_norm, merged[i].relative_norm) << before[i].module;
    EXPECT_EQ(before[i].amplification, merged[i].amplification) << before[i].module;
  }
}

TEST_F(InspectTest, ErrorsOfTheBaseAndMismatchedViewsAreReturned) {
  std::unique_ptr<LoraAdapter> qv = Adapter("qv");
  ASSERT_NE(qv, nullptr);
  BaseWeights failing = [](int64_t, const std::array<bool, model::kNumLinearModules>&,
                           std::array<std::vector<float>, model::kNumLinearModules>*) {
    return absl::UnavailableError("engine stopped");
  };
  EXPECT_THAT(InspectAdapter(qv->view(), model_->config(), failing).status(),
              StatusIs(absl::StatusCode::kUnavailable, "engine stopped"));
  model::LoraWeightsView short_view;
  short_view.layers.resize(2);
  EXPECT_THAT(InspectAdapter(short_view, model_->config(), Base()).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, "layers"));
  BaseWeights wrong_size = [](int64_t, const std::array<bool, model::kNumLinearModules>& wanted,
                              std::array<std::vector<float>, model::kNumLinearModules>* w) {
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      if (wanted[m]) (*w)[m].assign(3, 1.0f);
    }
    return absl::OkStatus();
  };
  EXPECT_THAT(InspectAdapter(qv->view(), model_->config(), wrong_size).status(),
              StatusIs(absl::StatusCode::kInternal, "base weight"));
}

// A zero update (PEFT's initial B = 0): no direction, nothing amplified.
TEST_F(InspectTest, AZeroUpdateHasNoRankAndNoAmplification) {
  std::unique_ptr<LoraAdapter> qv = Adapter("qv");
  ASSERT_NE(qv, nullptr);
  model::LoraWeightsView view = qv->view();
  std::vector<float> zeros(64 * 64, 0.0f);
  model::LoraPair zero = *view.layers[0][0];
  zero.b.data = zeros.data();
  zero.b.dtype = kernels::DType::kF32;
  view.layers[0][0] = &zero;
  ASSERT_OK_AND_ASSIGN(std::vector<ModuleInspection> got,
                       InspectAdapter(view, model_->config(), Base()));
  ASSERT_FALSE(got.empty());
  EXPECT_EQ(got[0].module, "model.layers.0.self_attn.q_proj");
  EXPECT_EQ(got[0].fro_norm, 0.0);
  EXPECT_EQ(got[0].effective_rank, 0);
  EXPECT_EQ(got[0].amplification, 0.0);
  for (double s : got[0].singular_values) EXPECT_EQ(s, 0.0);
}

}  // namespace
}  // namespace loraplex::adapters
