// GGUF reader and dequantization against fixtures written and read back by the gguf Python package,
// and against the real stories260K model.
//
// If a fixture comparison fails after a deliberate change of the fixtures, regenerate them with
//   python3 tools/make_gguf_fixtures.py
// (from the repository root) and commit tests/fixtures/gguf/ together with the change.

#include "formats/gguf.h"

#include <cstring>
#include <fstream>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "formats/dequantize.h"
#include "nlohmann/json.hpp"
#include "tests/testing/testing.h"

namespace loraplex::formats {
namespace {

using ::loraplex::testing::FixturesDir;
using ::loraplex::testing::StatusIs;
using ::loraplex::testing::Stories260KDir;
using nlohmann::json;

constexpr char kRegen[] = "regenerate with: python3 tools/make_gguf_fixtures.py";

std::string GgufDir() { return FixturesDir() + "/gguf"; }

json LoadJson(const std::string& path) {
  std::ifstream in(path);
  EXPECT_TRUE(in.good()) << "cannot read " << path << "; " << kRegen;
  std::stringstream ss;
  ss << in.rdbuf();
  return json::parse(ss.str(), nullptr, false);
}

// Bitwise equality of float arrays (so -0 vs +0 and NaN payloads count), naming the first miss.
::testing::AssertionResult BitEqual(const float* actual, const float* expected, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    if (std::memcmp(&actual[i], &expected[i], sizeof(float)) != 0) {
      return ::testing::AssertionFailure()
             << "first difference at element " << i << ": got " << actual[i]
             << ", gguf package gives " << expected[i] << " (" << kRegen << ")";
    }
  }
  return ::testing::AssertionSuccess();
}

// GGUF value-type codes by the names the gguf package gives them (GGUFValueType).
uint32_t TypeCode(const std::string& name) {
  static const std::map<std::string, uint32_t> kCodes = {
      {"UINT8", 0},   {"INT8", 1},    {"UINT16", 2},  {"INT16", 3},  {"UINT32", 4},
      {"INT32", 5},   {"FLOAT32", 6}, {"BOOL", 7},    {"STRING", 8}, {"ARRAY", 9},
      {"UINT64", 10}, {"INT64", 11},  {"FLOAT64", 12}};
  auto it = kCodes.find(name);
  EXPECT_NE(it, kCodes.end()) << name;
  return it == kCodes.end() ? 99 : it->second;
}

// Checks that `v` has the type types[depth] (with nested element types after it) and the value
// `want`, as the gguf package read it.
void ExpectValue(const GgufValue& v, const std::vector<std::string>& types, size_t depth,
                 const json& want, const std::string& ctx) {
  SCOPED_TRACE(ctx);
  const std::string& t = types.at(depth);
  if (t == "ARRAY") {
    const GgufValue::Array* a = v.AsArray();
    ASSERT_NE(a, nullptr);
    EXPECT_EQ(a->element_type, TypeCode(types.at(depth + 1)));
    ASSERT_EQ(a->values.size(), want.size());
    for (size_t i = 0; i < a->values.size(); ++i) {
      ExpectValue(a->values[i], types, depth + 1, want[i], ctx + "[" + std::to_string(i) + "]");
    }
  } else if (t == "UINT8") {
    ASSERT_TRUE(std::holds_alternative<uint8_t>(v.v));
    EXPECT_EQ(std::get<uint8_t>(v.v), want.get<uint64_t>());
  } else if (t == "INT8") {
    ASSERT_TRUE(std::holds_alternative<int8_t>(v.v));
    EXPECT_EQ(std::get<int8_t>(v.v), want.get<int64_t>());
  } else if (t == "UINT16") {
    ASSERT_TRUE(std::holds_alternative<uint16_t>(v.v));
    EXPECT_EQ(std::get<uint16_t>(v.v), want.get<uint64_t>());
  } else if (t == "INT16") {
    ASSERT_TRUE(std::holds_alternative<int16_t>(v.v));
    EXPECT_EQ(std::get<int16_t>(v.v), want.get<int64_t>());
  } else if (t == "UINT32") {
    ASSERT_TRUE(std::holds_alternative<uint32_t>(v.v));
    EXPECT_EQ(std::get<uint32_t>(v.v), want.get<uint64_t>());
  } else if (t == "INT32") {
    ASSERT_TRUE(std::holds_alternative<int32_t>(v.v));
    EXPECT_EQ(std::get<int32_t>(v.v), want.get<int64_t>());
  } else if (t == "UINT64") {
    ASSERT_TRUE(std::holds_alternative<uint64_t>(v.v));
    EXPECT_EQ(std::get<uint64_t>(v.v), want.get<uint64_t>());
  } else if (t == "INT64") {
    ASSERT_TRUE(std::holds_alternative<int64_t>(v.v));
    EXPECT_EQ(std::get<int64_t>(v.v), want.get<int64_t>());
  } else if (t == "FLOAT32") {
    ASSERT_TRUE(std::holds_alternative<float>(v.v));
    // The fixture holds the exact decimal of the stored float's double value.
    EXPECT_EQ(static_cast<double>(std::get<float>(v.v)), std::stod(want.get<std::string>()));
  } else if (t == "FLOAT64") {
    ASSERT_TRUE(std::holds_alternative<double>(v.v));
    EXPECT_EQ(std::get<double>(v.v), std::stod(want.get<std::string>()));
  } else if (t == "BOOL") {
    ASSERT_TRUE(std::holds_alternative<bool>(v.v));
    EXPECT_EQ(std::get<bool>(v.v), want.get<bool>());
  } else if (t == "STRING") {
    ASSERT_TRUE(std::holds_alternative<std::string>(v.v));
    EXPECT_EQ(std::get<std::string>(v.v), want.get<std::string>());
  } else {
    ADD_FAILURE() << "fixture names unknown type " << t;
  }
}

TEST(GgufTest, EveryMetadataTypeMatchesTheGgufPackage) {
  json want = LoadJson(GgufDir() + "/metadata.expected.json");
  ASSERT_FALSE(want.is_discarded());
  ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(GgufDir() + "/metadata.gguf"));
  EXPECT_EQ(f->version(), want["version"].get<uint32_t>());
  ASSERT_EQ(f->metadata().size(), want["metadata"].size()) << kRegen;
  for (auto it = want["metadata"].begin(); it != want["metadata"].end(); ++it) {
    const GgufValue* v = f->FindMetadata(it.key());
    ASSERT_NE(v, nullptr) << it.key();
    ExpectValue(*v, (*it)["types"].get<std::vector<std::string>>(), 0, (*it)["value"], it.key());
  }
}

