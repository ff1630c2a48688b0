#include "server/adapters_service.h"

#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/logging.h"
#include "common/status.h"
#include "engine/tsan_lock.h"
#include "server/status_mapping.h"
#include "server/tsan_annotations.h"

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
  return ::loraplex::server::FinishNow(ToGrpcStatus(status));  // tsan_annotations.h
}

// UploadAdapter: header, then chunks appended to the staging files as they arrive; the commit
// (fsync, sha256, validation, manifest) runs on a thread of its own after the client half-closes.
class UploadReactor final : public grpc::ServerReadReactor<v1::UploadAdapterRequest> {
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
    if (!ok) {  // the client half-closed: commit
      if (upload_ == nullptr) {
        FinishWith(ToGrpcStatus(
            absl::InvalidArgumentError("UploadAdapter: the stream ended before a header")));
        return;
      }
      service_->RunDetached([this] {
        absl::StatusOr<adapters::AdapterInfo> info = upload_->Commit();
        upload_.reset();
        if (info.ok()) {
          service_->UnmergeIfStale();
          ToProto(*info, response_);
        }
        FinishWith(ToGrpcStatus(info.status()));
      });
      return;
    }
    absl::Status status;
    if (message_.has_header()) {
      const v1::UploadAdapterHeader& h = message_.header();
      if (upload_ != nullptr) {
        status = absl::InvalidArgumentError("UploadAdapter: a second header in one stream");
      } else {
        absl::StatusOr<std::unique_ptr<adapters::PendingUpload>> upload =
            registry_->BeginUpload(h.name(), h.replace(), h.sha256(), h.pin());
        if (upload.ok()) {
          upload_ = *std::move(upload);
        } else {
          status = upload.status();
        }
      }
    } else if (message_.has_chunk()) {
      if (upload_ == nullptr) {
        status = absl::InvalidArgumentError("UploadAdapter: the first message must be the header");
      } else {
        status = upload_->Append(message_.chunk().file_name(), message_.chunk().data());
      }
    } else {
      status = absl::InvalidArgumentError("UploadAdapter: a message with neither header nor chunk");
    }
    if (!status.ok()) {
      upload_.reset();  // discards the staged files
      FinishWith(ToGrpcStatus(status));
      return;
    }
    sync_.Handoff([&] { StartRead(&message_); });
  }

  void OnDone() override {
    CheckOurs checked;
    sync_.Reacted();
    delete this;
  }

 private:
  void FinishWith(grpc::Status status) {
    sync_.Handoff([&] { Finish(std::move(status)); });
  }

  ReactorSync sync_;  // server/tsan_annotations.h
  AdaptersService* const service_;
  adapters::AdapterRegistry* const registry_;
  v1::AdapterInfo* const response_;
  v1::UploadAdapterRequest message_;
  // gRPC runs one OnReadDone at a time and the commit thread starts after the last one, so the
  // upload is never touched by two threads at once.
  std::unique_ptr<adapters::PendingUpload> upload_;
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
}

AdaptersService::AdaptersService(adapters::AdapterRegistry* registry, engine::Engine* engine,
                                 const TokenAuth* auth)
    : registry_(registry), engine_(engine), auth_(auth) {
  // The manifest says an adapter was merged when the last process stopped: merge it again, through
  // the same path as SetAdapterMode, before the server takes calls. A failure leaves it unmerged
  // (outputs stay right; only the speed differs) and is logged, rather than refusing to start.
  const std::string spec = registry_->merge_to_restore();
  if (spec.empty()) return;
  const std::string name = spec.substr(0, spec.rfind('@'));
  v1::AdapterInfo info;
  if (absl::Status s = Merge(name, &info); !s.ok()) {
    LP_LOG(ERROR) << "adapter " << spec << " was merged before the restart but cannot be merged "
                  << "again; serving it unmerged: " << s.ToString();
  } else {
    LP_LOG(INFO) << "adapter " << spec << " merged again (recorded in the manifest)";
  }
}

