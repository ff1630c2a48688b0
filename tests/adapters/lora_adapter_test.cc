// Loading PEFT adapters into compute layout and validating them against the base model: the PEFT
// fixtures of tests/fixtures/peft/stories260k (tools/make_peft_goldens.py) for the happy paths, and
// hand-written adapter folders for every refusal.

#include "adapters/lora_adapter.h"

#include <gtest/gtest.h>

#include <array>
#include <cmath>
#include <cstring>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "adapters/lora_mix.h"
#include "common/half.h"
#include "formats/safetensors.h"
#include "kernels/quant.h"
#include "model/lora_plan.h"
#include "nlohmann/json.hpp"
#include "tests/testing/testing.h"

namespace loraplex::adapters {
namespace {

using ::loraplex::testing::FixturesDir;
using ::loraplex::testing::MakeTempDir;
using ::loraplex::testing::StatusIs;
using ::loraplex::testing::Stories260KDir;
using model::LinearModule;

constexpr const char* kRegenerate = "python3 tools/make_peft_goldens.py --only stories";

model::LlamaConfig Stories() {
  auto c = model::LlamaConfig::FromHfJson(Stories260KDir() + "/config.json");
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? *c : model::LlamaConfig{};
}

std::string Fixture(const std::string& name) { return FixturesDir() + "/peft/stories260k/" + name; }

float At(const kernels::WeightView& w, int64_t i) {
  return w.dtype == kernels::DType::kF32 ? static_cast<const float*>(w.data)[i]
                                         : Bf16ToF32(static_cast<const uint16_t*>(w.data)[i]);
}

// The raw tensor from the fixture file, widened to f32.
std::vector<float> Raw(const formats::SafetensorsFile& f, const std::string& name) {
  const formats::TensorInfo* t = f.Find(name);
  EXPECT_NE(t, nullptr) << name;
  if (t == nullptr) return {};
  std::vector<float> out(t->NumElements());
  for (size_t i = 0; i < out.size(); ++i) {
    if (t->type == formats::StoredType::kF32) {
      std::memcpy(&out[i], t->data + 4 * i, 4);
    } else {
      uint16_t h;
      std::memcpy(&h, t->data + 2 * i, 2);
      out[i] = t->type == formats::StoredType::kBF16 ? Bf16ToF32(h) : F16ToF32(h);
    }
  }
  return out;
}

// Checks every pair of the adapter against the fixture tensors: A unchanged, B times the scale.
void ExpectFoldedScale(const LoraAdapter& ad, const std::string& dir,
                       const std::map<std::string, float>& scale_of_key) {
  auto file = formats::SafetensorsFile::Open(dir + "/adapter_model.safetensors");
  ASSERT_TRUE(file.ok()) << file.status().ToString() << "; regenerate with " << kRegenerate;
  for (size_t l = 0; l < ad.view().layers.size(); ++l) {
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      const model::LoraPair* p = ad.view().layers[l][m];
      const std::string key = ModuleKey(l, static_cast<LinearModule>(m));
      auto it = scale_of_key.find(key);
      if (it == scale_of_key.end()) {
        EXPECT_EQ(p, nullptr) << key;
        continue;
      }
      ASSERT_NE(p, nullptr) << key;
      std::vector<float> a = Raw(**file, "base_model.model." + key + ".lora_A.weight");
      std::vector<float> b = Raw(**file, "base_model.model." + key + ".lora_B.weight");
      ASSERT_EQ(static_cast<int64_t>(a.size()), p->a.rows * p->a.cols);
      ASSERT_EQ(static_cast<int64_t>(b.size()), p->b.rows * p->b.cols);
      for (size_t i = 0; i < a.size(); ++i) ASSERT_EQ(At(p->a, i), a[i]) << key;
      for (size_t i = 0; i < b.size(); ++i) ASSERT_EQ(At(p->b, i), b[i] * it->second) << key;
    }
  }
}

AdapterLoadOptions F32() { return {kernels::DType::kF32, 256}; }

TEST(LoraAdapterTest, LoadsQvAndFoldsTheScaleIntoB) {
  ASSERT_OK_AND_ASSIGN(auto ad, LoraAdapter::Load(Fixture("qv"), Stories(), F32()));
  std::map<std::string, float> scales;
  for (int l = 0; l < 5; ++l) {
    scales[ModuleKey(l, LinearModule::kQ)] = 2.0f;  // 16 / 8
    scales[ModuleKey(l, LinearModule::kV)] = 2.0f;
  }
  ExpectFoldedScale(*ad, Fixture("qv"), scales);
  EXPECT_EQ(ad->max_rank(), 8);
  EXPECT_EQ(ad->target_modules(), (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(ad->bytes(), 5 * 4 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8));
}

TEST(LoraAdapterTest, F16FileAndBf16Storage) {
  ASSERT_OK_AND_ASSIGN(
      auto ad, LoraAdapter::Load(Fixture("qv_f16"), Stories(), {kernels::DType::kBF16, 256}));
  const model::LoraPair* p = ad->view().layers[0][0];
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(p->a.dtype, kernels::DType::kBF16);
  auto file = formats::SafetensorsFile::Open(Fixture("qv_f16") + "/adapter_model.safetensors");
  ASSERT_OK(file);
  std::vector<float> b =
      Raw(**file, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
  for (size_t i = 0; i < b.size(); ++i) {
    ASSERT_EQ(At(p->b, i), Bf16ToF32(F32ToBf16(b[i] * 2.0f)));  // scaled in f32, rounded once
  }
}

TEST(LoraAdapterTest, RankAndAlphaPatterns) {
  ASSERT_OK_AND_ASSIGN(auto ad, LoraAdapter::Load(Fixture("patterns"), Stories(), F32()));
  std::map<std::string, float> scales;
  for (int l = 0; l < 5; ++l) {
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      scales[ModuleKey(l, static_cast<LinearModule>(m))] = 2.0f;  // 8 / 4
    }
    scales[ModuleKey(l, LinearModule::kQ)] = 1.0f;  // rank 8 from "q_proj", alpha 8
    scales[ModuleKey(l, LinearModule::kV)] = 0.5f;  // alpha 2 from "v_proj"
  }
  scales[ModuleKey(1, LinearModule::kQ)] = 4.0f;     // alpha 32, rank 8
  scales[ModuleKey(2, LinearModule::kDown)] = 4.0f;  // rank 2, alpha 8
  ExpectFoldedScale(*ad, Fixture("patterns"), scales);
  EXPECT_EQ(ad->view().layers[2][static_cast<int>(LinearModule::kDown)]->rank, 2);
  EXPECT_EQ(ad->view().layers[0][0]->rank, 8);
}

// Every A and B of `view`, by model::LoraStorageKey, must follow each other in memory in that
// order, each right after the one before (its bytes rounded up to 64).
void ExpectStoredInReadOrder(const model::LoraWeightsView& view, int64_t num_matrices) {
  std::map<int64_t, kernels::WeightView> by_key;
  for (size_t l = 0; l < view.layers.size(); ++l) {
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      const model::LoraPair* p = view.layers[l][m];
      if (p == nullptr) continue;
      const auto kind = static_cast<LinearModule>(m);
      by_key[model::LoraStorageKey(static_cast<int64_t>(l), kind, false)] = p->a;
      by_key[model::LoraStorageKey(static_cast<int64_t>(l), kind, true)] = p->b;
    }
  }
  ASSERT_EQ(static_cast<int64_t>(by_key.size()), num_matrices);
  const char* expected = nullptr;
  for (const auto& [key, w] : by_key) {
    const auto* at = static_cast<const char*>(w.data);
    if (expected != nullptr) {
      EXPECT_EQ(at, expected) << "key " << key;
    }
    const int64_t bytes = w.rows * w.cols * (w.dtype == kernels::DType::kF32 ? 4 : 2);
    expected = at + (bytes + 63) / 64 * 64;
  }
}

TEST(LoraAdapterTest, MatricesAreStoredInTheOrderADecodeStepReadsThem) {
  // Per layer and module group (q,k,v; o; gate,up; down): the group's A, then its B.
  EXPECT_LT(model::LoraStorageKey(0, LinearModule::kV, false),
            model::LoraStorageKey(0, LinearModule::kQ, true));
  EXPECT_LT(model::LoraStorageKey(0, LinearModule::kV, true),
            model::LoraStorageKey(0, LinearModule::kO, false));
  EXPECT_LT(model::LoraStorageKey(0, LinearModule::kO, true),
            model::LoraStorageKey(0, LinearModule::kGate, false));
  EXPECT_LT(model::LoraStorageKey(0, LinearModule::kUp, false),
            model::LoraStorageKey(0, LinearModule::kGate, true));
  EXPECT_LT(model::LoraStorageKey(0, LinearModule::kDown, true),
            model::LoraStorageKey(1, LinearModule::kQ, false));
  const model::LlamaConfig config = Stories();
  for (kernels::DType dtype : {kernels::DType::kF32, kernels::DType::kBF16}) {
    SCOPED_TRACE(kernels::DTypeName(dtype));
    ASSERT_OK_AND_ASSIGN(auto al, LoraAdapter::Load(Fixture("all_linear"), config, {dtype, 256}));
    ExpectStoredInReadOrder(al->view(), 2 * model::kNumLinearModules * config.num_layers);
    ASSERT_OK_AND_ASSIGN(auto mix,
                         LoraMix::Build({{&al->view(), 0.5f}, {&al->view(), 0.5f}}, config, 256));
    ExpectStoredInReadOrder(mix->view(), 2 * model::kNumLinearModules * config.num_layers);
  }
}

TEST(LoraAdapterTest, RsLoraLayersRegexAllLinearRank1Rank64FanInFanOut) {
  std::map<std::string, float> s;
  for (int l = 0; l < 5; ++l) {
    for (LinearModule m :
         {LinearModule::kQ, LinearModule::kK, LinearModule::kV, LinearModule::kO}) {
      s[ModuleKey(l, m)] = 1.0f;  // 4 / sqrt(16)
    }
  }
  ASSERT_OK_AND_ASSIGN(auto rs, LoraAdapter::Load(Fixture("rslora"), Stories(), F32()));
  ExpectFoldedScale(*rs, Fixture("rslora"), s);

  for (auto& [k, v] : s) v = 2.0f;  // 8 / 4
  ASSERT_OK_AND_ASSIGN(auto ff, LoraAdapter::Load(Fixture("fan_in_fan_out"), Stories(), F32()));
  EXPECT_TRUE(ff->config().fan_in_fan_out);
  ExpectFoldedScale(*ff, Fixture("fan_in_fan_out"), s);

  std::map<std::string, float> layers, all, rank1;
  for (int l = 0; l < 5; ++l) {
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      const std::string key = ModuleKey(l, static_cast<LinearModule>(m));
      if (l % 2 == 0) layers[key] = 2.0f;
      all[key] = 2.0f;
      rank1[key] = 2.0f;
    }
  }
  ASSERT_OK_AND_ASSIGN(auto la, LoraAdapter::Load(Fixture("layers"), Stories(), F32()));
  ExpectFoldedScale(*la, Fixture("layers"), layers);
  ASSERT_OK_AND_ASSIGN(auto al, LoraAdapter::Load(Fixture("all_linear"), Stories(), F32()));
  ExpectFoldedScale(*al, Fixture("all_linear"), all);
  ASSERT_OK_AND_ASSIGN(auto r1, LoraAdapter::Load(Fixture("rank1"), Stories(), F32()));
  ExpectFoldedScale(*r1, Fixture("rank1"), rank1);

