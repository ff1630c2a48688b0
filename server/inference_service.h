// The loraplex.v1.Inference service on the gRPC callback API. Generate streams through a
// ServerWriteReactor fed by the engine's sink; Complete is a unary reactor over the same path;
// Tokenize, Detokenize, GetModelInfo and GetEngineStats answer at once.
//
// Cancellation: a client cancel or an expired deadline reaches OnCancel, which cancels the engine
// request; the engine frees its KV blocks within one step and sends its last output, after which
// the call finishes. While the server drains (shutdown), new calls get UNAVAILABLE.
//
// Thread-safety: gRPC calls the handlers from its threads; the engine sinks run on the engine
// thread; each reactor guards its state with its own mutex.
#pragma once

#include <atomic>
#include <string>

#include "adapters/registry.h"
#include "engine/engine.h"
#include "loraplex/v1/inference.grpc.pb.h"
#include "server/auth.h"
#include "server/metrics.h"

namespace loraplex::server {

// What GetModelInfo reports besides the model's own config.
struct ServedModelInfo {
  std::string model_path;
  std::string dtype;   // "bf16" or "f32"
  std::string device;  // "cpu"
  int32_t max_lora_rank = 0;
};

class InferenceService final : public v1::Inference::CallbackService {
 public:
  // All pointers must outlive the service and every call it serves. Requests that name an
  // adapter take a lease on it from `adapters` (AcquireAsync).
  InferenceService(engine::Engine* engine, adapters::AdapterRegistry* adapters, Metrics* metrics,
                   ServedModelInfo info);

  // Every call must carry this bearer token (--api-token) from now on; null or disabled: open.
  // Set before serving; not owned.
  void RequireToken(const TokenAuth* auth) { auth_ = auth; }

  // From now on new calls get UNAVAILABLE; calls in flight go on.
  void StartDraining() { draining_.store(true); }
  bool draining() const { return draining_.load(); }

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* Complete(grpc::CallbackServerContext* context,
                                     const v1::GenerateRequest* request,
                                     v1::GenerateResponse* response) override;
  grpc::ServerUnaryReactor* Tokenize(grpc::CallbackServerContext* context,
                                     const v1::TokenizeRequest* request,
                                     v1::TokenizeResponse* response) override;
  grpc::ServerUnaryReactor* Detokenize(grpc::CallbackServerContext* context,
                                       const v1::DetokenizeRequest* request,
                                       v1::DetokenizeResponse* response) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;
  grpc::ServerUnaryReactor* GetEngineStats(grpc::CallbackServerContext* context,
                                           const v1::GetEngineStatsRequest* request,
                                           v1::EngineStats* response) override;

 private:
  engine::Engine* engine_;
  adapters::AdapterRegistry* adapters_;
  Metrics* metrics_;
  const ServedModelInfo info_;
  std::atomic<bool> draining_{false};
  const TokenAuth* auth_ = nullptr;
};

}  // namespace loraplex::server
