// Fuzzes GenerateRequest handling: bytes parsed as the proto, then the server's mapping and
// validation (server/request_mapping.cc ToGenerationRequest: tokenization, chat template,
// Engine::Validate; then the adapter's lease from the registry, as the server takes it) against a
// real engine on
// stories260K (CPU, 8 KV blocks of 16) with the stories260k "qv" adapter registered as "qv".
// Accepted requests also run their stop strings (engine/stop_matcher.cc) over the decoded prompt.
// Invariants: only the documented codes; an accepted request is one the engine would take (ids
// in the vocabulary, max_tokens >= 1, prompt + max_tokens within the context); the stop matcher
// sends exactly the text before the first stop string.
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "adapters/registry.h"
#include "common/logging.h"
#include "engine/engine.h"
#include "engine/stop_matcher.h"
#include "fuzz/fuzz_util.h"
#include "google/protobuf/stubs/logging.h"
#include "loraplex/v1/inference.pb.h"
#include "model/llama_model.h"
#include "server/request_mapping.h"

namespace {

using loraplex::engine::GenerationRequest;

struct Setup {
  std::unique_ptr<loraplex::model::LlamaModel> model;
  std::unique_ptr<loraplex::adapters::AdapterRegistry> registry;
  std::unique_ptr<loraplex::engine::Engine> engine;
};

const Setup& GetSetup() {
  static const Setup* setup = [] {
    loraplex::SetMinLogLevel(loraplex::LogLevel::kError);
    google::protobuf::SetLogHandler(nullptr);  // invalid UTF-8 in a string field is logged
    auto* s = new Setup();
    auto model = loraplex::model::LlamaModel::Load(
        loraplex::fuzz::RequireFile(loraplex::fuzz::Stories260KDir() + "/stories260K.gguf"));
    LP_FUZZ_CHECK_OK(model.status());
    s->model = *std::move(model);
    loraplex::adapters::RegistryOptions options;
    options.base = s->model->config();
    options.state_dir = loraplex::fuzz::ScratchDir("generate_request");
    options.loader_threads = 1;
    auto registry = loraplex::adapters::AdapterRegistry::Open(options);
    LP_FUZZ_CHECK_OK(registry.status());
    s->registry = *std::move(registry);
    LP_FUZZ_CHECK_OK(
        s->registry
            ->RegisterFromDir("qv",
                              loraplex::fuzz::RepoRoot() + "/tests/fixtures/peft/stories260k/qv",
                              /*replace=*/false, /*pin=*/true)
            .status());
    auto engine =
        loraplex::engine::Engine::Create(s->model.get(), {.kv_block_size = 16, .kv_blocks = 8});
    LP_FUZZ_CHECK_OK(engine.status());
    s->engine = *std::move(engine);
    return s;
  }();
  return *setup;
}

// Streams the prompt's text through a StopMatcher as the engine streams generated text.
void CheckStops(const loraplex::model::Tokenizer& tok, const GenerationRequest& req) {
  loraplex::model::StreamDecoder decoder(&tok);
  loraplex::engine::StopMatcher matcher(req.stop);
  std::string full, sent;
  bool stopped = false;
  auto push = [&](const std::string& delta) {
    full += delta;
    if (stopped) return;
    auto r = matcher.Push(delta);
    sent += r.text;
    stopped = r.stopped;
  };
  for (int32_t id : req.prompt_ids) push(decoder.Push(id));
  push(decoder.Flush());
  if (!stopped) sent += matcher.Flush();
  LP_FUZZ_CHECK(full.compare(0, sent.size(), sent) == 0);  // a prefix of the text
  bool starts_with_stop = false;
  for (const std::string& s : req.stop) {
    if (s.empty()) continue;
    LP_FUZZ_CHECK(sent.find(s) == std::string::npos);  // no stop string was let through
    starts_with_stop |= full.compare(sent.size(), s.size(), s) == 0;
  }
  LP_FUZZ_CHECK(stopped ? starts_with_stop : sent == full);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Setup& setup = GetSetup();
  loraplex::v1::GenerateRequest proto;
  if (!proto.ParseFromArray(data, static_cast<int>(size))) return 0;
  auto req = loraplex::server::ToGenerationRequest(proto, *setup.engine);
  if (req.ok() && !proto.adapter().empty()) {
    auto lease = setup.registry->Acquire(proto.adapter());
    if (lease.ok()) {
      req->adapter = *std::move(lease);
    } else {
      req = lease.status();
    }
  }
  if (!req.ok()) {
    const absl::StatusCode code = req.status().code();
    LP_FUZZ_CHECK(
        code == absl::StatusCode::kInvalidArgument || code == absl::StatusCode::kNotFound ||
        code == absl::StatusCode::kResourceExhausted || code == absl::StatusCode::kUnimplemented);
    return 0;
  }
  const loraplex::model::LlamaConfig& config = setup.model->config();
  LP_FUZZ_CHECK(!req->prompt_ids.empty());
  for (int32_t id : req->prompt_ids) LP_FUZZ_CHECK(id >= 0 && id < config.vocab_size);
  for (int32_t id : req->stop_token_ids) LP_FUZZ_CHECK(id >= 0 && id < config.vocab_size);
  LP_FUZZ_CHECK(req->max_tokens >= 1);
  LP_FUZZ_CHECK(static_cast<int64_t>(req->prompt_ids.size()) + req->max_tokens <=
                config.max_position_embeddings);
  LP_FUZZ_CHECK_OK(req->sampling.Validate());
  LP_FUZZ_CHECK((req->adapter != nullptr) == !proto.adapter().empty());
  if (req->adapter != nullptr) LP_FUZZ_CHECK(req->adapter->name() == "qv");
  CheckStops(setup.model->tokenizer(), *req);
  return 0;
}
