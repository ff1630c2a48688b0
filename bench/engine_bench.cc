// The serving workloads of DESIGN.md section 6 run in-process on the engine (no gRPC, no
// tokenizer): the reference that `loraplex bench` against loraplex-server is divided by to get the
// serving overhead (docs/benchmarks.md). Same shape as the client's closed loop: `concurrency`
// requests in flight, each a `prompt`-token prompt of random ids and exactly `max_tokens` greedy
// output tokens (ignore_eos), `requests` in all; adapter i of a request is (request % adapters),
// every adapter a separate copy of one PEFT folder (so the batch gathers distinct weights).
//
//   engine_bench --model models/SmolLM2-135M-Instruct.Q4_1.gguf --concurrency 32 --requests 64
//       [--adapter-dir DIR --adapters 32] [--dtype native] [--kv_dtype auto] [--prompt 128]
//       [--max-tokens 128]
//
// Prints one JSON line: output tokens, seconds, output tok/s, requests/s.
#include <stdlib.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "adapters/registry.h"
#include "engine/engine.h"
#include "model/llama_model.h"

ABSL_FLAG(std::string, model, "models/SmolLM2-135M-Instruct.Q4_1.gguf", "GGUF file or HF folder");
ABSL_FLAG(std::string, dtype, "native",
          "base weights: native (a GGUF's quantized blocks), bf16, f32, q8_0 or q4_0");
ABSL_FLAG(std::string, kv_dtype, "auto", "KV cache elements: auto, f32 or f16");
ABSL_FLAG(std::string, adapter_dir, "", "PEFT folder; copies of it serve as the adapters");
ABSL_FLAG(int, adapters, 0, "distinct adapters (0: base model only)");
ABSL_FLAG(int, concurrency, 1, "requests in flight");
ABSL_FLAG(int, requests, 8, "requests in all");
ABSL_FLAG(int, prompt, 128, "prompt tokens");
ABSL_FLAG(int, max_tokens, 128, "output tokens per request");

namespace lp = loraplex;

int main(int argc, char** argv) {
  absl::ParseCommandLine(argc, argv);
  lp::model::LoadOptions load;
  for (absl::Status st : {lp::model::ParseWeightStorage(absl::GetFlag(FLAGS_dtype), &load),
                          lp::model::ParseKvDType(absl::GetFlag(FLAGS_kv_dtype), &load)}) {
    if (!st.ok()) {
      std::cerr << "engine_bench: " << st << "\n";
      return 1;
    }
  }
  auto model = lp::model::LlamaModel::Load(absl::GetFlag(FLAGS_model), load);
  if (!model.ok()) {
    std::cerr << "engine_bench: " << model.status() << "\n";
    return 1;
  }
  // The adapters are registered as the server registers them (a registry in a scratch state
  // directory, every one pinned in memory), and requests hold their leases.
  std::unique_ptr<lp::adapters::AdapterRegistry> registry;
  std::vector<std::shared_ptr<const lp::adapters::Lease>> leases;
  char state_template[] = "/tmp/engine_bench_XXXXXX";
  const std::string state_dir = absl::GetFlag(FLAGS_adapters) > 0 ? mkdtemp(state_template) : "";
  if (absl::GetFlag(FLAGS_adapters) > 0) {
    lp::adapters::RegistryOptions ro;
    ro.state_dir = state_dir;
    ro.base = (*model)->config();
    ro.load.dtype = (*model)->adapter_dtype();
    auto opened = lp::adapters::AdapterRegistry::Open(ro);
    if (!opened.ok()) {
      std::cerr << "engine_bench: " << opened.status() << "\n";
      return 1;
    }
    registry = *std::move(opened);
  }
  for (int i = 0; i < absl::GetFlag(FLAGS_adapters); ++i) {
    const std::string name = absl::StrCat("a", i);
    auto info = registry->RegisterFromDir(name, absl::GetFlag(FLAGS_adapter_dir),
                                          /*replace=*/false, /*pin=*/true);
    if (!info.ok()) {
      std::cerr << "engine_bench: " << info.status() << "\n";
      return 1;
    }
    auto lease = registry->Acquire(name);
    if (!lease.ok()) {
      std::cerr << "engine_bench: " << lease.status() << "\n";
      return 1;
    }
    leases.push_back(*std::move(lease));
  }

  const int concurrency = absl::GetFlag(FLAGS_concurrency);
  const int total = absl::GetFlag(FLAGS_requests);
  const int prompt = absl::GetFlag(FLAGS_prompt), max_tokens = absl::GetFlag(FLAGS_max_tokens);
  lp::engine::EngineOptions eo;
  eo.max_running = concurrency;
  eo.kv_blocks = concurrency * ((prompt + max_tokens + eo.kv_block_size - 1) / eo.kv_block_size);
  auto engine = lp::engine::Engine::Create(model->get(), eo);
  if (!engine.ok()) {
    std::cerr << "engine_bench: " << engine.status() << "\n";
    return 1;
  }

  std::mt19937 rng(1);
  std::uniform_int_distribution<int32_t> id(
      100, static_cast<int32_t>((*model)->config().vocab_size) - 1);
  absl::Mutex mu;
  int submitted = 0, finished = 0, failed = 0;
  int64_t out_tokens = 0;
  // Submits request `i`; its sink submits the next one when it finishes (the closed loop).
  std::function<void()> submit_next = [&]() {
    int i;
    lp::engine::GenerationRequest r;
    {
      absl::MutexLock lock(&mu);  // rng is shared by main and the engine thread's sinks
      if (submitted >= total) return;
      i = submitted++;
      for (int t = 0; t < prompt; ++t) r.prompt_ids.push_back(id(rng));
    }
    r.max_tokens = max_tokens;
    r.ignore_eos = true;
    if (!leases.empty()) r.adapter = leases[i % leases.size()];
    auto st = (*engine)->Submit(std::move(r), [&](lp::engine::StepOutput out) {
      if (!out.finished) return;
      submit_next();  // before counting this one, so nothing runs here once main sees the total
      absl::MutexLock lock(&mu);
      ++finished;
      out_tokens += out.completion_tokens;
      if (out.finish_reason != lp::engine::FinishReason::kLength) ++failed;
    });
    if (!st.ok()) {
      std::cerr << "engine_bench: submit: " << st.status() << "\n";
      std::exit(1);
    }
  };
  const absl::Time start = absl::Now();
  for (int c = 0; c < concurrency; ++c) submit_next();
  {
    absl::MutexLock lock(&mu);
    auto done = [&]() { return finished >= total; };
    mu.Await(absl::Condition(&done));
  }
  const double s = absl::ToDoubleSeconds(absl::Now() - start);
  engine->reset();  // joins the engine thread while the state its sinks touch is still alive
  std::printf(
      "{\"concurrency\": %d, \"requests\": %d, \"adapters\": %d, \"failed\": %d, "
      "\"output_tokens\": %lld, \"seconds\": %.3f, \"output_tokens_per_s\": %.2f, "
      "\"requests_per_s\": %.3f}\n",
      concurrency, total, absl::GetFlag(FLAGS_adapters), failed, static_cast<long long>(out_tokens),
      s, out_tokens / s, total / s);
  leases.clear();
  registry.reset();
  if (!state_dir.empty()) std::filesystem::remove_all(state_dir);
  return failed == 0 ? 0 : 1;
}
