// The forward pass against references no one here wrote: the 60-token greedy story of stories260K
// (../shared/models/stories260K/golden-greedy.json), from both the GGUF and the HF copy.
#include <fstream>

#include "model/generate.h"
#include "model/llama_model.h"
#include "nlohmann/json.hpp"
#include "tests/testing/testing.h"

namespace loraplex::model {
namespace {

using ::loraplex::testing::AllClose;
using ::loraplex::testing::StatusIs;
using ::loraplex::testing::Stories260KDir;

struct Golden {
  std::vector<int32_t> ids;
  std::string text;
};

Golden LoadGolden() {
  std::ifstream in(Stories260KDir() + "/golden-greedy.json");
  nlohmann::json j = nlohmann::json::parse(in);
  return {j["greedy_ids_after_bos"].get<std::vector<int32_t>>(), j["text"].get<std::string>()};
}

std::unique_ptr<LlamaModel> LoadOrDie(const std::string& path, LoadOptions opts) {
  auto m = LlamaModel::Load(path, opts);
  EXPECT_OK(m);
  return m.ok() ? std::move(m).value() : nullptr;
}

std::vector<int32_t> Ids(const GenerateResult& r) {
  std::vector<int32_t> ids;
  for (const auto& t : r.tokens) ids.push_back(t.token_id);
  return ids;
}

GenerateOptions Greedy(int n) {
  GenerateOptions o;
  o.max_tokens = n;
  o.ignore_eos = true;
  return o;
}

TEST(Stories260KTest, GgufReproducesGoldenGreedyStory) {
  Golden g = LoadGolden();
  auto m = LoadOrDie(Stories260KDir() + "/stories260K.gguf", {kernels::DType::kF32});
  ASSERT_NE(m, nullptr);
  EXPECT_EQ(m->config().num_layers, 5);
  EXPECT_EQ(m->config().num_kv_heads, 4);
  ASSERT_OK_AND_ASSIGN(GenerateResult r, Generate(*m, {1}, Greedy(60)));
  EXPECT_EQ(Ids(r), g.ids);
  EXPECT_EQ(r.text, g.text);
}

TEST(Stories260KTest, HfCopyReproducesGoldenGreedyStory) {
  Golden g = LoadGolden();
  LoadOptions opts{kernels::DType::kF32};
  opts.require_tokenizer = false;
  auto m = LoadOrDie(Stories260KDir(), opts);
  ASSERT_NE(m, nullptr);
  EXPECT_FALSE(m->has_tokenizer());
  ASSERT_OK_AND_ASSIGN(GenerateResult r, Generate(*m, {1}, Greedy(60)));
  EXPECT_EQ(Ids(r), g.ids);
}

TEST(Stories260KTest, HfCopyWithoutTokenizerIsNotFoundUnlessAllowed) {
  EXPECT_THAT(LlamaModel::Load(Stories260KDir(), {kernels::DType::kF32}),
              StatusIs(absl::StatusCode::kNotFound, "tokenizer"));
  LoadOptions opts{kernels::DType::kF32};
  opts.tokenizer_path = Stories260KDir() + "/stories260K.gguf";
  auto m = LoadOrDie(Stories260KDir(), opts);
  ASSERT_NE(m, nullptr);
  EXPECT_TRUE(m->has_tokenizer());
}

// Logits of every position of a prompt, one sequence, one forward step.
std::vector<float> PromptLogits(LlamaModel& m, const std::vector<int32_t>& ids) {
  auto cache = KvCache::Create(m.config(), 8, 16);
  EXPECT_OK(cache);
  ForwardBatch b;
  b.tokens = ids;
  b.max_blocks_per_seq = 8;
  for (int i = 0; i < 8; ++i) b.block_tables.push_back(*cache->AllocateBlock());
  for (size_t i = 0; i < ids.size(); ++i) {
    b.positions.push_back(static_cast<int32_t>(i));
    b.token_seq.push_back(0);
    b.logit_rows.push_back(static_cast<int32_t>(i));
  }
  std::vector<float> logits;
  EXPECT_OK(m.Forward(b, &*cache, &logits));
  return logits;
}

TEST(Stories260KTest, GgufAndHfCopyGiveTheSameLogits) {
  // The GGUF stores q/k rows permuted for adjacent-pair RoPE; un-permuting at load must make the
  // two files one model.
  LoadOptions hf_opts{kernels::DType::kF32};
  hf_opts.require_tokenizer = false;
  auto gguf = LoadOrDie(Stories260KDir() + "/stories260K.gguf", {kernels::DType::kF32});
  auto hf = LoadOrDie(Stories260KDir(), hf_opts);
  ASSERT_TRUE(gguf && hf);
  std::vector<int32_t> ids = {1, 403, 407, 261, 378, 432, 383, 286};
  EXPECT_TRUE(
      AllClose(PromptLogits(*gguf, ids), PromptLogits(*hf, ids), testing::kF32KernelVsReference));
}

TEST(Stories260KTest, Bf16StaysCloseToF32) {
  auto f32 = LoadOrDie(Stories260KDir() + "/stories260K.gguf", {kernels::DType::kF32});
  auto bf16 = LoadOrDie(Stories260KDir() + "/stories260K.gguf", {kernels::DType::kBF16});
  ASSERT_TRUE(f32 && bf16);
  // Matrices halve; the f32 norms stay.
  EXPECT_LT(bf16->weight_bytes(), f32->weight_bytes() * 6 / 10);
  std::vector<int32_t> ids = {1, 403, 407, 261, 378, 432};
  EXPECT_TRUE(
      AllClose(PromptLogits(*bf16, ids), PromptLogits(*f32, ids), testing::kBf16ModelLogits));
}

TEST(ForwardTest, MixedPrefillAndDecodeBatchEqualsSoloRuns) {
  auto m = LoadOrDie(Stories260KDir() + "/stories260K.gguf", {kernels::DType::kF32});
  ASSERT_NE(m, nullptr);
  // Solo: sequence A = 5 prompt tokens then 1 decode token; sequence B = 7 prompt tokens.
  std::vector<int32_t> a = {1, 403, 407, 261, 378, 432};
  std::vector<int32_t> bseq = {1, 286, 261, 376, 298, 315, 421};
  std::vector<float> solo_a = PromptLogits(*m, a);
  std::vector<float> solo_b = PromptLogits(*m, bseq);
  const int64_t vocab = m->config().vocab_size;

  ASSERT_OK_AND_ASSIGN(KvCache cache, KvCache::Create(m->config(), 16, 4));
  ForwardBatch step1;
  step1.max_blocks_per_seq = 4;
  // Non-contiguous block tables: A gets blocks 0, 2; B gets 1, 3 (allocation interleaved).
  std::vector<int32_t> blocks;
  for (int i = 0; i < 8; ++i) blocks.push_back(*cache.AllocateBlock());
  step1.block_tables = {blocks[0], blocks[2], blocks[4], blocks[6],
                        blocks[1], blocks[3], blocks[5], blocks[7]};
  // Step 1: prefill A's first 5 tokens.
  for (int i = 0; i < 5; ++i) {
    step1.tokens.push_back(a[i]);
    step1.positions.push_back(i);
    step1.token_seq.push_back(0);
  }
  step1.logit_rows = {4};
  std::vector<float> logits;
  ASSERT_OK(m->Forward(step1, &cache, &logits));
  EXPECT_TRUE(AllClose(std::vector<float>(logits.begin(), logits.begin() + vocab),
                       std::vector<float>(solo_a.begin() + 4 * vocab, solo_a.begin() + 5 * vocab),
                       testing::kF32KernelVsReference));
  // Step 2: decode A's 6th token and prefill all of B in the same batch.
  ForwardBatch step2 = step1;
  step2.tokens = {a[5]};
  step2.positions = {5};
  step2.token_seq = {0};
  for (size_t i = 0; i < bseq.size(); ++i) {
    step2.tokens.push_back(bseq[i]);
    step2.positions.push_back(static_cast<int32_t>(i));
    step2.token_seq.push_back(1);
  }
  step2.logit_rows = {0, static_cast<int32_t>(bseq.size())};
  ASSERT_OK(m->Forward(step2, &cache, &logits));
  EXPECT_TRUE(AllClose(std::vector<float>(logits.begin(), logits.begin() + vocab),
                       std::vector<float>(solo_a.begin() + 5 * vocab, solo_a.end()),
                       testing::kF32KernelVsReference));
  EXPECT_TRUE(AllClose(std::vector<float>(logits.begin() + vocab, logits.end()),
                       std::vector<float>(solo_b.end() - vocab, solo_b.end()),
                       testing::kF32KernelVsReference));
}

TEST(ForwardTest, BadBatchesAreRejected) {
  auto m = LoadOrDie(Stories260KDir() + "/stories260K.gguf", {kernels::DType::kF32});
  ASSERT_NE(m, nullptr);
  ASSERT_OK_AND_ASSIGN(KvCache cache, KvCache::Create(m->config(), 4, 16));
  ForwardBatch b;
  b.max_blocks_per_seq = 1;
  b.block_tables = {*cache.AllocateBlock()};
  b.tokens = {1};
  b.positions = {0};
  b.token_seq = {0};
  b.logit_rows = {0};
  std::vector<float> logits;
  ASSERT_OK(m->Forward(b, &cache, &logits));
  ForwardBatch bad = b;
  bad.tokens = {512};
  EXPECT_THAT(m->Forward(bad, &cache, &logits),
              StatusIs(absl::StatusCode::kInvalidArgument, "vocabulary"));
  bad = b;
  bad.positions = {16};  // past the one block in the table
  EXPECT_THAT(m->Forward(bad, &cache, &logits), StatusIs(absl::StatusCode::kInvalidArgument));
  bad = b;
  bad.block_tables = {3};  // never allocated
  EXPECT_THAT(m->Forward(bad, &cache, &logits),
              StatusIs(absl::StatusCode::kInvalidArgument, "not allocated"));
  bad = b;
  bad.token_adapter = {0};  // no adapters given
  EXPECT_THAT(m->Forward(bad, &cache, &logits), StatusIs(absl::StatusCode::kInvalidArgument));
  // The samplers' Forward: top_k outside [0, kMaxTopLogits]; on the CPU whole rows come back.
  StepLogits step;
  EXPECT_THAT(m->Forward(b, &cache, LlamaModel::kMaxTopLogits + 1, &step),
              StatusIs(absl::StatusCode::kInvalidArgument, "top_k"));
  EXPECT_THAT(m->Forward(b, &cache, -1, &step), StatusIs(absl::StatusCode::kInvalidArgument));
  ASSERT_OK(m->Forward(b, &cache, 5, &step));
  EXPECT_EQ(step.k, 0);
  EXPECT_EQ(step.vocab, m->config().vocab_size);
  EXPECT_EQ(step.logits, logits);
  EXPECT_THAT(Generate(*m, {}, Greedy(4)), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(Generate(*m, {1}, Greedy(static_cast<int>(m->config().max_position_embeddings))),
              StatusIs(absl::StatusCode::kResourceExhausted, "context"));
}

TEST(GenerateTest, StopStringsEndTheTextAndSeedsRepeat) {
  auto m = LoadOrDie(Stories260KDir() + "/stories260K.gguf", {kernels::DType::kF32});
  ASSERT_NE(m, nullptr);
  GenerateOptions o = Greedy(60);
  o.stop = {"Lily"};
  std::string streamed;
  ASSERT_OK_AND_ASSIGN(GenerateResult r,
                       Generate(*m, {1}, o, [&](const std::string& d) { streamed += d; }));
  EXPECT_EQ(r.finish_reason, "stop");
  EXPECT_EQ(r.text, " Once upon a time, there was a little girl named ");
  EXPECT_EQ(streamed, r.text);

  GenerateOptions s;
  s.max_tokens = 30;
  s.sampling.temperature = 0.9f;
  s.sampling.top_p = 0.9f;
  s.sampling.top_k = 40;
  s.sampling.seed = 1234;
  s.sampling.logprobs = 3;
  ASSERT_OK_AND_ASSIGN(GenerateResult r1, Generate(*m, {1}, s));
  ASSERT_OK_AND_ASSIGN(GenerateResult r2, Generate(*m, {1}, s));
  EXPECT_EQ(Ids(r1), Ids(r2));
  ASSERT_EQ(r1.tokens[0].top.size(), 3u);
  EXPECT_GE(r1.tokens[0].top[0].logprob, r1.tokens[0].top[1].logprob);
  s.sampling.seed = 99;
  ASSERT_OK_AND_ASSIGN(GenerateResult r3, Generate(*m, {1}, s));
  EXPECT_NE(Ids(r1), Ids(r3));
}

}  // namespace
}  // namespace loraplex::model