TEST(GgufTest, CustomAlignmentPlacesTheDataSection) {
  json want = LoadJson(GgufDir() + "/metadata.expected.json");
  ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(GgufDir() + "/metadata.gguf"));
  ASSERT_EQ(f->tensors().size(), 1u);
  const TensorInfo* t = f->Find("aligned");
  ASSERT_NE(t, nullptr);
  EXPECT_EQ(t->shape, (std::vector<int64_t>{2, 3}));
  // The mapping is page-aligned, so a 64-aligned file offset gives a 64-aligned address.
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t->data) % 64, 0u);
  ASSERT_OK_AND_ASSIGN(std::vector<float> values, DequantizeToF32(*t));
  EXPECT_EQ(values, want["aligned_values"].get<std::vector<float>>());
}

TEST(GgufTest, TypedGetters) {
  ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(GgufDir() + "/metadata.gguf"));
  EXPECT_EQ(*f->GetInt("test.u32"), 4000000000);
  EXPECT_EQ(*f->GetInt("test.i64"), -9000000000000000000);
  EXPECT_EQ(*f->GetInt("general.alignment"), 64);
  EXPECT_EQ(*f->GetFloat("test.f32"), static_cast<double>(3.14159f));
  EXPECT_EQ(*f->GetFloat("test.i8"), -100.0);  // integers widen to float
  EXPECT_EQ(*f->GetString("general.architecture"), "llama");
  EXPECT_EQ(*f->GetStringArray("test.arr_string"),
            (std::vector<std::string>{"a", "", "\xe2\x96\x81the", "<0x0A>"}));
  EXPECT_EQ(*f->GetFloatArray("test.arr_f32"), (std::vector<float>{0.5f, -1.25f, 1e-3f}));
  EXPECT_EQ(*f->GetIntArray("test.arr_i32"), (std::vector<int64_t>{-5, 6, -7}));
  EXPECT_EQ(*f->GetIntArray("test.arr_u16"), (std::vector<int64_t>{1, 65535}));

  EXPECT_THAT(f->GetInt("no.such.key"), StatusIs(absl::StatusCode::kNotFound, "no.such.key"));
  EXPECT_THAT(f->GetInt("test.string"),
              StatusIs(absl::StatusCode::kInvalidArgument, "test.string"));
  EXPECT_THAT(f->GetInt("test.f32"),
              StatusIs(absl::StatusCode::kInvalidArgument, "not an integer"));
  // 18e18 does not fit an int64: refused rather than wrapped.
  EXPECT_THAT(f->GetInt("test.u64"), StatusIs(absl::StatusCode::kInvalidArgument, "exceeds int64"));
  EXPECT_THAT(f->GetString("test.u8"),
              StatusIs(absl::StatusCode::kInvalidArgument, "not a string"));
  EXPECT_THAT(f->GetStringArray("test.arr_i32"),
              StatusIs(absl::StatusCode::kInvalidArgument, "element 0"));
  EXPECT_THAT(f->GetIntArray("test.string"),
              StatusIs(absl::StatusCode::kInvalidArgument, "not an array"));
  EXPECT_THAT(f->GetIntArray("test.nested_ints"),
              StatusIs(absl::StatusCode::kInvalidArgument, "not an integer"));
}

