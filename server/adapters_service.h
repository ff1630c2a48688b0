// The loraplex.v1.Adapters admin service (DESIGN.md sections 4 and 5) over the adapter registry
// (adapters/registry.h), on the gRPC callback API. Every call first checks the admin token.
//
// No handler blocks a gRPC callback thread (there are few of them, and every call of every
// service needs one): LoadAdapter, the commit of UploadAdapter, UnloadAdapter and SetAdapterMode
// may wait (disk, a reload, the engine thread between two steps), so they run on admin workers
// (a thread each, at most kMaxOperationsInFlight) that finish the call; GetAdapter and
// ListAdapters answer at once. InspectAdapter computes on a worker too (a second or so for every
// module of a 135M model) and reads the pristine base weights on the engine thread, one layer per
// task between two steps. A merge waits for its adapter without holding the merge lock, so
// no other admin call waits behind it. UploadAdapter is a client stream: a header, chunks of
// adapter_config.json and adapter_model.safetensors written to the state directory's staging
// area as they arrive, and an end message with the byte counts; a stream that is cancelled or
// breaks off, or ends without the end message, is discarded (proto/loraplex/v1/adapters.proto).
//
// SetAdapterMode merges one adapter's current version into the base weights (one at a time) on
// the engine thread between two steps; other adapters keep working in mixed mode. The merged
// version stays in memory while merged. Replacing or unloading the merged adapter unmerges it
// first (the new version starts UNMERGED). The mode is recorded in the manifest: after a restart
// the constructor merges the same version again, before the server takes calls.
//
// Thread-safety: gRPC calls the handlers from its threads; shared state is guarded below.
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <set>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "adapters/registry.h"
#include "common/executor.h"
#include "engine/engine.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "server/auth.h"
#include "server/metrics.h"

namespace loraplex::server {

// What the command line says about adapter management and access control.
struct AdapterAdminOptions {
  std::string adapter_dir;      // root of LoadAdapter paths; empty: LoadAdapter by path is off
  bool load_on_demand = false;  // --load-on-demand: requests register <adapter_dir>/<name>
  std::string state_dir;        // empty: a temporary directory, removed at exit (no persistence)
  int64_t max_loaded = 0;       // --max-loaded-adapters; 0 = no limit
  int64_t memory_bytes = 0;     // --adapter-memory; 0 = no limit
  int64_t max_adapter_bytes = int64_t{1} << 30;  // --max-adapter-bytes, per upload
  std::string admin_token;  // --admin-token; empty: the Adapters service is open
  std::string api_token;    // --api-token; empty: the Inference service is open
  TlsFiles tls;
};

// Fills an API AdapterInfo from the registry's.
void ToProto(const adapters::AdapterInfo& info, v1::AdapterInfo* out);

class AdaptersService final : public v1::Adapters::CallbackService {
 public:
  // Pointers must outlive the service. `auth` guards every call; `metrics` (may be null) counts
  // merge transitions. Merges the adapter the manifest recorded as merged
  // (AdapterRegistry::merge_to_restore) on the running engine.
  AdaptersService(adapters::AdapterRegistry* registry, engine::Engine* engine,
                  const TokenAuth* auth, Metrics* metrics = nullptr);
  // Waits for the admin operations still running.
  ~AdaptersService() override;

  grpc::ServerUnaryReactor* LoadAdapter(grpc::CallbackServerContext* context,
                                        const v1::LoadAdapterRequest* request,
                                        v1::AdapterInfo* response) override;
  grpc::ServerReadReactor<v1::UploadAdapterRequest>* UploadAdapter(
      grpc::CallbackServerContext* context, v1::AdapterInfo* response) override;
  grpc::ServerUnaryReactor* UnloadAdapter(grpc::CallbackServerContext* context,
                                          const v1::UnloadAdapterRequest* request,
                                          v1::UnloadAdapterResponse* response) override;
  grpc::ServerUnaryReactor* GetAdapter(grpc::CallbackServerContext* context,
                                       const v1::GetAdapterRequest* request,
                                       v1::AdapterInfo* response) override;
  grpc::ServerUnaryReactor* ListAdapters(grpc::CallbackServerContext* context,
                                         const v1::ListAdaptersRequest* request,
                                         v1::ListAdaptersResponse* response) override;
  grpc::ServerUnaryReactor* SetAdapterMode(grpc::CallbackServerContext* context,
                                           const v1::SetAdapterModeRequest* request,
                                           v1::AdapterInfo* response) override;
  grpc::ServerUnaryReactor* InspectAdapter(grpc::CallbackServerContext* context,
                                           const v1::InspectAdapterRequest* request,
                                           v1::InspectAdapterResponse* response) override;

