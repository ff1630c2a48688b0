// Tokenizer tests against references made by tools/make_tokenizer_fixtures.py (HF transformers'
// GGUF conversion and the `tokenizers` package). On a mismatch after a deliberate change,
// regenerate with: python3 tools/make_tokenizer_fixtures.py
#include "model/tokenizer.h"

#include <glob.h>

#include <cstdio>
#include <fstream>
#include <sstream>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "formats/gguf.h"
#include "nlohmann/json.hpp"
#include "tests/testing/testing.h"
#include "unicode/ustring.h"

namespace loraplex::model {
namespace {

using ::loraplex::testing::FixturesDir;
using ::loraplex::testing::StatusIs;
using nlohmann::json;

constexpr char kRegen[] = "regenerate with: python3 tools/make_tokenizer_fixtures.py";

json ReadJson(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "missing fixture " << path << "; " << kRegen;
  std::stringstream ss;
  ss << in.rdbuf();
  return json::parse(ss.str(), nullptr, false);
}

std::string TokDir() { return FixturesDir() + "/tokenizer"; }

struct Case {
  std::string text;
  std::vector<int32_t> ids;
};

// `key` selects the reference ids: "ids", or another flavour's ("ids_gpt2", "ids_llama3").
std::vector<Case> LoadCases(const std::string& name, const char* key = "ids") {
  json j = ReadJson(TokDir() + "/" + name);
  std::vector<Case> cases;
  if (!j.is_object()) return cases;
  for (const json& c : j["cases"]) {
    cases.push_back({c["text"].get<std::string>(), c[key].get<std::vector<int32_t>>()});
  }
  return cases;
}

std::string Ids(const std::vector<int32_t>& ids) { return "[" + absl::StrJoin(ids, ",") + "]"; }

// Valid UTF-8 by ICU's converter (an implementation independent of the one under test).
bool IsValidUtf8(const std::string& s) {
  UErrorCode status = U_ZERO_ERROR;
  int32_t len = 0;
  u_strFromUTF8(nullptr, 0, &len, s.data(), static_cast<int32_t>(s.size()), &status);
  return status == U_BUFFER_OVERFLOW_ERROR || status == U_STRING_NOT_TERMINATED_WARNING ||
         U_SUCCESS(status);
}

bool ContainsAny(const std::string& s, const std::vector<std::string>& specials) {
  for (const auto& sp : specials) {
    if (s.find(sp) != std::string::npos) return true;
  }
  return false;
}

// Every id equals the reference; failures name the string and both id lists.
void ExpectIdsMatch(const Tokenizer& tok, const std::vector<Case>& cases, const char* fixture) {
  ASSERT_GE(cases.size(), 300u) << fixture;
  int bad = 0;
  for (const Case& c : cases) {
    const std::vector<int32_t> got = tok.Encode(c.text, /*add_bos=*/false);
    if (got != c.ids && ++bad <= 10) {
      ADD_FAILURE() << fixture << ": text '" << c.text << "'\n  got      " << Ids(got)
                    << "\n  expected " << Ids(c.ids) << "\n"
                    << kRegen;
    }
  }
  EXPECT_EQ(bad, 0) << bad << " of " << cases.size() << " strings differ in " << fixture;
}

// Push/Flush reproduce Decode, and no chunk ever carries a partial character.
void ExpectStreamingMatchesDecode(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  StreamDecoder stream(&tok);
  std::string all;
  for (int32_t id : ids) {
    const std::string chunk = stream.Push(id);
    ASSERT_TRUE(IsValidUtf8(chunk)) << "partial UTF-8 after id " << id << " of " << Ids(ids);
    all += chunk;
  }
  const std::string rest = stream.Flush();
  ASSERT_TRUE(IsValidUtf8(rest));
  all += rest;
  EXPECT_EQ(all, tok.Decode(ids)) << Ids(ids);
}

class SmolLm2Test : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto t = Tokenizer::FromHfDir(TokDir() + "/smollm2");
    ASSERT_TRUE(t.ok()) << t.status().ToString() << "; " << kRegen;
    tok_ = t->release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    tok_ = nullptr;
  }
  static inline Tokenizer* tok_ = nullptr;
  const std::vector<std::string> specials_ = {"<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                              "<file_sep>", "<repo_name>"};
};

TEST_F(SmolLm2Test, SpecAsLoaded) {
  EXPECT_EQ(tok_->vocab_size(), 49152);
  EXPECT_EQ(tok_->spec().kind, TokenizerSpec::Kind::kByteLevelBpe);
  EXPECT_EQ(tok_->spec().pre, "smollm");
  EXPECT_EQ(tok_->bos_id(), 1);  // <|im_start|>
  EXPECT_EQ(tok_->eos_id(), 2);  // <|im_end|>
  EXPECT_FALSE(tok_->spec().add_bos);
  EXPECT_TRUE(tok_->IsEndOfGeneration(2));
  EXPECT_TRUE(tok_->IsEndOfGeneration(0));  // <|endoftext|>
  EXPECT_FALSE(tok_->IsEndOfGeneration(1));
  EXPECT_EQ(tok_->PieceToId("<|im_start|>"), 1);
  EXPECT_EQ(tok_->PieceToId("no such piece"), -1);
  EXPECT_EQ(tok_->Piece(1), "<|im_start|>");
  EXPECT_EQ(tok_->Piece(-1), "");
  EXPECT_EQ(tok_->Piece(49152), "");
}

TEST_F(SmolLm2Test, IdsEqualHfTokenizers) {
  ExpectIdsMatch(*tok_, LoadCases("smollm2_ids.json"), "smollm2_ids.json");
}

TEST_F(SmolLm2Test, OtherPreTokenizerFlavoursEqualHfTokenizers) {
  // The same vocabulary behind the plain GPT-2 regex and behind Llama 3's regex with
  // ignore_merges: checks the "gpt2" and "llama3" flavours against HF's regex engine.
  TokenizerSpec gpt2 = tok_->spec();
  gpt2.pre = "gpt2";
  ASSERT_OK_AND_ASSIGN(auto gpt2_tok, Tokenizer::Create(gpt2));
  ExpectIdsMatch(*gpt2_tok, LoadCases("smollm2_ids.json", "ids_gpt2"), "smollm2_ids.json gpt2");
  TokenizerSpec llama3 = tok_->spec();
  llama3.pre = "llama3";
  llama3.ignore_merges = true;
  ASSERT_OK_AND_ASSIGN(auto llama3_tok, Tokenizer::Create(llama3));
  ExpectIdsMatch(*llama3_tok, LoadCases("smollm2_ids.json", "ids_llama3"),
                 "smollm2_ids.json llama3");
}

TEST_F(SmolLm2Test, DigitsAreIsolated) {
  // "smollm" differs from the plain GPT-2 regex here: two spaces merge into one token when the
  // digits that follow are split off first.
  const std::vector<int32_t> ids = tok_->Encode("  456", false);
  ASSERT_EQ(ids.size(), 4u) << Ids(ids);
  EXPECT_EQ(tok_->Piece(ids[0]), "\xC4\xA0\xC4\xA0");  // "ĠĠ"
}

TEST_F(SmolLm2Test, DecodeInvertsEncode) {
  for (const Case& c : LoadCases("smollm2_ids.json")) {
    std::string expected = c.text;
    for (const auto& sp : specials_) {  // control tokens render as nothing
      for (size_t p; (p = expected.find(sp)) != std::string::npos;) expected.erase(p, sp.size());
    }
    EXPECT_EQ(tok_->Decode(tok_->Encode(c.text, false)), expected);
    EXPECT_EQ(tok_->Decode(c.ids), expected);
  }
}

TEST_F(SmolLm2Test, IllFormedUtf8KeepsItsBytes) {
  // The regexes see U+FFFD, the tokens keep the original bytes.
  const std::string text = "a\xE2\x82 b\xC3 \xF0\x9F\x98 \xE2\x28\xA1!\x80";
  EXPECT_EQ(tok_->DecodeBytes(tok_->Encode(text, false)), text);
  EXPECT_EQ(tok_->Decode(tok_->Encode(text, false)), SanitizeUtf8(text));
  // 0xFF has no byte-level piece in this vocabulary: dropped, never mapped to <|endoftext|>.
  EXPECT_EQ(tok_->PieceToId("\xC3\xBF"), -1);  // "ÿ"
  std::vector<int32_t> x_then_y = tok_->Encode("x", false);
  for (int32_t id : tok_->Encode("y", false)) x_then_y.push_back(id);
  EXPECT_EQ(tok_->Encode("x\xFFy", false), x_then_y);
}

TEST_F(SmolLm2Test, StreamingNeverSplitsACharacter) {
  // A ZWJ family emoji is 25 bytes; byte-level BPE cuts it inside characters.
  const std::vector<int32_t> family = tok_->Encode("👨‍👩‍👧‍👦 and 🇺🇸", false);
  bool splits_inside = false;
  for (int32_t id : family) splits_inside |= !IsValidUtf8(tok_->DecodeBytes({id}));
  ASSERT_TRUE(splits_inside) << "the test string no longer exercises partial tokens";
  ExpectStreamingMatchesDecode(*tok_, family);
  for (const Case& c : LoadCases("smollm2_ids.json")) ExpectStreamingMatchesDecode(*tok_, c.ids);
}

TEST_F(SmolLm2Test, StreamingHoldsBackThenReleases) {
  StreamDecoder stream(tok_);
  // "😀" is F0 9F 98 80; feed it one single-byte token at a time.
  std::vector<int32_t> bytes;
  for (char b : std::string("\xF0\x9F\x98\x80")) {
    int32_t found = -1;
    for (int32_t id = 0; id < tok_->vocab_size() && found < 0; ++id) {
      if (tok_->DecodeBytes({id}) == std::string(1, b)) found = id;
    }
    ASSERT_GE(found, 0) << "no token for byte " << static_cast<int>(static_cast<uint8_t>(b));
    bytes.push_back(found);
  }
  ASSERT_EQ(tok_->DecodeBytes(bytes), "\xF0\x9F\x98\x80");
  EXPECT_EQ(stream.Push(bytes[0]), "");
  EXPECT_EQ(stream.Push(bytes[1]), "");
  EXPECT_EQ(stream.Push(bytes[2]), "");
  EXPECT_EQ(stream.Push(bytes[3]), "😀");
  // A lone continuation byte is invalid at once; an unfinished lead byte is flushed as U+FFFD.
  EXPECT_EQ(stream.Push(bytes[1]), "\xEF\xBF\xBD");
  EXPECT_EQ(stream.Push(bytes[0]), "");
  EXPECT_EQ(stream.Flush(), "\xEF\xBF\xBD");
  EXPECT_EQ(stream.Flush(), "");
}

TEST_F(SmolLm2Test, ChatTemplateEqualsTransformers) {
  // Covered with the other templates below; here the model's own template and its default
  // system prompt.
  auto text = tok_->ApplyChatTemplate({{"user", "Hello!"}}, true);
  ASSERT_OK(text);
  EXPECT_EQ(*text,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
            "Face<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n");
}

TEST_F(SmolLm2Test, ConcurrentEncodeIsDeterministic) {
  const std::vector<Case> cases = LoadCases("smollm2_ids.json");
  std::vector<std::thread> threads;
  std::vector<int> bad(4, 0);
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      for (size_t i = t; i < cases.size(); i += 2) {
        if (tok_->Encode(cases[i].text, false) != cases[i].ids) ++bad[t];
      }
    });
  }
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) EXPECT_EQ(bad[t], 0) << "thread " << t;
}