  std::map<std::string, float> rx;
  for (int l : {1, 3}) {
    rx[ModuleKey(l, LinearModule::kQ)] = 2.0f;
    rx[ModuleKey(l, LinearModule::kK)] = 2.0f;
  }
  ASSERT_OK_AND_ASSIGN(auto re, LoraAdapter::Load(Fixture("regex"), Stories(), F32()));
  ExpectFoldedScale(*re, Fixture("regex"), rx);

  ASSERT_OK_AND_ASSIGN(auto r64, LoraAdapter::Load(Fixture("rank64"), Stories(), F32()));
  EXPECT_EQ(r64->max_rank(), 64);
  EXPECT_THAT(LoraAdapter::Load(Fixture("rank64"), Stories(), {kernels::DType::kF32, 32}),
              StatusIs(absl::StatusCode::kFailedPrecondition, "maximum LoRA rank 32"));
}

// ---- hand-written adapters for the refusals
// ------------------------------------------------------

struct Tensor {
  std::string name;
  std::vector<int64_t> shape;
  float value = 0.01f;
};

// Writes an F32 safetensors file.
void WriteSafetensors(const std::string& path, const std::vector<Tensor>& tensors) {
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (const Tensor& t : tensors) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    header[t.name] = {
        {"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {data.size(), data.size() + 4 * n}}};
    for (int64_t i = 0; i < n; ++i) {
      const float v = t.value * static_cast<float>((i % 7) - 3);
      data.append(reinterpret_cast<const char*>(&v), 4);
    }
  }
  std::string h = header.dump();
  const uint64_t len = h.size();
  std::ofstream f(path, std::ios::binary);
  f.write(reinterpret_cast<const char*>(&len), 8);
  f << h << data;
}

std::string WriteAdapter(const std::string& config, const std::vector<Tensor>& tensors) {
  const std::string dir = MakeTempDir("lp_adapter");
  std::ofstream(dir + "/adapter_config.json") << config;
  WriteSafetensors(dir + "/adapter_model.safetensors", tensors);
  return dir;
}

std::vector<Tensor> QPairs(int64_t r, int64_t in = 64, int64_t out = 64, int layers = 5) {
  std::vector<Tensor> t;
  for (int l = 0; l < layers; ++l) {
    const std::string p =
        "base_model.model.model.layers." + std::to_string(l) + ".self_attn.q_proj";
    t.push_back({p + ".lora_A.weight", {r, in}});
    t.push_back({p + ".lora_B.weight", {out, r}});
  }
  return t;
}

const char* kQConfig = R"({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "bias": "none"})";

TEST(LoraAdapterTest, HandWrittenValidAdapterLoads) {
  ASSERT_OK_AND_ASSIGN(auto ad, LoraAdapter::Load(WriteAdapter(kQConfig, QPairs(4)), Stories()));
  EXPECT_EQ(ad->num_pairs(), 5);
  EXPECT_EQ(ad->view().layers[0][0]->a.dtype, kernels::DType::kBF16);  // the default storage
}

TEST(LoraAdapterTest, MissingFilesAndPickles) {
  EXPECT_THAT(LoraAdapter::Load("/nonexistent/adapter", Stories()),
              StatusIs(absl::StatusCode::kNotFound, "/nonexistent/adapter"));
  std::string dir = MakeTempDir("lp_adapter");
  EXPECT_THAT(LoraAdapter::Load(dir, Stories()),
              StatusIs(absl::StatusCode::kNotFound, "adapter_config.json"));
  std::ofstream(dir + "/adapter_config.json") << kQConfig;
  EXPECT_THAT(LoraAdapter::Load(dir, Stories()),
              StatusIs(absl::StatusCode::kNotFound, "adapter_model.safetensors"));
  std::ofstream(dir + "/adapter_model.bin") << "pickle";
  EXPECT_THAT(LoraAdapter::Load(dir, Stories()),
              StatusIs(absl::StatusCode::kInvalidArgument, "adapter_model.bin: pickle"));
}

TEST(LoraAdapterTest, MalformedSafetensors) {
  for (const std::string& bytes :
       {std::string("garbage"), std::string("\xff\xff\xff\xff\xff\xff\xff\x7f{}", 10),
        std::string("\x04\x00\x00\x00\x00\x00\x00\x00{bad", 12)}) {
    std::string dir = MakeTempDir("lp_adapter");
    std::ofstream(dir + "/adapter_config.json") << kQConfig;
    std::ofstream(dir + "/adapter_model.safetensors", std::ios::binary) << bytes;
    EXPECT_THAT(LoraAdapter::Load(dir, Stories()),
                StatusIs(absl::StatusCode::kInvalidArgument, "adapter_model.safetensors"));
  }
}

// DoRA adapters (use_dora) need a magnitude per module, of the module's out features, the base
// weights for their norms, and a backend that runs them. (Their numbers: StoriesDoraTest.)
TEST(LoraAdapterTest, DoraRefusals) {
  const std::string config = R"({"r": 4, "target_modules": ["q_proj"], "use_dora": true})";
  auto magnitudes = [](std::vector<int64_t> shape, const char* suffix = "") {
    std::vector<Tensor> t = QPairs(4);
    for (int l = 0; l < 5; ++l) {
      t.push_back({"base_model.model.model.layers." + std::to_string(l) +
                       ".self_attn.q_proj.lora_magnitude_vector" + suffix,
                   shape});
    }
    return t;
  };
  int reads = 0;
  AdapterLoadOptions o;
  o.base_weights = [&reads](int64_t, const std::array<bool, model::kNumLinearModules>& wanted,
                            std::array<std::vector<float>, model::kNumLinearModules>* w) {
    ++reads;
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      if (wanted[m]) (*w)[m].assign(64 * 64, 0.05f);
    }
    return absl::OkStatus();
  };
  EXPECT_THAT(LoraAdapter::Load(WriteAdapter(config, QPairs(4)), Stories(), o),
              StatusIs(absl::StatusCode::kInvalidArgument, "lora_magnitude_vector is missing"));
  EXPECT_THAT(LoraAdapter::Load(WriteAdapter(config, magnitudes({63})), Stories(), o),
              StatusIs(absl::StatusCode::kFailedPrecondition, "lora_magnitude_vector has 63"));
  EXPECT_THAT(LoraAdapter::Load(WriteAdapter(config, magnitudes({64, 1}, ".weight")), Stories(), o),
              StatusIs(absl::StatusCode::kInvalidArgument, "must be 1-D"));
  EXPECT_EQ(reads, 0);
  // The hand-written values repeat (i % 7 - 3) * 0.01: every seventh magnitude is 0, and so is
  // g = m / ||W + s B A||; 1 / g (mixed mode) would be infinite.
  EXPECT_THAT(LoraAdapter::Load(WriteAdapter(config, magnitudes({64})), Stories(), o),
              StatusIs(absl::StatusCode::kInvalidArgument, "0 or not finite"));
  EXPECT_EQ(reads, 1);  // refused at layer 0
  AdapterLoadOptions failing = o;
  failing.base_weights = [](int64_t, const std::array<bool, model::kNumLinearModules>&,
                            std::array<std::vector<float>, model::kNumLinearModules>*) {
    return absl::UnavailableError("the engine is shutting down");
  };
  EXPECT_THAT(LoraAdapter::Load(WriteAdapter(config, magnitudes({64})), Stories(), failing),
              StatusIs(absl::StatusCode::kUnavailable, "shutting down"));
  EXPECT_THAT(LoraAdapter::Load(WriteAdapter(config, magnitudes({64})), Stories(), F32()),
              StatusIs(absl::StatusCode::kFailedPrecondition, "base model's weights"));
  AdapterLoadOptions refused = o;
  refused.dora_refused = "not on this backend";
  EXPECT_THAT(LoraAdapter::Load(WriteAdapter(config, magnitudes({64})), Stories(), refused),
              StatusIs(absl::StatusCode::kFailedPrecondition, "DoRA: not on this backend"));
  EXPECT_THAT(LoraAdapter::Load(WriteAdapter(R"({"r": 4, "target_modules": ["q_proj"],
                                                 "use_dora": 1})",
                                             magnitudes({64})),
                                Stories(), o),
              StatusIs(absl::StatusCode::kInvalidArgument, "use_dora"));
}

