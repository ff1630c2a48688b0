#include "server/adapters_service.h"

#include <atomic>
#include <map>
#include <optional>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "adapters/inspect.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/sync.h"
#include "server/reactors.h"
#include "server/status_mapping.h"

namespace loraplex::server {
namespace {

v1::AdapterState StateProto(adapters::AdapterState s) {
  switch (s) {
    case adapters::AdapterState::kLoading:
      return v1::LOADING;
    case adapters::AdapterState::kReady:
      return v1::READY;
    case adapters::AdapterState::kDraining:
      return v1::DRAINING;
  }
  return v1::ADAPTER_STATE_UNSPECIFIED;
}

v1::Residency ResidencyProto(adapters::Residency r) {
  switch (r) {
    case adapters::Residency::kDevice:
      return v1::DEVICE;
    case adapters::Residency::kHost:
      return v1::HOST;
    case adapters::Residency::kDisk:
      return v1::DISK;
  }
  return v1::RESIDENCY_UNSPECIFIED;
}

grpc::ServerUnaryReactor* FinishNow(const absl::Status& status) {
  return ::loraplex::server::FinishNow(ToGrpcStatus(status));  // server/reactors.h
}

// UploadAdapter: header, chunks appended to the staging files as they arrive, the end message,
// then the client's half-close; the commit (fsync, sha256, validation, manifest) then runs on an
// admin worker. A cancel (OnCancel: the client cancelled, its deadline passed or the connection
// broke) discards the upload: before the end message nothing is committed (the failed read that
// follows a cancel looks like a half-close, so a stream that ends without the end message is
// refused), and once the commit runs it asks the cancel flag up to the manifest's rename.
// Lifetime: server/reactors.h (gRPC, the commit worker, each reaction).
class UploadReactor final : public grpc::ServerReadReactor<v1::UploadAdapterRequest>,
                            public RefCounted {
 public:
  UploadReactor(AdaptersService* service, adapters::AdapterRegistry* registry,
                const absl::Status& auth, v1::AdapterInfo* response)
      : service_(service), registry_(registry), response_(response) {
    if (!auth.ok()) {
      FinishWith(ToGrpcStatus(auth));
      return;
    }
    sync_.Handoff([&] { StartRead(&message_); });
  }

  void OnReadDone(bool ok) override {
    CheckOurs checked;
    sync_.Reacted();
    ScopedRef<UploadReactor> reacting(this);
    if (!ok) return OnStreamEnd();
    absl::Status status;
    if (end_received_) {
      status = absl::InvalidArgumentError("UploadAdapter: a message after the end message");
    } else if (message_.has_header()) {
      const v1::UploadAdapterHeader& h = message_.header();
      if (upload_ != nullptr) {
        status = absl::InvalidArgumentError("UploadAdapter: a second header in one stream");
      } else {
        absl::StatusOr<std::unique_ptr<adapters::PendingUpload>> upload =
            registry_->BeginUpload(h.name(), h.replace(), h.sha256(), h.pin(), h.max_rank());
        if (upload.ok()) {
          upload_ = *std::move(upload);
        } else {
          status = upload.status();
        }
      }
    } else if (upload_ == nullptr) {
      status = absl::InvalidArgumentError("UploadAdapter: the first message must be the header");
    } else if (message_.has_chunk()) {
      const v1::FileChunk& chunk = message_.chunk();
      status = upload_->Append(chunk.file_name(), chunk.data());
      if (status.ok()) received_[chunk.file_name()] += static_cast<int64_t>(chunk.data().size());
    } else if (message_.has_end()) {
      status = CheckSizes(message_.end());
      end_received_ = status.ok();
    } else {
      status =
          absl::InvalidArgumentError("UploadAdapter: a message with neither header, chunk nor end");
    }
    if (!status.ok()) {
      upload_.reset();  // discards the staged files
      FinishWith(ToGrpcStatus(status));
      return;
    }
    sync_.Handoff([&] { StartRead(&message_); });
  }

  void OnCancel() override {
    CheckOurs checked;
    sync_.Reacted();
    ScopedRef<UploadReactor> reacting(this);
    cancelled_.store(true);
  }

  void OnDone() override {
    CheckOurs checked;
    sync_.Reacted();
    Unref();  // gRPC's reference
  }

 private:
  // The read after the last message failed: the client half-closed, or the call was cancelled.
  void OnStreamEnd() {
    if (cancelled_.load()) {
      upload_.reset();
      FinishWith(
          ToGrpcStatus(absl::CancelledError("the upload was cancelled; nothing was registered")));
      return;
    }
    if (upload_ == nullptr) {
      FinishWith(ToGrpcStatus(
          absl::InvalidArgumentError("UploadAdapter: the stream ended before a header")));
      return;
    }
    if (!end_received_) {
      upload_.reset();
      FinishWith(ToGrpcStatus(absl::InvalidArgumentError(
          "UploadAdapter: the stream ended without the end message (UploadAdapterEnd) that "
          "confirms the upload is complete; nothing was registered")));
      return;
    }
    absl::Status started = service_->RunOnWorker([self = RefPtr<UploadReactor>(this)] {
      absl::StatusOr<adapters::AdapterInfo> info =
          self->upload_->Commit([raw = &*self] { return raw->cancelled_.load(); });
      self->upload_.reset();
      if (info.ok()) {
        self->service_->UnmergeIfStale();
        ToProto(*info, self->response_);
      }
      self->FinishWith(ToGrpcStatus(info.status()));
    });
    if (!started.ok()) {
      upload_.reset();
      FinishWith(ToGrpcStatus(started));
    }
  }

  // The end message's byte counts against what arrived.
  absl::Status CheckSizes(const v1::UploadAdapterEnd& end) {
    const std::pair<const char*, int64_t> files[] = {
        {adapters::kAdapterConfigFile, end.config_bytes()},
        {adapters::kAdapterWeightsFile, end.model_bytes()}};
    for (const auto& [file, sent] : files) {
      const int64_t got = received_[file];
      if (got != sent) {
        return absl::InvalidArgumentError(absl::StrCat("UploadAdapter: the end message says ", sent,
                                                       " bytes of ", file, " were sent, ", got,
                                                       " arrived"));
      }
    }
    return absl::OkStatus();
  }

  void FinishWith(grpc::Status status) {
    sync_.Handoff([&] { Finish(std::move(status)); });
  }

  ReactorSync sync_;  // server/reactors.h
  AdaptersService* const service_;
  adapters::AdapterRegistry* const registry_;
  v1::AdapterInfo* const response_;
  std::atomic<bool> cancelled_{false};  // OnCancel came
  // gRPC runs one OnReadDone at a time and the commit worker starts after the last one, so the
  // fields below are never touched by two threads at once.
  v1::UploadAdapterRequest message_;
  std::unique_ptr<adapters::PendingUpload> upload_;
  std::map<std::string, int64_t> received_;  // bytes per file name
  bool end_received_ = false;
};

}  // namespace

void ToProto(const adapters::AdapterInfo& info, v1::AdapterInfo* out) {
  out->set_name(info.name);
  out->set_version(info.version);
  out->set_state(StateProto(info.state));
  out->set_rank(static_cast<int32_t>(info.max_rank));
  for (const auto& [module, rank] : info.ranks)
    (*out->mutable_ranks())[module] = static_cast<int32_t>(rank);
  out->set_alpha(info.alpha);
  for (const std::string& m : info.target_modules) out->add_target_modules(m);
  out->set_bytes(info.bytes);
  out->set_residency(ResidencyProto(info.residency));
  out->set_merged(info.merged);
  out->set_requests_served(info.requests_served);
  out->set_last_used_unix_ms(
      info.last_used == absl::InfinitePast() ? 0 : absl::ToUnixMillis(info.last_used));
  out->set_sha256(info.sha256);
  out->set_pinned(info.pinned);
  out->set_path(info.source);
  out->set_dora(info.dora);
  out->set_auto_merged(info.auto_merged);
  if (info.compression) {
    const adapters::CompressionReport& c = *info.compression;
    v1::Compression* pc = out->mutable_compression();
    pc->set_max_rank(static_cast<int32_t>(c.max_rank));
    pc->set_trained_rank(static_cast<int32_t>(c.trained_max_rank));
    pc->set_relative_error(c.relative_error);
    for (const adapters::ModuleCompression& m : c.modules) {
      v1::ModuleCompression* pm = pc->add_modules();
      pm->set_module(m.module);
      pm->set_trained_rank(static_cast<int32_t>(m.trained_rank));
      pm->set_rank(static_cast<int32_t>(m.rank));
      pm->set_relative_error(m.relative_error);
    }
  }
}

AdaptersService::AdaptersService(adapters::AdapterRegistry* registry, engine::Engine* engine,
                                 const TokenAuth* auth, Metrics* metrics)
    : registry_(registry), engine_(engine), auth_(auth), metrics_(metrics) {
  // The manifest says an adapter was merged when the last process stopped: merge it again, through
  // the same path as SetAdapterMode, before the server takes calls. A failure leaves it unmerged
  // (outputs stay right; only the speed differs) and is logged, rather than refusing to start.
  const std::string spec = registry_->merge_to_restore();
  if (spec.empty()) return;
  absl::StatusOr<adapters::AdapterSpec> parsed = adapters::ParseAdapterSpec(spec);
  v1::AdapterInfo info;
  if (absl::Status s = parsed.ok() ? Merge(parsed->name, &info) : parsed.status(); !s.ok()) {
    LP_LOG(ERROR) << "adapter " << spec << " was merged before the restart but cannot be merged "
                  << "again; serving it unmerged: " << s.ToString();
  } else {
    LP_LOG(INFO) << "adapter " << spec << " merged again (recorded in the manifest)";
  }
}

AdaptersService::~AdaptersService() { workers_.Shutdown(); }

absl::Status AdaptersService::RunOnWorker(std::function<void()> work) {
  return workers_.Submit(std::move(work));
}

grpc::ServerUnaryReactor* AdaptersService::OnWorker(std::function<absl::Status()> work) {
  auto* reactor = new FinishingReactor();
  absl::Status started =
      RunOnWorker([reactor, work = std::move(work)] { reactor->FinishWith(ToGrpcStatus(work())); });
  if (!started.ok()) reactor->FinishWith(ToGrpcStatus(started));
  return reactor;
}

grpc::ServerUnaryReactor* AdaptersService::LoadAdapter(grpc::CallbackServerContext* context,
                                                       const v1::LoadAdapterRequest* request,
                                                       v1::AdapterInfo* response) {
  CheckOurs checked;  // server/reactors.h
  if (absl::Status s = auth_->Check(*context); !s.ok()) return FinishNow(s);
  return OnWorker([this, request, response]() -> absl::Status {
    LP_ASSIGN_OR_RETURN(
        adapters::AdapterInfo info,
        registry_->RegisterFromPath(request->name(), request->path(), request->replace(),
                                    request->pin(), request->max_rank()));
    UnmergeIfStale();
    ToProto(info, response);
    return absl::OkStatus();
  });
}

grpc::ServerReadReactor<v1::UploadAdapterRequest>* AdaptersService::UploadAdapter(
    grpc::CallbackServerContext* context, v1::AdapterInfo* response) {
  CheckOurs checked;  // server/reactors.h
  return new UploadReactor(this, registry_, auth_->Check(*context), response);
}

grpc::ServerUnaryReactor* AdaptersService::UnloadAdapter(grpc::CallbackServerContext* context,
                                                         const v1::UnloadAdapterRequest* request,
                                                         v1::UnloadAdapterResponse* response) {
  CheckOurs checked;  // server/reactors.h
  if (absl::Status s = auth_->Check(*context); !s.ok()) return FinishNow(s);
  // Unmerging runs on the engine thread and waits for it: not on a gRPC thread.
  return OnWorker([this, request, response]() -> absl::Status {
    LP_ASSIGN_OR_RETURN(adapters::AdapterInfo info, registry_->Unload(request->name()));
    UnmergeIfStale();
    ToProto(info, response->mutable_adapter());
    return absl::OkStatus();
  });
}

grpc::ServerUnaryReactor* AdaptersService::GetAdapter(grpc::CallbackServerContext* context,
                                                      const v1::GetAdapterRequest* request,
                                                      v1::AdapterInfo* response) {
  CheckOurs checked;  // server/reactors.h
  if (absl::Status s = auth_->Check(*context); !s.ok()) return FinishNow(s);
  absl::StatusOr<adapters::AdapterInfo> info = registry_->Get(request->name());
  if (info.ok()) ToProto(*info, response);
  return FinishNow(info.status());
}

grpc::ServerUnaryReactor* AdaptersService::ListAdapters(grpc::CallbackServerContext* context,
                                                        const v1::ListAdaptersRequest* request,
                                                        v1::ListAdaptersResponse* response) {
  CheckOurs checked;  // server/reactors.h
  if (absl::Status s = auth_->Check(*context); !s.ok()) return FinishNow(s);
  for (const adapters::AdapterInfo& info : registry_->List())
    ToProto(info, response->add_adapters());
  return FinishNow(absl::OkStatus());
}

grpc::ServerUnaryReactor* AdaptersService::SetAdapterMode(grpc::CallbackServerContext* context,
                                                          const v1::SetAdapterModeRequest* request,
                                                          v1::AdapterInfo* response) {
  CheckOurs checked;  // server/reactors.h
  if (absl::Status s = auth_->Check(*context); !s.ok()) return FinishNow(s);
  // A merge may wait for its adapter to come back from disk and both wait for the engine
  // thread: on a worker, never on a gRPC thread.
  switch (request->mode()) {
    case v1::MERGED:
      return OnWorker([this, request, response] { return Merge(request->name(), response); });
    case v1::UNMERGED:
      return OnWorker([this, request, response] { return Unmerge(request->name(), response); });
    default:
      return FinishNow(absl::InvalidArgumentError("mode must be MERGED or UNMERGED"));
  }
}

grpc::ServerUnaryReactor* AdaptersService::InspectAdapter(grpc::CallbackServerContext* context,
                                                          const v1::InspectAdapterRequest* request,
                                                          v1::InspectAdapterResponse* response) {
  CheckOurs checked;  // server/reactors.h
  if (absl::Status s = auth_->Check(*context); !s.ok()) return FinishNow(s);
  // May wait for the adapters to come back from disk and for the engine thread: on a worker.
  return OnWorker([this, request, response]() -> absl::Status {
    LP_ASSIGN_OR_RETURN(std::shared_ptr<const adapters::Lease> lease,
                        registry_->Acquire(request->name(), /*count_request=*/false));
    std::shared_ptr<const adapters::Lease> against;
    if (!request->against().empty()) {
      LP_ASSIGN_OR_RETURN(against, registry_->Acquire(request->against(), /*count_request=*/false));
    }
    // The pristine base weights of one layer, read between two steps (Merge writes them there).
    adapters::BaseWeights base =
        [this](int64_t layer, const std::array<bool, model::kNumLinearModules>& wanted,
               std::array<std::vector<float>, model::kNumLinearModules>* weights) {
          return engine_->RunOnEngineThread([&](model::LlamaModel& model) -> absl::Status {
            for (int m = 0; m < model::kNumLinearModules; ++m) {
              if (!wanted[m]) continue;
              LP_ASSIGN_OR_RETURN((*weights)[m],
                                  model.BaseLinearF32(layer, static_cast<model::LinearModule>(m)));
            }
            return absl::OkStatus();
          });
        };
    LP_ASSIGN_OR_RETURN(std::vector<adapters::ModuleInspection> modules,
                        adapters::InspectAdapter(lease->view(), engine_->model().config(), base,
                                                 against != nullptr ? &against->view() : nullptr));
    response->set_name(lease->name());
    response->set_version(lease->version());
    if (against != nullptr) {
      response->set_against(against->name());
      response->set_against_version(against->version());
    }
    for (const adapters::ModuleInspection& mi : modules) {
      v1::ModuleInspection* out = response->add_modules();
      out->set_module(mi.module);
      out->set_rank(static_cast<int32_t>(mi.rank));
      for (double s : mi.singular_values) out->add_singular_values(s);
      out->set_fro_norm(mi.fro_norm);
      out->set_relative_norm(mi.relative_norm);
      out->set_effective_rank(static_cast<int32_t>(mi.effective_rank));
      out->set_amplification(mi.amplification);
      if (mi.similarity.has_value()) out->set_similarity(*mi.similarity);
    }
    return absl::OkStatus();
  });
}

absl::Status AdaptersService::Merge(const std::string& name, v1::AdapterInfo* response) {
  LP_ASSIGN_OR_RETURN(adapters::AdapterInfo current, registry_->Get(name));
  LP_RETURN_IF_ERROR(CheckMergeable(current));
  // The lease keeps the version in memory (never evicted) for as long as it is merged. Taking it
  // may wait for a reload (and for room): without merge_mu_, so that unloads, replacements and
  // other merges' answers never wait behind it.
  LP_ASSIGN_OR_RETURN(
      std::shared_ptr<const adapters::Lease> lease,
      registry_->Acquire(absl::StrCat(name, "@", current.version), /*count_request=*/false));
  {
    MutexLock lock(&merge_mu_);
    // A mode set by hand stays: the merge policy leaves this adapter alone from now on, and a
    // merge of its own gives way (this one is recorded in the manifest, the policy's is not).
    hand_set_.insert(name);
    if (!auto_merged_.empty()) {
      LP_RETURN_IF_ERROR(AutoUnmergeLocked(absl::StrCat("SetAdapterMode MERGED for ", name)));
    }
    // Checked again: another merge, a replacement or an unload may have come meanwhile.
    LP_ASSIGN_OR_RETURN(current, registry_->Get(name));
    if (current.version != lease->version()) {
      return absl::AbortedError(absl::StrCat("adapter '", name, "' v", lease->version(),
                                             " was replaced while it was being merged; retry"));
    }
    LP_RETURN_IF_ERROR(CheckMergeable(current));
    if (registry_->merged() == nullptr) {
      double seconds = 0, stopped_s = 0;
      LP_RETURN_IF_ERROR(MergeWeights(&lease->view(), &seconds, &stopped_s));
      if (absl::Status recorded = registry_->SetMerged(lease); !recorded.ok()) {
        // Not in the manifest, so a restart would not merge it: undo, so that what runs is what
        // is stored.
        absl::Status undone = UnmergeWeights();
        // When the undo failed the record stays: the weights stay merged and must stay alive.
        if (!undone.ok()) return Annotate(undone, std::string(recorded.message()));
        registry_->ClearMerged().IgnoreError();  // the manifest already says unmerged
        return recorded;
      }
      LP_LOG(INFO) << "adapter " << name << " v" << lease->version() << " merged in "
                   << absl::StrFormat("%.1f", 1e3 * seconds) << " ms (the engine stopped "
                   << absl::StrFormat("%.1f", 1e3 * stopped_s) << " ms)";
      Transition(name, "merge");
    }
  }
  LP_ASSIGN_OR_RETURN(adapters::AdapterInfo info,
                      registry_->Get(absl::StrCat(name, "@", current.version)));
  ToProto(info, response);
  return absl::OkStatus();
}

absl::Status AdaptersService::CheckMergeable(const adapters::AdapterInfo& current) const {
  std::shared_ptr<const adapters::Lease> merged = registry_->merged();
  if (merged != nullptr &&
      (merged->name() != current.name || merged->version() != current.version)) {
    return absl::FailedPreconditionError(
        absl::StrCat("adapter '", merged->name(), "' v", merged->version(),
                     " is merged; set it UNMERGED first (one merged adapter at a time)"));
  }
  return absl::OkStatus();
}

absl::Status AdaptersService::Unmerge(const std::string& name, v1::AdapterInfo* response) {
  MutexLock lock(&merge_mu_);
  LP_ASSIGN_OR_RETURN(adapters::AdapterInfo current, registry_->Get(name));
  hand_set_.insert(name);  // the merge policy leaves it unmerged from now on
  std::shared_ptr<const adapters::Lease> merged = registry_->merged();
  if (merged != nullptr && merged->name() == current.name) {
    LP_RETURN_IF_ERROR(UnmergeWeights());
    merged.reset();
    if (auto_merged_ == name) auto_merged_.clear();
    absl::Status recorded = registry_->ClearMerged();
    LP_LOG(INFO) << "adapter " << name << " unmerged";
    Transition(name, "unmerge");
    // The model is unmerged either way; say so when a restart would merge it again.
    if (!recorded.ok()) return recorded;
  }
  // Not merged (any more): UNMERGED is already the case.
  LP_ASSIGN_OR_RETURN(adapters::AdapterInfo info, registry_->Get(name));
  ToProto(info, response);
  return absl::OkStatus();
}

void AdaptersService::UnmergeIfStale() {
  MutexLock lock(&merge_mu_);
  std::shared_ptr<const adapters::Lease> merged = registry_->merged();
  if (merged == nullptr) return;
  absl::StatusOr<adapters::AdapterInfo> current = registry_->Get(merged->name());
  if (current.ok() && current->version == merged->version()) return;
  absl::Status s = UnmergeWeights();
  if (!s.ok()) {
    // The record stays: the weights stay merged and must stay alive.
    LP_LOG(ERROR) << "unmerging replaced adapter " << merged->name() << ": " << s.ToString();
    return;
  }
  LP_LOG(INFO) << "adapter " << merged->name() << " v" << merged->version()
               << " unmerged (replaced or unloaded)";
  Transition(merged->name(), "unmerge");
  if (auto_merged_ == merged->name()) auto_merged_.clear();
  merged.reset();
  // A replaced or unloaded version is out of the manifest already: nothing to write.
  registry_->ClearMerged().IgnoreError();
}

namespace {

// The cost of a switch the policy assumes before it has measured one, per byte of base weights
// (a merge reads, copies and rewrites the matrices it touches; an unmerge moves the copies back):
// 0.25 s per GB. BM_MergeUnmerge measured 38-42 ms for a rank-16 q,k,v,o adapter on SmolLM2
// (0.27 GB in bf16, 0.54 GB in f32) on 2 cores, so the prior errs 1.6-3.5x on the slow side.
constexpr double kSwitchPriorSPerByte = 0.25e-9;

// Runs `op` on the engine thread and returns the seconds `op` itself took (not the wait for the
// step in flight).
absl::Status TimedOnEngine(engine::Engine& engine,
                           std::function<absl::Status(model::LlamaModel&)> op, double* seconds) {
  return engine.RunOnEngineThread([&op, seconds](model::LlamaModel& model) {
    const absl::Time t0 = absl::Now();
    absl::Status s = op(model);
    *seconds = absl::ToDoubleSeconds(absl::Now() - t0);
    return s;
  });
}

}  // namespace

absl::Status AdaptersService::MergeWeights(const model::LoraWeightsView* view, double* seconds,
                                           double* stopped_s) {
  const absl::Time t0 = absl::Now();
  std::optional<model::LlamaModel::PreparedMerge> prepared;
  // Only merges change the weights, and merge_mu_ keeps them from overlapping this read.
  if (engine_->model().prepares_merge_anywhere()) {
    LP_ASSIGN_OR_RETURN(prepared, engine_->model().PrepareMerge(view));
  }
  const double prepare_s = absl::ToDoubleSeconds(absl::Now() - t0);
  absl::Status merged = TimedOnEngine(
      *engine_,
      [view, &prepared](model::LlamaModel& model) -> absl::Status {
        if (!prepared.has_value()) {
          LP_ASSIGN_OR_RETURN(prepared, model.PrepareMerge(view));
        }
        return model.Merge(*std::move(prepared));
      },
      stopped_s);
  *seconds = prepare_s + *stopped_s;  // not the wait for the step in flight
  return merged;
}

absl::Status AdaptersService::UnmergeWeights(double* seconds) {
  double s = 0;
  absl::Status status = TimedOnEngine(
      *engine_, [](model::LlamaModel& model) { return model.Unmerge(); }, &s);
  engine_->model().FreeUnmerged();  // the merged copies, freed here rather than between two steps
  if (seconds != nullptr) *seconds = s;
  return status;
}

void AdaptersService::Transition(const std::string& adapter, const char* direction) {
  if (metrics_ != nullptr) metrics_->RecordMergeTransition(adapter, direction);
}

AdaptersService::MergeState AdaptersService::merge_state() {
  MutexLock lock(&merge_mu_);
  MergeState st;
  st.auto_merged = auto_merged_;
  std::shared_ptr<const adapters::Lease> merged = registry_->merged();
  st.hand_merged = merged != nullptr && merged->name() != auto_merged_;
  st.excluded = hand_set_;
  st.excluded.insert(unmergeable_.begin(), unmergeable_.end());
  st.switch_s = merge_s_ >= 0 && unmerge_s_ >= 0 ? merge_s_ + unmerge_s_
                : merge_s_ >= 0
                    ? 2 * merge_s_
                    : kSwitchPriorSPerByte * static_cast<double>(engine_->Stats().weight_bytes);
  return st;
}

absl::Status AdaptersService::AutoMerge(const std::string& name, const std::string& reason) {
  LP_ASSIGN_OR_RETURN(adapters::AdapterInfo current, registry_->Get(name));
  // As Merge: the lease keeps the version in memory while merged; taken without merge_mu_.
  LP_ASSIGN_OR_RETURN(
      std::shared_ptr<const adapters::Lease> lease,
      registry_->Acquire(absl::StrCat(name, "@", current.version), /*count_request=*/false));
  MutexLock lock(&merge_mu_);
  if (registry_->merged() != nullptr || hand_set_.count(name) > 0 || unmergeable_.count(name) > 0) {
    return absl::OkStatus();  // a client's merge came first, or a client set its mode
  }
  LP_ASSIGN_OR_RETURN(current, registry_->Get(name));
  if (current.version != lease->version()) return absl::OkStatus();  // replaced meanwhile
  double seconds = 0, stopped_s = 0;
  absl::Status merged = MergeWeights(&lease->view(), &seconds, &stopped_s);
  if (!merged.ok()) {
    if (merged.code() == absl::StatusCode::kFailedPrecondition ||
        merged.code() == absl::StatusCode::kUnimplemented) {
      unmergeable_.insert(name);
      LP_LOG(WARNING) << "merge policy: adapter " << name << " cannot be merged; serving it "
                      << "unmerged from now on: " << merged.ToString();
    }
    return merged;
  }
  // Not in the manifest: this cannot fail but for another merge, which merge_mu_ rules out.
  if (absl::Status recorded = registry_->SetMerged(std::move(lease), /*automatic=*/true);
      !recorded.ok()) {
    UnmergeWeights().IgnoreError();
    return recorded;
  }
  auto_merged_ = name;
  merge_s_ = seconds;
  LP_LOG(INFO) << "merge policy: adapter " << name << " v" << current.version << " merged in "
               << absl::StrFormat("%.1f", 1e3 * seconds) << " ms (the engine stopped "
               << absl::StrFormat("%.1f", 1e3 * stopped_s) << " ms); " << reason;
  Transition(name, "merge");
  return absl::OkStatus();
}

absl::Status AdaptersService::AutoUnmerge(const std::string& reason) {
  MutexLock lock(&merge_mu_);
  return AutoUnmergeLocked(reason);
}

absl::Status AdaptersService::AutoUnmergeLocked(const std::string& why) {
  if (auto_merged_.empty()) return absl::OkStatus();
  std::shared_ptr<const adapters::Lease> merged = registry_->merged();
  if (merged == nullptr || merged->name() != auto_merged_) {
    auto_merged_.clear();  // unmerged meanwhile (a replacement or an unload)
    return absl::OkStatus();
  }
  double seconds = 0;
  LP_RETURN_IF_ERROR(UnmergeWeights(&seconds));
  const std::string name = auto_merged_;
  const int64_t version = merged->version();
  merged.reset();
  auto_merged_.clear();
  unmerge_s_ = seconds;
  absl::Status recorded = registry_->ClearMerged();  // nothing to write: it was never recorded
  LP_LOG(INFO) << "merge policy: adapter " << name << " v" << version << " unmerged in "
               << absl::StrFormat("%.1f", 1e3 * seconds) << " ms; " << why;
  Transition(name, "unmerge");
  return recorded;
}

}  // namespace loraplex::server
