#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>

#include "absl/strings/str_cat.h"
#include "adapters/lora_adapter.h"
#include "common/logging.h"
#include "common/status.h"

namespace loraplex::server {

absl::StatusOr<std::unique_ptr<Server>> Server::Start(std::unique_ptr<model::LlamaModel> model,
                                                      const ServerOptions& options) {
  auto server = std::unique_ptr<Server>(new Server());
  server->model_ = std::move(model);
  server->metrics_interval_ = options.metrics_interval;
  for (const auto& [name, dir] : options.adapters) {
    adapters::AdapterLoadOptions load;
    load.dtype = server->model_->dtype();
    load.max_rank = options.info.max_lora_rank;
    absl::StatusOr<std::unique_ptr<adapters::LoraAdapter>> adapter =
        adapters::LoraAdapter::Load(dir, server->model_->config(), load);
    if (!adapter.ok()) return Annotate(adapter.status(), absl::StrCat("--adapter ", name));
    std::shared_ptr<const adapters::LoraAdapter> owner = *std::move(adapter);
    auto handle = std::make_shared<engine::AdapterHandle>();
    handle->name = name;
    handle->version = 1;
    handle->weights = &owner->view();
    handle->owner = owner;
    server->adapters_.Put(std::move(handle));
    LP_LOG(INFO) << "adapter " << name << " from " << dir << ": rank " << owner->max_rank()
                 << ", " << owner->bytes() << " bytes";
  }
  LP_ASSIGN_OR_RETURN(server->engine_, engine::Engine::Create(server->model_.get(), options.engine));
  LP_ASSIGN_OR_RETURN(server->metrics_, Metrics::Create(options.metrics_listen));
  server->service_ = std::make_unique<InferenceService>(
      server->engine_.get(), &server->adapters_, server->metrics_.get(), options.info);

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  // TLS is refused by main until it is implemented; this is the one place it would plug in.
  builder.AddListeningPort(options.listen, grpc::InsecureServerCredentials(), &server->port_);
  builder.RegisterService(server->service_.get());
  server->grpc_server_ = builder.BuildAndStart();
  if (server->grpc_server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("--listen ", options.listen, ": cannot listen there (in use or malformed)"));
  }
  server->grpc_server_->GetHealthCheckService()->SetServingStatus(true);
  server->metrics_thread_ = std::thread([s = server.get()] { s->MetricsLoop(); });
  LP_LOG(INFO) << "serving loraplex.v1.Inference on port " << server->port_
               << (server->metrics_->port() > 0
                       ? absl::StrCat(", metrics on port ", server->metrics_->port())
                       : std::string());
  return server;
}

Server::~Server() { Shutdown(absl::ZeroDuration()); }

void Server::MetricsLoop() {
  absl::MutexLock lock(&mu_);
  while (!shutdown_) {
    metrics_->UpdateEngine(engine_->Stats());
    mu_.AwaitWithTimeout(absl::Condition(&shutdown_), metrics_interval_);
  }
}

void Server::Shutdown(absl::Duration grace) {
  {
    absl::MutexLock lock(&mu_);
    if (shutdown_) return;
    shutdown_ = true;
  }
  if (grpc_server_ == nullptr) {  // Start failed half way: nothing was served
    if (engine_ != nullptr) engine_->Shutdown();
    return;
  }
  LP_LOG(INFO) << "shutting down: finishing calls in flight (grace " << grace << ")";
  service_->StartDraining();
  grpc_server_->GetHealthCheckService()->SetServingStatus(false);
  // Refuses new calls, waits for those in flight until the deadline, then cancels them (their
  // OnCancel cancels the engine requests, which end within a step).
  grpc_server_->Shutdown(std::chrono::system_clock::now() + absl::ToChronoNanoseconds(grace));
  grpc_server_->Wait();
  engine_->Shutdown();
  if (metrics_thread_.joinable()) metrics_thread_.join();
  LP_LOG(INFO) << "shut down";
}

}  // namespace loraplex::server
