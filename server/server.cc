#include "server/server.h"

#include <grpcpp/ext/proto_server_reflection_plugin.h>
#include <grpcpp/health_check_service_interface.h>
#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_builder.h>
#include <grpcpp/support/server_interceptor.h>
#include <stdlib.h>

#include <filesystem>

#include "absl/strings/str_cat.h"
#include "adapters/base_weights.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/sync.h"
#include "kernels/kernels.h"
#include "kernels/quant.h"
#include "server/merge_policy.h"
#include "server/reactors.h"
#include "server/test_hooks.h"

namespace loraplex::server {
namespace {

// Counts a call from its arrival until gRPC destroys it (after the handler's OnDone).
class CallCounter : public grpc::experimental::Interceptor {
 public:
  explicit CallCounter(std::shared_ptr<std::atomic<int64_t>> n) : n_(std::move(n)) {
    CheckOurs checked;  // server/reactors.h
    ++*n_;
    TsanRelease(this);  // gRPC destroys us on another thread
  }
  ~CallCounter() override {
    CheckOurs checked;
    TsanAcquire(this);
    --*n_;
  }
  void Intercept(grpc::experimental::InterceptorBatchMethods* methods) override {
    // gRPC runs the rest of the call's batch, and at the first one our handler, inside Proceed:
    // its own code unchecked, ours checked again (server/reactors.h).
    CheckOurs checked;
    IgnoreGrpc ignore;
    methods->Proceed();
  }

 private:
  std::shared_ptr<std::atomic<int64_t>> n_;
};

class CallCounterFactory : public grpc::experimental::ServerInterceptorFactoryInterface {
 public:
  explicit CallCounterFactory(std::shared_ptr<std::atomic<int64_t>> n) : n_(std::move(n)) {}
  grpc::experimental::Interceptor* CreateServerInterceptor(
      grpc::experimental::ServerRpcInfo*) override {
    return new CallCounter(n_);
  }

