// Logits against HF transformers (fixtures made by tools/make_hf_goldens.py; see
// tests/fixtures/hf/README.md). Regenerate with the "regenerate" command recorded in each fixture.
#include <algorithm>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iostream>

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

// base: GQA llama; rope_linear / rope_llama3: rope scaling; qwen2_bias: q/k/v bias;
// mistral_window: Mistral with sliding_window 8 and prompts up to 48 tokens (one prefill step).
INSTANTIATE_TEST_SUITE_P(Variants, TinyLlamaTest,
                         ::testing::Values("base", "rope_linear", "rope_llama3", "qwen2_bias",
                                           "mistral_window"));

// Mistral's sliding window through the paged KV cache: the 48-token prompt fed in chunks and then
// one token per step, with blocks of 4 slots so that, past position 12, whole blocks lie before
// the window (attention skips them; they stay allocated). Every position's logits must equal
// transformers' one-shot forward with its sliding-window mask.
TEST(MistralWindowTest, ChunkedPrefillAndDecodePastTheWindowMatchTransformers) {
  const std::string dir = FixturesDir() + "/tiny_llama/mistral_window";
  auto m = LoadNoTokenizer(dir, kernels::DType::kF32);
  ASSERT_NE(m, nullptr);
  ASSERT_EQ(m->config().sliding_window, 8);
  GoldenFile g = ReadGolden(dir + "/logits.json");
  const GoldenPrompt* p = nullptr;
  for (const GoldenPrompt& q : g.prompts) {
    if (q.name == "long_48") p = &q;
  }
  ASSERT_NE(p, nullptr) << "regenerate with: " << g.regenerate;
  const int64_t vocab = m->config().vocab_size, n = static_cast<int64_t>(p->ids.size());
  ASSERT_EQ(p->logits.size(), static_cast<size_t>(n * vocab));
  float max_err = 0;
  for (int64_t chunk : {1, 5, 11}) {
    SCOPED_TRACE(::testing::Message() << "prefill chunk " << chunk);
    const int64_t block = 4, blocks = (n + block - 1) / block;
    ASSERT_OK_AND_ASSIGN(KvCache cache, KvCache::Create(m->config(), blocks, block));
    ForwardBatch b;
    b.max_blocks_per_seq = blocks;
    for (int64_t i = 0; i < blocks; ++i) b.block_tables.push_back(*cache.AllocateBlock());
    // The first 20 tokens in chunks of `chunk`, then the rest one per step (decode).
    for (int64_t start = 0; start < n;) {
      const int64_t count = start < 20 ? std::min(chunk, 20 - start) : 1;
      b.tokens.assign(p->ids.begin() + start, p->ids.begin() + start + count);
      b.positions.clear();
      b.logit_rows.clear();
      for (int64_t i = 0; i < count; ++i) {
        b.positions.push_back(static_cast<int32_t>(start + i));
        b.logit_rows.push_back(static_cast<int32_t>(i));
      }
      b.token_seq.assign(count, 0);
      std::vector<float> logits;
      ASSERT_OK(m->Forward(b, &cache, &logits));
      std::vector<float> want(p->logits.begin() + start * vocab,
                              p->logits.begin() + (start + count) * vocab);
      for (size_t i = 0; i < want.size(); ++i) {
        max_err = std::max(max_err, std::abs(logits[i] - want[i]));
      }
      ASSERT_TRUE(AllClose(logits, want, ::loraplex::testing::kF32ModelLogits))
          << "positions " << start << ".." << start + count - 1
          << "; if the reference changed, regenerate with: " << g.regenerate;
      start += count;
    }
  }
  std::cout << "[ info ] mistral_window long_48, all chunkings: max abs logit error " << max_err
            << "\n";
}

// The window is what makes the logits right: the same weights with the window removed from the
// config miss transformers' logits past position 8 (and match them before it).
TEST(MistralWindowTest, WithoutTheWindowLogitsDifferPastIt) {
  const std::string src = FixturesDir() + "/tiny_llama/mistral_window";
  const std::string dir = ::loraplex::testing::MakeTempDir("nowindow");
  std::filesystem::copy_file(src + "/model.safetensors", dir + "/model.safetensors");
  std::ifstream in(src + "/config.json");
  nlohmann::json cfg = nlohmann::json::parse(in);
  cfg["sliding_window"] = nullptr;
  std::ofstream(dir + "/config.json") << cfg.dump();
  auto m = LoadNoTokenizer(dir, kernels::DType::kF32);
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->config().sliding_window, 0);
  GoldenFile g = ReadGolden(src + "/logits.json");
  for (const GoldenPrompt& p : g.prompts) {
    if (p.name != "long_48") continue;
    const int64_t vocab = m->config().vocab_size;
    std::vector<float> got = Logits(*m, p.ids, p.positions);
    const std::vector<float> head(got.begin(), got.begin() + 8 * vocab);
    EXPECT_TRUE(AllClose(head, std::vector<float>(p.logits.begin(), p.logits.begin() + 8 * vocab),
                         ::loraplex::testing::kF32ModelLogits));
    float max_diff = 0;
    for (size_t i = 8 * vocab; i < got.size(); ++i) {
      max_diff = std::max(max_diff, std::abs(got[i] - p.logits[i]));
    }
    EXPECT_GT(max_diff, 0.1f);
  }
}

