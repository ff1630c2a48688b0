// adapter_config.json parsing, every refused field, and PEFT's matching rules for target_modules,
// layers_to_transform/layers_pattern, exclude_modules and rank/alpha patterns
// (peft 0.21 tuners_utils.check_target_module_exists and utils/other.get_pattern_key).

#include "adapters/peft_config.h"

#include <gtest/gtest.h>

#include <cmath>
#include <string>

#include "tests/testing/testing.h"

namespace loraplex::adapters {
namespace {

using ::loraplex::testing::StatusIs;

PeftConfig Parse(const std::string& json) {
  auto c = ParsePeftConfig(json, "cfg.json");
  EXPECT_TRUE(c.ok()) << c.status().ToString();
  return c.ok() ? *c : PeftConfig{};
}

TEST(PeftConfigTest, ListTargetsMatchWholeNamesAtDotBoundaries) {
  PeftConfig c =
      Parse(R"({"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "mlp.up_proj"]})");
  EXPECT_TRUE(c.Targets("model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(c.Targets("model.layers.4.mlp.up_proj"));
  EXPECT_FALSE(c.Targets("model.layers.0.self_attn.k_proj"));
  EXPECT_FALSE(c.Targets("model.layers.0.self_attn.xq_proj"));  // not at a "." boundary
  EXPECT_EQ(c.RankFor("model.layers.0.self_attn.q_proj"), 8);
  EXPECT_FLOAT_EQ(c.ScaleFor("model.layers.0.self_attn.q_proj"), 2.0f);
}

TEST(PeftConfigTest, RegexTargetIsAFullMatchAndIgnoresLayersToTransform) {
  PeftConfig c = Parse(R"({"r": 4, "target_modules": ".*\\.layers\\.[13]\\.self_attn\\.(q|k)_proj",
                           "layers_to_transform": [0]})");
  EXPECT_EQ(c.target_kind, PeftConfig::TargetKind::kRegex);
  EXPECT_TRUE(c.Targets("model.layers.1.self_attn.q_proj"));
  EXPECT_TRUE(c.Targets("model.layers.3.self_attn.k_proj"));
  EXPECT_FALSE(c.Targets("model.layers.2.self_attn.q_proj"));
  EXPECT_FALSE(c.Targets("model.layers.13.self_attn.q_proj"));  // full match, not search
  EXPECT_FALSE(c.Targets("model.layers.1.self_attn.q_proj.extra"));
  EXPECT_FLOAT_EQ(c.lora_alpha, 8.0f);  // PEFT default when absent
}

TEST(PeftConfigTest, AllLinearTargetsTheSevenProjections) {
  PeftConfig c = Parse(R"({"r": 2, "target_modules": "all-linear"})");
  for (const char* m : {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}) {
    EXPECT_TRUE(c.Targets(std::string("model.layers.2.") + m)) << m;
  }
  EXPECT_FALSE(c.Targets("lm_head"));
  EXPECT_FALSE(c.Targets("model.embed_tokens"));
}

TEST(PeftConfigTest, LayersToTransformWithAndWithoutPattern) {
  PeftConfig c = Parse(R"({"r": 4, "target_modules": ["q_proj"], "layers_to_transform": [0, 2],
                           "layers_pattern": "layers"})");
  EXPECT_TRUE(c.Targets("model.layers.0.self_attn.q_proj"));
  EXPECT_FALSE(c.Targets("model.layers.1.self_attn.q_proj"));
  EXPECT_TRUE(c.Targets("model.layers.2.self_attn.q_proj"));
  PeftConfig d = Parse(R"({"r": 4, "target_modules": ["q_proj"], "layers_to_transform": 1})");
  EXPECT_TRUE(d.Targets("model.layers.1.self_attn.q_proj"));
  EXPECT_FALSE(d.Targets("model.layers.11.self_attn.q_proj"));
  PeftConfig e = Parse(R"({"r": 4, "target_modules": ["q_proj"], "layers_to_transform": [1],
                           "layers_pattern": ["blocks"]})");
  EXPECT_FALSE(e.Targets("model.layers.1.self_attn.q_proj"));  // pattern does not occur
}

