// Fuzzes adapter_config.json parsing (adapters/peft_config.h) and PEFT's module matching rules
// on every module key of a Llama model; configs that parse are also loaded as a whole adapter
// (adapters/lora_adapter.h) beside the stories260k "qv" weights, against the stories260K base.
// Bad input must be a status (INVALID_ARGUMENT from the parser), never a crash or an exception.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>

#include "adapters/lora_adapter.h"
#include "adapters/peft_config.h"
#include "fuzz/fuzz_util.h"
#include "model/llama_config.h"
#include "model/llama_model.h"

namespace {

using loraplex::adapters::PeftConfig;
using loraplex::model::LinearModule;

struct Setup {
  loraplex::model::LlamaConfig base;
  std::string dir;  // adapter_config.json (rewritten per input) + adapter_model.safetensors
};

const Setup& GetSetup() {
  static const Setup* setup = [] {
    auto* s = new Setup();
    auto base =
        loraplex::model::LlamaConfig::FromHfJson(loraplex::fuzz::Stories260KDir() + "/config.json");
    LP_FUZZ_CHECK_OK(base.status());
    s->base = *base;
    s->dir = loraplex::fuzz::ScratchDir("peft_config");
    const std::string weights = loraplex::fuzz::RequireFile(
        loraplex::fuzz::RepoRoot() +
        "/tests/fixtures/peft/stories260k/qv/adapter_model.safetensors");
    std::filesystem::copy_file(weights, s->dir + "/adapter_model.safetensors");
    return s;
  }();
  return *setup;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Setup& setup = GetSetup();
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto config = loraplex::adapters::ParsePeftConfig(text, "adapter_config.json");
  if (!config.ok()) {
    LP_FUZZ_CHECK(config.status().code() == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  LP_FUZZ_CHECK(config->r >= 1);
  const int64_t max_rank = config->MaxRank();
  LP_FUZZ_CHECK(max_rank >= config->r);
  for (int64_t layer = 0; layer < setup.base.num_layers; ++layer) {
    for (int m = 0; m < loraplex::model::kNumLinearModules; ++m) {
      const std::string key = loraplex::adapters::ModuleKey(layer, static_cast<LinearModule>(m));
      (void)config->Targets(key);
      const int64_t rank = config->RankFor(key);
      LP_FUZZ_CHECK(rank >= 1 && rank <= max_rank);
      (void)config->AlphaFor(key);
      (void)config->ScaleFor(key);
    }
  }
  // Non-module keys must be matched without trouble too (PEFT sees every named module).
  for (const char* key : {"lm_head", "model.embed_tokens", "model.layers.99999999999999999999.mlp",
                          "model.norm", ""}) {
    (void)config->Targets(key);
    (void)config->RankFor(key);
  }

  loraplex::fuzz::WriteFileOrDie(setup.dir + "/adapter_config.json", text);
  auto adapter = loraplex::adapters::LoraAdapter::Load(setup.dir, setup.base);
  if (adapter.ok()) {
    LP_FUZZ_CHECK((*adapter)->max_rank() >= 1);
    LP_FUZZ_CHECK((*adapter)->view().layers.size() == static_cast<size_t>(setup.base.num_layers));
  } else {
    const absl::StatusCode code = adapter.status().code();
    LP_FUZZ_CHECK(code == absl::StatusCode::kInvalidArgument ||
                  code == absl::StatusCode::kFailedPrecondition);
  }
  return 0;
}