TEST(Utf8Test, SanitizeEqualsPythonReplace) {
  json j = ReadJson(TokDir() + "/utf8_decode.json");
  ASSERT_TRUE(j.is_object());
  int n = 0;
  for (const json& c : j["cases"]) {
    const std::string hex = c["hex"].get<std::string>();
    std::string bytes;
    for (size_t i = 0; i + 1 < hex.size(); i += 2) {
      bytes.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
    }
    EXPECT_EQ(SanitizeUtf8(bytes), c["text"].get<std::string>()) << "bytes " << hex;
    ++n;
  }
  EXPECT_GT(n, 40);
}

TEST(ChatTemplateTest, EqualsTransformersRendering) {
  json j = ReadJson(TokDir() + "/chat_templates.json");
  ASSERT_TRUE(j.is_object());
  for (const json& t : j["templates"]) {
    TokenizerSpec spec;
    spec.kind = TokenizerSpec::Kind::kByteLevelBpe;
    spec.tokens = {t["bos_token"].get<std::string>(), t["eos_token"].get<std::string>()};
    spec.token_types = {TokenizerSpec::kControl, TokenizerSpec::kControl};
    spec.bos_id = 0;
    spec.eos_id = 1;
    spec.chat_template = t["template"].get<std::string>();
    ASSERT_OK_AND_ASSIGN(auto tok, Tokenizer::Create(spec));
    for (const json& c : t["cases"]) {
      std::vector<ChatMessage> messages;
      for (const json& m : c["messages"]) {
        messages.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
      }
      auto got = tok->ApplyChatTemplate(messages, c["add_generation_prompt"].get<bool>());
      const std::string where = t["name"].get<std::string>() + " " + c["messages"].dump() +
                                (c["add_generation_prompt"].get<bool>() ? " +gen" : "");
      if (c.contains("error")) {
        EXPECT_THAT(got, StatusIs(absl::StatusCode::kInvalidArgument)) << where;
      } else {
        ASSERT_OK(got) << where;
        EXPECT_EQ(*got, c["text"].get<std::string>()) << where << "; " << kRegen;
      }
    }
  }
}

