#include "server/inference_service.h"

#include <atomic>
#include <cmath>
#include <deque>
#include <set>
#include <string>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "adapters/lora_mix.h"
#include "common/status.h"
#include "common/sync.h"
#include "kernels/kernels.h"
#include "kernels/quant.h"
#include "server/reactors.h"
#include "server/request_mapping.h"
#include "server/status_mapping.h"
#include "server/test_hooks.h"

namespace loraplex::server {
namespace {

std::string CodeName(absl::StatusCode code) { return absl::StatusCodeToString(code); }

// The status a finished generation ends its call with.
absl::Status FinalStatus(const engine::StepOutput& out) {
  switch (out.finish_reason) {
    case engine::FinishReason::kError:
      return out.status.ok() ? absl::InternalError("generation failed") : out.status;
    case engine::FinishReason::kCancelled:
      return absl::CancelledError("the request was cancelled");
    default:
      return absl::OkStatus();
  }
}

// What both generation reactors share: turning a proto into a submitted engine request, latency
// metrics, the request fields needed to render outputs, and the reactor's lifetime.
//
// Lifetime (server/reactors.h): the reactor is deleted when gRPC's OnDone and every other
// thread that may still call into it have let go. The engine's sink holds a reference until the
// engine destroys it (right after the final output, or when Submit refuses), the adapter resolve
// callback until the registry has run or dropped it, and each reaction while it runs. So OnDone,
// which may come on a gRPC thread as soon as another thread has called Finish, never frees the
// reactor under the engine thread's feet.
//
// A request for an adapter that is not in memory is resolved asynchronously (AdapterRegistry::
// AcquireAsync): the gRPC thread returns at once and a registry loader thread submits the request
// once the adapter is back, or ends the call with the error. While it waits, a cancellation (client
// gone, deadline) ends the call at once; the lease that arrives later is dropped.
class GenerationCall : public RefCounted {
 protected:
  GenerationCall(engine::Engine* engine, Metrics* metrics)
      : engine_(engine), config_(engine->model().config()), metrics_(metrics) {}
  ~GenerationCall() override {
    if (GetTestHooks().generation_destroyed) GetTestHooks().generation_destroyed();
  }

  // Ends the call with `status` (the reactor's Finish).
  virtual void FinishCall(const absl::Status& status) = 0;

  // Validates and submits; `sink` receives the engine outputs. A refused request ends the call
  // through FinishCall, possibly later on a loader thread (see above).
  void Start(const v1::GenerateRequest& proto, adapters::AdapterRegistry& registry, bool draining,
             engine::OutputSink sink) {
    if (draining) return FinishCall(Refuse(absl::UnavailableError("the server is shutting down")));
    if (proto.adapters_size() > 0) return StartMix(proto, registry, std::move(sink));
    if (proto.adapter().empty()) {
      absl::StatusOr<engine::GenerationRequest> req = ToGenerationRequest(proto, *engine_);
      if (!req.ok()) return FinishCall(Refuse(req.status()));
      return Submit(*std::move(req), std::move(sink));
    }
    // Everything but the adapter is checked first, so a bad request never causes a reload.
    v1::GenerateRequest rest = proto;
    rest.clear_adapter();
    absl::StatusOr<engine::GenerationRequest> req = ToGenerationRequest(rest, *engine_);
    if (!req.ok()) return FinishCall(Refuse(req.status()));
    {
      MutexLock lock(&wait_mu_);
      waiting_ = true;
    }
    // std::function wants a copyable callable: the request travels in a shared_ptr.
    auto request = std::make_shared<engine::GenerationRequest>(*std::move(req));
    registry.AcquireAsync(
        proto.adapter(), [self = RefPtr<GenerationCall>(this), request, sink = std::move(sink)](
                             absl::StatusOr<std::shared_ptr<const adapters::Lease>> lease) mutable {
          self->Resolved(std::move(lease), std::move(*request), std::move(sink));
        });
  }