TEST(PeftConfigTest, ExcludeModules) {
  PeftConfig c = Parse(R"({"r": 4, "target_modules": "all-linear",
                           "exclude_modules": ["down_proj"]})");
  EXPECT_TRUE(c.Targets("model.layers.0.mlp.up_proj"));
  EXPECT_FALSE(c.Targets("model.layers.0.mlp.down_proj"));
  PeftConfig d = Parse(R"({"r": 4, "target_modules": ["q_proj"],
                           "exclude_modules": ".*layers\\.0\\..*"})");
  EXPECT_FALSE(d.Targets("model.layers.0.self_attn.q_proj"));
  EXPECT_TRUE(d.Targets("model.layers.1.self_attn.q_proj"));
}

TEST(PeftConfigTest, RankAndAlphaPatternsFirstMatchInFileOrder) {
  PeftConfig c =
      Parse(R"({"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
    "rank_pattern": {"layers.2.mlp.down_proj": 2, "layers.3.self_attn.q_proj": 2, "q_proj": 8},
    "alpha_pattern": {"layers.1.self_attn.q_proj": 32, "v_proj": 2}})");
  EXPECT_EQ(c.RankFor("model.layers.0.self_attn.q_proj"), 8);
  EXPECT_EQ(c.RankFor("model.layers.3.self_attn.q_proj"), 2);  // listed before "q_proj"
  EXPECT_EQ(c.RankFor("model.layers.2.mlp.down_proj"), 2);
  EXPECT_EQ(c.RankFor("model.layers.1.mlp.down_proj"), 4);
  EXPECT_EQ(c.RankFor("model.layers.12.mlp.down_proj"), 4);  // "layers.2" only at a "." boundary
  EXPECT_FLOAT_EQ(c.AlphaFor("model.layers.1.self_attn.q_proj"), 32.0f);
  EXPECT_FLOAT_EQ(c.ScaleFor("model.layers.1.self_attn.q_proj"), 4.0f);  // 32 / 8
  EXPECT_FLOAT_EQ(c.ScaleFor("model.layers.0.self_attn.v_proj"), 0.5f);  // 2 / 4
  EXPECT_EQ(c.MaxRank(), 8);
}

TEST(PeftConfigTest, RsLoraScale) {
  PeftConfig c =
      Parse(R"({"r": 16, "lora_alpha": 4, "use_rslora": true, "target_modules": ["q_proj"]})");
  EXPECT_FLOAT_EQ(c.ScaleFor("model.layers.0.self_attn.q_proj"), 1.0f);  // 4 / sqrt(16)
}

TEST(PeftConfigTest, UseDoraIsRead) {
  EXPECT_TRUE(Parse(R"({"r": 4, "target_modules": ["q_proj"], "use_dora": true})").use_dora);
  EXPECT_FALSE(Parse(R"({"r": 4, "target_modules": ["q_proj"], "use_dora": false})").use_dora);
  EXPECT_FALSE(Parse(R"({"r": 4, "target_modules": ["q_proj"]})").use_dora);
}

TEST(PeftConfigTest, FanInFanOutIsAcceptedAsPeftDoesForLinear) {
  PeftConfig c = Parse(R"({"r": 4, "target_modules": ["q_proj"], "fan_in_fan_out": true})");
  EXPECT_TRUE(c.fan_in_fan_out);
}

struct Refusal {
  const char* json;
  const char* field;  // must appear in the message
};