TEST(GgufTest, EveryTensorTypeDequantizesBitExactlyLikeTheGgufPackage) {
  json want = LoadJson(GgufDir() + "/tensors.expected.json");
  ASSERT_FALSE(want.is_discarded());
  std::ifstream bin(GgufDir() + "/tensors.expected.bin", std::ios::binary);
  std::vector<char> raw((std::istreambuf_iterator<char>(bin)), std::istreambuf_iterator<char>());
  std::vector<float> expected(raw.size() / sizeof(float));
  std::memcpy(expected.data(), raw.data(), expected.size() * sizeof(float));

  ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(GgufDir() + "/tensors.gguf"));
  ASSERT_EQ(f->tensors().size(), want["tensors"].size()) << kRegen;
  std::set<std::string> types_seen;
  for (const json& e : want["tensors"]) {
    const std::string name = e["name"].get<std::string>();
    SCOPED_TRACE(name);
    const TensorInfo* t = f->Find(name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(StoredTypeName(t->type), e["type"].get<std::string>());
    EXPECT_EQ(t->shape, e["shape"].get<std::vector<int64_t>>());
    const size_t offset = e["offset"].get<size_t>(), count = e["count"].get<size_t>();
    ASSERT_LE(offset + count, expected.size()) << kRegen;
    ASSERT_EQ(static_cast<size_t>(t->NumElements()), count);
    ASSERT_OK_AND_ASSIGN(std::vector<float> got, DequantizeToF32(*t));
    EXPECT_TRUE(BitEqual(got.data(), expected.data() + offset, count));
    types_seen.insert(std::string(StoredTypeName(t->type)));

    // A row range gives the same floats as the same rows of the whole tensor.
    const int64_t cols = t->shape.back();
    const int64_t rows = t->NumElements() / cols;
    if (rows >= 3) {
      std::vector<float> part(2 * cols);
      ASSERT_OK(DequantizeRowsToF32(*t, 1, 2, part.data()));
      EXPECT_TRUE(BitEqual(part.data(), expected.data() + offset + cols, part.size()));
    }
    EXPECT_THAT(DequantizeRowsToF32(*t, rows, 1, got.data()),
                StatusIs(absl::StatusCode::kInvalidArgument, name));
  }
  EXPECT_EQ(types_seen,
            (std::set<std::string>{"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"}));
}

// The fixtures are small enough to convert on the calling thread; tiling each one past a few
// hundred thousand elements sends it through ThreadPool::Default() in chunks, which must give the
// same bits at every chunk boundary.
TEST(GgufTest, LargeTensorsDequantizeOnThePoolLikeSmallOnes) {
  json want = LoadJson(GgufDir() + "/tensors.expected.json");
  std::ifstream bin(GgufDir() + "/tensors.expected.bin", std::ios::binary);
  std::vector<char> raw((std::istreambuf_iterator<char>(bin)), std::istreambuf_iterator<char>());
  std::vector<float> expected(raw.size() / sizeof(float));
  std::memcpy(expected.data(), raw.data(), expected.size() * sizeof(float));
  ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(GgufDir() + "/tensors.gguf"));
  for (const json& e : want["tensors"]) {
    const TensorInfo* small = f->Find(e["name"].get<std::string>());
    ASSERT_NE(small, nullptr);
    SCOPED_TRACE(small->name);
    const int64_t n = small->NumElements();
    const int64_t copies = 300000 / n + 1;
    std::vector<uint8_t> bytes;
    for (int64_t i = 0; i < copies; ++i)
      bytes.insert(bytes.end(), small->data, small->data + small->nbytes);
    TensorInfo big = *small;
    const int64_t cols = small->shape.back();
    big.shape = {copies * (n / cols), cols};
    big.data = bytes.data();
    big.nbytes = bytes.size();
    ASSERT_OK_AND_ASSIGN(std::vector<float> got, DequantizeToF32(big));
    const float* want_values = expected.data() + e["offset"].get<size_t>();
    for (int64_t i = 0; i < copies; ++i) {
      ASSERT_TRUE(BitEqual(got.data() + i * n, want_values, n)) << "copy " << i;
    }
  }
}

