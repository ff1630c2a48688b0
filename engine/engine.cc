#include "engine/engine.h"

#include <algorithm>
#include <cmath>
#include <future>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "common/logging.h"
#include "common/status.h"
#include "common/sync.h"

namespace loraplex::engine {
namespace {

// Without --kv-blocks/--kv-memory: room for max_running full-context sequences, at most this much.
constexpr int64_t kDefaultKvBytesCap = int64_t{1} << 30;
// Tokens/s is measured over this much recent time.
constexpr absl::Duration kRateWindow = absl::Seconds(3);
// EngineStats::window_tokens spans about this much.
constexpr absl::Duration kTokenWindow = absl::Seconds(1);
// How long the idle engine thread sleeps in one wait for commands.
constexpr absl::Duration kIdleWait = absl::Milliseconds(100);

// The per-adapter cap in words, for the log line at start.
std::string RunningCapName(const EngineOptions& o) {
  if (o.max_running_per_adapter > 0) return absl::StrCat(o.max_running_per_adapter);
  if (o.max_running_per_adapter == 0 || o.fairness != Fairness::kVtc) return "no cap";
  return absl::StrCat("its share among those active within ", o.fairness_window_ms, " ms");
}

}  // namespace

const char* FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kEos:
      return "eos";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
  }
  return "";
}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Create(model::LlamaModel* model,
                                                       const EngineOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("engine: no model");
  if (options.max_batch_tokens < 1 || options.max_running < 1 || options.max_queue < 1 ||
      options.kv_block_size < 1 || options.kv_blocks < 0 || options.kv_memory_bytes < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "engine options: max_batch_tokens (", options.max_batch_tokens, "), max_running (",
        options.max_running, "), max_queue (", options.max_queue, ") and kv_block_size (",
        options.kv_block_size, ") must be >= 1; kv_blocks and kv_memory_bytes >= 0"));
  }
  if (options.max_running_per_adapter < EngineOptions::kRunningShare ||
      options.fairness_window_ms < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("engine options: max_running_per_adapter (", options.max_running_per_adapter,
                     ") must be >= 0 or kRunningShare, fairness_window_ms (",
                     options.fairness_window_ms, ") >= 0"));
  }
  for (const auto& [name, share] : options.adapter_shares) {
    if (!(share > 0) || !std::isfinite(share)) {
      return absl::InvalidArgumentError(absl::StrCat("engine options: the share of adapter '", name,
                                                     "' (", share,
                                                     ") must be a finite number > 0"));
    }
  }
  const model::LlamaConfig& config = model->config();
  const int64_t bytes_per_block = model->kv_bytes_per_token() * options.kv_block_size;
  int64_t blocks = options.kv_blocks;
  if (blocks == 0 && options.kv_memory_bytes > 0) {
    blocks = options.kv_memory_bytes / bytes_per_block;
    if (blocks < 1) {
      return absl::ResourceExhaustedError(
          absl::StrCat("KV memory of ", options.kv_memory_bytes, " bytes holds no block of ",
                       options.kv_block_size, " tokens (", bytes_per_block, " bytes)"));
    }
  }
  if (blocks == 0) {
    const int64_t per_seq =
        (config.max_position_embeddings + options.kv_block_size - 1) / options.kv_block_size;
    blocks = std::max<int64_t>(
        1, std::min(options.max_running * per_seq, kDefaultKvBytesCap / bytes_per_block));
  }
  LP_ASSIGN_OR_RETURN(model::KvCache cache, model->CreateKvCache(blocks, options.kv_block_size));
  auto engine = std::unique_ptr<Engine>(new Engine(model, options, std::move(cache)));
  engine->thread_ = std::thread([e = engine.get()] { e->Loop(); });
  LP_LOG(INFO) << "engine: " << blocks << " KV blocks of " << options.kv_block_size << " tokens ("
               << (blocks * bytes_per_block >> 20) << " MiB), max_batch_tokens "
               << options.max_batch_tokens << ", max_running " << options.max_running
               << ", max_queue " << options.max_queue << ", fairness "
               << (options.fairness == Fairness::kVtc ? "vtc" : "fifo") << ", running per adapter "
               << RunningCapName(options) << ", prefix cache "
               << (options.prefix_cache ? "on" : "off");
  return engine;
}

