// The engine: one thread that owns the model and the KV cache and serves many requests at once by
// continuous batching. Start here for the serving path below the gRPC layer.
//
//   caller thread                         engine thread (one, owns model + cache)
//   -------------                         ---------------------------------------
//   Submit(request, sink) ----Queue----->  every step:
//   Cancel(id)            ----Queue----->    take new requests and cancellations
//                                            Scheduler::Schedule (admit, chunk prefill, blocks)
//                                            LlamaModel::Forward over the whole batch
//                                            sample each sequence, check stop conditions
//   sink(StepOutput)      <---------------   report new tokens/text; free finished at once
//
// Requests wait in a bounded queue while the KV cache is short; Submit refuses with
// RESOURCE_EXHAUSTED when that queue is full, and refuses up front a request that could never fit.
// A cancelled request leaves the batch and gives its KV blocks back at the start of the next step.
//
// Thread-safety: Submit, Cancel, Stats, Validate and Shutdown may be called from any thread.
// Sinks run on the engine thread.
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <thread>
#include <unordered_map>
#include <variant>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/queue.h"
#include "engine/request.h"
#include "engine/scheduler.h"
#include "engine/sequence.h"
#include "model/kv_cache.h"
#include "model/llama_model.h"

namespace loraplex::engine {

struct EngineOptions {
  int64_t max_batch_tokens = 512;  // tokens per forward step (decodes + prefill chunks)
  int64_t max_running = 64;        // sequences per step
  int64_t max_queue = 256;         // requests waiting for admission before RESOURCE_EXHAUSTED
  int64_t kv_block_size = 16;      // token slots per KV block
  // KV pool size: kv_blocks when > 0, else kv_memory_bytes / bytes per block, else enough for
  // max_running sequences of the full context length.
  int64_t kv_blocks = 0;
  int64_t kv_memory_bytes = 0;
  // Admission order across adapters (engine/scheduler.h): VTC fair share by default, or FIFO; a
  // cap on the running sequences of one adapter (0: none; kRunningShare: under VTC, its share of
  // max_running among the adapters active within fairness_window_ms, none under FIFO); VTC shares
  // per adapter name ("" is the base model, "@mix" every weighted mix; > 0, absent: 1).
  static constexpr int64_t kRunningShare = -1;
  Fairness fairness = Fairness::kVtc;
  int64_t max_running_per_adapter = kRunningShare;
  int64_t fairness_window_ms = 30000;
  std::map<std::string, double> adapter_shares;
  // Reuse the K/V of full blocks of equal prefixes across requests of the same adapter version
  // and merge state (engine/block_pool.h); idle cached blocks are evicted LRU.
  bool prefix_cache = true;
};

// A consistent snapshot of the engine's counters.
struct EngineStats {
  int64_t running = 0;         // sequences in the running batch
  int64_t waiting = 0;         // submitted, not admitted yet (counts against max_queue)
  int64_t kv_blocks_used = 0;  // held by requests
  int64_t kv_blocks_free = 0;  // free or idle in the prefix cache (evicted when needed)
  int64_t kv_blocks_total = 0;
  int64_t steps = 0;             // forward steps run
  int64_t generated_tokens = 0;  // tokens sampled in total
  int64_t finished_requests = 0;
  int64_t cancelled_requests = 0;
  int64_t preemptions = 0;
  // Prefix cache: blocks entered (held or idle), and since the start the tokens admitted requests
  // needed K/V for and those of them found cached.
  int64_t prefix_cache_blocks = 0;
  int64_t prefix_cache_lookup_tokens = 0;
  int64_t prefix_cache_hit_tokens = 0;
  // Tokens computed (prompt and decode) per adapter in the last whole window of about a second
  // (window_s long, ending window_end): the adapter's name, "" for the base model, "@mix" for
  // weighted mixes (Sequence::tenant); adapters without tokens then are absent.
  std::map<std::string, int64_t> window_tokens;
  double window_s = 0;
  absl::Time window_end;
  // The model's LoRA passes so far (LlamaModel::lora_cost; seconds 0 on CUDA).
  double lora_seconds = 0;
  int64_t lora_token_passes = 0;
  double tokens_per_second = 0;  // over the last few seconds
  // Memory the engine accounts for, in bytes (the pieces an operator adds up against the
  // process's resident size; adapters are the registry's): the model's stored weights, the KV
  // pools (all of them, used or not), and the step scratch (the model's forward-pass buffers and
  // the engine's logits, as large as the largest step so far).
  int64_t weight_bytes = 0;
  int64_t kv_pool_bytes = 0;
  int64_t scratch_bytes = 0;
};

class Engine {
 public:
  // Starts the engine thread. `model` must outlive the engine and is used only by its thread from
  // now on. INVALID_ARGUMENT for nonsensical options; RESOURCE_EXHAUSTED when the KV pool cannot
  // be allocated or cannot hold even one block.
  static absl::StatusOr<std::unique_ptr<Engine>> Create(model::LlamaModel* model,
                                                        const EngineOptions& options);
  // Cancels what is still running (sinks get kCancelled) and joins the thread.
  ~Engine();