AdaptersService::~AdaptersService() {
  engine::TsanMutexLock lock(&threads_mu_);
  engine::TsanRelease(&threads_mu_);
  threads_mu_.Await(absl::Condition(
      +[](int64_t* running) { return *running == 0; }, &running_));
  engine::TsanAcquire(&threads_mu_);
}

void AdaptersService::RunDetached(std::function<void()> work) {
  {
    engine::TsanMutexLock lock(&threads_mu_);
    ++running_;
  }
  std::thread([this, work = std::move(work)] {
    work();
    engine::TsanMutexLock lock(&threads_mu_);
    --running_;
  }).detach();
}

grpc::ServerUnaryReactor* AdaptersService::LoadAdapter(grpc::CallbackServerContext* context,
                                                       const v1::LoadAdapterRequest* request,
                                                       v1::AdapterInfo* response) {
  CheckOurs checked;  // server/tsan_annotations.h
  if (absl::Status s = auth_->Check(*context); !s.ok()) return FinishNow(s);
  auto* reactor = new FinishingReactor();
  RunDetached([this, reactor, request, response] {
    absl::StatusOr<adapters::AdapterInfo> info = registry_->RegisterFromPath(
        request->name(), request->path(), request->replace(), request->pin());
    if (info.ok()) {
      UnmergeIfStale();
      ToProto(*info, response);
    }
    reactor->FinishWith(ToGrpcStatus(info.status()));
  });
  return reactor;
}

grpc::ServerReadReactor<v1::UploadAdapterRequest>* AdaptersService::UploadAdapter(
    grpc::CallbackServerContext* context, v1::AdapterInfo* response) {
  CheckOurs checked;  // server/tsan_annotations.h
  return new UploadReactor(this, registry_, auth_->Check(*context), response);
}

grpc::ServerUnaryReactor* AdaptersService::UnloadAdapter(grpc::CallbackServerContext* context,
                                                         const v1::UnloadAdapterRequest* request,
                                                         v1::UnloadAdapterResponse* response) {
  CheckOurs checked;  // server/tsan_annotations.h
  if (absl::Status s = auth_->Check(*context); !s.ok()) return FinishNow(s);
  absl::StatusOr<adapters::AdapterInfo> info = registry_->Unload(request->name());
  if (!info.ok()) return FinishNow(info.status());
  UnmergeIfStale();
  ToProto(*info, response->mutable_adapter());
  return FinishNow(absl::OkStatus());
}

grpc::ServerUnaryReactor* AdaptersService::GetAdapter(grpc::CallbackServerContext* context,
                                                      const v1::GetAdapterRequest* request,
                                                      v1::AdapterInfo* response) {
  CheckOurs checked;  // server/tsan_annotations.h
  if (absl::Status s = auth_->Check(*context); !s.ok()) return FinishNow(s);
  absl::StatusOr<adapters::AdapterInfo> info = registry_->Get(request->name());
  if (info.ok()) ToProto(*info, response);
  return FinishNow(info.status());
}

grpc::ServerUnaryReactor* AdaptersService::ListAdapters(grpc::CallbackServerContext* context,
                                                        const v1::ListAdaptersRequest* request,
                                                        v1::ListAdaptersResponse* response) {
  CheckOurs checked;  // server/tsan_annotations.h
  if (absl::Status s = auth_->Check(*context); !s.ok()) return FinishNow(s);
  for (const adapters::AdapterInfo& info : registry_->List())
    ToProto(info, response->add_adapters());
  return FinishNow(absl::OkStatus());
}

grpc::ServerUnaryReactor* AdaptersService::SetAdapterMode(grpc::CallbackServerContext* context,
                                                          const v1::SetAdapterModeRequest* request,
                                                          v1::AdapterInfo* response) {
  CheckOurs checked;  // server/tsan_annotations.h
  if (absl::Status s = auth_->Check(*context); !s.ok()) return FinishNow(s);
  switch (request->mode()) {
    case v1::MERGED:
      return FinishNow(Merge(request->name(), response));
    case v1::UNMERGED:
      return FinishNow(Unmerge(request->name(), response));
    default:
      return FinishNow(absl::InvalidArgumentError("mode must be MERGED or UNMERGED"));
  }
}