TEST(ChatTemplateTest, UnknownTemplateIsUnimplemented) {
  TokenizerSpec spec;
  spec.kind = TokenizerSpec::Kind::kByteLevelBpe;
  spec.tokens = {"a"};
  spec.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}";
  ASSERT_OK_AND_ASSIGN(auto tok, Tokenizer::Create(spec));
  EXPECT_THAT(tok->ApplyChatTemplate({{"user", "x"}}, false),
              StatusIs(absl::StatusCode::kUnimplemented));
  // No template at all: plain ChatML without a default system prompt.
  spec.chat_template.clear();
  ASSERT_OK_AND_ASSIGN(auto plain, Tokenizer::Create(spec));
  EXPECT_EQ(plain->ApplyChatTemplate({{"user", "x"}}, true).value(),
            "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n");
}

// --- malformed input -----------------------------------------------------------------------------

TokenizerSpec TinyBpe() {
  TokenizerSpec spec;
  spec.kind = TokenizerSpec::Kind::kByteLevelBpe;
  spec.tokens = {"a", "b", "ab", "<eos>"};
  spec.token_types = {1, 1, 1, 3};
  spec.merges = {"a b"};
  spec.eos_id = 3;
  return spec;
}

TEST(TokenizerSpecTest, TinyBpeWorks) {
  ASSERT_OK_AND_ASSIGN(auto tok, Tokenizer::Create(TinyBpe()));
  EXPECT_EQ(tok->Encode("abab<eos>a", false), (std::vector<int32_t>{2, 2, 3, 0}));
  EXPECT_EQ(tok->Decode({2, 3, 0}), "aba");
}