  // A request for a weighted mix (GenerateRequest.adapters): everything else is checked first, then
  // the adapters are acquired one after another (AcquireAsync, so possibly on loader threads), each
  // copied with its weight as it comes (PendingMix), the mix is built from the copies
  // (adapters/lora_mix.h) and the request is submitted with it.
  void StartMix(const v1::GenerateRequest& proto, adapters::AdapterRegistry& registry,
                engine::OutputSink sink) {
    adapter_label_ = "mix";
    if (!proto.adapter().empty()) {
      return FinishCall(
          Refuse(absl::InvalidArgumentError("set either adapter or adapters (a mix), not both")));
    }
    if (proto.adapters_size() > adapters::kMaxMixParts) {
      return FinishCall(Refuse(absl::InvalidArgumentError(
          absl::StrCat("adapters: a mix names at most ", adapters::kMaxMixParts, " adapters, got ",
                       proto.adapters_size()))));
    }
    auto mix = std::make_shared<PendingMix>();
    std::set<std::string> names;
    for (const v1::WeightedAdapter& a : proto.adapters()) {
      absl::StatusOr<adapters::AdapterSpec> spec = adapters::ParseAdapterSpec(a.name());
      if (!spec.ok()) return FinishCall(Refuse(spec.status()));
      if (!names.insert(spec->name).second) {
        return FinishCall(Refuse(absl::InvalidArgumentError(
            absl::StrCat("adapters: '", spec->name, "' appears more than once"))));
      }
      const float weight = a.has_weight() ? a.weight() : 1.0f;
      if (!std::isfinite(weight)) {
        return FinishCall(Refuse(absl::InvalidArgumentError(
            absl::StrCat("adapters: the weight of '", spec->name, "' is not finite"))));
      }
      mix->specs.push_back(a.name());
      mix->weights.push_back(weight);
    }
    v1::GenerateRequest rest = proto;
    rest.clear_adapters();
    absl::StatusOr<engine::GenerationRequest> req = ToGenerationRequest(rest, *engine_);
    if (!req.ok()) return FinishCall(Refuse(req.status()));
    {
      MutexLock lock(&wait_mu_);
      waiting_ = true;
    }
    mix->request = *std::move(req);
    mix->sink = std::move(sink);
    AcquireNextPart(&registry, std::move(mix));
  }

  // For OnCancel. True when the call was waiting for its adapter: the caller then ends it as
  // cancelled. Otherwise cancels the engine request (now, or as soon as Submit has its id).
  bool CancelWaiting() {
    {
      MutexLock lock(&wait_mu_);
      if (waiting_) {
        waiting_ = false;
        wait_cancelled_ = true;
        return true;
      }
    }
    CancelRequest();
    return false;
  }

  // Cancels the engine request, now or as soon as Submit has its id.
  void CancelRequest() {
    cancel_requested_.store(true);
    engine_->Cancel(id_.load());
  }

  // Latency metrics for one engine output (engine thread).
  void Observe(const engine::StepOutput& out) {
    if (!out.tokens.empty()) {
      const absl::Time now = absl::Now();
      if (!seen_first_token_) {
        metrics_->ObserveTimeToFirstToken(absl::ToDoubleSeconds(now - start_));
        seen_first_token_ = true;
      } else {
        // Several tokens in one output share the gap.
        const double gap = absl::ToDoubleSeconds(now - last_token_) / out.tokens.size();
        for (size_t i = 0; i < out.tokens.size(); ++i) metrics_->ObserveInterTokenLatency(gap);
      }
      last_token_ = now;
      metrics_->AddGeneratedTokens(static_cast<int64_t>(out.tokens.size()));
    }
    if (out.finished) metrics_->RecordRequest(adapter_label_, CodeName(FinalStatus(out).code()));
  }

