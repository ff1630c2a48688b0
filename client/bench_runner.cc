#include <chrono>
#include <condition_variable>
#include <mutex>
#include <random>
#include <thread>

#include "absl/strings/str_cat.h"
#include "client/bench.h"
#include "client/rpc.h"

namespace loraplex::client {
namespace {

using Clock = std::chrono::steady_clock;

// Shared state of one phase. Calls finish on gRPC's threads; `mu` guards everything below it.
class Phase {
 public:
  Phase(v1::Inference::Stub& stub, const ConnectionOptions& conn, const LoadSpec& spec,
        Progress* progress)
      : stub_(stub),
        conn_(conn),
        spec_(spec),
        progress_(progress),
        picker_(spec.popularity, std::max<int>(1, spec.adapters.size()), spec.seed),
        rng_(spec.seed ^ 0x9e3779b97f4a7c15ull),
        t0_(Clock::now()) {}

  double Now() const { return std::chrono::duration<double>(Clock::now() - t0_).count(); }

  // Starts one request if the bounds allow; false when the phase should start no more.
  bool MaybeStart();
  // A failed attempt of `rec`'s request: whether LoadSpec::retries allows another.
  bool MayRetry(const RequestRecord& rec, const grpc::Status& status) const;
  // Sends the request again after a back-off (on a thread of its own: never a gRPC thread's
  // sleep); the request stays in flight meanwhile.
  void Retry(v1::GenerateRequest req, RequestRecord rec);
  void Finished(RequestRecord rec);
  void WaitAllDone();
  PhaseRun Take();

 private:
  v1::GenerateRequest BuildRequest(std::string* adapter);

  v1::Inference::Stub& stub_;
  const ConnectionOptions& conn_;
  const LoadSpec& spec_;
  Progress* progress_;
  std::mutex mu_;
  std::condition_variable cv_;
  AdapterPicker picker_;
  std::mt19937_64 rng_;
  int64_t started_ = 0;
  int64_t measured_started_ = 0;
  int64_t in_flight_ = 0;
  std::vector<RequestRecord> records_;
  const Clock::time_point t0_;
};

// One streamed Generate call; deletes itself when gRPC is done with it.
class StreamCall : public grpc::ClientReadReactor<v1::GenerateResponse> {
 public:
  // `rec` holds what the request's attempts share: adapter, index, start, retries so far.
  StreamCall(Phase* phase, v1::GenerateRequest req, RequestRecord rec, bool record_outputs)
      : phase_(phase),
        req_(std::move(req)),
        rec_(std::move(rec)),
        record_outputs_(record_outputs) {}
  void Go(v1::Inference::Stub& stub, const ConnectionOptions& conn, double deadline_s) {
    PrepareContext(ctx_, conn, deadline_s);
    SetRoutingAdapter(ctx_, RoutingAdapter(req_));
    stub.async()->Generate(&ctx_, &req_, this);
    StartRead(&resp_);
    StartCall();
  }
  void OnReadDone(bool ok) override {
    if (!ok) return;  // OnDone follows
    const double t = phase_->Now();
    if (resp_.token_ids_size() > 0) {
      if (rec_.first_token_s < 0) rec_.first_token_s = t;
      rec_.chunk_times_s.push_back(t);
      rec_.chunk_tokens.push_back(resp_.token_ids_size());
      rec_.output_tokens += resp_.token_ids_size();
      if (record_outputs_) {
        rec_.output_ids.insert(rec_.output_ids.end(), resp_.token_ids().begin(),
                               resp_.token_ids().end());
      }
    }
    if (!resp_.finish_reason().empty()) {
      rec_.prompt_tokens = resp_.usage().prompt_tokens();
      if (resp_.usage().completion_tokens() > 0) {
        rec_.output_tokens = resp_.usage().completion_tokens();
      }
    }
    StartRead(&resp_);
  }
  void OnDone(const grpc::Status& s) override {
    if (!s.ok() && phase_->MayRetry(rec_, s)) {
      rec_.retried_errors.push_back(
          absl::StrCat(CodeName(s.error_code()), ": ", s.error_message()));
      phase_->Retry(std::move(req_), std::move(rec_));
      delete this;
      return;
    }
    rec_.end_s = phase_->Now();
    rec_.grpc_code = static_cast<int>(s.error_code());
    if (!s.ok()) rec_.error = s.error_message();
    // The call's context goes before the phase may end: once Finished has counted the last call,
    // the caller destroys the stub and the channel and may exit.
    Phase* phase = phase_;
    RequestRecord rec = std::move(rec_);
    delete this;
    phase->Finished(std::move(rec));
  }