Engine::Engine(model::LlamaModel* model, const EngineOptions& options, model::KvCache cache)
    : model_(model),
      options_(options),
      cache_(std::move(cache)),
      kv_blocks_total_(cache_.num_blocks()),
      scheduler_(&cache_, SchedulerOptions{.max_batch_tokens = options.max_batch_tokens,
                                           .max_running = options.max_running,
                                           .fairness = options.fairness,
                                           .max_running_per_tenant = std::max<int64_t>(
                                               0, options.max_running_per_adapter),
                                           .share_running_slots = options.max_running_per_adapter ==
                                                                  EngineOptions::kRunningShare,
                                           .active_window_ms = options.fairness_window_ms,
                                           .tenant_weights = options.adapter_shares,
                                           .prefix_cache = options.prefix_cache}) {
  MutexLock lock(&stats_mu_);
  stats_.kv_blocks_total = kv_blocks_total_;
  stats_.kv_blocks_free = kv_blocks_total_;
  stats_.weight_bytes = model_->weight_bytes();
  stats_.kv_pool_bytes = cache_.pool_bytes();
  stats_.scratch_bytes = model_->scratch_bytes();
}

Engine::~Engine() { Shutdown(); }

absl::Status Engine::Validate(const GenerationRequest& request) const {
  const model::LlamaConfig& config = model_->config();
  const int64_t vocab = config.vocab_size;
  if (request.prompt_ids.empty()) {
    return absl::InvalidArgumentError("the prompt is empty: give at least one token");
  }
  for (size_t i = 0; i < request.prompt_ids.size(); ++i) {
    const int32_t id = request.prompt_ids[i];
    if (id < 0 || id >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt_token_ids[", i, "] = ", id, " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  if (request.stop.size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(
        absl::StrCat("at most ", kMaxStopStrings, " stop strings, got ", request.stop.size()));
  }
  for (size_t i = 0; i < request.stop.size(); ++i) {
    if (request.stop[i].empty() || request.stop[i].size() > kMaxStopBytes) {
      return absl::InvalidArgumentError(absl::StrCat("stop[", i, "] must have 1 to ", kMaxStopBytes,
                                                     " bytes, got ", request.stop[i].size()));
    }
  }
  if (request.stop_token_ids.size() > kMaxStopStrings) {
    return absl::InvalidArgumentError(absl::StrCat(
        "at most ", kMaxStopStrings, " stop_token_ids, got ", request.stop_token_ids.size()));
  }
  for (size_t i = 0; i < request.stop_token_ids.size(); ++i) {
    const int32_t id = request.stop_token_ids[i];
    if (id < 0 || id >= vocab) {
      return absl::InvalidArgumentError(absl::StrCat(
          "stop_token_ids[", i, "] = ", id, " is outside the vocabulary [0, ", vocab, ")"));
    }
  }
  if (request.max_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_tokens must be at least 1, got ", request.max_tokens));
  }
  LP_RETURN_IF_ERROR(request.sampling.Validate());
  const int64_t context = config.max_position_embeddings;
  const int64_t prompt = static_cast<int64_t>(request.prompt_ids.size());
  if (prompt >= context) {
    return absl::ResourceExhaustedError(absl::StrCat("the prompt has ", prompt,
                                                     " tokens; the context length is ", context,
                                                     " (room for at least one new token needed)"));
  }
  if (prompt + request.max_tokens > context) {
    return absl::ResourceExhaustedError(
        absl::StrCat("prompt (", prompt, " tokens) + max_tokens (", request.max_tokens,
                     ") exceeds the context length ", context, "; lower max_tokens to at most ",
                     context - prompt));
  }
  const int64_t blocks = scheduler_.BlocksFor(prompt + request.max_tokens);
  if (blocks > kv_blocks_total_) {
    return absl::ResourceExhaustedError(
        absl::StrCat("prompt + max_tokens need ", blocks, " KV blocks but the whole pool has ",
                     kv_blocks_total_, " (raise --kv-memory or lower max_tokens)"));
  }
  return absl::OkStatus();
}

absl::StatusOr<RequestId> Engine::Submit(GenerationRequest request, OutputSink sink) {
  if (stopping_.load()) return absl::UnavailableError("the engine is shutting down");
  LP_RETURN_IF_ERROR(Validate(request));
  int64_t queued = num_queued_.load();
  do {
    if (queued >= options_.max_queue) {
      return absl::ResourceExhaustedError(absl::StrCat("the request queue is full (",
                                                       options_.max_queue,
                                                       " waiting, --max-queue); retry later"));
    }
  } while (!num_queued_.compare_exchange_weak(queued, queued + 1));

  const RequestId id = next_id_.fetch_add(1);
  auto seq =
      std::make_unique<Sequence>(id, std::move(request), std::move(sink), &model_->tokenizer());
  seq->submit_time = absl::Now();
  Command command = SubmitCommand{std::move(seq)};
  if (inbox_.TryPush(std::move(command)) != Queue<Command>::PushResult::kOk) {
    num_queued_.fetch_sub(1);
    return absl::UnavailableError("the engine is shutting down");
  }
  return id;
}

void Engine::Cancel(RequestId id) {
  Command command = CancelCommand{id};
  // A closed inbox means Shutdown, which cancels everything anyway.
  (void)inbox_.TryPush(std::move(command));
}

absl::Status Engine::RunOnEngineThread(std::function<absl::Status(model::LlamaModel&)> task) {
  auto done = std::make_shared<std::promise<absl::Status>>();
  std::future<absl::Status> result = done->get_future();
  Command command = TaskCommand{
      [task = std::move(task), done](model::LlamaModel& m) { done->set_value(task(m)); }};
  if (inbox_.TryPush(std::move(command)) != Queue<Command>::PushResult::kOk) {
    return absl::UnavailableError("the engine is shutting down");
  }
  return result.get();  // the loop runs every queued command, also while shutting down
}

void Engine::Shutdown() {
  stopping_.store(true);
  inbox_.Close();
  if (thread_.joinable()) thread_.join();
}

EngineStats Engine::Stats() const {
  MutexLock lock(&stats_mu_);
  return stats_;
}

void Engine::Loop() {
  while (true) {
    const bool idle = scheduler_.num_running() == 0 && scheduler_.num_waiting() == 0;
    TakeCommands(idle ? kIdleWait : absl::ZeroDuration());
    if (stopping_.load() && inbox_.closed()) break;
    // Tasks may have merged or unmerged an adapter: the prefix cache keys by the weights' state.
    scheduler_.SetMergeState(model_->merged() != nullptr ? model_->merged()->id : 0);
    StepPlan plan = scheduler_.Schedule();
    for (const ScheduledChunk& c : plan.chunks) {
      if (c.seq->queued) {
        c.seq->queued = false;
        num_queued_.fetch_sub(1);
      }
    }
    if (plan.num_preempted > 0) {
      MutexLock lock(&stats_mu_);
      stats_.preemptions += plan.num_preempted;
    }
    if (plan.chunks.empty()) {
      PublishStats(0);
      continue;
    }
    RunStep(plan);
  }
  // Shutdown: whatever is queued or running ends as cancelled.
  TakeCommands(absl::ZeroDuration());
  std::vector<Sequence*> left;
  for (auto& [id, seq] : sequences_) left.push_back(seq.get());
  for (Sequence* seq : left) Finish(seq, StepOutput{}, FinishReason::kCancelled);
  PublishStats(0);
}

void Engine::TakeCommands(absl::Duration wait) {
  std::vector<Command> commands;
  if (wait > absl::ZeroDuration()) {
    if (std::optional<Command> c = inbox_.Pop(wait)) commands.push_back(std::move(*c));
  }
  for (Command& c : inbox_.PopAll()) commands.push_back(std::move(c));
  for (Command& command : commands) {
    if (auto* submit = std::get_if<SubmitCommand>(&command)) {
      Sequence* seq = submit->seq.get();
      sequences_.emplace(seq->id, std::move(submit->seq));
      scheduler_.AddWaiting(seq);
    } else if (auto* task = std::get_if<TaskCommand>(&command)) {
      task->run(*model_);
    } else {
      const RequestId id = std::get<CancelCommand>(command).id;
      auto it = sequences_.find(id);
      if (it != sequences_.end()) Finish(it->second.get(), StepOutput{}, FinishReason::kCancelled);
    }
  }
}

void Engine::RunStep(const StepPlan& plan) {
  model::ForwardBatch batch;
  int64_t max_blocks = 1;
  for (const ScheduledChunk& c : plan.chunks) {
    max_blocks = std::max<int64_t>(max_blocks, static_cast<int64_t>(c.seq->blocks.size()));
  }
  batch.max_blocks_per_seq = max_blocks;
  // Unused table entries point at block 0; attention never reads past a sequence's position.
  batch.block_tables.assign(plan.chunks.size() * max_blocks, 0);
  batch.tokens.reserve(plan.num_tokens);
  bool any_adapter = false;
  for (size_t i = 0; i < plan.chunks.size(); ++i) {
    const ScheduledChunk& c = plan.chunks[i];
    const Sequence& seq = *c.seq;
    std::copy(seq.blocks.begin(), seq.blocks.end(), batch.block_tables.begin() + i * max_blocks);
    int32_t adapter = -1;  // index into batch.adapters
    if (seq.request.adapter != nullptr || seq.request.mix != nullptr) {
      const model::LoraWeightsView* w =
          seq.request.mix != nullptr ? &seq.request.mix->view() : &seq.request.adapter->view();
      auto it = std::find(batch.adapters.begin(), batch.adapters.end(), w);
      adapter = static_cast<int32_t>(it - batch.adapters.begin());
      if (it == batch.adapters.end()) batch.adapters.push_back(w);
      any_adapter = true;
    }
    for (int64_t t = c.start; t < c.start + c.count; ++t) {
      batch.tokens.push_back(seq.tokens[t]);
      batch.positions.push_back(static_cast<int32_t>(t));
      batch.token_seq.push_back(static_cast<int32_t>(i));
      batch.token_adapter.push_back(adapter);
    }
    if (c.sample) batch.logit_rows.push_back(static_cast<int32_t>(batch.tokens.size() - 1));
  }
  if (!any_adapter) batch.token_adapter.clear();

  // The best logits every sampled row needs; 0 (whole rows) when one request needs all of them.
  int64_t top_k = 1;
  for (const ScheduledChunk& c : plan.chunks) {
    if (!c.sample) continue;
    const int64_t need = model::Sampler::TopLogitsNeeded(c.seq->request.sampling);
    if (need == 0 || need > model::LlamaModel::kMaxTopLogits) {
      top_k = 0;
      break;
    }
    top_k = std::max(top_k, need);
  }
  absl::Status status = model_->Forward(batch, &cache_, top_k, &logits_);
  if (!status.ok()) {
    // Requests were validated on submission, so this is a bug; fail this batch, keep serving.
    LP_LOG(ERROR) << "forward step failed: " << status.ToString();
    for (const ScheduledChunk& c : plan.chunks) {
      StepOutput out;
      out.status = absl::InternalError(absl::StrCat("forward step failed: ", status.message()));
      Finish(c.seq, std::move(out), FinishReason::kError);
    }
    PublishStats(0);
    return;
  }
  scheduler_.Commit(plan);
  for (const ScheduledChunk& c : plan.chunks) window_tokens_[c.seq->tenant] += c.count;

  const model::Tokenizer& tokenizer = model_->tokenizer();
  // Every sampling chunk gives one token. Counted before any is sent, so that a client who has
  // its token finds it in the stats.
  const int64_t new_tokens = std::count_if(plan.chunks.begin(), plan.chunks.end(),
                                           [](const ScheduledChunk& c) { return c.sample; });
  {
    MutexLock lock(&stats_mu_);
    stats_.generated_tokens += new_tokens;
  }
  int64_t row = 0;
  for (const ScheduledChunk& c : plan.chunks) {
    if (!c.sample) continue;
    Sequence* seq = c.seq;
    model::SampleResult sample = seq->sampler.Sample(logits_, row++);
    const int32_t id = sample.token_id;
    seq->tokens.push_back(id);

    StepOutput out;
    out.tokens.push_back({id, sample.logprob, std::move(sample.top)});
    const GenerationRequest& req = seq->request;
    FinishReason reason = FinishReason::kNone;
    bool by_stop_string = false;
    if (std::find(req.stop_token_ids.begin(), req.stop_token_ids.end(), id) !=
        req.stop_token_ids.end()) {
      reason = FinishReason::kStop;
    } else if (!req.ignore_eos && tokenizer.IsEndOfGeneration(id)) {
      reason = FinishReason::kEos;
    } else {
      StopMatcher::Result m = seq->stop.Push(seq->decoder.Push(id));
      out.text = std::move(m.text);
      if (m.stopped) {
        reason = FinishReason::kStop;
        by_stop_string = true;
      }
    }
    if (reason == FinishReason::kNone && seq->num_generated() >= req.max_tokens) {
      reason = FinishReason::kLength;
    }
    if (reason == FinishReason::kNone) {
      out.id = seq->id;
      out.prompt_tokens = static_cast<int32_t>(seq->num_prompt_tokens);
      out.completion_tokens = static_cast<int32_t>(seq->num_generated());
      seq->sink(std::move(out));
      continue;
    }
    if (!by_stop_string) {
      // Ending for another reason than a stop string: what was held back is part of the answer.
      out.text += seq->stop.Push(seq->decoder.Flush()).text;
      out.text += seq->stop.Flush();
    }
    Finish(seq, std::move(out), reason);
  }
  {
    MutexLock lock(&stats_mu_);
    ++stats_.steps;
  }
  PublishStats(new_tokens);
}

void Engine::Finish(Sequence* seq, StepOutput out, FinishReason reason) {
  scheduler_.Remove(seq);
  if (seq->queued) {
    seq->queued = false;
    num_queued_.fetch_sub(1);
  }
  out.id = seq->id;
  out.finished = true;
  out.finish_reason = reason;
  out.prompt_tokens = static_cast<int32_t>(seq->num_prompt_tokens);
  out.completion_tokens = static_cast<int32_t>(seq->num_generated());
  {
    MutexLock lock(&stats_mu_);
    ++stats_.finished_requests;
    if (reason == FinishReason::kCancelled) ++stats_.cancelled_requests;
  }
  // The sequence, and with it the adapter's lease, goes before the caller hears of the end: a
  // client that unloads or replaces the adapter next must not find this finished request still
  // holding the version (listed DRAINING, its memory kept).
  const OutputSink sink = seq->sink;
  sequences_.erase(seq->id);  // destroys seq
  sink(std::move(out));
}

void Engine::PublishStats(int64_t new_tokens) {
  const absl::Time now = absl::Now();
  rate_window_.emplace_back(now, new_tokens);
  while (rate_window_.size() > 1 && now - rate_window_.front().first > kRateWindow) {
    rate_window_.pop_front();
  }
  int64_t window_tokens = 0;
  for (const auto& [t, n] : rate_window_) window_tokens += n;
  const double span = absl::ToDoubleSeconds(now - rate_window_.front().first);
  const int64_t scratch =
      model_->scratch_bytes() +
      static_cast<int64_t>((logits_.logits.capacity() + logits_.logprobs.capacity()) *
                               sizeof(float) +
                           logits_.ids.capacity() * sizeof(int32_t));
  MutexLock lock(&stats_mu_);
  stats_.scratch_bytes = scratch;
  stats_.running = scheduler_.num_running();
  stats_.waiting = scheduler_.num_waiting();
  stats_.kv_blocks_free = scheduler_.blocks().num_available();
  stats_.kv_blocks_used = kv_blocks_total_ - stats_.kv_blocks_free;
  stats_.prefix_cache_blocks = scheduler_.blocks().num_cached();
  stats_.prefix_cache_hit_tokens = scheduler_.prefix_hit_tokens();
  stats_.prefix_cache_lookup_tokens = scheduler_.prefix_lookup_tokens();
  if (now - window_start_ >= kTokenWindow) {
    stats_.window_tokens = std::move(window_tokens_);
    window_tokens_.clear();
    stats_.window_s = absl::ToDoubleSeconds(now - window_start_);
    stats_.window_end = now;
    window_start_ = now;
  }
  const model::LlamaModel::LoraCost lora = model_->lora_cost();
  stats_.lora_seconds = lora.seconds;
  stats_.lora_token_passes = lora.token_passes;
  stats_.tokens_per_second = span > 0.05 ? window_tokens / span : 0.0;
}

}  // namespace loraplex::engine
