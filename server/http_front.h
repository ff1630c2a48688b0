// The OpenAI-compatible HTTP front of loraplex-server (--http-listen): the JSON of
// server/openai_api.h served with cpp-httplib, every call passed to the gRPC services of the same
// process over an in-process channel, so that validation, adapter leases, metrics, auth and
// draining are exactly the gRPC API's.
//
//   GET  /health                    200 while serving, 503 once the server drains
//   GET  /v1/models[/ID]            the base model and every registered adapter (API token)
//   POST /v1/completions            Inference.Complete, or Generate as server-sent events
//   POST /v1/chat/completions       the same with messages
//   POST /v1/load_lora_adapter      vLLM's body {lora_name, lora_path}: Adapters.LoadAdapter
//                                   (admin token; lora_path inside --adapter-dir)
//   POST /v1/unload_lora_adapter    vLLM's body {lora_name}: Adapters.UnloadAdapter
//
// `Authorization: Bearer <token>` is passed on as the gRPC metadata the services check. Errors
// are OpenAI's error object with the HTTP status of the gRPC code (openai::ToHttpError); bodies
// above max_body_bytes get 413. A streaming client that goes away cancels its request at the next
// token; a non-streaming one is not noticed before its answer is complete (cpp-httplib 0.11 does
// not report a closed connection to a handler).
//
// Thread-safety: Start and Stop from one thread; requests run on the front's own thread pool.
#pragma once

#include <grpcpp/channel.h>

#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "adapters/registry.h"
#include "model/tokenizer.h"
#include "server/auth.h"

namespace loraplex::server {

struct HttpFrontOptions {
  std::string listen;      // HOST:PORT; port 0 picks a free one
  std::string model_name;  // the base model's name in /v1/models and requests' `model`
  int64_t max_body_bytes = int64_t{8} << 20;
  int threads = 64;  // connections served at once (each streaming request holds one)
  // --adapter-dir: an absolute lora_path inside it is taken as relative to it (vLLM's clients
  // send absolute paths).
  std::string adapter_dir;
};

class HttpFront {
 public:
  struct Backend {
    std::shared_ptr<grpc::Channel> channel;  // to this process's Inference and Adapters services
    const TokenAuth* api_auth = nullptr;     // /v1/models, which reads the registry directly
    adapters::AdapterRegistry* registry = nullptr;
    const model::Tokenizer* tokenizer = nullptr;  // token texts of logprobs; null: empty texts
    std::function<bool()> serving;                // false once the server drains
  };

  // Binds and starts serving. UNAVAILABLE when the address cannot be bound.
  static absl::StatusOr<std::unique_ptr<HttpFront>> Start(const HttpFrontOptions& options,
                                                          Backend backend);
  ~HttpFront();

  int port() const { return port_; }
  // Stops accepting and returns once every request handler has returned; idle keep-alive
  // connections are closed within their 5 s timeout. Call after the gRPC server has shut down
  // (which ends the calls the handlers wait on).
  void Stop();

  struct Impl;

 private:
  HttpFront() = default;
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace loraplex::server
