// safetensors reader against files written by safetensors.torch (values widened by torch), and the
// real stories260K model against its GGUF twin.
//
// If a fixture comparison fails after a deliberate change of the fixtures, regenerate them with
//   python3 tools/make_gguf_fixtures.py
// (from the repository root) and commit tests/fixtures/gguf/ together with the change.

#include "formats/safetensors.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "formats/gguf.h"
#include "nlohmann/json.hpp"
#include "tests/testing/testing.h"

namespace loraplex::formats {
namespace {

using ::loraplex::testing::AllClose;
using ::loraplex::testing::FixturesDir;
using ::loraplex::testing::kExact;
using ::loraplex::testing::MakeTempDir;
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

StoredType TypeOfTorchDtype(const std::string& dtype) {
  if (dtype == "float16") return StoredType::kF16;
  if (dtype == "bfloat16") return StoredType::kBF16;
  EXPECT_EQ(dtype, "float32");
  return StoredType::kF32;
}

// Checks every tensor named in `want` ({name: {dtype, shape, values}}) against `find(name)`.
template <typename Find>
void ExpectTensors(const json& want, Find find) {
  for (auto it = want.begin(); it != want.end(); ++it) {
    SCOPED_TRACE(it.key());
    const TensorInfo* t = find(it.key());
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->name, it.key());
    EXPECT_EQ(t->type, TypeOfTorchDtype((*it)["dtype"].get<std::string>()));
    EXPECT_EQ(t->shape, (*it)["shape"].get<std::vector<int64_t>>());
    std::vector<float> expected;
    for (const json& v : (*it)["values"]) expected.push_back(std::stof(v.get<std::string>()));
    ASSERT_OK_AND_ASSIGN(std::vector<float> got, DequantizeToF32(*t));
    // torch widens f16/bf16 exactly, so the comparison is exact (kExact: no arithmetic involved).
    EXPECT_TRUE(AllClose(got, expected, kExact)) << kRegen;
  }
}

TEST(SafetensorsTest, SingleFileMatchesTorch) {
  json want = LoadJson(GgufDir() + "/small.expected.json");
  ASSERT_FALSE(want.is_discarded());
  ASSERT_OK_AND_ASSIGN(auto f, SafetensorsFile::Open(GgufDir() + "/small.safetensors"));
  EXPECT_EQ(f->tensors().size(), want["tensors"].size());
  ExpectTensors(want["tensors"], [&](const std::string& n) { return f->Find(n); });
  EXPECT_EQ(f->metadata(), (want["metadata"].get<std::map<std::string, std::string>>()));
  EXPECT_EQ(f->Find("d.scalar")->shape, std::vector<int64_t>{});
  EXPECT_EQ(f->Find("absent"), nullptr);
  EXPECT_EQ(f->path(), GgufDir() + "/small.safetensors");
}

TEST(SafetensorsTest, ShardedModelMatchesTorch) {
  json want = LoadJson(GgufDir() + "/sharded.expected.json");
  ASSERT_FALSE(want.is_discarded());
  for (const std::string& path :
       {GgufDir() + "/sharded", GgufDir() + "/sharded/model.safetensors.index.json"}) {
    SCOPED_TRACE(path);
    ASSERT_OK_AND_ASSIGN(auto m, SafetensorsModel::Open(path));
    ExpectTensors(want["tensors"], [&](const std::string& n) { return m->Find(n); });
    EXPECT_EQ(m->Names(),
              (std::vector<std::string>{"model.embed", "model.layers.0.w", "model.layers.1.w"}));
  }
}

TEST(SafetensorsTest, ModelOpensAFolderWithASingleFile) {
  ASSERT_OK_AND_ASSIGN(auto m, SafetensorsModel::Open(Stories260KDir()));
  EXPECT_NE(m->Find("model.embed_tokens.weight"), nullptr);
  ASSERT_OK_AND_ASSIGN(auto m2, SafetensorsModel::Open(GgufDir() + "/small.safetensors"));
  EXPECT_EQ(m2->Names().size(), 4u);
}

TEST(SafetensorsTest, ModelInAFolderWithoutWeightsIsNotFound) {
  std::string dir = MakeTempDir("formats-empty");
  EXPECT_THAT(SafetensorsModel::Open(dir), StatusIs(absl::StatusCode::kNotFound, dir));
  EXPECT_THAT(SafetensorsModel::Open(dir + "/missing.safetensors"),
              StatusIs(absl::StatusCode::kNotFound, "missing.safetensors"));
}

// stories260K's safetensors copy was derived from the GGUF; tensors that the q/k RoPE permutation
// does not touch must be identical, element for element.
TEST(SafetensorsTest, Stories260KEqualsItsGgufTwin) {
  ASSERT_OK_AND_ASSIGN(auto st, SafetensorsModel::Open(Stories260KDir() + "/model.safetensors"));
  ASSERT_OK_AND_ASSIGN(auto gg, GgufFile::Open(Stories260KDir() + "/stories260K.gguf"));
  std::vector<std::pair<std::string, std::string>> pairs = {
      {"model.embed_tokens.weight", "token_embd.weight"},
      {"model.norm.weight", "output_norm.weight"}};
  const std::vector<std::pair<std::string, std::string>> per_layer = {
      {"mlp.down_proj", "ffn_down"},
      {"mlp.gate_proj", "ffn_gate"},
      {"mlp.up_proj", "ffn_up"},
      {"self_attn.v_proj", "attn_v"},
      {"self_attn.o_proj", "attn_output"},
      {"input_layernorm", "attn_norm"},
      {"post_attention_layernorm", "ffn_norm"}};
  for (int l = 0; l < 5; ++l) {
    for (const auto& [hf, gguf] : per_layer) {
      pairs.push_back({"model.layers." + std::to_string(l) + "." + hf + ".weight",
                       "blk." + std::to_string(l) + "." + gguf + ".weight"});
    }
  }
  for (const auto& [hf, gguf] : pairs) {
    SCOPED_TRACE(hf + " vs " + gguf);
    const TensorInfo* a = st->Find(hf);
    const TensorInfo* b = gg->Find(gguf);
    ASSERT_NE(a, nullptr);
    ASSERT_NE(b, nullptr);
    EXPECT_EQ(a->shape, b->shape);
    ASSERT_OK_AND_ASSIGN(std::vector<float> va, DequantizeToF32(*a));
    ASSERT_OK_AND_ASSIGN(std::vector<float> vb, DequantizeToF32(*b));
    EXPECT_TRUE(AllClose(va, vb, kExact));
  }
  // q/k are stored permuted in the GGUF: same shape, different order (model/ un-permutes them).
  const TensorInfo* q_hf = st->Find("model.layers.0.self_attn.q_proj.weight");
  const TensorInfo* q_gg = gg->Find("blk.0.attn_q.weight");
  ASSERT_NE(q_hf, nullptr);
  ASSERT_NE(q_gg, nullptr);
  EXPECT_EQ(q_hf->shape, q_gg->shape);
  EXPECT_NE(std::memcmp(q_hf->data, q_gg->data, q_hf->nbytes), 0);
}

}  // namespace
}  // namespace loraplex::formats