TEST(TokenizerSpecTest, MalformedSpecsAreRefused) {
  const auto kInvalid = absl::StatusCode::kInvalidArgument;
  TokenizerSpec s = TinyBpe();
  s.tokens.clear();
  s.token_types.clear();
  EXPECT_THAT(Tokenizer::Create(s), StatusIs(kInvalid, "empty vocabulary"));
  s = TinyBpe();
  s.merges = {"a c"};
  EXPECT_THAT(Tokenizer::Create(s), StatusIs(kInvalid, "outside the vocabulary"));
  s = TinyBpe();
  s.merges = {"ab"};
  EXPECT_THAT(Tokenizer::Create(s), StatusIs(kInvalid, "is not 'left right'"));
  s = TinyBpe();
  s.merges = {"b b"};  // "bb" is not a piece
  EXPECT_THAT(Tokenizer::Create(s), StatusIs(kInvalid, "outside the vocabulary"));
  s = TinyBpe();
  s.eos_id = 4;
  EXPECT_THAT(Tokenizer::Create(s), StatusIs(kInvalid, "eos id 4"));
  s = TinyBpe();
  s.bos_id = -7;
  EXPECT_THAT(Tokenizer::Create(s), StatusIs(kInvalid, "bos id"));
  s = TinyBpe();
  s.token_types = {1, 1};
  EXPECT_THAT(Tokenizer::Create(s), StatusIs(kInvalid, "token types"));
  s = TinyBpe();
  s.token_types[2] = 9;
  EXPECT_THAT(Tokenizer::Create(s), StatusIs(kInvalid, "unknown type"));
  s = TinyBpe();
  s.scores = {0.f};
  EXPECT_THAT(Tokenizer::Create(s), StatusIs(kInvalid, "scores"));
  s = TinyBpe();
  s.add_bos = true;
  EXPECT_THAT(Tokenizer::Create(s), StatusIs(kInvalid, "no BOS"));
  s = TinyBpe();
  s.extra_eos_ids = {17};
  EXPECT_THAT(Tokenizer::Create(s), StatusIs(kInvalid, "end-of-generation"));
  s = TinyBpe();
  s.pre = "bloom";
  EXPECT_THAT(Tokenizer::Create(s), StatusIs(kInvalid, "bloom"));
  s = TinyBpe();
  s.kind = TokenizerSpec::Kind::kSentencePiece;  // no <unk> and no byte tokens
  EXPECT_THAT(Tokenizer::Create(s), StatusIs(kInvalid, "<0x00>"));
}