// The same Mistral as a GGUF file laid out as llama.cpp converts one (architecture "llama",
// q/k rows permuted for adjacent-pair RoPE, the window under llama.attention.sliding_window; made
// by tools/make_mistral_gguf.py with the gguf package): the window is read from the GGUF key and
// every prompt, long_48 past the window included, matches transformers' logits.
TEST(MistralWindowTest, GgufWithTheWindowKeyMatchesTransformers) {
  const std::string dir = FixturesDir() + "/tiny_llama/mistral_window";
  auto m = LoadNoTokenizer(dir + "/model.gguf", kernels::DType::kF32);
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->config().architecture, "llama");
  ASSERT_EQ(m->config().sliding_window, 8);
  ExpectMatches(*m, ReadGolden(dir + "/logits.json"), testing::kF32ModelLogits);
}

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

TEST(LlamaConfigTest, SlidingWindowIsReadForMistralAndRefusedForQwen2) {
  const std::string dir = ::loraplex::testing::MakeTempDir("swa");
  auto write = [&](const std::string& fields) {
    std::ofstream(dir + "/config.json")
        << R"({"hidden_size": 64, "intermediate_size": 8, "num_hidden_layers": 4,
               "num_attention_heads": 8, "vocab_size": 10, )"
        << fields << "}";
    return LlamaConfig::FromHfJson(dir + "/config.json");
  };
  using ::loraplex::testing::StatusIs;
  ASSERT_OK_AND_ASSIGN(LlamaConfig c, write(R"("model_type": "mistral", "sliding_window": 4096)"));
  EXPECT_EQ(c.sliding_window, 4096);
  ASSERT_OK_AND_ASSIGN(c, write(R"("model_type": "mistral", "sliding_window": null)"));
  EXPECT_EQ(c.sliding_window, 0);
  ASSERT_OK_AND_ASSIGN(c, write(R"("model_type": "mistral")"));
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_THAT(write(R"("model_type": "mistral", "sliding_window": 0)"),
              StatusIs(absl::StatusCode::kInvalidArgument, "sliding_window"));
  EXPECT_THAT(write(R"("model_type": "mistral", "sliding_window": "big")"),
              StatusIs(absl::StatusCode::kInvalidArgument, "sliding_window"));
  // Llama ignores the key, as transformers does.
  ASSERT_OK_AND_ASSIGN(c, write(R"("model_type": "llama", "sliding_window": 16)"));
  EXPECT_EQ(c.sliding_window, 0);
  // Qwen2: off (the Hub's usual config), or on for no layer, loads with full attention.
  ASSERT_OK_AND_ASSIGN(c, write(R"("model_type": "qwen2", "use_sliding_window": false,
                                    "sliding_window": 4096, "max_window_layers": 2)"));
  EXPECT_EQ(c.sliding_window, 0);
  ASSERT_OK_AND_ASSIGN(c, write(R"("model_type": "qwen2", "use_sliding_window": true,
                                    "sliding_window": 4096, "max_window_layers": 4)"));
  EXPECT_EQ(c.sliding_window, 0);
  // On for some layers: refused, not served with full attention.
  EXPECT_THAT(write(R"("model_type": "qwen2", "use_sliding_window": true,
                       "sliding_window": 4096, "max_window_layers": 2)"),
              StatusIs(absl::StatusCode::kUnimplemented, "use_sliding_window"));
  // max_window_layers defaults to 28 (transformers' Qwen2Config): no layer of 4 slides.
  ASSERT_OK_AND_ASSIGN(c, write(R"("model_type": "qwen2", "use_sliding_window": true,
                                    "sliding_window": 64)"));
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_THAT(write(R"("model_type": "qwen2", "use_sliding_window": true, "sliding_window": 64,
                       "layer_types": ["full_attention", "sliding_attention",
                                       "full_attention", "full_attention"])"),
              StatusIs(absl::StatusCode::kUnimplemented, "use_sliding_window"));
}

}  // namespace
}  // namespace loraplex::model
