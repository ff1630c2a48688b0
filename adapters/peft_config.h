// A PEFT LoRA adapter_config.json, parsed and checked, and PEFT's rules for which module of the
// base model an adapter targets, with which rank and alpha (peft 0.21: tuners_utils.py
// check_target_module_exists, utils/other.py get_pattern_key, lora/model.py _create_and_replace).
//
// Module keys are the names of HF LlamaForCausalLM's named_modules, e.g.
// "model.layers.3.self_attn.q_proj" or "model.layers.0.mlp.down_proj".
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace loraplex::adapters {

struct PeftConfig {
  int64_t r = 0;
  float lora_alpha = 0.0f;
  bool use_rslora = false;
  // DoRA (weight-decomposed LoRA): every targeted module also carries a magnitude vector
  // "lora_magnitude_vector" [out], and its output is rescaled per row (adapters/lora_adapter.h).
  bool use_dora = false;

  // target_modules: a list (a key matches when it equals an entry or ends with "." + entry), a
  // regex string (full match against the key), or "all-linear" (every linear except lm_head:
  // q/k/v/o/gate/up/down on Llama).
  enum class TargetKind { kList, kRegex, kAllLinear };
  TargetKind target_kind = TargetKind::kList;
  std::vector<std::string> target_list;
  std::string target_regex;
  // exclude_modules: a regex string (full match) or a list (equal or "." + entry suffix).
  std::vector<std::string> exclude_list;
  std::string exclude_regex;

  // In file order: PEFT takes the first key that matches.
  std::vector<std::pair<std::string, int64_t>> rank_pattern;
  std::vector<std::pair<std::string, float>> alpha_pattern;

  // Applied only with a list target_modules, as in PEFT. Empty = all layers.
  std::vector<int64_t> layers_to_transform;
  std::vector<std::string> layers_pattern;  // empty = PEFT's default ("<name>.<N>." first index)

  // PEFT forces this to false for torch.nn.Linear targets (every Llama projection) and the saved
  // lora_A [r, in] / lora_B [out, r] tensors have the same layout either way, so it is accepted
  // and changes nothing here. Kept for reporting.
  bool fan_in_fan_out = false;
  std::string base_model_name_or_path;

  // Whether PEFT would put a LoRA layer on this module.
  bool Targets(const std::string& module_key) const;
  // rank_pattern / alpha_pattern lookup (first key k with the key matching "(.*\.)?(k)$"), else
  // r / lora_alpha.
  int64_t RankFor(const std::string& module_key) const;
  float AlphaFor(const std::string& module_key) const;
  // alpha / r, or alpha / sqrt(r) with use_rslora, for the module's own r and alpha.
  float ScaleFor(const std::string& module_key) const;
  // The largest rank any module may have (r and every rank_pattern value).
  int64_t MaxRank() const;
};

// Parses the text of an adapter_config.json. INVALID_ARGUMENT with a message naming `source` and
// the field for: malformed JSON, peft_type other than LORA, r missing or < 1, a regex that does not
// compile, use_dora that is not true or false, and every feature that is not supported yet
// (modules_to_save, bias other than "none", lora_bias, embedding or lm_head targets,
// trainable_token_indices, layer_replication, target_parameters, use_qalora,
// alora_invocation_tokens, megatron_config).
absl::StatusOr<PeftConfig> ParsePeftConfig(const std::string& json_text, const std::string& source);

}  // namespace loraplex::adapters