 private:
  Phase* phase_;
  grpc::ClientContext ctx_;
  v1::GenerateRequest req_;
  v1::GenerateResponse resp_;
  RequestRecord rec_;
  const bool record_outputs_;
};

v1::GenerateRequest Phase::BuildRequest(std::string* adapter) {
  v1::GenerateRequest req;
  if (!spec_.adapters.empty()) *adapter = spec_.adapters[picker_.Pick(started_)];
  req.set_adapter(*adapter);
  int64_t max_tokens = spec_.max_tokens.Sample(rng_);
  if (!spec_.prompts.empty()) {
    const PromptLine& p = spec_.prompts[started_ % spec_.prompts.size()];
    req.set_prompt(p.prompt);
    if (p.max_tokens > 0) max_tokens = p.max_tokens;
  } else {
    const int64_t n = spec_.prompt_tokens.Sample(rng_);
    // Ids 0..2 are special in Llama vocabularies (unk, bos, eos); random text avoids them.
    std::uniform_int_distribution<int32_t> id(3, std::max(3, spec_.vocab_size - 1));
    if (spec_.system_prompt_tokens > 0) {
      // The adapter's own system prompt: a generator seeded by the run's seed and the name.
      std::seed_seq seq(adapter->begin(), adapter->end());
      std::vector<uint32_t> words(2);
      seq.generate(words.begin(), words.end());
      std::mt19937_64 system_rng(spec_.seed ^ (uint64_t{words[0]} << 32 | words[1]));
      for (int64_t i = 0; i < spec_.system_prompt_tokens; ++i) {
        req.add_prompt_token_ids(id(system_rng));
      }
    }
    for (int64_t i = 0; i < n; ++i) req.add_prompt_token_ids(id(rng_));
  }
  req.set_max_tokens(static_cast<int32_t>(max_tokens));
  req.set_ignore_eos(spec_.ignore_eos);
  return req;
}

bool Phase::MaybeStart() {
  StreamCall* call = nullptr;
  {
    std::lock_guard<std::mutex> lock(mu_);
    const double now = Now();
    const bool measuring = now >= spec_.warmup_s;
    if (measuring) {
      if (spec_.duration_s > 0 && now >= spec_.warmup_s + spec_.duration_s) return false;
      if (spec_.requests > 0 && measured_started_ >= spec_.requests) return false;
    }
    std::string adapter;
    v1::GenerateRequest req = BuildRequest(&adapter);
    ++started_;
    if (measuring) ++measured_started_;
    ++in_flight_;
    if (progress_ != nullptr) {
      progress_->started.fetch_add(1, std::memory_order_relaxed);
      progress_->in_flight.fetch_add(1, std::memory_order_relaxed);
    }
    RequestRecord rec;
    rec.adapter = std::move(adapter);
    rec.index = started_ - 1;
    rec.start_s = now;
    call = new StreamCall(this, std::move(req), std::move(rec), spec_.record_outputs);
  }
  call->Go(stub_, conn_, spec_.request_deadline_s);
  return true;
}

bool Phase::MayRetry(const RequestRecord& rec, const grpc::Status& status) const {
  const grpc::StatusCode code = status.error_code();
  return rec.retries < spec_.retries &&
         (code == grpc::StatusCode::UNAVAILABLE || code == grpc::StatusCode::INTERNAL ||
          code == grpc::StatusCode::UNKNOWN);
}

void Phase::Retry(v1::GenerateRequest req, RequestRecord rec) {
  RequestRecord next;
  next.adapter = std::move(rec.adapter);
  next.index = rec.index;
  next.start_s = rec.start_s;
  next.retries = rec.retries + 1;
  next.retried_errors = std::move(rec.retried_errors);
  const auto backoff = std::chrono::milliseconds(100 << std::min(next.retries - 1, 5));
  auto* call = new StreamCall(this, std::move(req), std::move(next), spec_.record_outputs);
  std::thread([this, call, backoff] {
    std::this_thread::sleep_for(backoff);
    call->Go(stub_, conn_, spec_.request_deadline_s);
  }).detach();
}

void Phase::Finished(RequestRecord rec) {
  if (progress_ != nullptr) {
    progress_->done.fetch_add(1, std::memory_order_relaxed);
    progress_->in_flight.fetch_sub(1, std::memory_order_relaxed);
    progress_->output_tokens.fetch_add(rec.output_tokens, std::memory_order_relaxed);
    if (rec.grpc_code != 0) progress_->errors.fetch_add(1, std::memory_order_relaxed);
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    records_.push_back(std::move(rec));
  }
  // Closed loop: a finished request makes room for the next one. It starts before in_flight_
  // drops, so WaitAllDone never sees 0 while a successor is about to start.
  if (spec_.concurrency > 0) MaybeStart();
  std::lock_guard<std::mutex> lock(mu_);
  --in_flight_;
  cv_.notify_all();  // under the lock: the waiter may destroy this Phase as soon as it wakes
}

void Phase::WaitAllDone() {
  std::unique_lock<std::mutex> lock(mu_);
  cv_.wait(lock, [&] { return in_flight_ == 0; });
}

PhaseRun Phase::Take() {
  std::lock_guard<std::mutex> lock(mu_);
  PhaseRun run;
  run.records = std::move(records_);
  run.warmup_end_s = spec_.warmup_s;
  run.wall_s = Now();
  return run;
}

}  // namespace

PhaseRun RunPhase(v1::Inference::Stub& stub, const ConnectionOptions& conn, const LoadSpec& spec,
                  Progress* progress) {
  Phase phase(stub, conn, spec, progress);
  if (spec.concurrency > 0) {
    for (int64_t i = 0; i < spec.concurrency; ++i) {
      if (!phase.MaybeStart()) break;
    }
  } else if (spec.arrivals.has_value()) {
    std::mt19937_64 rng(spec.seed + 1);
    double next = 0;
    while (true) {
      const double now = phase.Now();
      if (next > now) {
        std::this_thread::sleep_for(std::chrono::duration<double>(next - now));
      }
      if (!phase.MaybeStart()) break;
      next += spec.arrivals->NextGap(rng);
    }
  }
  phase.WaitAllDone();
  return phase.Take();
}

}  // namespace loraplex::client