  absl::Status Refuse(absl::Status status) {
    metrics_->RecordRequest(adapter_label_, CodeName(status.code()));
    return status;
  }

  engine::Engine* const engine_;
  // The model's, for the registry loader threads that build a mix: a cancelled call can end, and
  // the server destroy its engine, while a loader is still copying a part; the model and the
  // registry outlive those threads.
  const model::LlamaConfig& config_;
  Metrics* const metrics_;
  // Wraps every gRPC call that hands the reactor over and starts every reaction
  // (server/reactors.h).
  ReactorSync sync_;
  // What AppendOutput needs of the request (the adapter's name and version, not its lease, so that
  // the lease goes back to the registry when the engine is done, not when gRPC is). Written
  // before Submit, read by the engine thread's sink after.
  OutputContext rendering_;

 private:
  // A mix while its parts are acquired. Each part is copied, with its weight applied, as soon as
  // its lease arrives, and the lease goes at once: a mix never holds one adapter in memory while it
  // waits for another to be loaded, so mixes that wait for room cannot hold up each other.
  struct PendingMix {
    std::vector<std::string> specs;
    std::vector<float> weights;
    std::vector<std::unique_ptr<adapters::LoraMix>> parts;  // of specs[0..size), weighted
    std::vector<std::string> described;                     // "name@version*weight" of each
    std::vector<std::string> keyed;  // the same with the weight's exact bits (the prefix cache)
    engine::GenerationRequest request;
    engine::OutputSink sink;
  };

  void AcquireNextPart(adapters::AdapterRegistry* registry, std::shared_ptr<PendingMix> mix) {
    const std::string spec = mix->specs[mix->parts.size()];
    registry->AcquireAsync(
        spec, [self = RefPtr<GenerationCall>(this), registry, mix = std::move(mix)](
                  absl::StatusOr<std::shared_ptr<const adapters::Lease>> lease) mutable {
          if (self->WaitCancelled()) return;  // the call ended
          if (GetTestHooks().mix_part_acquired) GetTestHooks().mix_part_acquired(lease.status());
          absl::Status added =
              lease.ok() ? self->AddPart(*registry, **lease, mix.get()) : lease.status();
          lease = nullptr;  // the part is copied: its lease goes back now
          if (!added.ok()) {
            return self->Resolved(added, std::move(mix->request), std::move(mix->sink));
          }
          // Ended while the part was copied: no more parts to load for it.
          if (self->WaitCancelled()) return;
          if (mix->parts.size() < mix->specs.size()) {
            return self->AcquireNextPart(registry, std::move(mix));
          }
          self->BuildMix(*registry, std::move(mix));
        });
  }

  bool WaitCancelled() {
    MutexLock lock(&wait_mu_);
    return wait_cancelled_;
  }

  absl::Status AddPart(const adapters::AdapterRegistry& registry, const adapters::Lease& lease,
                       PendingMix* mix) {
    const float weight = mix->weights[mix->parts.size()];
    if (lease.view().dora) {
      return absl::InvalidArgumentError(absl::StrCat(
          "adapter '", lease.name(),
          "' is a DoRA adapter: its per-row magnitude rescales a module's whole output, so it is "
          "not a delta that can be summed with others in a mix; request it alone"));
    }
    LP_ASSIGN_OR_RETURN(std::unique_ptr<adapters::LoraMix> part,
                        adapters::LoraMix::Build({{&lease.view(), weight}}, config_,
                                                 registry.options().load.max_rank));
    mix->parts.push_back(std::move(part));
    mix->described.push_back(absl::StrCat(lease.name(), "@", lease.version(), "*", weight));
    mix->keyed.push_back(
        absl::StrCat(lease.name(), "@", lease.version(), "*", absl::StrFormat("%a", weight)));
    return absl::OkStatus();
  }

