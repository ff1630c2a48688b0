// SmolLM2-135M-Instruct (the Q4_1 GGUF, dequantized) against HF transformers loading the same
// GGUF in f32: tokenization, chat template, last-position logits, per-position argmax and greedy
// continuations. Fixture: tests/fixtures/hf/smollm2_logits.json (tools/make_hf_goldens.py).
// Skipped with a message when the model is absent (scripts/fetch-model.sh fetches it); fails
// instead under LP_REQUIRE_MODELS=1 or CI=true (tests/testing/testing.h).
#include <filesystem>
#include <fstream>

#include "model/generate.h"
#include "model/llama_model.h"
#include "nlohmann/json.hpp"
#include "tests/testing/testing.h"

namespace loraplex::model {
namespace {

using ::loraplex::testing::AllClose;
using ::loraplex::testing::FixturesDir;

std::string ModelPath() {
  const char* env = std::getenv("LP_SMOLLM2_GGUF");
  return env ? env : "models/SmolLM2-135M-Instruct.Q4_1.gguf";
}

class SmolLM2Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(ModelPath())) return;
    // Any failure here must fail every test, not skip it: record it for SetUp.
    auto m = LlamaModel::Load(ModelPath(), {kernels::DType::kF32});
    if (!m.ok()) {
      setup_error_ = new std::string(m.status().ToString());
      return;
    }
    std::ifstream in(FixturesDir() + "/hf/smollm2_logits.json");
    nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) {
      setup_error_ = new std::string("cannot read tests/fixtures/hf/smollm2_logits.json");
      return;
    }
    model_ = std::move(m).value().release();
    fixture_ = new nlohmann::json(std::move(j));
    std::ifstream data(FixturesDir() + "/hf/" + (*fixture_)["data_file"].get<std::string>(),
                       std::ios::binary);
    data_ =
        new std::string((std::istreambuf_iterator<char>(data)), std::istreambuf_iterator<char>());
  }
  static void TearDownTestSuite() {
    delete model_;
    delete fixture_;
    delete data_;
    model_ = nullptr;
  }
  void SetUp() override {
    if (setup_error_ != nullptr) FAIL() << *setup_error_;
    if (model_ == nullptr) {
      LP_SKIP_UNLESS_MODEL_EXISTS(ModelPath());
      FAIL() << ModelPath() << " appeared after the suite's set-up";
    }
  }
  std::string Regenerate() const { return (*fixture_)["regenerate"].get<std::string>(); }

  static LlamaModel* model_;
  static nlohmann::json* fixture_;
  static std::string* data_;
  static std::string* setup_error_;
};
std::string* SmolLM2Test::setup_error_ = nullptr;
LlamaModel* SmolLM2Test::model_ = nullptr;
nlohmann::json* SmolLM2Test::fixture_ = nullptr;
std::string* SmolLM2Test::data_ = nullptr;

TEST_F(SmolLM2Test, ConfigMatchesTheReference) {
  const auto& ref = (*fixture_)["config"];
  const LlamaConfig& c = model_->config();
  EXPECT_EQ(c.hidden_size, ref["hidden_size"]);
  EXPECT_EQ(c.intermediate_size, ref["intermediate_size"]);
  EXPECT_EQ(c.num_layers, ref["num_hidden_layers"]);
  EXPECT_EQ(c.num_heads, ref["num_attention_heads"]);
  EXPECT_EQ(c.num_kv_heads, ref["num_key_value_heads"]);
  EXPECT_EQ(c.head_dim, ref["head_dim"]);
  EXPECT_FLOAT_EQ(c.rope_theta, ref["rope_theta"].get<float>());
  EXPECT_EQ(c.vocab_size, 49152);
  EXPECT_TRUE(c.tie_word_embeddings);
}

