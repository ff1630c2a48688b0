// loraplex-generate: offline generation from a model file, no server. See README.md for usage.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "client/offline_adapter.h"
#include "common/flags.h"
#include "model/device.h"
#include "model/generate.h"
#include "model/llama_model.h"
#include "model/score.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(std::string, model, "", "GGUF file or HF model folder");
ABSL_FLAG(std::string, tokenizer, "", "tokenizer from another GGUF file or HF folder");
ABSL_FLAG(std::vector<std::string>, adapter, {},
          "PEFT adapter folder (adapter_config.json + safetensors); repeat for a weighted mix");
ABSL_FLAG(std::vector<std::string>, adapter_weights, {},
          "a mix's weights, one per --adapter, comma-separated (e.g. 0.7,-0.4; default 1 each)");
ABSL_FLAG(std::string, prompt, "", "prompt text (encoded with BOS when the model uses one)");
ABSL_FLAG(std::string, prompt_ids, "", "prompt as comma-separated token ids");
ABSL_FLAG(std::string, chat, "", "a user message, formatted with the model's chat template");
ABSL_FLAG(std::string, system, "", "system message for --chat");
ABSL_FLAG(int32_t, max_tokens, 64, "tokens to generate");
ABSL_FLAG(double, temperature, 0.0, "0 = greedy");
ABSL_FLAG(int32_t, top_k, 0, "0 = off");
ABSL_FLAG(double, top_p, 1.0, "1 = off");
ABSL_FLAG(uint64_t, seed, 0, "sampling seed");
ABSL_FLAG(bool, ignore_eos, false, "keep generating past end-of-sequence");
ABSL_FLAG(int32_t, logprobs, 0, "top alternatives per token to report (0-20)");
ABSL_FLAG(std::vector<std::string>, stop, {}, "comma-separated stop strings");
ABSL_FLAG(std::string, dtype, "native",
          "weight storage: native (a GGUF's quantized blocks as stored, the rest bf16), bf16, f32, "
          "q8_0 or q4_0");
ABSL_FLAG(std::string, kv_dtype, "auto",
          "KV cache elements: auto (f16 when base weights are quantized on the CPU, else f32), "
          "f32 or f16");
ABSL_FLAG(
    std::string, device, "auto",
    "auto (CUDA when a device is usable, else the CPU), cpu or cuda (fails without a device)");
ABSL_FLAG(int32_t, max_lora_rank, 256, "largest adapter rank accepted");
ABSL_FLAG(bool, json, false, "print one JSON object instead of streaming text");
ABSL_FLAG(std::string, score, "",
          "instead of generating: the perplexity of this text file, as llama-perplexity computes "
          "it (model/score.h)");
ABSL_FLAG(int64_t, score_context, 512, "tokens per chunk for --score (llama-perplexity -c)");