  void BuildMix(const adapters::AdapterRegistry& registry, std::shared_ptr<PendingMix> mix) {
    std::vector<adapters::MixPart> parts;
    for (const auto& part : mix->parts) parts.push_back({&part->view(), 1.0f});
    absl::StatusOr<std::unique_ptr<adapters::LoraMix>> built =
        adapters::LoraMix::Build(parts, config_, registry.options().load.max_rank);
    mix->parts.clear();
    if (!built.ok()) {
      return Resolved(built.status(), std::move(mix->request), std::move(mix->sink));
    }
    mix->request.mix = *std::move(built);
    mix->request.mix_identity = absl::StrCat("@mix:", absl::StrJoin(mix->keyed, "+"));
    mix_name_ = absl::StrJoin(mix->described, "+");
    Resolved(std::shared_ptr<const adapters::Lease>(), std::move(mix->request),
             std::move(mix->sink));
  }

  // The adapter resolve callback (this thread, or a registry loader thread).
  void Resolved(absl::StatusOr<std::shared_ptr<const adapters::Lease>> lease,
                engine::GenerationRequest request, engine::OutputSink sink) {
    {
      MutexLock lock(&wait_mu_);
      if (wait_cancelled_) return;  // the call ended; the lease goes with `lease`
      waiting_ = false;             // from here on OnCancel cancels the engine request
    }
    if (!lease.ok()) return FinishCall(Refuse(lease.status()));
    if (request.mix == nullptr) request.adapter = *std::move(lease);
    Submit(std::move(request), std::move(sink));
  }

  void Submit(engine::GenerationRequest req, engine::OutputSink sink) {
    adapter_label_ = req.mix != nullptr       ? "mix"
                     : req.adapter == nullptr ? "base"
                                              : req.adapter->name();
    rendering_.logprobs = req.sampling.logprobs;
    if (req.adapter != nullptr) {
      rendering_.adapter = req.adapter->name();
      rendering_.adapter_version = req.adapter->version();
    } else if (req.mix != nullptr) {
      rendering_.adapter = mix_name_;
    }
    start_ = absl::Now();
    absl::StatusOr<engine::RequestId> id = engine_->Submit(std::move(req), std::move(sink));
    if (!id.ok()) return FinishCall(Refuse(id.status()));
    id_.store(*id);
    if (cancel_requested_.load()) engine_->Cancel(*id);  // OnCancel came before the id existed
  }

