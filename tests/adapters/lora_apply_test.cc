// ApplyLora (model/lora_apply.h), driven by a LoraPlan (model/lora_plan.h) built from the batch,
// against a per-token loop written from the formula y[t] += B_j (A_j x[t]) (- B_M (A_M x[t]) while
// M is merged), on random adapters: fused q/k/v with GQA widths, modules some adapters skip,
// prefill runs (SGMV) and decode (BGMV), base tokens.

#include "model/lora_apply.h"

#include <gtest/gtest.h>

#include <memory>
#include <random>
#include <vector>

#include "tests/testing/testing.h"

namespace loraplex::model {
namespace {

using ::loraplex::testing::AllClose;
using ::loraplex::testing::kF32KernelVsReference;

struct RandomAdapter {
  std::vector<std::vector<float>> data;
  std::vector<std::unique_ptr<LoraPair>> pairs;
  LoraWeightsView view;
};

// One layer; q/k/v with in=96, out 96/32/32. Module m is present unless (seed + m) % 3 == 0.
std::unique_ptr<RandomAdapter> MakeAdapter(uint32_t seed, int64_t rank) {
  auto ad = std::make_unique<RandomAdapter>();
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> dist(-0.2f, 0.2f);
  ad->view.layers.assign(1, {});
  const int64_t outs[3] = {96, 32, 32};
  ad->data.reserve(6);
  for (int m = 0; m < 3; ++m) {
    if ((seed + m) % 3 == 0) continue;
    auto p = std::make_unique<LoraPair>();
    p->rank = rank + m;
    ad->data.emplace_back(p->rank * 96);
    for (float& v : ad->data.back()) v = dist(rng);
    p->a = {kernels::DType::kF32, ad->data.back().data(), p->rank, 96};
    ad->data.emplace_back(outs[m] * p->rank);
    for (float& v : ad->data.back()) v = dist(rng);
    p->b = {kernels::DType::kF32, ad->data.back().data(), outs[m], p->rank};
    ad->view.layers[0][m] = p.get();
    ad->pairs.push_back(std::move(p));
  }
  return ad;
}

// y[out] += sign * B (A x), plainly.
void AddDelta(float* y, const float* x, const LoraPair* p, float sign) {
  if (p == nullptr) return;
  const float* a = static_cast<const float*>(p->a.data);
  const float* b = static_cast<const float*>(p->b.data);
  std::vector<float> v(p->rank, 0.0f);
  for (int64_t r = 0; r < p->rank; ++r) {
    for (int64_t i = 0; i < p->a.cols; ++i) v[r] += a[r * p->a.cols + i] * x[i];
  }
  for (int64_t o = 0; o < p->b.rows; ++o) {
    float acc = 0.0f;
    for (int64_t r = 0; r < p->rank; ++r) acc += b[o * p->rank + r] * v[r];
    y[o] += sign * acc;
  }
}

void Check(const std::vector<int32_t>& token_adapter, bool with_merged) {
  std::vector<std::unique_ptr<RandomAdapter>> ads;
  ForwardBatch batch;
  for (uint32_t j = 0; j < 5; ++j) {
    ads.push_back(MakeAdapter(10 + j, 1 + 3 * j));
    batch.adapters.push_back(&ads.back()->view);
  }
  const LoraWeightsView* merged = with_merged ? batch.adapters[2] : nullptr;
  const int64_t n = static_cast<int64_t>(token_adapter.size());
  batch.tokens.assign(n, 0);
  batch.token_adapter = token_adapter;
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> dist(-1.0f, 1.0f);
  std::vector<float> x(n * 100);  // row stride 100 > in 96
  for (float& v : x) v = dist(rng);
  const int64_t stride = 96 + 32 + 32;  // fused qkv buffer
  std::vector<float> y(n * stride);
  for (float& v : y) v = dist(rng);
  std::vector<float> expected = y;
  const int64_t col[3] = {0, 96, 128};
  for (int64_t t = 0; t < n; ++t) {
    const int32_t j = token_adapter.empty() ? -1 : token_adapter[t];
    const LoraWeightsView* mine = j >= 0 ? batch.adapters[j] : nullptr;
    for (int m = 0; m < 3; ++m) {
      float* yt = expected.data() + t * stride + col[m];
      if (mine != nullptr && mine != merged) AddDelta(yt, &x[t * 100], mine->layers[0][m], 1.0f);
      if (merged != nullptr && mine != merged)
        AddDelta(yt, &x[t * 100], merged->layers[0][m], -1.0f);
    }
  }
  LoraPlan plan;
  plan.Build(batch, merged);
  LoraScratch scratch;
  ApplyLora(plan, LoraGroup::kQkv, 0, x.data(), 100,
            {{y.data() + col[0], stride}, {y.data() + col[1], stride}, {y.data() + col[2], stride}},
            &scratch);
  EXPECT_TRUE(AllClose(y, expected, kF32KernelVsReference));
}

TEST(LoraApplyTest, DecodeTokensEachTheirOwnAdapter) {
  Check({0, 1, -1, 2, 3, 4, 0, -1, 4}, false);
}

TEST(LoraApplyTest, PrefillRunsUseSegments) {
  std::vector<int32_t> token_adapter;
  for (int32_t j : {1, -1, 3, 0, 4, 2}) token_adapter.insert(token_adapter.end(), 9, j);
  Check(token_adapter, false);
}

TEST(LoraApplyTest, MixedModeWhileMerged) {
  Check({0, 1, -1, 2, 3, 4, 2, -1, 4}, true);
  std::vector<int32_t> token_adapter;
  for (int32_t j : {2, -1, 3, 2, 0}) token_adapter.insert(token_adapter.end(), 8, j);
  Check(token_adapter, true);
  Check({}, true);  // an all-base batch while merged
}

TEST(LoraApplyTest, NothingToDoLeavesYAlone) {
  ForwardBatch batch;
  batch.tokens.assign(3, 0);
  std::vector<float> x(3 * 96, 1.0f), y(3 * 96, 5.0f);
  LoraPlan plan;
  plan.Build(batch, nullptr);
  LoraScratch scratch;
  ApplyLora(plan, LoraGroup::kO, 0, x.data(), 96, {{y.data(), 96}}, &scratch);
  EXPECT_EQ(y, std::vector<float>(3 * 96, 5.0f));
}

}  // namespace
}  // namespace loraplex::model
