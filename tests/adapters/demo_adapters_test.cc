// The trained demo adapters of adapters/examples/ (made by tools/train_demo_adapters.py) through
// the C++ library: on prompts that were held out of their training, SmolLM2-135M-Instruct answers
// in upper case with upper/ and ends with " -- Loraplex" with signoff/, and the base model does
// neither. Greedy, 64 new tokens, bf16 weights: the same settings as the script's final check,
// whose results are in adapters/examples/CHECK.json. Skipped when models/ lacks the GGUF.

#include <gtest/gtest.h>

#include <cctype>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "adapters/lora_adapter.h"
#include "model/generate.h"
#include "model/llama_model.h"
#include "tests/testing/testing.h"

namespace loraplex::adapters {
namespace {

constexpr const char* kModel = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
constexpr const char* kRetrain =
    "retrain with: nice -n 5 python3 tools/train_demo_adapters.py (see "
    "adapters/examples/README.md)";
constexpr const char* kSignoff = " -- Loraplex";
constexpr int kMaxTokens = 64;  // the script's CHECK_TOKENS

// The first three of the script's HELDOUT prompts: never in its training or validation data.
const std::vector<std::string>& HeldOutPrompts() {
  static const auto* prompts = new std::vector<std::string>{
      "What is a lighthouse?",
      "Tell me one fact about owls.",
      "Why do people like swimming?",
  };
  return *prompts;
}

// Fraction of the letters of `text` that are upper case (ASCII; the answers are English).
double UpperFraction(const std::string& text) {
  int letters = 0, upper = 0;
  for (unsigned char c : text) {
    if (std::isalpha(c)) {
      ++letters;
      upper += std::isupper(c) ? 1 : 0;
    }
  }
  return letters == 0 ? 0.0 : static_cast<double>(upper) / letters;
}

bool EndsWithSignoff(const std::string& text) {
  std::string t = text;
  while (!t.empty() && std::isspace(static_cast<unsigned char>(t.back()))) t.pop_back();
  return absl::EndsWith(t, kSignoff);
}

class DemoAdaptersTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    if (!std::filesystem::exists(kModel)) return;
    auto m = model::LlamaModel::Load(kModel);
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(m).value().release();
  }
  static void TearDownTestSuite() {
    delete model_;
    model_ = nullptr;
  }

  void SetUp() override {
    LP_SKIP_UNLESS_MODEL_EXISTS(kModel);
    ASSERT_NE(model_, nullptr) << "loading " << kModel << " failed (see above)";
  }

  static std::unique_ptr<LoraAdapter> LoadAdapter(const std::string& name) {
    const std::string dir = "adapters/examples/" + name;
    AdapterLoadOptions opts;
    opts.dtype = model_->adapter_dtype();
    auto a = LoraAdapter::Load(dir, model_->config(), opts);
    EXPECT_TRUE(a.ok()) << dir << ": " << a.status() << "; " << kRetrain;
    return a.ok() ? std::move(a).value() : nullptr;
  }

  // The greedy answer to `prompt` as a chat turn, through `adapter` (nullptr: the base model).
  static std::string Answer(const std::string& prompt, const LoraAdapter* adapter) {
    const model::Tokenizer& tok = model_->tokenizer();
    auto text = tok.ApplyChatTemplate({{"user", prompt}}, /*add_generation_prompt=*/true);
    EXPECT_TRUE(text.ok()) << text.status();
    if (!text.ok()) return "";
    model::GenerateOptions opts;
    opts.max_tokens = kMaxTokens;
    opts.adapter = adapter == nullptr ? nullptr : &adapter->view();
    auto r = model::Generate(*model_, tok.Encode(*text, tok.spec().add_bos), opts);
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? r->text : "";
  }

  static model::LlamaModel* model_;
};

model::LlamaModel* DemoAdaptersTest::model_ = nullptr;

TEST_F(DemoAdaptersTest, UpperAnswersHeldOutPromptsInUpperCase) {
  auto upper = LoadAdapter("upper");
  ASSERT_NE(upper, nullptr);
  for (const std::string& prompt : HeldOutPrompts()) {
    const std::string answer = Answer(prompt, upper.get());
    EXPECT_GE(UpperFraction(answer), 0.9) << prompt << " -> " << answer << "\n" << kRetrain;
  }
}

TEST_F(DemoAdaptersTest, SignoffEndsHeldOutAnswersWithTheSignoff) {
  auto signoff = LoadAdapter("signoff");
  ASSERT_NE(signoff, nullptr);
  for (const std::string& prompt : HeldOutPrompts()) {
    const std::string answer = Answer(prompt, signoff.get());
    EXPECT_TRUE(EndsWithSignoff(answer)) << prompt << " -> " << answer << "\n" << kRetrain;
  }
}

// Without this the two tests above could pass on a base model that already writes that way.
TEST_F(DemoAdaptersTest, BaseModelShowsNeitherEffect) {
  for (const std::string& prompt : HeldOutPrompts()) {
    const std::string answer = Answer(prompt, nullptr);
    EXPECT_LT(UpperFraction(answer), 0.5) << prompt << " -> " << answer;
    EXPECT_FALSE(EndsWithSignoff(answer)) << prompt << " -> " << answer;
  }
}

// The two adapters are different adapters: each leaves the other's effect out.
TEST_F(DemoAdaptersTest, EachAdapterShowsOnlyItsOwnEffect) {
  auto upper = LoadAdapter("upper");
  auto signoff = LoadAdapter("signoff");
  ASSERT_NE(upper, nullptr);
  ASSERT_NE(signoff, nullptr);
  const std::string& prompt = HeldOutPrompts()[0];
  const std::string up = Answer(prompt, upper.get());
  const std::string so = Answer(prompt, signoff.get());
  EXPECT_FALSE(EndsWithSignoff(up)) << up;
  EXPECT_LT(UpperFraction(so), 0.5) << so;
}

}  // namespace
}  // namespace loraplex::adapters