namespace loraplex {
namespace {

int Fail(const absl::Status& s) {
  std::fprintf(stderr, "loraplex-generate: %s\n", s.ToString().c_str());
  return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

absl::StatusOr<std::vector<int32_t>> BuildPrompt(const model::LlamaModel& m) {
  const std::string ids = absl::GetFlag(FLAGS_prompt_ids);
  const std::string chat = absl::GetFlag(FLAGS_chat);
  if (!ids.empty()) {
    std::vector<int32_t> out;
    for (absl::string_view part : absl::StrSplit(ids, ',', absl::SkipWhitespace())) {
      int32_t v;
      if (!absl::SimpleAtoi(part, &v)) {
        return absl::InvalidArgumentError("--prompt-ids: '" + std::string(part) +
                                          "' is not an integer");
      }
      out.push_back(v);
    }
    if (out.empty()) return absl::InvalidArgumentError("--prompt-ids: the list is empty");
    return out;
  }
  if (!m.has_tokenizer()) {
    return absl::FailedPreconditionError(
        "this model has no tokenizer: use --prompt-ids or --tokenizer");
  }
  const model::Tokenizer& tok = m.tokenizer();
  if (!chat.empty()) {
    std::vector<model::ChatMessage> msgs;
    if (!absl::GetFlag(FLAGS_system).empty())
      msgs.push_back({"system", absl::GetFlag(FLAGS_system)});
    msgs.push_back({"user", chat});
    auto text = tok.ApplyChatTemplate(msgs, /*add_generation_prompt=*/true);
    if (!text.ok()) return text.status();
    return tok.Encode(*text, tok.spec().add_bos);
  }
  std::vector<int32_t> out = tok.Encode(absl::GetFlag(FLAGS_prompt), tok.spec().add_bos);
  if (out.empty()) {
    return absl::InvalidArgumentError(
        "the prompt is empty and this model has no BOS token to start from");
  }
  return out;
}

// --adapter (repeated: a mix) and --adapter-weights.
absl::Status LoadAdapters(const model::LlamaModel& m, OfflineAdapter& adapter) {
  std::vector<double> weights;
  for (const std::string& w : absl::GetFlag(FLAGS_adapter_weights)) {
    double v = 0;
    if (!absl::SimpleAtod(w, &v)) {
      return absl::InvalidArgumentError("--adapter-weights: '" + w + "' is not a number");
    }
    weights.push_back(v);
  }
  return adapter.Load(absl::GetFlag(FLAGS_adapter), weights, m, absl::GetFlag(FLAGS_max_lora_rank));
}

// --score FILE: prints the chunks, scored tokens, mean negative log-likelihood and perplexity.
int Score(model::LlamaModel& m) {
  if (!m.has_tokenizer()) return Fail(absl::InvalidArgumentError("--score needs a tokenizer"));
  std::ifstream in(absl::GetFlag(FLAGS_score), std::ios::binary);
  if (!in) {
    return Fail(absl::NotFoundError("--score: cannot read " + absl::GetFlag(FLAGS_score)));
  }
  const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::vector<int32_t> tokens = m.tokenizer().Encode(text, m.tokenizer().spec().add_bos);
  OfflineAdapter adapter;
  if (absl::Status s = LoadAdapters(m, adapter); !s.ok()) return Fail(s);
  auto r = model::ScoreTokens(m, tokens, absl::GetFlag(FLAGS_score_context), adapter.view());
  if (!r.ok()) return Fail(r.status());
  if (absl::GetFlag(FLAGS_json)) {
    nlohmann::json out = {{"tokens", tokens.size()},           {"chunks", r->chunks},
                          {"scored_tokens", r->scored_tokens}, {"mean_nll", r->mean_nll},
                          {"perplexity", r->perplexity},       {"weights", m.weight_formats()}};
    std::cout << out.dump() << "\n";
  } else {
    std::printf("%zu tokens, %lld chunks of %lld, %lld scored: mean NLL %.6f, perplexity %.4f\n",
                tokens.size(), static_cast<long long>(r->chunks),
                static_cast<long long>(absl::GetFlag(FLAGS_score_context)),
                static_cast<long long>(r->scored_tokens), r->mean_nll, r->perplexity);
  }
  return 0;
}

int Run() {
  if (absl::GetFlag(FLAGS_model).empty()) {
    return Fail(absl::InvalidArgumentError("--model is required (a GGUF file or HF folder)"));
  }
  int forms = !absl::GetFlag(FLAGS_prompt_ids).empty() + !absl::GetFlag(FLAGS_chat).empty() +
              !absl::GetFlag(FLAGS_prompt).empty();
  if (forms > 1) {
    return Fail(absl::InvalidArgumentError("give only one of --prompt, --prompt-ids, --chat"));
  }
  model::LoadOptions load;
  std::string device_reason;
  absl::StatusOr<model::Device> device =
      model::ResolveDevice(absl::GetFlag(FLAGS_device), &device_reason);
  if (!device.ok()) return Fail(device.status());
  load.device = *device;
  // The choice is reported in --json ("device", "device_reason") rather than on stderr, so the
  // plain-text output stays exactly the generated text.
  if (absl::Status s = model::ParseWeightStorage(absl::GetFlag(FLAGS_dtype), &load); !s.ok()) {
    return Fail(s);
  }
  if (absl::Status s = model::ParseKvDType(absl::GetFlag(FLAGS_kv_dtype), &load); !s.ok()) {
    return Fail(s);
  }
  load.tokenizer_path = absl::GetFlag(FLAGS_tokenizer);
  load.require_tokenizer = absl::GetFlag(FLAGS_prompt_ids).empty();
  auto m = model::LlamaModel::Load(absl::GetFlag(FLAGS_model), load);
  if (!m.ok()) return Fail(m.status());
  if (!absl::GetFlag(FLAGS_score).empty()) return Score(**m);
  auto prompt = BuildPrompt(**m);
  if (!prompt.ok()) return Fail(prompt.status());

  model::GenerateOptions opts;
  opts.max_tokens = absl::GetFlag(FLAGS_max_tokens);
  opts.sampling.temperature = static_cast<float>(absl::GetFlag(FLAGS_temperature));
  opts.sampling.top_k = absl::GetFlag(FLAGS_top_k);
  opts.sampling.top_p = static_cast<float>(absl::GetFlag(FLAGS_top_p));
  opts.sampling.seed = absl::GetFlag(FLAGS_seed);
  opts.sampling.logprobs = absl::GetFlag(FLAGS_logprobs);
  opts.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);
  opts.stop = absl::GetFlag(FLAGS_stop);

  OfflineAdapter adapter;
  if (absl::Status s = LoadAdapters(**m, adapter); !s.ok()) return Fail(s);
  opts.adapter = adapter.view();

  const bool json = absl::GetFlag(FLAGS_json);
  auto result = model::Generate(**m, *prompt, opts, [&](const std::string& delta) {
    if (!json) {
      std::fwrite(delta.data(), 1, delta.size(), stdout);
      std::fflush(stdout);
    }
  });
  if (!result.ok()) return Fail(result.status());
  if (!json) {
    std::fputc('\n', stdout);
    return 0;
  }
  nlohmann::json out;
  out["prompt_token_ids"] = *prompt;
  std::vector<int32_t> ids;
  nlohmann::json logprobs = nlohmann::json::array();
  for (const auto& t : result->tokens) {
    ids.push_back(t.token_id);
    nlohmann::json top = nlohmann::json::array();
    for (const auto& alt : t.top)
      top.push_back({{"token_id", alt.token_id}, {"logprob", alt.logprob}});
    logprobs.push_back({{"token_id", t.token_id}, {"logprob", t.logprob}, {"top", top}});
  }
  out["token_ids"] = ids;
  out["text"] = result->text;
  out["finish_reason"] = result->finish_reason;
  out["device"] = model::DeviceName(load.device);
  out["device_reason"] = device_reason;
  if (absl::GetFlag(FLAGS_logprobs) > 0) out["logprobs"] = logprobs;
  std::cout << out.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  return 0;
}

}  // namespace
}  // namespace loraplex

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "offline generation: loraplex-generate --model PATH (--prompt TEXT | --prompt-ids 1,2 | "
      "--chat TEXT) [--adapter DIR [--adapter DIR2 --adapter-weights W1,W2]] [--max-tokens N] "
      "[--temperature T] [--json] ...");
  // --adapter may be repeated (a weighted mix); absl keeps a flag's last value, so the
  // occurrences are joined into one comma-separated list first.
  std::vector<std::string> joined;
  std::string adapters;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--") {
      for (; i < argc; ++i) joined.push_back(argv[i]);
      break;
    }
    if (a == "--adapter" && i + 1 < argc) {
      adapters += (adapters.empty() ? "" : ",") + std::string(argv[++i]);
    } else if (a.rfind("--adapter=", 0) == 0) {
      adapters += (adapters.empty() ? "" : ",") + a.substr(10);
    } else {
      joined.push_back(a);
    }
  }
  if (!adapters.empty()) joined.insert(joined.begin() + 1, "--adapter=" + adapters);
  std::vector<char*> ptrs;
  for (std::string& s : joined) ptrs.push_back(s.data());
  loraplex::DashedArgs args(static_cast<int>(ptrs.size()), ptrs.data());
  absl::ParseCommandLine(args.argc(), args.argv());
  return loraplex::Run();
}