void WriteFile(const std::string& path, const std::string& text) {
  std::ofstream(path, std::ios::binary) << text;
}

TEST(HfDirTest, BadFoldersAreRefused) {
  const std::string dir = ::loraplex::testing::MakeTempDir("tok_hf");
  EXPECT_THAT(Tokenizer::FromHfDir(dir), StatusIs(absl::StatusCode::kNotFound, "tokenizer.json"));
  WriteFile(dir + "/tokenizer.json", "{ not json");
  EXPECT_THAT(Tokenizer::FromHfDir(dir),
              StatusIs(absl::StatusCode::kInvalidArgument, "not valid JSON"));
  WriteFile(dir + "/tokenizer.json", R"({"model": {"type": "WordPiece", "vocab": {}}})");
  EXPECT_THAT(Tokenizer::FromHfDir(dir), StatusIs(absl::StatusCode::kUnimplemented, "WordPiece"));
  const std::string ok_head =
      R"({"normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false},)";
  WriteFile(dir + "/tokenizer.json",
            ok_head + R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 2}, "merges": []}})");
  EXPECT_THAT(Tokenizer::FromHfDir(dir),
              StatusIs(absl::StatusCode::kInvalidArgument, "no token has id 1"));
  WriteFile(dir + "/tokenizer.json",
            ok_head + R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a c"]}})");
  EXPECT_THAT(Tokenizer::FromHfDir(dir),
              StatusIs(absl::StatusCode::kInvalidArgument, "outside the vocabulary"));
  WriteFile(
      dir + "/tokenizer.json",
      R"({"pre_tokenizer": {"type": "Whitespace"}, "model": {"type": "BPE", "vocab": {"a": 0}}})");
  EXPECT_THAT(Tokenizer::FromHfDir(dir),
              StatusIs(absl::StatusCode::kUnimplemented, "pre_tokenizer"));
  WriteFile(dir + "/tokenizer.json",
            ok_head + R"("model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": []}})");
  WriteFile(dir + "/tokenizer_config.json", R"({"eos_token": "</s>"})");
  EXPECT_THAT(Tokenizer::FromHfDir(dir),
              StatusIs(absl::StatusCode::kInvalidArgument, "eos_token '</s>'"));
  WriteFile(dir + "/tokenizer_config.json", R"({"eos_token": {"content": "b"}})");
  ASSERT_OK_AND_ASSIGN(auto tok, Tokenizer::FromHfDir(dir));
  EXPECT_EQ(tok->eos_id(), 1);
}

TEST(HfDirTest, ReadsLlama3StyleTokenizerJson) {
  // The pre-tokenizer, post-processor and ignore_merges as Meta's Llama 3 tokenizer.json has them.
  const std::string dir = ::loraplex::testing::MakeTempDir("tok_llama3");
  WriteFile(dir + "/tokenizer.json", R"({
    "added_tokens": [{"id": 3, "content": "<|begin_of_text|>", "special": true},
                     {"id": 4, "content": "<|eot_id|>", "special": true}],
    "normalizer": null,
    "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
       "behavior": "Isolated", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]},
    "post_processor": {"type": "TemplateProcessing",
      "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}}]},
    "model": {"type": "BPE", "ignore_merges": true, "vocab": {"a": 0, "b": 1, "ab": 2},
              "merges": [["a", "b"]]}})");
  WriteFile(dir + "/tokenizer_config.json",
            R"({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})");
  ASSERT_OK_AND_ASSIGN(auto tok, Tokenizer::FromHfDir(dir));
  EXPECT_EQ(tok->spec().pre, "llama3");
  EXPECT_TRUE(tok->spec().ignore_merges);
  EXPECT_TRUE(tok->spec().add_bos);  // from the post-processor
  EXPECT_EQ(tok->bos_id(), 3);
  EXPECT_EQ(tok->Encode("ab<|eot_id|>", true), (std::vector<int32_t>{3, 2, 4}));
  EXPECT_TRUE(tok->IsEndOfGeneration(4));
}