  absl::Mutex wait_mu_;                                    // guards the adapter wait's two flags
  bool waiting_ ABSL_GUARDED_BY(wait_mu_) = false;         // the adapter is being resolved
  bool wait_cancelled_ ABSL_GUARDED_BY(wait_mu_) = false;  // ended as cancelled while waiting
  std::atomic<bool> cancel_requested_{false};
  // Atomic: OnCancel may read it before Submit stores it; a 0 then cancels nothing, and Submit
  // cancels the request itself once it has the id.
  std::atomic<engine::RequestId> id_{0};
  std::string adapter_label_ = "-";
  std::string mix_name_;  // "a@1*0.7+b@3*-0.4", set before Submit
  absl::Time start_;
  absl::Time last_token_;          // engine thread
  bool seen_first_token_ = false;  // engine thread
};

// Generate: one response message per engine output. Outputs that arrive while a write is in
// flight are merged into the next message, so a slow client never makes the queue grow past two.
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse>,
                              private GenerationCall {
 public:
  GenerateReactor(engine::Engine* engine, adapters::AdapterRegistry* adapters, Metrics* metrics,
                  bool draining, const v1::GenerateRequest& request)
      : GenerationCall(engine, metrics) {
    Start(request, *adapters, draining,
          [self = RefPtr<GenerateReactor>(this)](engine::StepOutput out) {
            self->OnOutput(std::move(out));
          });
    sync_.Publish();
  }

  void OnWriteDone(bool ok) override {
    CheckOurs checked;
    sync_.Reacted();
    ScopedRef<GenerateReactor> reacting(this);
    if (GetTestHooks().generate_write_done) GetTestHooks().generate_write_done();
    bool cancel = false;
    {
      MutexLock lock(&mu_);
      writing_ = false;
      pending_.pop_front();
      if (!ok && !write_failed_) {
        // The client is gone: stop the generation; the final output then finishes the call.
        write_failed_ = true;
        pending_.clear();
        cancel = !final_received_;
      }
    }
    if (cancel) CancelRequest();
    Pump();
  }

  void OnCancel() override {
    CheckOurs checked;
    sync_.Reacted();
    ScopedRef<GenerateReactor> reacting(this);
    if (CancelWaiting()) FinishCall(Refuse(absl::CancelledError("the request was cancelled")));
  }
  void OnDone() override {
    CheckOurs checked;
    sync_.Reacted();
    if (GetTestHooks().generation_done) GetTestHooks().generation_done();
    Unref();  // gRPC's reference
  }

 private:
  friend class RefPtr<GenerateReactor>;

  // A refusal: no engine request exists, so no Pump can finish the call too.
  void FinishCall(const absl::Status& status) override {
    sync_.Handoff([&] { Finish(ToGrpcStatus(status)); });
  }

  // Engine thread.
  void OnOutput(engine::StepOutput out) {
    Observe(out);
    {
      MutexLock lock(&mu_);
      if (!write_failed_) {
        // The front message is being written only while writing_; merge into the back otherwise.
        const bool back_free = !pending_.empty() && !(writing_ && pending_.size() == 1);
        if (!back_free) pending_.emplace_back();
        AppendOutput(out, rendering_, &pending_.back());
      }
      if (out.finished) {
        final_received_ = true;
        final_status_ = ToGrpcStatus(FinalStatus(out));
      }
    }
    if (out.finished && GetTestHooks().generate_final_output_queued) {
      GetTestHooks().generate_final_output_queued();
    }
    Pump();
  }

  // Starts the next write, or finishes the call once everything is written. gRPC calls happen
  // outside the lock; the caller holds a reference, so OnDone cannot free the reactor meanwhile.
  void Pump() {
    const v1::GenerateResponse* next = nullptr;
    bool finish = false;
    grpc::Status status;
    {
      MutexLock lock(&mu_);
      if (writing_ || finish_called_) return;
      if (!pending_.empty()) {
        writing_ = true;
        next = &pending_.front();  // deque: stays valid while others are appended
      } else if (final_received_) {
        finish_called_ = true;
        finish = true;
        status = final_status_;
      }
    }
    if (next != nullptr) {
      sync_.Handoff([&] { StartWrite(next); });
    } else if (finish) {
      sync_.Handoff([&] { Finish(status); });
    }
  }

  absl::Mutex mu_;  // guards the write state below
  std::deque<v1::GenerateResponse> pending_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool write_failed_ ABSL_GUARDED_BY(mu_) = false;
  bool final_received_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_called_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status final_status_ ABSL_GUARDED_BY(mu_);
};

// Complete: the same generation, gathered into the one response.
class CompleteReactor final : public grpc::ServerUnaryReactor, private GenerationCall {
 public:
  CompleteReactor(engine::Engine* engine, adapters::AdapterRegistry* adapters, Metrics* metrics,
                  bool draining, const v1::GenerateRequest& request, v1::GenerateResponse* response)
      : GenerationCall(engine, metrics), response_(response) {
    Start(request, *adapters, draining,
          [self = RefPtr<CompleteReactor>(this)](engine::StepOutput out) {
            self->OnOutput(std::move(out));
          });
    sync_.Publish();
  }

  void OnCancel() override {
    CheckOurs checked;
    sync_.Reacted();
    ScopedRef<CompleteReactor> reacting(this);
    if (CancelWaiting()) FinishCall(Refuse(absl::CancelledError("the request was cancelled")));
  }
  void OnDone() override {
    CheckOurs checked;
    sync_.Reacted();
    if (GetTestHooks().generation_done) GetTestHooks().generation_done();
    Unref();  // gRPC's reference
  }