TEST(PeftConfigTest, RefusesUnsupportedFieldsNamingThem) {
  const Refusal cases[] = {
      {R"({"r": 8, "target_modules": ["q_proj"], "use_dora": "yes"})", "use_dora"},
      {R"({"r": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]})",
       "modules_to_save"},
      {R"({"r": 8, "target_modules": ["q_proj"], "bias": "all"})", "bias"},
      {R"({"r": 8, "target_modules": ["q_proj"], "bias": "lora_only"})", "bias"},
      {R"({"r": 8, "target_modules": ["q_proj"], "lora_bias": true})", "lora_bias"},
      {R"({"r": 8, "target_modules": ["q_proj", "embed_tokens"]})", "target_modules"},
      {R"({"r": 8, "target_modules": ["lm_head"]})", "target_modules"},
      {R"({"r": 8, "target_modules": ".*"})", "target_modules"},
      {R"({"r": 8, "target_modules": "(["})", "target_modules"},
      {R"({"r": 8})", "target_modules"},
      {R"({"r": 8, "target_modules": ["q_proj"], "trainable_token_indices": [1, 2]})",
       "trainable_token_indices"},
      {R"({"r": 8, "target_modules": ["q_proj"], "layer_replication": [[0, 2]]})",
       "layer_replication"},
      {R"({"r": 8, "target_modules": ["q_proj"], "target_parameters": ["x.weight"]})",
       "target_parameters"},
      {R"({"r": 8, "target_modules": ["q_proj"], "use_qalora": true})", "use_qalora"},
      {R"({"r": 8, "target_modules": ["q_proj"], "peft_type": "PREFIX_TUNING"})", "peft_type"},
      {R"({"r": 0, "target_modules": ["q_proj"]})", "'r'"},
      {R"({"target_modules": ["q_proj"]})", "'r'"},
      {R"({"r": 4.5, "target_modules": ["q_proj"]})", "'r'"},
      {R"({"r": 8, "target_modules": ["q_proj"], "rank_pattern": {"q_proj": 0}})", "rank_pattern"},
      {R"({"r": 8, "target_modules": ["q_proj"], "alpha_pattern": {"q_proj": "x"}})",
       "alpha_pattern"},
      {R"({"r": 8, "target_modules": ["q_proj"], "layers_to_transform": "all"})",
       "layers_to_transform"},
      {R"({"r": 8, "target_modules": ["q_proj"], "use_rslora": "yes"})", "use_rslora"},
      {R"({"r": 8, "target_modules": 5})", "target_modules"},
  };
  for (const Refusal& c : cases) {
    EXPECT_THAT(ParsePeftConfig(c.json, "cfg.json"),
                StatusIs(absl::StatusCode::kInvalidArgument, c.field))
        << c.json;
    EXPECT_THAT(ParsePeftConfig(c.json, "cfg.json"),
                StatusIs(absl::StatusCode::kInvalidArgument, "cfg.json"));
  }
}

TEST(PeftConfigTest, MalformedJson) {
  EXPECT_THAT(ParsePeftConfig("{\"r\": 8,", "x/adapter_config.json"),
              StatusIs(absl::StatusCode::kInvalidArgument, "x/adapter_config.json"));
  EXPECT_THAT(ParsePeftConfig("[1, 2]", "cfg.json"),
              StatusIs(absl::StatusCode::kInvalidArgument, "not a JSON object"));
}

// Found by fuzz/peft_config_fuzz.cc: the layer index was read with std::stoll from the first
// capturing group, so a group in layers_pattern (or a pattern whose alternation leaves the index
// group empty) threw std::invalid_argument out of Targets and took the server down.
TEST(PeftConfigTest, LayersPatternWithCapturingGroupIsRefused) {
  EXPECT_THAT(ParsePeftConfig(R"j({"r": 8, "target_modules": ["q_proj"], "layers_to_transform": [0],
                                    "layers_pattern": "(layers)"})j",
                              "cfg.json"),
              StatusIs(absl::StatusCode::kInvalidArgument, "layers_pattern"));
  PeftConfig c = Parse(R"j({"r": 8, "target_modules": ["q_proj"], "layers_to_transform": [0],
                             "layers_pattern": "(?:layers)"})j");
  EXPECT_TRUE(c.Targets("model.layers.0.self_attn.q_proj"));
  // "^(?:.*?\.)?layers|h\.(\d+)\." matches through its first branch: no index.
  c = Parse(R"({"r": 8, "target_modules": ["q_proj"], "layers_to_transform": [0],
                "layers_pattern": "layers|h"})");
  EXPECT_FALSE(c.Targets("model.layers.0.self_attn.q_proj"));
  c = Parse(R"({"r": 8, "target_modules": ["mlp"], "layers_to_transform": [0]})");
  EXPECT_FALSE(c.Targets("model.layers.99999999999999999999.mlp"));  // past int64
}

TEST(PeftConfigTest, FalseOrNullUnsupportedFieldsAreFine) {
  Parse(R"({"r": 8, "target_modules": ["q_proj"], "use_dora": false, "modules_to_save": null,
            "bias": "none", "lora_bias": false, "layer_replication": null, "use_qalora": false,
            "trainable_token_indices": null, "target_parameters": null, "peft_type": "LORA"})");
}

}  // namespace
}  // namespace loraplex::adapters