// --- SentencePiece-style: stories260K (GGUF in ../shared) -------------------------------------

class Stories260KTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto gguf =
        formats::GgufFile::Open(::loraplex::testing::Stories260KDir() + "/stories260K.gguf");
    ASSERT_TRUE(gguf.ok()) << gguf.status().ToString();
    auto t = Tokenizer::FromGguf(**gguf);
    ASSERT_TRUE(t.ok()) << t.status().ToString();
    tok_ = t->release();
  }
  static void TearDownTestSuite() {
    delete tok_;
    tok_ = nullptr;
  }
  static inline Tokenizer* tok_ = nullptr;
  const std::vector<std::string> specials_ = {"<unk>", "<s>", "</s>"};
};

TEST_F(Stories260KTest, SpecAsLoaded) {
  EXPECT_EQ(tok_->vocab_size(), 512);
  EXPECT_EQ(tok_->spec().kind, TokenizerSpec::Kind::kSentencePiece);
  EXPECT_EQ(tok_->bos_id(), 1);
  EXPECT_EQ(tok_->eos_id(), 2);
  EXPECT_EQ(tok_->spec().pad_id, -1);  // 0xFFFFFFFF in the file means none
  EXPECT_TRUE(tok_->spec().add_bos);
  EXPECT_TRUE(tok_->spec().add_space_prefix);
  EXPECT_EQ(tok_->Encode("", true), std::vector<int32_t>{1});
  EXPECT_TRUE(tok_->Encode("", false).empty());
}

TEST_F(Stories260KTest, IdsEqualReference) {
  ExpectIdsMatch(*tok_, LoadCases("stories260k_ids.json"), "stories260k_ids.json");
}

TEST_F(Stories260KTest, GoldenStoryRoundTrips) {
  json golden = ReadJson(::loraplex::testing::Stories260KDir() + "/golden-greedy.json");
  const auto ids = golden["greedy_ids_after_bos"].get<std::vector<int32_t>>();
  const std::string text = golden["text"].get<std::string>();
  // The decoded story keeps the space the tokenizer prefixed; encoding the text without it
  // gives back the model's own tokens.
  EXPECT_EQ(tok_->Decode(ids), text);
  ASSERT_EQ(text[0], ' ');
  EXPECT_EQ(tok_->Encode(text.substr(1), true), [&] {
    std::vector<int32_t> with_bos = {1};
    with_bos.insert(with_bos.end(), ids.begin(), ids.end());
    return with_bos;
  }());
}

TEST_F(Stories260KTest, DecodeInvertsEncodeWithThePrefixSpace) {
  for (const Case& c : LoadCases("stories260k_ids.json")) {
    if (ContainsAny(c.text, specials_)) continue;  // a prefix space follows every special token
    EXPECT_EQ(tok_->Decode(tok_->Encode(c.text, true)), c.text.empty() ? "" : " " + c.text);
    ExpectStreamingMatchesDecode(*tok_, c.ids);
  }
  // Ill-formed UTF-8 goes through byte tokens unchanged.
  const std::string bad = "x\xFF\xE2\x82 y\xC3";
  EXPECT_EQ(tok_->DecodeBytes(tok_->Encode(bad, false)), " " + bad);
  // Byte fallback: CJK has no pieces in this vocabulary.
  const auto ids = tok_->Encode("日本", false);
  EXPECT_EQ(ids.size(), 7u) << Ids(ids);  // "▁" + 6 byte tokens
  EXPECT_EQ(tok_->Piece(ids[1]), "<0xE6>");
  ExpectStreamingMatchesDecode(*tok_, ids);
}

