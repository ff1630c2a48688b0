// `loraplex bench`: flags, scenarios S1..S6, adapters made for the run, hot swaps, the live
// progress line, and results.json / report.html.
#include "client/bench.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/adapter_files.h"
#include "client/bench_report.h"
#include "client/commands.h"
#include "client/format.h"
#include "loraplex/v1/adapters.grpc.pb.h"

namespace loraplex::client {
namespace {

struct BenchFlags {
  ConnectionOptions conn;
  std::string scenario;
  int64_t concurrency = 0;
  double rate = 0;
  std::string arrival = "poisson";
  std::string adapters;
  std::string popularity = "uniform";
  std::vector<std::string> make_adapters;
  double perturb = 0.1;
  int64_t max_rank = 0;
  bool keep_adapters = false;
  std::string prompt_tokens = "128";
  int64_t system_prompt_tokens = 0;
  bool record_outputs = false;
  bool hand_merge = true;
  std::string max_tokens = "128";
  std::string prompts_file;
  bool ignore_eos = true;
  int64_t requests = 0;
  double duration = 0;
  double warmup = 1;
  double swap_every = 0;
  std::string out;
  int64_t seed = 1;
  double request_deadline = 600;
  int64_t retries = 0;
  bool quiet = false;
  int64_t rounds = 1;
};

// The fixed parameters of DESIGN.md section 6 (prompts and outputs of 128 tokens). Flags given on
// the command line still override them.
absl::Status ApplyScenario(const std::string& s, BenchFlags& f) {
  f.prompt_tokens = "128";
  f.max_tokens = "128";
  if (s == "S1") {  // base decode: one request at a time, no adapter
    f.concurrency = 1;
    f.requests = 8;
    f.warmup = 0;
  } else if (s == "S2" || s == "S6") {  // 32 concurrent requests, each a different adapter
    f.concurrency = 32;
    f.adapters = "32";
    f.popularity = "distinct";
    f.duration = 60;
    f.warmup = 5;
  } else if (s == "S3" || s == "S5") {  // 64 adapters, zipf(1.0), Poisson arrivals near capacity
    f.adapters = "64";
    f.popularity = "zipf:1.0";
    f.arrival = "poisson";
    f.rate = 2;  // "near capacity" depends on the machine: pass --rate after measuring S2
    f.duration = 60;
    f.warmup = 5;
    if (s == "S5") f.swap_every = 1;
  } else if (s == "S4") {  // one request: base vs one adapter unmerged vs merged
    f.concurrency = 1;
    f.adapters = "1";
    f.popularity = "identical";
    f.requests = 8;
    f.warmup = 0;
  } else if (s == "S7") {  // skewed: one adapter has 90% of the requests, 31 share the rest
    f.concurrency = 32;
    f.adapters = "32";
    f.popularity = "hot:0.9";
    f.duration = 60;
    f.warmup = 5;
  } else if (s == "S9") {  // a 512-token system prompt per adapter, short user turns
    f.system_prompt_tokens = 512;
    f.prompt_tokens = "32";
    f.max_tokens = "32";
    f.concurrency = 4;
    f.adapters = "8";
    f.popularity = "uniform";
    f.requests = 96;
    f.warmup = 0;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("--scenario: '", s, "' is not one of S1..S7, S9"));
  }
  return absl::OkStatus();
}

void AddFlags(ArgParser& p, BenchFlags& f) {
  AddConnectionFlags(p, f.conn);
  p.AddString("scenario", &f.scenario,
              "S1..S6 of DESIGN.md section 6, S7 (one hot adapter) or S9 (shared system prompts); "
              "flags below override");
  p.AddInt("concurrency", &f.concurrency, "closed loop: requests kept in flight");
  p.AddDouble("rate", &f.rate, "open loop: requests per second");
  p.AddString("arrival", &f.arrival, "open loop arrivals: poisson or gamma:SHAPE");
  p.AddString("adapters", &f.adapters, "names a,b,c, or a count N (made, or the first N loaded)");
  p.AddString("popularity", &f.popularity, "distinct | uniform | zipf:ALPHA | identical | hot:P");
  p.AddList("make-adapters", &f.make_adapters,
            "PEFT folder to upload N perturbed copies of (bench-0..); repeat for S6 ranks", true);
  p.AddDouble("perturb", &f.perturb, "relative perturbation of made copies' LoRA weights");
  p.AddInt(
      "max-rank", &f.max_rank,
      "serve the made copies compressed to this rank (UploadAdapter max_rank; 0 = as trained)");
  p.AddBool("keep-adapters", &f.keep_adapters, "leave made adapters loaded at the end");
  p.AddString("prompt-tokens", &f.prompt_tokens, "prompt length: N or uniform:MIN:MAX");
  p.AddInt("system-prompt-tokens", &f.system_prompt_tokens,
           "random prompts start with their adapter's system prompt of N tokens (shared by its "
           "requests)");
  p.AddString("max-tokens", &f.max_tokens, "output length: N or uniform:MIN:MAX");
  p.AddString("prompts-file", &f.prompts_file, "JSONL of {\"prompt\", \"max_tokens\"?} instead");
  p.AddBool("ignore-eos", &f.ignore_eos, "generate exactly max-tokens (default on)");
  p.AddInt("requests", &f.requests, "measured requests to send (after warm-up)");
  p.AddDouble("duration", &f.duration, "seconds to send measured requests (after warm-up)");
  p.AddDouble("warmup", &f.warmup, "seconds of warm-up whose requests are not measured");
  p.AddDouble("swap-every", &f.swap_every, "replace a made adapter every SECONDS (S5)");
  p.AddString("out", &f.out, "write DIR/results.json and DIR/report.html");
  p.AddBool("hand-merge", &f.hand_merge,
            "S7: also run the phases with the hot adapter merged, then unmerged, by hand (default "
            "on)");
  p.AddBool("record-outputs", &f.record_outputs,
            "also write DIR/outputs.jsonl: every request's generated token ids");
  p.AddInt("seed", &f.seed, "seed of prompts, lengths, adapters and arrivals");
  p.AddDouble("request-deadline", &f.request_deadline, "seconds per request");
  p.AddInt("retries", &f.retries,
           "send a request failing with UNAVAILABLE, INTERNAL or UNKNOWN again, up to N times");
  p.AddBool("quiet", &f.quiet, "no progress line");
  p.AddInt("rounds", &f.rounds,
           "S2/S4/S6: run the phases this many times in turn (base, adapters, base, ...), so a "
           "drift of the machine hits every phase alike; ratios pool the rounds");
}

// Adapters made for this run: name -> files (kept for hot swaps).
struct MadeAdapters {
  std::map<std::string, PeftFiles> files;
  std::vector<std::vector<std::string>> groups;  // one group per --make-adapters folder
  std::vector<int64_t> ranks;                    // "r" of each folder's config
};

absl::StatusOr<MadeAdapters> MakeAdapters(v1::Adapters::Stub& stub, const BenchFlags& f, int n,
                                          std::string* failure) {
  MadeAdapters made;
  for (size_t g = 0; g < f.make_adapters.size(); ++g) {
    auto src = ReadPeftDir(f.make_adapters[g]);
    if (!src.ok()) return src.status();
    const nlohmann::json cfg = nlohmann::json::parse(src->config_json, nullptr, false);
    const int64_t rank = cfg.value("r", 0);
    made.ranks.push_back(rank);
    std::vector<std::string> names;
    for (int k = 0; k < n; ++k) {
      const std::string name = f.make_adapters.size() == 1 ? absl::StrCat("bench-", k)
                                                           : absl::StrCat("bench-r", rank, "-", k);
      PeftFiles copy = *src;
      auto perturbed =
          PerturbLoraWeights(src->safetensors, f.seed * 1000003 + g * 1009 + k, f.perturb);
      if (!perturbed.ok()) {
        return absl::Status(perturbed.status().code(),
                            absl::StrCat(f.make_adapters[g], ": ", perturbed.status().message()));
      }
      copy.safetensors = std::move(*perturbed);
      v1::AdapterInfo info;
      grpc::Status st = UploadPeft(stub, f.conn, name, copy, /*replace=*/true, /*pin=*/false,
                                   1 << 20, &info, f.max_rank);
      if (!st.ok()) {
        *failure = DescribeError(st, absl::StrCat("bench: uploading ", name), f.conn);
        return absl::Status(static_cast<absl::StatusCode>(st.error_code()), *failure);
      }
      made.files[name] = std::move(copy);
      names.push_back(name);
    }
    made.groups.push_back(std::move(names));
  }
  return made;
}

// Prints the live progress line on stderr until stopped.
class ProgressPrinter {
 public:
  ProgressPrinter(const Progress& p, std::string phase, bool quiet)
      : p_(p), phase_(std::move(phase)), tty_(isatty(STDERR_FILENO)) {
    if (!quiet) thread_ = std::thread([this] { Loop(); });
  }
  ~ProgressPrinter() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }

 private:
  void Loop() {
    const auto t0 = std::chrono::steady_clock::now();
    int64_t last_tokens = 0;
    double last_t = 0;
    int tick = 0;
    std::unique_lock<std::mutex> l(mu_);
    while (!cv_.wait_for(l, std::chrono::milliseconds(500), [&] { return stop_; })) {
      const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      const int64_t tok = p_.output_tokens.load(std::memory_order_relaxed);
      const std::string line = absl::StrCat(
          "[bench ", phase_, "] ", Num(t, 1), " s  done ", p_.done.load(), "  in flight ",
          p_.in_flight.load(), "  ", Num((tok - last_tokens) / std::max(1e-9, t - last_t), 1),
          " tok/s  errors ", p_.errors.load());
      last_tokens = tok;
      last_t = t;
      // Without a terminal, a line every 5 s instead of redrawing one.
      if (tty_)
        std::cerr << "\r" << line << "\033[K" << std::flush;
      else if (++tick % 10 == 0)
        std::cerr << line << "\n";
    }
    if (tty_) std::cerr << "\r\033[K" << std::flush;
  }

  const Progress& p_;
  std::string phase_;
  bool tty_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  std::thread thread_;
};

// Replaces made adapters round-robin every `every_s` seconds while a phase runs (scenario S5).
class Swapper {
 public:
  Swapper(v1::Adapters::Stub& stub, const BenchFlags& f, const MadeAdapters& made,
          std::vector<std::string> names)
      : stub_(stub), f_(f), made_(made), names_(std::move(names)) {
    if (f.swap_every > 0 && !names_.empty()) thread_ = std::thread([this] { Loop(); });
  }
  ~Swapper() { Stop(); }
  void Stop() {
    {
      std::lock_guard<std::mutex> l(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
  }
  nlohmann::json Json() const {
    return {{"every_s", f_.swap_every}, {"done", done_}, {"failed", failed_}, {"errors", errors_}};
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> l(mu_);
    for (int64_t k = 0;; ++k) {
      if (cv_.wait_for(l, std::chrono::duration<double>(f_.swap_every), [&] { return stop_; })) {
        return;
      }
      const std::string& name = names_[k % names_.size()];
      PeftFiles files = made_.files.at(name);
      auto perturbed = PerturbLoraWeights(files.safetensors, f_.seed + 7919 * (k + 1), f_.perturb);
      if (perturbed.ok()) files.safetensors = std::move(*perturbed);
      v1::AdapterInfo info;
      l.unlock();
      grpc::Status st =
          UploadPeft(stub_, f_.conn, name, files, true, false, 1 << 20, &info, f_.max_rank);
      l.lock();
      if (st.ok()) {
        ++done_;
      } else {
        ++failed_;
        if (errors_.size() < 5) errors_.push_back(DescribeError(st, "swap " + name, f_.conn));
      }
    }
  }
  v1::Adapters::Stub& stub_;
  const BenchFlags& f_;
  const MadeAdapters& made_;
  std::vector<std::string> names_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool stop_ = false;
  int64_t done_ = 0, failed_ = 0;
  std::vector<std::string> errors_;
  std::thread thread_;
};

grpc::Status SetMode(v1::Adapters::Stub& stub, const ConnectionOptions& conn,
                     const std::string& name, v1::AdapterMode mode) {
  grpc::ClientContext ctx;
  PrepareContext(ctx, conn, 120);
  SetRoutingAdapter(ctx, name);
  v1::SetAdapterModeRequest req;
  req.set_name(name);
  req.set_mode(mode);
  v1::AdapterInfo info;
  return stub.SetAdapterMode(&ctx, req, &info);
}

struct PhasePlan {
  std::string name;
  std::vector<std::string> adapters;
  std::string merge;  // adapter merged for the phase (S4)
};

void PrintSummary(const nlohmann::json& r, const std::string& title) {
  std::cout << title << ": " << r["requests"] << " requests (" << r["errors"] << " errors) in "
            << Num(r["duration_s"].get<double>(), 2) << " s after " << r["warmup_requests"]
            << " warm-up; " << Num(r["requests_per_s"].get<double>(), 2) << " req/s, "
            << Num(r["output_tokens_per_s"].get<double>(), 1) << " output tok/s\n";
  std::vector<std::vector<std::string>> rows = {{"ms", "mean", "p50", "p90", "p99"}};
  for (const char* k : {"ttft", "tpot", "itl", "e2e"}) {
    rows.push_back({k, Num(r[k]["mean"].get<double>()), Num(r[k]["p50"].get<double>()),
                    Num(r[k]["p90"].get<double>()), Num(r[k]["p99"].get<double>())});
  }
  std::cout << FormatTable(rows);
  if (r["retries"].get<int64_t>() > 0) {
    std::cout << "retried attempts: " << r["retries"] << " " << r["retried_by_code"].dump() << "\n";
  }
  if (r["errors"].get<int64_t>() > 0) {
    std::cout << "errors by code: " << r["errors_by_code"].dump() << "\n";
    for (const auto& e : r["error_examples"]) std::cout << "  " << e.get<std::string>() << "\n";
  }
}

}  // namespace

int RunBench(const std::vector<std::string>& args) {
  ArgParser p("loraplex bench", "[--concurrency N | --rate R] [flags]");
  BenchFlags f;
  AddFlags(p, f);
  // A scenario sets defaults that explicit flags then override: find it first.
  for (size_t i = 0; i < args.size(); ++i) {
    std::string s;
    if (args[i].rfind("--scenario=", 0) == 0)
      s = args[i].substr(11);
    else if (args[i] == "--scenario" && i + 1 < args.size())
      s = args[i + 1];
    if (!s.empty()) {
      if (absl::Status st = ApplyScenario(s, f); !st.ok()) {
        std::cerr << "loraplex bench: " << st.message() << "\n";
        return kExitUsage;
      }
    }
  }
  auto usage_error = [](const auto& msg) {
    std::cerr << "loraplex bench: " << msg << "\n";
    return kExitUsage;
  };
  auto pos = p.Parse(args);
  if (!pos.ok()) return usage_error(pos.status().message());
  if (p.help_requested()) {
    std::cout << p.Usage();
    return kExitOk;
  }
  if (!pos->empty()) return usage_error(absl::StrCat("unexpected argument '", (*pos)[0], "'"));
  if (f.rate > 0 && f.scenario != "S3" && f.scenario != "S5") {
    // An explicit --rate selects the open loop even where a scenario set a concurrency.
    bool explicit_concurrency = false;
    for (const auto& a : args) explicit_concurrency |= a.rfind("--concurrency", 0) == 0;
    if (!explicit_concurrency) f.concurrency = 0;
  }
  if ((f.concurrency > 0) == (f.rate > 0)) {
    return usage_error(
        "give exactly one of --concurrency N (closed loop) and --rate R (open loop)");
  }
  if (f.requests <= 0 && f.duration <= 0) f.duration = 10;
  if (f.warmup < 0) return usage_error("--warmup must be >= 0");
  if (f.retries < 0 || f.retries > 10) return usage_error("--retries must be 0..10");
  if (f.rounds < 1 || f.rounds > 100) return usage_error("--rounds must be 1..100");

  LoadSpec spec;
  spec.concurrency = f.concurrency;
  if (f.rate > 0) {
    auto a = ParseArrivals(f.arrival, f.rate);
    if (!a.ok()) return usage_error(a.status().message());
    spec.arrivals = *a;
  }
  auto pop = ParsePopularity(f.popularity);
  if (!pop.ok()) return usage_error(pop.status().message());
  spec.popularity = *pop;
  auto pt = ParseLengthDist("prompt-tokens", f.prompt_tokens);
  if (!pt.ok()) return usage_error(pt.status().message());
  auto mt = ParseLengthDist("max-tokens", f.max_tokens);
  if (!mt.ok()) return usage_error(mt.status().message());
  spec.prompt_tokens = *pt;
  spec.max_tokens = *mt;
  if (f.system_prompt_tokens < 0) return usage_error("--system-prompt-tokens must be >= 0");
  if (f.system_prompt_tokens > 0 && !f.prompts_file.empty()) {
    return usage_error("--system-prompt-tokens starts random prompts; not with --prompts-file");
  }
  spec.system_prompt_tokens = f.system_prompt_tokens;
  if (f.record_outputs && f.out.empty()) return usage_error("--record-outputs writes into --out");
  spec.record_outputs = f.record_outputs;
  if (!f.prompts_file.empty()) {
    auto prompts = ReadPromptsJsonl(f.prompts_file);
    if (!prompts.ok()) return usage_error(prompts.status().message());
    spec.prompts = std::move(*prompts);
  }
  spec.ignore_eos = f.ignore_eos;
  spec.requests = f.requests;
  spec.duration_s = f.duration;
  spec.warmup_s = f.warmup;
  spec.seed = static_cast<uint64_t>(f.seed);
  spec.request_deadline_s = f.request_deadline;
  spec.retries = static_cast<int>(f.retries);

  auto channel = MakeChannel(f.conn);
  if (!channel.ok()) return usage_error(channel.status().message());
  auto inference = v1::Inference::NewStub(*channel);
  auto admin = v1::Adapters::NewStub(*channel);
  v1::ModelInfo model;
  {
    grpc::ClientContext ctx;
    PrepareContext(ctx, f.conn, 30);
    grpc::Status st = inference->GetModelInfo(&ctx, v1::GetModelInfoRequest(), &model);
    if (!st.ok()) return ReportError(st, "bench", f.conn);
  }
  spec.vocab_size = static_cast<int32_t>(model.vocab_size());

  // Which adapters: made here, named, or the first N the server has.
  int64_t count = 0;
  std::vector<std::string> named;
  if (!f.adapters.empty() && !absl::SimpleAtoi(f.adapters, &count)) {
    named = absl::StrSplit(f.adapters, ',', absl::SkipEmpty());
  }
  if (f.swap_every > 0 && f.make_adapters.empty()) {
    return usage_error("--swap-every replaces adapters made with --make-adapters; give one");
  }
  MadeAdapters made;
  if (!f.make_adapters.empty()) {
    if (!named.empty())
      return usage_error("--make-adapters wants --adapters N (a count), not names");
    if (count <= 0) count = 8;
    std::string failure;
    auto m = MakeAdapters(*admin, f, static_cast<int>(count), &failure);
    if (!m.ok()) {
      std::cerr << "loraplex "
                << (failure.empty() ? "bench: " + std::string(m.status().message()) : failure)
                << "\n";
      return failure.empty() ? kExitUsage
                             : ExitCodeFor(static_cast<grpc::StatusCode>(m.status().code()));
    }
    made = std::move(*m);
    named = made.groups.back();
  } else if (count > 0) {
    grpc::ClientContext ctx;
    PrepareContext(ctx, f.conn, 30);
    v1::ListAdaptersResponse list;
    grpc::Status st = admin->ListAdapters(&ctx, v1::ListAdaptersRequest(), &list);
    if (!st.ok()) return ReportError(st, "bench: listing adapters", f.conn);
    for (const auto& a : list.adapters()) {
      if (static_cast<int64_t>(named.size()) < count && a.state() == v1::READY) {
        named.push_back(a.name());
      }
    }
    if (static_cast<int64_t>(named.size()) < count) {
      std::cerr << "loraplex bench: --adapters " << count << " but the server has " << named.size()
                << " ready; load more or use --make-adapters DIR\n";
      return kExitNotFound;
    }
  }

  std::vector<PhasePlan> plans;
  if (f.scenario == "S2") {
    plans = {{"base", {}, ""}, {"adapters", named, ""}};
  } else if (f.scenario == "S4") {
    if (named.empty())
      return usage_error("S4 needs an adapter: --adapters NAME or --make-adapters");
    plans = {{"base", {}, ""}, {"unmerged", {named[0]}, ""}, {"merged", {named[0]}, named[0]}};
  } else if (f.scenario == "S7") {
    // As served (against a server with --merge-policy off: unmerged; auto: the policy's choice),
    // then with the hot adapter merged by hand, then unmerged by hand (SetAdapterMode UNMERGED at
    // the end of the merged phase: a merge policy leaves it so), all on one server back to back.
    if (named.empty()) return usage_error("S7 needs adapters: --adapters N or --make-adapters");
    plans = {{"served", named, ""}};
    if (f.hand_merge) {
      plans.push_back({"hot merged by hand", named, named[0]});
      plans.push_back({"hot unmerged by hand", named, ""});
    }
  } else if (f.scenario == "S6") {
    plans = {{"base", {}, ""}};
    for (size_t g = 0; g < made.groups.size(); ++g) {
      plans.push_back({absl::StrCat("rank ", made.ranks[g]), made.groups[g], ""});
    }
  } else {
    plans = {{"run", named, ""}};
  }

  std::vector<PhaseRun> runs;
  std::vector<std::string> names;
  nlohmann::json phases = nlohmann::json::array();
  nlohmann::json swaps;
  // Every plan `rounds` times, in turn; round k > 1 names its phases "NAME #k".
  std::vector<PhasePlan> order;
  std::vector<std::string> plan_of;  // the plan name of each run
  for (int64_t round = 1; round <= f.rounds; ++round) {
    for (PhasePlan plan : plans) {
      plan_of.push_back(plan.name);
      if (round > 1) plan.name = absl::StrCat(plan.name, " #", round);
      order.push_back(std::move(plan));
    }
  }
  for (const PhasePlan& plan : order) {
    LoadSpec s = spec;
    s.adapters = plan.adapters;
    if (!plan.merge.empty()) {
      grpc::Status st = SetMode(*admin, f.conn, plan.merge, v1::MERGED);
      if (!st.ok()) return ReportError(st, "bench: merging " + plan.merge, f.conn);
    }
    Progress progress;
    PhaseRun run;
    {
      Swapper swapper(*admin, f, made,
                      plan.adapters.empty() ? std::vector<std::string>{} : plan.adapters);
      ProgressPrinter printer(progress, plan.name, f.quiet);
      run = RunPhase(*inference, f.conn, s, &progress);
      swapper.Stop();
      if (f.swap_every > 0) swaps = swapper.Json();
    }
    if (!plan.merge.empty()) {
      grpc::Status st = SetMode(*admin, f.conn, plan.merge, v1::UNMERGED);
      if (!st.ok()) ReportError(st, "bench: unmerging " + plan.merge, f.conn);
    }
    nlohmann::json summary = PhaseSummary(run);
    summary["name"] = plan.name;
    phases.push_back(summary);
    runs.push_back(std::move(run));
    names.push_back(plan.name);
  }

  nlohmann::json results = phases.back();
  results["config"] = {
      {"scenario", f.scenario},
      {"server", f.conn.server},
      {"model", model.model_path()},
      {"device", model.device()},
      {"dtype", model.dtype()},
      {"mode", f.concurrency > 0 ? "closed loop" : "open loop"},
      {"concurrency", f.concurrency},
      {"rate", f.rate},
      {"arrival", spec.arrivals ? spec.arrivals->Name() : ""},
      {"adapters", named.size()},
      {"popularity", PopularityName(spec.popularity)},
      {"prompt_tokens", f.prompts_file.empty() ? f.prompt_tokens : "from " + f.prompts_file},
      {"system_prompt_tokens", f.system_prompt_tokens},
      {"max_tokens", f.max_tokens},
      {"ignore_eos", f.ignore_eos},
      {"requests_bound", f.requests},
      {"duration_bound_s", f.duration},
      {"warmup_s", f.warmup},
      {"seed", f.seed},
      {"rounds", f.rounds},
      {"made_from", absl::StrJoin(f.make_adapters, ",")},
      {"max_rank", f.max_rank}};
  if (!swaps.is_null()) results["swaps"] = swaps;
  if (phases.size() > 1) {
    results["phases"] = phases;
    // Per plan, over its rounds: output tokens and measured seconds summed ("pooled"), and per
    // round the ratio to the base phase of the same round. Each ratio is the pooled one; with
    // several rounds, "... per round" lists them and the e2e ratio is their median.
    nlohmann::json pooled, ratios;
    std::map<std::string, std::vector<double>> tps_ratio, e2e_ratio;
    const size_t per_round = plans.size();
    for (size_t i = 0; i < phases.size(); ++i) {
      nlohmann::json& p = pooled[plan_of[i]];
      if (p.is_null()) p = {{"output_tokens", int64_t{0}}, {"duration_s", 0.0}, {"rounds", 0}};
      p["output_tokens"] =
          p["output_tokens"].get<int64_t>() + phases[i]["output_tokens"].get<int64_t>();
      p["duration_s"] = p["duration_s"].get<double>() + phases[i]["duration_s"].get<double>();
      p["rounds"] = p["rounds"].get<int>() + 1;
      const nlohmann::json& base = phases[i - i % per_round];
      if (i % per_round == 0) continue;
      const double bt = base["output_tokens_per_s"], pt2 = phases[i]["output_tokens_per_s"];
      const double be = base["e2e"]["p50"], pe = phases[i]["e2e"]["p50"];
      tps_ratio[plan_of[i]].push_back(bt > 0 ? pt2 / bt : 0.0);
      e2e_ratio[plan_of[i]].push_back(be > 0 ? pe / be : 0.0);
    }
    for (auto& [name, p] : pooled.items()) {
      const double d = p["duration_s"].get<double>();
      p["output_tokens_per_s"] = d > 0 ? p["output_tokens"].get<int64_t>() / d : 0.0;
    }
    const double base_tps = pooled[plans[0].name]["output_tokens_per_s"].get<double>();
    for (size_t j = 1; j < per_round; ++j) {
      const std::string& n = plans[j].name;
      const double tps = pooled[n]["output_tokens_per_s"].get<double>();
      std::vector<double> e2e = e2e_ratio[n];
      std::sort(e2e.begin(), e2e.end());
      const size_t mid = e2e.size() / 2;
      // Against the first plan ("base" but in S7).
      const std::string over = n + " / " + plans[0].name;
      ratios[over + " output tok/s"] = base_tps > 0 ? tps / base_tps : 0.0;
      ratios[over + " e2e p50"] = e2e.size() % 2 ? e2e[mid] : (e2e[mid - 1] + e2e[mid]) / 2;
      if (f.rounds > 1) ratios[over + " output tok/s per round"] = tps_ratio[n];
    }
    results["ratios"] = ratios;
    if (f.rounds > 1) results["pooled"] = pooled;
  }

  if (!f.out.empty()) {
    std::error_code ec;
    std::filesystem::create_directories(f.out, ec);
    std::ofstream json_file(f.out + "/results.json");
    std::ofstream html_file(f.out + "/report.html");
    if (ec || !json_file || !html_file) {
      std::cerr << "loraplex bench: cannot write into " << f.out << "\n";
      return kExitUsage;
    }
    json_file << results.dump(2) << "\n";
    html_file << RenderHtmlReport(results, runs, names);
    if (f.record_outputs) {
      std::ofstream outputs(f.out + "/outputs.jsonl");
      for (size_t i = 0; i < runs.size(); ++i) {
        std::vector<const RequestRecord*> sorted;
        for (const RequestRecord& r : runs[i].records) sorted.push_back(&r);
        std::sort(sorted.begin(), sorted.end(), [](const RequestRecord* a, const RequestRecord* b) {
          return a->index < b->index;
        });
        for (const RequestRecord* r : sorted) {
          nlohmann::json line = {{"phase", names[i]},
                                 {"index", r->index},
                                 {"adapter", r->adapter},
                                 {"code", r->grpc_code},
                                 {"ids", r->output_ids}};
          if (r->grpc_code == 0 && r->first_token_s >= 0) {
            line["ttft_ms"] = 1e3 * (r->first_token_s - r->start_s);
            if (r->output_tokens >= 2) {
              line["tpot_ms"] =
                  1e3 * (r->end_s - r->first_token_s) / static_cast<double>(r->output_tokens - 1);
            }
          }
          outputs << line.dump() << "\n";
        }
      }
      if (!outputs) {
        std::cerr << "loraplex bench: cannot write " << f.out << "/outputs.jsonl\n";
        return kExitUsage;
      }
    }
  }
  if (f.conn.json) {
    std::cout << results.dump(2) << "\n";
  } else {
    for (size_t i = 0; i < phases.size(); ++i) {
      PrintSummary(phases[i], phases.size() > 1 ? "phase " + names[i] : "bench");
    }
    if (results.contains("ratios")) {
      for (auto it = results["ratios"].begin(); it != results["ratios"].end(); ++it) {
        std::vector<std::string> values;
        for (const nlohmann::json& v :
             it.value().is_array() ? it.value() : nlohmann::json::array({it.value()})) {
          values.push_back(Num(v.get<double>(), 3));
        }
        std::cout << it.key() << ": " << absl::StrJoin(values, ", ") << "\n";
      }
    }
    if (results.contains("swaps")) std::cout << "swaps: " << results["swaps"].dump() << "\n";
    if (!f.out.empty()) std::cout << "wrote " << f.out << "/results.json and report.html\n";
  }
  if (!f.keep_adapters) {
    for (const auto& [name, files] : made.files) {
      grpc::ClientContext ctx;
      PrepareContext(ctx, f.conn, 30);
      SetRoutingAdapter(ctx, name);
      v1::UnloadAdapterRequest req;
      req.set_name(name);
      v1::UnloadAdapterResponse resp;
      (void)admin->UnloadAdapter(&ctx, req, &resp);  // best effort: the results are written
    }
  }
  int64_t errors = 0;
  for (const auto& ph : phases) errors += ph["errors"].get<int64_t>();
  return errors == 0 ? kExitOk : kExitFailed;
}

}  // namespace loraplex::client