TEST(LoraAdapterTest, ConfigRefusalsSurfaceThroughLoad) {
  EXPECT_THAT(LoraAdapter::Load(WriteAdapter(R"({"r": 4, "target_modules": ["q_proj"],
                                                 "modules_to_save": ["lm_head"]})",
                                             QPairs(4)),
                                Stories()),
              StatusIs(absl::StatusCode::kInvalidArgument, "modules_to_save"));
}

TEST(LoraAdapterTest, TensorRefusals) {
  struct Case {
    std::string config;
    std::vector<Tensor> tensors;
    absl::StatusCode code;
    std::string substr;
  };
  auto with = [](std::vector<Tensor> t, Tensor extra) {
    t.push_back(extra);
    return t;
  };
  std::vector<Tensor> no_b = QPairs(4);
  no_b.pop_back();
  std::vector<Tensor> nan = QPairs(4);
  nan[0].value = std::nanf("");
  const Case cases[] = {
      {kQConfig, QPairs(4, 63), absl::StatusCode::kFailedPrecondition, "does not fit the base"},
      {kQConfig, QPairs(4, 64, 32), absl::StatusCode::kFailedPrecondition, "does not fit the base"},
      {kQConfig, QPairs(8), absl::StatusCode::kInvalidArgument, "config and tensors disagree"},
      {R"({"r": 300, "target_modules": ["q_proj"]})", QPairs(300),
       absl::StatusCode::kFailedPrecondition, "maximum LoRA rank 256"},
      {kQConfig, with(QPairs(4), {"base_model.model.lm_head.lora_A.weight", {4, 64}}),
       absl::StatusCode::kInvalidArgument, "lm_head"},
      {kQConfig,
       with(QPairs(4), {"base_model.model.model.embed_tokens.lora_embedding_A", {4, 512}}),
       absl::StatusCode::kInvalidArgument, "embedding"},
      {kQConfig,
       with(QPairs(4),
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", {64}}),
       absl::StatusCode::kInvalidArgument, "DoRA"},
      {kQConfig,
       with(QPairs(4), {"base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias", {64}}),
       absl::StatusCode::kInvalidArgument, "bias"},
      {kQConfig,
       with(QPairs(4), {"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", {4, 64}}),
       absl::StatusCode::kFailedPrecondition, "layer 7 does not exist"},
      {kQConfig, no_b, absl::StatusCode::kInvalidArgument, "lora_B.weight is missing"},
      {R"({"r": 4, "target_modules": ["q_proj", "k_proj"]})", QPairs(4),
       absl::StatusCode::kInvalidArgument, "k_proj"},
      {R"({"r": 4, "target_modules": ["v_proj"]})", QPairs(4), absl::StatusCode::kInvalidArgument,
       "do not select"},
      {R"({"r": 4, "target_modules": ["c_attn"]})",
       {},
       absl::StatusCode::kFailedPrecondition,
       "matches no module"},
      {kQConfig, nan, absl::StatusCode::kInvalidArgument, "non-finite"},
  };
  for (const Case& c : cases) {
    EXPECT_THAT(LoraAdapter::Load(WriteAdapter(c.config, c.tensors), Stories()),
                StatusIs(c.code, c.substr))
        << c.substr;
  }
}

}  // namespace
}  // namespace loraplex::adapters