TEST_F(SmolLM2Test, PromptsTokenizeAndGiveTheReferenceLogits) {
  const Tokenizer& tok = model_->tokenizer();
  for (const auto& p : (*fixture_)["prompts"]) {
    SCOPED_TRACE(p["name"].get<std::string>());
    auto ids = p["token_ids"].get<std::vector<int32_t>>();
    if (p.contains("messages")) {
      std::vector<ChatMessage> msgs;
      for (const auto& m : p["messages"]) msgs.push_back({m["role"], m["content"]});
      ASSERT_OK_AND_ASSIGN(std::string text, tok.ApplyChatTemplate(msgs, true));
      EXPECT_EQ(text, p["text"].get<std::string>());
    }
    EXPECT_EQ(tok.Encode(p["text"].get<std::string>(), tok.spec().add_bos), ids);

    auto cache = KvCache::Create(model_->config(), (ids.size() + 15) / 16, 16);
    ASSERT_OK(cache);
    ForwardBatch b;
    b.tokens = ids;
    b.max_blocks_per_seq = cache->num_blocks();
    for (int64_t i = 0; i < cache->num_blocks(); ++i)
      b.block_tables.push_back(*cache->AllocateBlock());
    for (size_t i = 0; i < ids.size(); ++i) {
      b.positions.push_back(static_cast<int32_t>(i));
      b.token_seq.push_back(0);
      b.logit_rows.push_back(static_cast<int32_t>(i));
    }
    std::vector<float> logits;
    ASSERT_OK(model_->Forward(b, &*cache, &logits));
    const int64_t vocab = model_->config().vocab_size;
    // Last position: every logit.
    const auto& l = p["logits"];
    std::vector<float> want(vocab);
    std::memcpy(want.data(), data_->data() + l["offset_bytes"].get<size_t>(), vocab * 4);
    std::vector<float> got(logits.end() - vocab, logits.end());
    EXPECT_TRUE(AllClose(got, want, testing::kF32ModelLogits)) << "regenerate: " << Regenerate();
    // Every position: the same argmax wherever the reference's top-2 margin is not a near-tie.
    auto argmax = p["argmax"].get<std::vector<int32_t>>();
    auto margin = p["argmax_margin"].get<std::vector<double>>();
    for (size_t pos = 0; pos < ids.size(); ++pos) {
      const float* row = logits.data() + pos * vocab;
      int32_t best = static_cast<int32_t>(std::max_element(row, row + vocab) - row);
      if (margin[pos] > 0.01) {
        EXPECT_EQ(best, argmax[pos]) << "position " << pos;
      }
    }
  }
}

TEST_F(SmolLM2Test, GreedyContinuationsMatchTransformers) {
  for (const auto& g : (*fixture_)["greedy"]) {
    SCOPED_TRACE(g["name"].get<std::string>());
    GenerateOptions o;
    o.max_tokens = g["max_tokens"];
    o.ignore_eos = true;  // the reference generated past EOS
    ASSERT_OK_AND_ASSIGN(GenerateResult r,
                         Generate(*model_, g["prompt_token_ids"].get<std::vector<int32_t>>(), o));
    std::vector<int32_t> got;
    for (const auto& t : r.tokens) got.push_back(t.token_id);
    EXPECT_EQ(got, g["token_ids"].get<std::vector<int32_t>>());
    EXPECT_GE(got.size(), 32u);
  }
}

TEST_F(SmolLM2Test, ChatAnswerStopsAtEndOfTurn) {
  // Without ignore_eos the answer ends at <|im_end|> with the reference's text.
  for (const auto& g : (*fixture_)["greedy"]) {
    if (g["first_eos_index"].is_null()) continue;
    GenerateOptions o;
    o.max_tokens = g["max_tokens"];
    ASSERT_OK_AND_ASSIGN(GenerateResult r,
                         Generate(*model_, g["prompt_token_ids"].get<std::vector<int32_t>>(), o));
    EXPECT_EQ(r.finish_reason, "eos");
    EXPECT_EQ(r.text, g["text_until_eos"].get<std::string>());
  }
}

}  // namespace
}  // namespace loraplex::model