  // Runs `work` on an admin worker; the destructor waits for it. RESOURCE_EXHAUSTED (and `work`
  // is dropped) when kMaxOperationsInFlight are running already.
  absl::Status RunOnWorker(std::function<void()> work);
  // After a replace or unload: unmerges when the merged version is no longer current.
  void UnmergeIfStale();

  // --- for the merge policy (server/merge_policy.h; Server runs it) ---
  struct MergeState {
    std::string auto_merged;         // the adapter the policy merged; "" none
    bool hand_merged = false;        // one merged through SetAdapterMode: the policy stays out
    std::set<std::string> excluded;  // modes set by hand, and adapters that cannot be merged
    double switch_s = 0;             // a merge and an unmerge: measured, a prior before
  };
  MergeState merge_state();
  // Merges `name`'s current version for the policy (AdapterInfo.auto_merged; never recorded in
  // the manifest). Does nothing when any adapter is merged already or `name` is excluded; an
  // adapter the model refuses to merge is excluded from then on. `reason` goes to the log.
  absl::Status AutoMerge(const std::string& name, const std::string& reason);
  // Unmerges what the policy merged (nothing if a client's merge replaced it meanwhile).
  absl::Status AutoUnmerge(const std::string& reason);

 private:
  // Sets `response` to the adapter's current info, with merged state.
  absl::Status Merge(const std::string& name, v1::AdapterInfo* response);
  absl::Status Unmerge(const std::string& name, v1::AdapterInfo* response);
  // FAILED_PRECONDITION when another adapter (or version) than `current` is merged.
  absl::Status CheckMergeable(const adapters::AdapterInfo& current) const;
  // Merges `view` into the model (under merge_mu_): W + B A computed on this thread while steps
  // go on where the model allows it (LlamaModel::PrepareMerge), then swapped in between two steps.
  // *seconds: the whole merge; *stopped_s: the part the engine stood still for.
  absl::Status MergeWeights(const model::LoraWeightsView* view, double* seconds, double* stopped_s)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(merge_mu_);
  // Unmerges the model (under merge_mu_) between two steps; *seconds: what the engine stood still
  // for.
  absl::Status UnmergeWeights(double* seconds = nullptr) ABSL_EXCLUSIVE_LOCKS_REQUIRED(merge_mu_);
  // Unmerges the policy's merge (under merge_mu_); `why` goes to the log.
  absl::Status AutoUnmergeLocked(const std::string& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(merge_mu_);
  // Counts a transition in the metrics.
  void Transition(const std::string& adapter, const char* direction);
  // A unary reactor finished with what `work` returns, run on an admin worker: for calls that may
  // wait (for the engine thread, a reload, disk), which must never hold a gRPC callback thread.
  grpc::ServerUnaryReactor* OnWorker(std::function<absl::Status()> work);

  // Admin operations running on workers at once (each has a thread, mostly waiting on disk or
  // the engine); more are refused with RESOURCE_EXHAUSTED rather than piling up threads.
  static constexpr int kMaxOperationsInFlight = 64;

  adapters::AdapterRegistry* const registry_;
  engine::Engine* const engine_;
  const TokenAuth* const auth_;
  Metrics* const metrics_;

  // Serialises merges and unmerges: the model's weights and the registry's record of the merged
  // version (AdapterRegistry::merged) change together under it.
  absl::Mutex merge_mu_;
  // The merge policy's state, under merge_mu_: the adapter it merged, the names a client set the
  // mode of (the policy leaves them alone), those the model refused to merge, and the measured
  // seconds of the last merge and unmerge (< 0 before the first).
  std::string auto_merged_ ABSL_GUARDED_BY(merge_mu_);
  std::set<std::string> hand_set_ ABSL_GUARDED_BY(merge_mu_);
  std::set<std::string> unmergeable_ ABSL_GUARDED_BY(merge_mu_);
  double merge_s_ ABSL_GUARDED_BY(merge_mu_) = -1;
  double unmerge_s_ ABSL_GUARDED_BY(merge_mu_) = -1;

  // Last: its jobs finish before the rest of the service goes.
  Executor workers_{Executor::Options{.name = "adapter operation",
                                      .max_threads = kMaxOperationsInFlight,
                                      .max_jobs = kMaxOperationsInFlight}};
};

}  // namespace loraplex::server