 private:
  friend class RefPtr<CompleteReactor>;

  void FinishCall(const absl::Status& status) override {
    sync_.Handoff([&] { Finish(ToGrpcStatus(status)); });
  }

  // Engine thread; the only writer of response_ until Finish.
  void OnOutput(engine::StepOutput out) {
    Observe(out);
    AppendOutput(out, rendering_, response_);
    if (out.finished) sync_.Handoff([&] { Finish(ToGrpcStatus(FinalStatus(out))); });
  }

  v1::GenerateResponse* response_;
};

const grpc::Status kDraining(grpc::StatusCode::UNAVAILABLE, "the server is shutting down");

absl::Status CheckToken(const TokenAuth* auth, const grpc::CallbackServerContext& context) {
  return auth == nullptr ? absl::OkStatus() : auth->Check(context);
}

}  // namespace

InferenceService::InferenceService(engine::Engine* engine, adapters::AdapterRegistry* adapters,
                                   Metrics* metrics, ServedModelInfo info)
    : engine_(engine), adapters_(adapters), metrics_(metrics), info_(std::move(info)) {}

grpc::ServerWriteReactor<v1::GenerateResponse>* InferenceService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  CheckOurs checked;  // server/reactors.h
  if (absl::Status s = CheckToken(auth_, *context); !s.ok()) {
    // Refused before it starts (bad or missing --api-token).
    auto* refused = new FinishOnlyReactor<grpc::ServerWriteReactor<v1::GenerateResponse>>();
    refused->FinishWith(ToGrpcStatus(s));
    return refused;
  }
  return new GenerateReactor(engine_, adapters_, metrics_, draining(), *request);
}

grpc::ServerUnaryReactor* InferenceService::Complete(grpc::CallbackServerContext* context,
                                                     const v1::GenerateRequest* request,
                                                     v1::GenerateResponse* response) {
  CheckOurs checked;  // server/reactors.h
  if (absl::Status s = CheckToken(auth_, *context); !s.ok()) {
    return FinishNow(ToGrpcStatus(s));
  }
  return new CompleteReactor(engine_, adapters_, metrics_, draining(), *request, response);
}

grpc::ServerUnaryReactor* InferenceService::Tokenize(grpc::CallbackServerContext* context,
                                                     const v1::TokenizeRequest* request,
                                                     v1::TokenizeResponse* response) {
  CheckOurs checked;  // server/reactors.h
  if (absl::Status s = CheckToken(auth_, *context); !s.ok()) {
    return FinishNow(ToGrpcStatus(s));
  }
  if (draining()) return FinishNow(kDraining);
  const model::Tokenizer& tokenizer = engine_->model().tokenizer();
  for (int32_t id : tokenizer.Encode(request->text(), request->add_bos())) {
    response->add_token_ids(id);
    response->add_pieces(tokenizer.Piece(id));
  }
  return FinishNow(grpc::Status::OK);
}

grpc::ServerUnaryReactor* InferenceService::Detokenize(grpc::CallbackServerContext* context,
                                                       const v1::DetokenizeRequest* request,
                                                       v1::DetokenizeResponse* response) {
  CheckOurs checked;  // server/reactors.h
  if (absl::Status s = CheckToken(auth_, *context); !s.ok()) {
    return FinishNow(ToGrpcStatus(s));
  }
  if (draining()) return FinishNow(kDraining);
  const model::Tokenizer& tokenizer = engine_->model().tokenizer();
  const int32_t vocab = tokenizer.vocab_size();
  for (int i = 0; i < request->token_ids_size(); ++i) {
    const int32_t id = request->token_ids(i);
    if (id < 0 || id >= vocab) {
      return FinishNow(ToGrpcStatus(absl::InvalidArgumentError(absl::StrCat(
          "token_ids[", i, "] = ", id, " is outside the vocabulary [0, ", vocab, ")"))));
    }
  }
  response->set_text(tokenizer.Decode({request->token_ids().begin(), request->token_ids().end()}));
  return FinishNow(grpc::Status::OK);
}