absl::Status AdaptersService::Merge(const std::string& name, v1::AdapterInfo* response) {
  engine::TsanMutexLock lock(&merge_mu_);
  LP_ASSIGN_OR_RETURN(adapters::AdapterInfo current, registry_->Get(name));
  if (merged_ != nullptr) {
    if (merged_->name() != current.name || merged_->version() != current.version) {
      return absl::FailedPreconditionError(
          absl::StrCat("adapter '", merged_->name(), "' v", merged_->version(),
                       " is merged; set it UNMERGED first (one merged adapter at a time)"));
    }
  } else {
    // The lease keeps the version in memory (never evicted) for as long as it is merged.
    LP_ASSIGN_OR_RETURN(std::shared_ptr<const adapters::Lease> lease,
                        registry_->Acquire(name, /*count_request=*/false));
    const model::LoraWeightsView* view = &lease->view();
    LP_RETURN_IF_ERROR(
        engine_->RunOnEngineThread([view](model::LlamaModel& model) { return model.Merge(view); }));
    if (absl::Status recorded = registry_->SetMerged(*lease, true); !recorded.ok()) {
      // Not recorded, so a restart would not merge it: undo, so that what runs is what is stored.
      absl::Status undone =
          engine_->RunOnEngineThread([](model::LlamaModel& model) { return model.Unmerge(); });
      if (!undone.ok()) {  // keep the lease: the weights stay merged and must stay alive
        merged_ = std::move(lease);
        return Annotate(undone, std::string(recorded.message()));
      }
      registry_->SetMerged(*lease, false).IgnoreError();  // the manifest already says unmerged
      return recorded;
    }
    merged_ = std::move(lease);
    LP_LOG(INFO) << "adapter " << name << " v" << merged_->version() << " merged";
  }
  LP_ASSIGN_OR_RETURN(adapters::AdapterInfo info,
                      registry_->Get(absl::StrCat(name, "@", merged_->version())));
  ToProto(info, response);
  return absl::OkStatus();
}

absl::Status AdaptersService::Unmerge(const std::string& name, v1::AdapterInfo* response) {
  engine::TsanMutexLock lock(&merge_mu_);
  LP_ASSIGN_OR_RETURN(adapters::AdapterInfo current, registry_->Get(name));
  if (merged_ != nullptr && merged_->name() == current.name) {
    LP_RETURN_IF_ERROR(
        engine_->RunOnEngineThread([](model::LlamaModel& model) { return model.Unmerge(); }));
    absl::Status recorded = registry_->SetMerged(*merged_, false);
    merged_.reset();
    LP_LOG(INFO) << "adapter " << name << " unmerged";
    // The model is unmerged either way; say so when a restart would merge it again.
    if (!recorded.ok()) return recorded;
  }
  // Not merged (any more): UNMERGED is already the case.
  LP_ASSIGN_OR_RETURN(adapters::AdapterInfo info, registry_->Get(name));
  ToProto(info, response);
  return absl::OkStatus();
}

void AdaptersService::UnmergeIfStale() {
  engine::TsanMutexLock lock(&merge_mu_);
  if (merged_ == nullptr) return;
  absl::StatusOr<adapters::AdapterInfo> current = registry_->Get(merged_->name());
  if (current.ok() && current->version == merged_->version()) return;
  absl::Status s =
      engine_->RunOnEngineThread([](model::LlamaModel& model) { return model.Unmerge(); });
  if (!s.ok()) {
    LP_LOG(ERROR) << "unmerging replaced adapter " << merged_->name() << ": " << s.ToString();
    return;  // keep the lease: the weights stay merged and must stay alive
  }
  // A replaced or unloaded version is out of the manifest already: nothing to write.
  registry_->SetMerged(*merged_, false).IgnoreError();
  LP_LOG(INFO) << "adapter " << merged_->name() << " v" << merged_->version()
               << " unmerged (replaced or unloaded)";
  merged_.reset();
}

}  // namespace loraplex::server
