// The loraplex gRPC server: the Inference service, the standard health service and server
// reflection on one listening address, Prometheus metrics on another, the OpenAI-compatible HTTP
// API on a third (server/http_front.h), and the graceful shutdown that SIGTERM/SIGINT trigger.
// main.cc only parses flags and calls this.
//
// Thread-safety: Shutdown may be called from any thread, once or more.
#pragma once

#include <grpcpp/server.h>

#include <array>
#include <atomic>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "adapters/registry.h"
#include "engine/engine.h"
#include "model/llama_model.h"
#include "server/adapters_service.h"
#include "server/auth.h"
#include "server/http_front.h"
#include "server/inference_service.h"
#include "server/metrics.h"

namespace loraplex::server {

struct ServerOptions {
  std::string listen = "127.0.0.1:50051";  // HOST:PORT; port 0 picks a free one
  std::string metrics_listen;              // empty: no metrics endpoint
  HttpFrontOptions http;                   // http.listen empty: no HTTP API
  engine::EngineOptions engine;
  ServedModelInfo info;
  // PEFT adapter folders registered at start as (name, dir) (version 1; a name the state
  // directory already holds keeps its version there).
  std::vector<std::pair<std::string, std::string>> adapters;
  // Adapter management, the state directory, tokens and TLS (server/adapters_service.h).
  AdapterAdminOptions admin;
  // How often engine gauges are copied into the metrics.
  absl::Duration metrics_interval = absl::Milliseconds(250);
  // --merge-policy auto: merge the adapter that dominates the load while that pays
  // (server/merge_policy.h), deciding every merge_policy_interval. Needs base weights stored
  // bf16 or f32 (Start refuses it over a quantized base: merging would requantize it).
  bool merge_policy = false;
  absl::Duration merge_policy_interval = absl::Seconds(1);
};

class Server {
 public:
  // Loads the adapters, starts the engine on `model` (kept alive by the server) and begins
  // serving. UNAVAILABLE when an address cannot be bound; adapters::LoraAdapter::Load's codes
  // (prefixed with the adapter's name) and the engine's otherwise.
  static absl::StatusOr<std::unique_ptr<Server>> Start(std::unique_ptr<model::LlamaModel> model,
                                                       const ServerOptions& options);
  ~Server();

  int port() const { return port_; }
  int metrics_port() const { return metrics_->port(); }
  int http_port() const { return http_ == nullptr ? 0 : http_->port(); }
  adapters::AdapterRegistry& registry() { return *registry_; }

  // Graceful shutdown: health turns NOT_SERVING and new calls get UNAVAILABLE at once; calls in
  // flight may finish within `grace`, after which they are cancelled; then the engine stops.
  void Shutdown(absl::Duration grace);

 private:
  explicit Server(const ServerOptions& options)
      : admin_auth_(options.admin.admin_token, "the Adapters service"),
        api_auth_(options.admin.api_token, "the Inference service") {}
  void MetricsLoop();
  void MergePolicyLoop();
  // Opens the registry in the state directory and registers the --adapter folders.
  absl::Status OpenRegistry(const ServerOptions& options);

  // The base weights a DoRA adapter's norms are computed from (AdapterLoadOptions::base_weights),
  // for registry loader threads: read directly before the engine starts, through the engine
  // thread (between steps, where merges write them) while it runs, refused once it stopped.
  absl::Status ReadBaseWeights(int64_t layer,
                               const std::array<bool, model::kNumLinearModules>& wanted,
                               std::array<std::vector<float>, model::kNumLinearModules>* weights);
  // Refuses further reads and waits for those in flight (before the engine is destroyed).
  void StopBaseReads();

  std::unique_ptr<model::LlamaModel> model_;
  // Declared before the registry, whose loader threads use them until it is destroyed.
  absl::Mutex base_reads_mu_;
  engine::Engine* base_reads_engine_ ABSL_GUARDED_BY(base_reads_mu_) = nullptr;
  bool base_reads_stopped_ ABSL_GUARDED_BY(base_reads_mu_) = false;
  int base_reads_in_flight_ ABSL_GUARDED_BY(base_reads_mu_) = 0;
  // Declared before the engine: leases the engine holds are released into it, so it goes last.
  std::unique_ptr<adapters::AdapterRegistry> registry_;
  std::string temp_state_dir_;  // removed at exit when no --state-dir was given
  TokenAuth admin_auth_;
  TokenAuth api_auth_;
  // Destroyed right after the engine: tells a test (TestHooks::server_engine_destroyed).
  struct AfterEngine {
    ~AfterEngine();
  } after_engine_;
  std::unique_ptr<engine::Engine> engine_;
  std::unique_ptr<Metrics> metrics_;
  std::unique_ptr<InferenceService> service_;
  std::unique_ptr<AdaptersService> adapters_service_;
  std::unique_ptr<grpc::Server> grpc_server_;
  std::unique_ptr<HttpFront> http_;  // with --http-listen; calls grpc_server_ in process
  int port_ = 0;
  // gRPC calls of any service between their arrival and their end (a server interceptor counts
  // them), so that shutdown can stop waiting as soon as nothing is in flight.
  std::shared_ptr<std::atomic<int64_t>> calls_in_flight_ =
      std::make_shared<std::atomic<int64_t>>(0);
  absl::Duration metrics_interval_;
  absl::Duration merge_policy_interval_;

  absl::Mutex mu_;  // guards shutdown_ (and wakes the metrics thread)
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  std::thread metrics_thread_;
  std::thread merge_policy_thread_;  // with --merge-policy auto
};

}  // namespace loraplex::server