TEST(GgufTest, DequantizeRefusesATensorWhoseBytesDoNotMatchItsShape) {
  ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(GgufDir() + "/tensors.gguf"));
  TensorInfo t = *f->Find("q4_k");
  t.nbytes -= 1;
  EXPECT_THAT(DequantizeToF32(t), StatusIs(absl::StatusCode::kInvalidArgument, "q4_k"));
  t = *f->Find("q8_0");
  t.shape = {5, 63};  // not a whole number of 32-element blocks
  EXPECT_THAT(DequantizeToF32(t), StatusIs(absl::StatusCode::kInvalidArgument, "block size"));
  t.shape = {INT64_MAX, 4, 32};
  EXPECT_THAT(DequantizeToF32(t), StatusIs(absl::StatusCode::kInvalidArgument, "overflow"));
}

TEST(GgufTest, StoredByteSizes) {
  const int64_t q[] = {3, 512};
  EXPECT_EQ(*StoredByteSize(StoredType::kQ4_K, q, 2), 3u * 2 * 144);
  EXPECT_EQ(*StoredByteSize(StoredType::kQ6_K, q, 2), 3u * 2 * 210);
  EXPECT_EQ(*StoredByteSize(StoredType::kQ8_0, q, 2), 3u * 16 * 34);
  EXPECT_EQ(*StoredByteSize(StoredType::kQ4_0, q, 2), 3u * 16 * 18);
  EXPECT_EQ(*StoredByteSize(StoredType::kQ4_1, q, 2), 3u * 16 * 20);
  EXPECT_EQ(*StoredByteSize(StoredType::kBF16, q, 2), 3u * 512 * 2);
  EXPECT_EQ(*StoredByteSize(StoredType::kF32, nullptr, 0), 4u);  // a scalar
  const int64_t neg[] = {2, -1};
  EXPECT_THAT(StoredByteSize(StoredType::kF32, neg, 2),
              StatusIs(absl::StatusCode::kInvalidArgument, "negative"));
}

// --- the real model
// --------------------------------------------------------------------------------

TEST(GgufTest, Stories260KOpensWithItsLlamaMetadata) {
  ASSERT_OK_AND_ASSIGN(auto f, GgufFile::Open(Stories260KDir() + "/stories260K.gguf"));
  EXPECT_EQ(f->version(), 3u);
  EXPECT_EQ(*f->GetString("general.architecture"), "llama");
  EXPECT_EQ(*f->GetInt("llama.block_count"), 5);
  EXPECT_EQ(*f->GetInt("llama.embedding_length"), 64);
  EXPECT_EQ(*f->GetInt("llama.feed_forward_length"), 172);
  EXPECT_EQ(*f->GetInt("llama.attention.head_count"), 8);
  EXPECT_EQ(*f->GetInt("llama.attention.head_count_kv"), 4);
  EXPECT_EQ(*f->GetFloat("llama.attention.layer_norm_rms_epsilon"), static_cast<double>(1e-5f));
  EXPECT_EQ(*f->GetString("tokenizer.ggml.model"), "llama");
  EXPECT_EQ(*f->GetInt("tokenizer.ggml.bos_token_id"), 1);
  EXPECT_EQ(*f->GetInt("tokenizer.ggml.eos_token_id"), 2);
  ASSERT_OK_AND_ASSIGN(auto tokens, f->GetStringArray("tokenizer.ggml.tokens"));
  ASSERT_EQ(tokens.size(), 512u);
  EXPECT_EQ(tokens[1], "<s>");
  EXPECT_EQ(tokens[2], "</s>");
  EXPECT_EQ(f->GetFloatArray("tokenizer.ggml.scores")->size(), 512u);
  EXPECT_EQ(f->GetIntArray("tokenizer.ggml.token_type")->size(), 512u);

  EXPECT_EQ(f->tensors().size(), 48u);  // 3 + 9 per layer
  const TensorInfo* embd = f->Find("token_embd.weight");
  ASSERT_NE(embd, nullptr);
  EXPECT_EQ(embd->type, StoredType::kF32);
  EXPECT_EQ(embd->shape, (std::vector<int64_t>{512, 64}));
  EXPECT_EQ(f->Find("blk.0.attn_k.weight")->shape, (std::vector<int64_t>{32, 64}));
  EXPECT_EQ(f->Find("blk.4.ffn_down.weight")->shape, (std::vector<int64_t>{64, 172}));
  EXPECT_EQ(f->Find("output_norm.weight")->shape, (std::vector<int64_t>{64}));
  EXPECT_EQ(f->Find("nope"), nullptr);
}

}  // namespace
}  // namespace loraplex::formats
