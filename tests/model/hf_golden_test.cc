// Logits against HF transformers (fixtures made by tools/make_hf_goldens.py; see
// tests/fixtures/hf/README.md). Regenerate with the "regenerate" command recorded in each fixture.
#include <fstream>

#include "model/generate.h"
#include "model/llama_model.h"
#include "nlohmann/json.hpp"
#include "tests/testing/testing.h"

namespace loraplex::model {
namespace {

using ::loraplex::testing::AllClose;
using ::loraplex::testing::FixturesDir;
using ::loraplex::testing::Stories260KDir;
using ::loraplex::testing::Tolerance;

struct GoldenPrompt {
  std::string name;
  std::vector<int32_t> ids;
  std::vector<int32_t> positions;  // rows of `logits`
  std::vector<float> logits;       // [positions.size(), vocab]
};

struct GoldenFile {
  std::string regenerate;
  std::vector<GoldenPrompt> prompts;
};

// Reads a "loraplex-golden-logits/1" fixture: JSON index + little-endian f32 data file.
GoldenFile ReadGolden(const std::string& json_path) {
  GoldenFile g;
  std::ifstream in(json_path);
  EXPECT_TRUE(in.good()) << json_path << " missing: run tools/make_hf_goldens.py";
  if (!in.good()) return g;
  nlohmann::json j = nlohmann::json::parse(in);
  EXPECT_EQ(j["format"], "loraplex-golden-logits/1");
  g.regenerate = j.value("regenerate", "python3 tools/make_hf_goldens.py");
  std::string dir = json_path.substr(0, json_path.rfind('/'));
  std::ifstream data(dir + "/" + j["data_file"].get<std::string>(), std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(data)), std::istreambuf_iterator<char>());
  for (const auto& p : j["prompts"]) {
    GoldenPrompt gp;
    gp.name = p["name"];
    gp.ids = p["token_ids"].get<std::vector<int32_t>>();
    const auto& l = p["logits"];
    gp.positions = l["positions"].get<std::vector<int32_t>>();
    auto shape = l["shape"].get<std::vector<int64_t>>();
    size_t off = l["offset_bytes"].get<size_t>();
    size_t n = shape[0] * shape[1];
    EXPECT_LE(off + n * 4, bytes.size());
    gp.logits.resize(n);
    std::memcpy(gp.logits.data(), bytes.data() + off, n * 4);
    g.prompts.push_back(std::move(gp));
  }
  return g;
}

// Logits of the given positions of `ids`, run as one prefill step.
std::vector<float> Logits(LlamaModel& m, const std::vector<int32_t>& ids,
                          const std::vector<int32_t>& positions) {
  const int64_t block = 16;
  const int64_t blocks = (ids.size() + block - 1) / block;
  auto cache = KvCache::Create(m.config(), blocks, block);
  EXPECT_OK(cache);
  ForwardBatch b;
  b.tokens = ids;
  b.max_blocks_per_seq = blocks;
  for (int64_t i = 0; i < blocks; ++i) b.block_tables.push_back(*cache->AllocateBlock());
  for (size_t i = 0; i < ids.size(); ++i) {
    b.positions.push_back(static_cast<int32_t>(i));
    b.token_seq.push_back(0);
  }
  b.logit_rows = positions;
  std::vector<float> logits;
  EXPECT_OK(m.Forward(b, &*cache, &logits));
  return logits;
}

void ExpectMatches(LlamaModel& m, const GoldenFile& g, Tolerance tol) {
  ASSERT_FALSE(g.prompts.empty());
  for (const GoldenPrompt& p : g.prompts) {
    EXPECT_TRUE(AllClose(Logits(m, p.ids, p.positions), p.logits, tol))
        << "prompt '" << p.name << "'; if the reference changed, regenerate with: " << g.regenerate;
  }
}

std::unique_ptr<LlamaModel> LoadNoTokenizer(const std::string& path, kernels::DType dtype) {
  LoadOptions o{dtype};
  o.require_tokenizer = false;
  auto m = LlamaModel::Load(path, o);
  EXPECT_OK(m);
  return m.ok() ? std::move(m).value() : nullptr;
}

class TinyLlamaTest : public ::testing::TestWithParam<std::string> {};

TEST_P(TinyLlamaTest, LogitsMatchTransformers) {
  const std::string dir = FixturesDir() + "/tiny_llama/" + GetParam();
  auto m = LoadNoTokenizer(dir, kernels::DType::kF32);
  ASSERT_NE(m, nullptr);
  ExpectMatches(*m, ReadGolden(dir + "/logits.json"), testing::kF32ModelLogits);
}

// base: GQA llama; rope_linear / rope_llama3: rope scaling; qwen2_bias: q/k/v bias.
INSTANTIATE_TEST_SUITE_P(Variants, TinyLlamaTest,
                         ::testing::Values("base", "rope_linear", "rope_llama3", "qwen2_bias"));

TEST(Stories260KGoldenTest, HfCopyLogitsMatchTransformers) {
  auto m = LoadNoTokenizer(Stories260KDir(), kernels::DType::kF32);
  ASSERT_NE(m, nullptr);
  ExpectMatches(*m, ReadGolden(FixturesDir() + "/hf/stories260k_logits.json"),
                testing::kF32ModelLogits);
}

TEST(Stories260KGoldenTest, GgufLogitsMatchTransformers) {
  auto m = LoadNoTokenizer(Stories260KDir() + "/stories260K.gguf", kernels::DType::kF32);
  ASSERT_NE(m, nullptr);
  ExpectMatches(*m, ReadGolden(FixturesDir() + "/hf/stories260k_logits.json"),
                testing::kF32ModelLogits);
}

TEST(Stories260KGoldenTest, Bf16LogitsStayNearTransformers) {
  auto m = LoadNoTokenizer(Stories260KDir() + "/stories260K.gguf", kernels::DType::kBF16);
  ASSERT_NE(m, nullptr);
  ExpectMatches(*m, ReadGolden(FixturesDir() + "/hf/stories260k_logits.json"),
                testing::kBf16ModelLogits);
}

}  // namespace
}  // namespace loraplex::model