grpc::ServerUnaryReactor* InferenceService::GetModelInfo(grpc::CallbackServerContext* context,
                                                         const v1::GetModelInfoRequest* request,
                                                         v1::ModelInfo* response) {
  CheckOurs checked;  // server/reactors.h
  if (absl::Status s = CheckToken(auth_, *context); !s.ok()) {
    return FinishNow(ToGrpcStatus(s));
  }
  const model::LlamaModel& model = engine_->model();
  const model::LlamaConfig& c = model.config();
  response->set_architecture(c.architecture);
  response->set_model_path(info_.model_path);
  response->set_hidden_size(c.hidden_size);
  response->set_intermediate_size(c.intermediate_size);
  response->set_num_layers(c.num_layers);
  response->set_num_heads(c.num_heads);
  response->set_num_kv_heads(c.num_kv_heads);
  response->set_head_dim(c.head_dim);
  response->set_vocab_size(c.vocab_size);
  response->set_context_length(c.max_position_embeddings);
  response->set_dtype(info_.dtype);
  response->set_device(info_.device);
  response->set_max_lora_rank(info_.max_lora_rank);
  response->set_bos_token_id(model.tokenizer().bos_id());
  response->set_eos_token_id(model.tokenizer().eos_id());
  response->set_kv_blocks_total(engine_->kv_blocks_total());
  response->set_kv_block_size(engine_->options().kv_block_size);
  response->set_max_batch_tokens(engine_->options().max_batch_tokens);
  response->set_max_queue(static_cast<int32_t>(engine_->options().max_queue));
  response->set_weight_bytes(model.weight_bytes());
  response->set_weight_formats(model.weight_formats());
  response->set_weight_mapped_bytes(model.weight_mapped_bytes());
  response->set_kv_dtype(model::KvDTypeName(model.kv_dtype()));
  response->set_prefix_cache(engine_->options().prefix_cache);
  if (response->device() == "cpu") {
    response->set_cpu_kernels(kernels::CpuKernelIsa());
    response->set_quant_kernels(kernels::QuantKernelIsa());
    response->set_batch_invariant(kernels::BatchInvariant());
  }
  return FinishNow(grpc::Status::OK);
}

grpc::ServerUnaryReactor* InferenceService::GetEngineStats(grpc::CallbackServerContext* context,
                                                           const v1::GetEngineStatsRequest* request,
                                                           v1::EngineStats* response) {
  CheckOurs checked;  // server/reactors.h
  if (absl::Status s = CheckToken(auth_, *context); !s.ok()) {
    return FinishNow(ToGrpcStatus(s));
  }
  const engine::EngineStats s = engine_->Stats();
  response->set_running(s.running);
  response->set_waiting(s.waiting);
  response->set_kv_blocks_used(s.kv_blocks_used);
  response->set_kv_blocks_free(s.kv_blocks_free);
  response->set_kv_blocks_total(s.kv_blocks_total);
  response->set_steps(s.steps);
  response->set_generated_tokens(s.generated_tokens);
  response->set_tokens_per_second(s.tokens_per_second);
  response->set_finished_requests(s.finished_requests);
  response->set_cancelled_requests(s.cancelled_requests);
  response->set_preemptions(s.preemptions);
  response->set_prefix_cache_blocks(s.prefix_cache_blocks);
  response->set_prefix_cache_lookup_tokens(s.prefix_cache_lookup_tokens);
  response->set_prefix_cache_hit_tokens(s.prefix_cache_hit_tokens);
  return FinishNow(grpc::Status::OK);
}

}  // namespace loraplex::server