  // Checks a request against the model without queueing it. The one owner of these rules (the
  // server maps proto shape only):
  //   INVALID_ARGUMENT: empty prompt, prompt or stop token id outside the vocabulary,
  //                     max_tokens < 1, bad sampling parameters (SamplingParams::Validate), more
  //                     than kMaxStopStrings stop strings or stop token ids, a stop string empty
  //                     or longer than kMaxStopBytes;
  //   RESOURCE_EXHAUSTED: prompt longer than the context, prompt + max_tokens past the context,
  //                     or more KV blocks than the whole pool holds.
  absl::Status Validate(const GenerationRequest& request) const;

  // Validates and queues a request; `sink` then receives its outputs on the engine thread, the last
  // one with finished = true. On error nothing is queued and the sink is never called. Besides
  // Validate's codes: RESOURCE_EXHAUSTED when max_queue requests are waiting already,
  // UNAVAILABLE after Shutdown.
  absl::StatusOr<RequestId> Submit(GenerationRequest request, OutputSink sink);

  // Asks the engine to drop a request: within one step it leaves the batch, its KV blocks are free
  // and its sink gets a last output with kCancelled. Unknown or finished ids are ignored.
  void Cancel(RequestId id);

  // Runs `task` on the engine thread between two steps and returns its status, blocking the caller
  // until then: for changes to the model that must not overlap a forward step (LoRA merge and
  // unmerge by the adapter service). UNAVAILABLE after Shutdown.
  absl::Status RunOnEngineThread(std::function<absl::Status(model::LlamaModel&)> task);

  // Refuses new requests (UNAVAILABLE), cancels those in flight and stops the thread. Idempotent.
  void Shutdown();

  EngineStats Stats() const;
  const model::LlamaModel& model() const { return *model_; }
  const EngineOptions& options() const { return options_; }
  int64_t kv_blocks_total() const { return kv_blocks_total_; }

 private:
  struct SubmitCommand {
    std::unique_ptr<Sequence> seq;
  };
  struct CancelCommand {
    RequestId id;
  };
  struct TaskCommand {
    std::function<void(model::LlamaModel&)> run;
  };
  using Command = std::variant<SubmitCommand, CancelCommand, TaskCommand>;

  Engine(model::LlamaModel* model, const EngineOptions& options, model::KvCache cache);

  // --- engine thread only -------------------------------------------------------------------
  void Loop();
  // Applies queued commands. Waits for one up to `wait` when there is nothing to run.
  void TakeCommands(absl::Duration wait);
  // Runs one forward step over the plan and reports to the sinks.
  void RunStep(const StepPlan& plan);
  // Removes seq from the scheduler (freeing its blocks), sends the final output, forgets it.
  void Finish(Sequence* seq, StepOutput out, FinishReason reason);
  void PublishStats(int64_t new_tokens);

  model::LlamaModel* const model_;
  const EngineOptions options_;
  model::KvCache cache_;  // engine thread only
  const int64_t kv_blocks_total_;
  Scheduler scheduler_;                                                 // engine thread only
  std::unordered_map<RequestId, std::unique_ptr<Sequence>> sequences_;  // engine thread only
  std::deque<std::pair<absl::Time, int64_t>> rate_window_;              // engine thread only
  model::StepLogits logits_;                                            // engine thread only
  std::map<std::string, int64_t> window_tokens_;                        // engine thread only
  absl::Time window_start_ = absl::Now();                               // engine thread only

  // --- shared ----------------------------------------------------------------------------------
  Queue<Command> inbox_;  // the only way requests and cancellations reach the engine thread
  std::atomic<RequestId> next_id_{1};
  // Requests submitted and not admitted yet; Submit reserves a place with a compare-exchange so
  // that concurrent callers never overshoot max_queue.
  std::atomic<int64_t> num_queued_{0};
  std::atomic<bool> stopping_{false};

  mutable absl::Mutex stats_mu_;  // guards stats_
  EngineStats stats_ ABSL_GUARDED_BY(stats_mu_);

  std::thread thread_;
};

}  // namespace loraplex::engine