 private:
  std::shared_ptr<std::atomic<int64_t>> n_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Server>> Server::Start(std::unique_ptr<model::LlamaModel> model,
                                                      const ServerOptions& options) {
  auto server = std::unique_ptr<Server>(new Server(options));
  server->model_ = std::move(model);
  server->metrics_interval_ = options.metrics_interval;
  server->merge_policy_interval_ = options.merge_policy_interval;
  if (options.merge_policy) {
    const kernels::WeightView q = server->model_->LinearWeight(0, model::LinearModule::kQ);
    if (kernels::IsQuantized(q.dtype)) {
      return absl::InvalidArgumentError(absl::StrCat(
          "--merge-policy auto: the base weights are stored ", kernels::DTypeName(q.dtype),
          ", and merging into them would requantize W + BA; load the model with --dtype bf16 "
          "or f32 to merge"));
    }
  }
  LP_RETURN_IF_ERROR(server->OpenRegistry(options));
  LP_ASSIGN_OR_RETURN(std::shared_ptr<grpc::ServerCredentials> credentials,
                      MakeServerCredentials(options.admin.tls));
  LP_ASSIGN_OR_RETURN(server->engine_,
                      engine::Engine::Create(server->model_.get(), options.engine));
  {
    MutexLock lock(&server->base_reads_mu_);
    server->base_reads_engine_ = server->engine_.get();
  }
  LP_ASSIGN_OR_RETURN(server->metrics_, Metrics::Create(options.metrics_listen));
  server->service_ = std::make_unique<InferenceService>(
      server->engine_.get(), server->registry_.get(), server->metrics_.get(), options.info);
  server->service_->RequireToken(&server->api_auth_);
  server->adapters_service_ = std::make_unique<AdaptersService>(
      server->registry_.get(), server->engine_.get(), &server->admin_auth_, server->metrics_.get());

  grpc::EnableDefaultHealthCheckService(true);
  grpc::reflection::InitProtoReflectionServerBuilderPlugin();
  grpc::ServerBuilder builder;
  builder.AddListeningPort(options.listen, credentials, &server->port_);
  builder.RegisterService(server->service_.get());
  builder.RegisterService(server->adapters_service_.get());
  std::vector<std::unique_ptr<grpc::experimental::ServerInterceptorFactoryInterface>> interceptors;
  interceptors.push_back(std::make_unique<CallCounterFactory>(server->calls_in_flight_));
  builder.experimental().SetInterceptorCreators(std::move(interceptors));
  {
    IgnoreGrpc ignore;  // gRPC's own code (server/reactors.h)
    server->grpc_server_ = builder.BuildAndStart();
  }
  if (server->grpc_server_ == nullptr || server->port_ == 0) {
    return absl::UnavailableError(
        absl::StrCat("--listen ", options.listen, ": cannot listen there (in use or malformed)"));
  }
  {
    IgnoreGrpc ignore;
    server->grpc_server_->GetHealthCheckService()->SetServingStatus(true);
  }
  if (!options.http.listen.empty()) {
    HttpFront::Backend backend;
    {
      IgnoreGrpc ignore;
      backend.channel = server->grpc_server_->InProcessChannel(grpc::ChannelArguments());
    }
    backend.api_auth = &server->api_auth_;
    backend.registry = server->registry_.get();
    backend.tokenizer = server->model_->has_tokenizer() ? &server->model_->tokenizer() : nullptr;
    backend.serving = [s = server.get()] { return !s->service_->draining(); };
    LP_ASSIGN_OR_RETURN(server->http_, HttpFront::Start(options.http, std::move(backend)));
  }
  server->metrics_thread_ = std::thread([s = server.get()] { s->MetricsLoop(); });
  if (options.merge_policy) {
    server->merge_policy_thread_ = std::thread([s = server.get()] { s->MergePolicyLoop(); });
  }
  LP_LOG(INFO) << "serving loraplex.v1.Inference and Adapters on port " << server->port_
               << (options.admin.tls.cert.empty() ? " (plaintext)" : " (TLS)")
               << (server->metrics_->port() > 0
                       ? absl::StrCat(", metrics on port ", server->metrics_->port())
                       : std::string())
               << "; CPU kernels " << kernels::CpuKernelIsa() << " (quantized weights "
               << kernels::QuantKernelIsa() << ")"
               << (kernels::BatchInvariant() ? ", batch-invariant" : "");
  return server;
}

absl::Status Server::OpenRegistry(const ServerOptions& options) {
  const AdapterAdminOptions& admin = options.admin;
  adapters::RegistryOptions r;
  r.state_dir = admin.state_dir;
  if (r.state_dir.empty()) {
    // No persistence asked for; the registry still keeps evicted adapters on disk.
    std::string pattern =
        (std::filesystem::temp_directory_path() / "loraplex-state-XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) {
      return absl::FailedPreconditionError("cannot create a temporary adapter state directory");
    }
    r.state_dir = temp_state_dir_ = pattern;
  }
  r.adapter_dir = admin.adapter_dir;
  r.load_on_demand = admin.load_on_demand;
  r.base = model_->config();
  r.load.dtype = model_->adapter_dtype();
  r.load.max_rank = options.info.max_lora_rank;
  r.load.base_weights = [this](int64_t layer,
                               const std::array<bool, model::kNumLinearModules>& wanted,
                               std::array<std::vector<float>, model::kNumLinearModules>* weights) {
    return ReadBaseWeights(layer, wanted, weights);
  };
  r.max_loaded = admin.max_loaded;
  r.memory_bytes = admin.memory_bytes;
  r.max_upload_bytes = admin.max_adapter_bytes;
  r.max_waiters = options.engine.max_queue;
  LP_ASSIGN_OR_RETURN(registry_, adapters::AdapterRegistry::Open(r));
  for (const auto& [name, dir] : options.adapters) {
    absl::StatusOr<adapters::AdapterInfo> info =
        registry_->RegisterFromDir(name, dir, /*replace=*/false, /*pin=*/false);
    if (absl::IsAlreadyExists(info.status())) {
      LP_LOG(INFO) << "--adapter " << name << ": already in the state directory; serving that";
      continue;
    }
    if (!info.ok()) return Annotate(info.status(), absl::StrCat("--adapter ", name));
  }
  return absl::OkStatus();
}

absl::Status Server::ReadBaseWeights(
    int64_t layer, const std::array<bool, model::kNumLinearModules>& wanted,
    std::array<std::vector<float>, model::kNumLinearModules>* weights) {
  engine::Engine* engine = nullptr;
  {
    MutexLock lock(&base_reads_mu_);
    if (base_reads_stopped_) return absl::UnavailableError("the server is shutting down");
    engine = base_reads_engine_;
    ++base_reads_in_flight_;
  }
  const adapters::BaseWeights direct = adapters::DirectBaseWeights(*model_);
  // Before the engine exists nothing merges, so the model is read here; after, on its thread.
  absl::Status status = engine == nullptr ? direct(layer, wanted, weights)
                                          : engine->RunOnEngineThread([&](model::LlamaModel&) {
                                              return direct(layer, wanted, weights);
                                            });
  MutexLock lock(&base_reads_mu_);
  --base_reads_in_flight_;
  return status;
}

void Server::StopBaseReads() {
  MutexLock lock(&base_reads_mu_);
  base_reads_stopped_ = true;
  Await(&base_reads_mu_, absl::Condition(
                             +[](int* n) { return *n == 0; }, &base_reads_in_flight_));
}

Server::AfterEngine::~AfterEngine() {
  if (GetTestHooks().server_engine_destroyed) GetTestHooks().server_engine_destroyed();
}

Server::~Server() {
  Shutdown(absl::ZeroDuration());
  adapters_service_.reset();  // waits for loads still running
  if (!temp_state_dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(temp_state_dir_, ec);
  }
}

void Server::MetricsLoop() {
  MutexLock lock(&mu_);
  while (!shutdown_) {
    metrics_->UpdateEngine(engine_->Stats());
    metrics_->UpdateAdapters(registry_->List());
    AwaitWithTimeout(&mu_, absl::Condition(&shutdown_), metrics_interval_);
  }
}

void Server::MergePolicyLoop() {
  MergePolicy policy;
  while (true) {
    {
      MutexLock lock(&mu_);
      AwaitWithTimeout(&mu_, absl::Condition(&shutdown_), merge_policy_interval_);
      if (shutdown_) return;
    }
    const AdaptersService::MergeState state = adapters_service_->merge_state();
    MergeInputs in =
        policy.Observe(engine_->Stats(), state.hand_merged || !state.auto_merged.empty());
    if (state.hand_merged) continue;  // a client's merge: left alone
    in.switch_s = state.switch_s;
    in.merged = state.auto_merged;
    in.excluded = state.excluded;
    const MergeDecision d = DecideMerge(in);
    absl::Status s;
    if (d.action == MergeDecision::Action::kMerge) {
      s = adapters_service_->AutoMerge(d.adapter, d.reason);
    } else if (d.action == MergeDecision::Action::kUnmerge) {
      s = adapters_service_->AutoUnmerge(d.reason);
    }
    if (!s.ok()) LP_LOG(WARNING) << "merge policy: " << d.adapter << ": " << s.ToString();
  }
}

void Server::Shutdown(absl::Duration grace) {
  {
    MutexLock lock(&mu_);
    if (shutdown_) return;
    shutdown_ = true;
  }
  // Its merges wait for the engine thread, which runs until below.
  if (merge_policy_thread_.joinable()) merge_policy_thread_.join();
  if (grpc_server_ == nullptr) {  // Start failed half way: nothing was served
    if (engine_ != nullptr) engine_->Shutdown();
    StopBaseReads();
    return;
  }
  LP_LOG(INFO) << "shutting down: finishing calls in flight (grace " << grace << ")";
  service_->StartDraining();
  {
    IgnoreGrpc ignore;
    grpc_server_->GetHealthCheckService()->SetServingStatus(false);
  }
  // Keep the listener open while the engine finishes what it has, so that every new call meets
  // our UNAVAILABLE instead of a transport-level CANCELLED from a gRPC server shutting down.
  // Calls that are not engine requests (uploads, adapter loads, tokenize) count too: wait until no
  // call of any kind is in flight, or the grace period is over.
  const absl::Time deadline = absl::Now() + grace;
  while (absl::Now() < deadline) {
    const engine::EngineStats st = engine_->Stats();
    if (st.running == 0 && st.waiting == 0 && calls_in_flight_->load() == 0) break;
    absl::SleepFor(absl::Milliseconds(10));
  }
  // Then stop gRPC at once: nothing is left, or the grace period is over and what is left is
  // cancelled (their OnCancel cancels the engine requests, which end within a step). A deadline in
  // the future would only make gRPC wait for idle client connections to go away (~5 s).
  {
    IgnoreGrpc ignore;
    grpc_server_->Shutdown(absl::ToChronoTime(absl::Now()));
    grpc_server_->Wait();
  }
  // Its handlers' in-process calls ended with the gRPC server.
  if (http_ != nullptr) http_->Stop();
  engine_->Shutdown();
  StopBaseReads();  // reads in flight returned: the engine ran or refused their tasks
  if (metrics_thread_.joinable()) metrics_thread_.join();
  LP_LOG(INFO) << "shut down";
}

}  // namespace loraplex::server