namespace loraplex::model {
namespace {

TEST(LlamaConfigTest, Transformers5RopeParametersReadLikeRopeScaling) {
  const std::string dir = FixturesDir() + "/tiny_llama/rope_llama3";
  ASSERT_OK_AND_ASSIGN(LlamaConfig old_keys, LlamaConfig::FromHfJson(dir + "/config.json"));
  ASSERT_OK_AND_ASSIGN(LlamaConfig new_keys,
                       LlamaConfig::FromHfJson(dir + "/config.transformers5.json"));
  EXPECT_EQ(new_keys.rope_scaling.type, RopeScaling::Type::kLlama3);
  EXPECT_EQ(old_keys.RopeInvFreq(), new_keys.RopeInvFreq());
  EXPECT_EQ(old_keys.rope_theta, new_keys.rope_theta);
}

TEST(LlamaConfigTest, BadConfigsNameTheField) {
  const std::string dir = ::loraplex::testing::MakeTempDir("cfg");
  auto write = [&](const std::string& text) {
    std::ofstream(dir + "/config.json") << text;
    return LlamaConfig::FromHfJson(dir + "/config.json");
  };
  using ::loraplex::testing::StatusIs;
  EXPECT_THAT(write("not json"), StatusIs(absl::StatusCode::kInvalidArgument, "JSON"));
  EXPECT_THAT(write(R"({"model_type": "gpt2"})"),
              StatusIs(absl::StatusCode::kUnimplemented, "gpt2"));
  EXPECT_THAT(write(R"({"model_type": "llama", "hidden_size": 64})"),
              StatusIs(absl::StatusCode::kInvalidArgument, "intermediate_size"));
  EXPECT_THAT(write(R"({"model_type": "llama", "hidden_size": 64, "intermediate_size": 8,
      "num_hidden_layers": 1, "num_attention_heads": 8, "num_key_value_heads": 3,
      "vocab_size": 10})"),
              StatusIs(absl::StatusCode::kInvalidArgument, "num_key_value_heads"));
  EXPECT_THAT(write(R"({"model_type": "llama", "hidden_size": 64, "intermediate_size": 8,
      "num_hidden_layers": 1, "num_attention_heads": 8, "vocab_size": 10,
      "rope_scaling": {"type": "yarn", "factor": 2}})"),
              StatusIs(absl::StatusCode::kUnimplemented, "yarn"));
  EXPECT_THAT(LlamaModel::Load(dir + "/missing"), StatusIs(absl::StatusCode::kNotFound));
}

}  // namespace
}  // namespace loraplex::model