// Writes a GGUF v3 file holding only string metadata.
void WriteGguf(const std::string& path,
               const std::vector<std::pair<std::string, std::string>>& kv) {
  std::string b = "GGUF";
  auto u32 = [&](uint32_t v) { b.append(reinterpret_cast<const char*>(&v), 4); };
  auto u64 = [&](uint64_t v) { b.append(reinterpret_cast<const char*>(&v), 8); };
  auto str = [&](const std::string& s) {
    u64(s.size());
    b += s;
  };
  u32(3);
  u64(0);
  u64(kv.size());
  for (const auto& [k, v] : kv) {
    str(k);
    u32(8);  // string
    str(v);
  }
  WriteFile(path, b);
}

TEST(GgufTokenizerTest, BadMetadataIsRefused) {
  const std::string dir = ::loraplex::testing::MakeTempDir("tok_gguf");
  WriteGguf(dir + "/a.gguf", {{"general.architecture", "llama"}});
  ASSERT_OK_AND_ASSIGN(auto a, formats::GgufFile::Open(dir + "/a.gguf"));
  EXPECT_THAT(Tokenizer::FromGguf(*a),
              StatusIs(absl::StatusCode::kNotFound, "tokenizer.ggml.model"));
  WriteGguf(dir + "/b.gguf", {{"tokenizer.ggml.model", "bert"}});
  ASSERT_OK_AND_ASSIGN(auto b, formats::GgufFile::Open(dir + "/b.gguf"));
  EXPECT_THAT(Tokenizer::FromGguf(*b), StatusIs(absl::StatusCode::kUnimplemented, "bert"));
  WriteGguf(dir + "/c.gguf", {{"tokenizer.ggml.model", "gpt2"}});
  ASSERT_OK_AND_ASSIGN(auto c, formats::GgufFile::Open(dir + "/c.gguf"));
  EXPECT_THAT(Tokenizer::FromGguf(*c),
              StatusIs(absl::StatusCode::kNotFound, "tokenizer.ggml.tokens"));
  WriteGguf(dir + "/d.gguf", {{"tokenizer.ggml.model", "gpt2"}, {"tokenizer.ggml.tokens", "x"}});
  ASSERT_OK_AND_ASSIGN(auto d, formats::GgufFile::Open(dir + "/d.gguf"));
  EXPECT_THAT(Tokenizer::FromGguf(*d),
              StatusIs(absl::StatusCode::kInvalidArgument, "tokenizer.ggml.tokens"));
}

// --- SmolLM2 from its real GGUF (fetched by scripts/fetch-model.sh into models/) ----------------

std::string FindSmolLm2Gguf() {
  glob_t g;
  std::string found;
  if (glob("models/SmolLM2*.gguf", 0, nullptr, &g) == 0 && g.gl_pathc > 0) found = g.gl_pathv[0];
  globfree(&g);
  return found;
}

TEST(SmolLm2GgufTest, AgreesWithTokenizerJson) {
  const std::string path = FindSmolLm2Gguf();
  LP_SKIP_UNLESS_MODEL_EXISTS(path.empty() ? std::string(::loraplex::testing::kSmolLm2Gguf) : path);
  ASSERT_OK_AND_ASSIGN(auto gguf, formats::GgufFile::Open(path));
  ASSERT_OK_AND_ASSIGN(auto from_gguf, Tokenizer::FromGguf(*gguf));
  ASSERT_OK_AND_ASSIGN(auto from_json, Tokenizer::FromHfDir(TokDir() + "/smollm2"));
  EXPECT_EQ(from_gguf->spec().pre, "smollm");
  EXPECT_EQ(from_gguf->vocab_size(), from_json->vocab_size());
  EXPECT_EQ(from_gguf->bos_id(), from_json->bos_id());
  EXPECT_EQ(from_gguf->eos_id(), from_json->eos_id());
  EXPECT_EQ(from_gguf->spec().add_bos, from_json->spec().add_bos);
  ExpectIdsMatch(*from_gguf, LoadCases("smollm2_ids.json"), "smollm2_ids.json (GGUF)");
  const std::vector<ChatMessage> chat = {{"user", "Hi"}, {"assistant", "Hello"}, {"user", "?"}};
  EXPECT_EQ(from_gguf->ApplyChatTemplate(chat, true).value(),
            from_json->ApplyChatTemplate(chat, true).value());
  EXPECT_EQ(from_gguf->IsEndOfGeneration(0), from_json->IsEndOfGeneration(0));
}

}  // namespace
}  // namespace loraplex::model
