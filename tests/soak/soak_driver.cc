// loraplex-soak: a seeded chaos soak against a running loraplex-server (scripts/soak.sh starts the
// server, runs this, then stops the server with SIGTERM and scans its log).
//
// For --duration seconds (the first part a warm-up), several client threads send a bounded, seeded
// mix over loopback:
//   streams   Generate streams cancelled after k messages or before the first, 1-30 ms deadlines,
//             slow readers, streams abandoned unread (context destroyed, or TryCancel), one in
//             five of them for a weighted mix of two adapters, and disconnects (a child process
//             opens streams and _exits mid-stream, so the kernel closes its connection);
//   bad       every kind of bad request in docs/api.md's error table, each checked for its code;
//   greedy    Complete and Generate (temperature 0) on the base and on adapters; every OK answer is
//             recorded with the adapter and version its last message reports;
//   admin     registrations, uploads (some cancelled after the header, mid-stream, after the
//             last chunk or after the end message), replacements with other fixture folders,
//             unloads, re-registrations (one thread) and merges/unmerges (another);
//   prober    a Unary RPC (GetAdapter, ListAdapters, GetEngineStats, Tokenize) every ~100 ms.
// Then it checks (a line PASS/FAIL each, a last line "N passed, M failed"; exit 1 on a failure):
// every answer got a code its situation allows; each bad request got its documented code; every
// greedy answer equals loraplex-generate's offline run on the folder its reported (adapter,
// version) was registered from (up to the first near tie, kTieMargin); responses name the version
// asked for, never one older than a replace that had returned; cancelled uploads are never
// committed; the registry ends as the admin thread left it; the engine ends idle (0 KV blocks,
// nothing running or waiting); the prefix cache served some K/V (the greedy check covers the
// answers it gave); no probe took longer than --max-probe-s; the server's VmRSS, threads
// and open fds are back near their level after the warm-up (thresholds in soak_options.h, with
// their reasons).
//
// The seed fixes the mix (the sequence of choices of every thread), not the interleaving: a failure
// found with --seed S is usually found again with S, but timing decides whether a race fires.
//
// The parts (soak.h says which member is where): soak_options.h (the flags, and the resource
// thresholds with their reasons), soak_util.h and soak_proc.h (helpers, /proc samples), soak_mix.h
// (prompts, adapters), soak_workload.cc (the client loops), soak_bad_requests.cc, soak_admin.cc
// (the admin churn), soak_checks.cc (references, prober, final checks, report). This file: main,
// the run and its phases.
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "loraplex/v1/inference.grpc.pb.h"
#include "tests/soak/soak.h"
#include "tests/soak/soak_mix.h"
#include "tests/soak/soak_options.h"
#include "tests/soak/soak_proc.h"
#include "tests/soak/soak_util.h"

namespace loraplex::soak {

Soak::Soak(Options o) : o_(std::move(o)) {
  inference_ = v1::Inference::NewStub(NewChannel(o_.server));
  admin_ = v1::Adapters::NewStub(NewChannel(o_.server));
}

bool Soak::Setup() {
  // The server is up (scripts/soak.sh waited for its port file); wait for the channel anyway.
  {
    grpc::ClientContext ctx;
    ctx.set_wait_for_ready(true);
    ctx.set_deadline(In(std::chrono::seconds(60)));
    v1::ModelInfo info;
    grpc::Status st = inference_->GetModelInfo(&ctx, {}, &info);
    if (!st.ok()) {
      std::cerr << "soak: GetModelInfo: " << st.error_message() << "\n";
      return false;
    }
    std::cout << "server: " << info.architecture() << " vocab " << info.vocab_size() << " context "
              << info.context_length() << " kv blocks " << info.kv_blocks_total() << " device "
              << info.device() << "\n";
  }
  MakeBadFolders();
  if (!ComputeReferences()) return false;
  Rng rng(o_.seed ^ 0x5eed);
  v1::AdapterInfo info;
  grpc::Status st = Load(kKeepName, kKeepFolder, false, /*pin=*/true, &info);
  if (!st.ok()) {
    std::cerr << "soak: LoadAdapter keep: " << st.error_message() << "\n";
    return false;
  }
  Registered(kKeepName, info.version(), kKeepFolder);
  for (size_t i = 0; i < kChurnNames.size(); ++i) {
    const std::string& folder = kChurnFolders[i];
    st = i % 2 == 0
             ? Load(kChurnNames[i], folder, true, false, &info)
             : Upload(*admin_, kChurnNames[i], Folder(folder), true, true, Cut::kNone, rng, &info);
    if (!st.ok()) {
      std::cerr << "soak: registering " << kChurnNames[i] << ": " << st.error_message() << "\n";
      return false;
    }
    Registered(kChurnNames[i], info.version(), folder);
    published_[i] = info.version();
  }
  return true;
}

void Soak::RunPhase(double seconds, const std::string& label) {
  const Clock::time_point end =
      Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  std::cout << "== " << label << ": " << seconds << " s" << std::endl;
  std::vector<std::thread> threads;
  for (int i = 0; i < o_.stream_threads; ++i)
    threads.emplace_back([=, this] { StreamLoop(i, end); });
  for (int i = 0; i < o_.greedy_threads; ++i)
    threads.emplace_back([=, this] { GreedyLoop(i, end); });
  threads.emplace_back([=, this] { BadLoop(end); });
  threads.emplace_back([=, this] { RegistrationLoop(end); });
  threads.emplace_back([=, this] { MergeLoop(end); });
  threads.emplace_back([=, this] { ProbeLoop(end); });
  threads.emplace_back([=, this] { DisconnectLoop(end); });
  for (std::thread& t : threads) t.join();
  ++phase_seq_;
  std::cout << "== " << label << " done after "
            << SecondsSince(end - std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)))
            << " s" << std::endl;
}

v1::EngineStats Soak::WaitIdle(double seconds, bool* idle, grpc::Status* last) {
  v1::EngineStats s;
  *idle = false;
  const Clock::time_point t0 = Clock::now();
  while (SecondsSince(t0) < seconds) {
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(10)));
    s.Clear();
    *last = inference_->GetEngineStats(&ctx, {}, &s);
    if (last->ok() && s.kv_blocks_used() == 0 && s.running() == 0 && s.waiting() == 0) {
      *idle = true;
      break;
    }
    SleepMs(50);
  }
  return s;
}

int Soak::Run() {
  std::cout << "soak: seed " << o_.seed << ", " << o_.duration_s << " s against " << o_.server
            << std::endl;
  if (!Setup()) {
    std::cout << "soak: setup failed\n0 passed, 1 failed" << std::endl;
    return 1;
  }
  // The warm-up runs the same mix, so allocator arenas, gRPC's thread pool and the registry reach
  // their working size before the baseline is taken.
  const double warmup = std::clamp(o_.duration_s * 0.15, 5.0, 20.0);
  RunPhase(warmup, "warm-up");
  bool idle = false;
  grpc::Status last;
  v1::EngineStats stats = WaitIdle(30, &idle, &last);
  SleepMs(1000);
  const ProcSample before = o_.server_pid > 0 ? SampleProc(o_.server_pid) : ProcSample{};
  std::cout << "after the warm-up: VmRSS " << before.rss_kib / 1024 << " MiB, " << before.threads
            << " threads, " << before.fds << " fds" << std::endl;
  if (!server_gone_) RunPhase(std::max(1.0, o_.duration_s - warmup), "soak");
  // Let every cancelled call and draining version finish, then look.
  if (!server_gone_) stats = WaitIdle(30, &idle, &last);
  if (idle) {
    Count("prefix cache hit tokens", stats.prefix_cache_hit_tokens());
    Count("prefix cache lookup tokens", stats.prefix_cache_lookup_tokens());
    if (stats.prefix_cache_hit_tokens() == 0) {
      Violation("prefix",
                "no request found a cached block (scripts/soak.sh runs the server with "
                "--kv-block-size=4 so that the prompts share some)");
    }
  }
  if (!idle && !server_gone_) {
    Violation("idle",
              last.ok() ? absl::StrCat("after 30 s: ", stats.kv_blocks_used(), " KV blocks used, ",
                                       stats.running(), " running, ", stats.waiting(), " waiting")
                        : absl::StrCat("GetEngineStats: ", CodeName(last.error_code()), " ",
                                       last.error_message()));
  }
  if (!server_gone_) SleepMs(2000);
  const ProcSample after = o_.server_pid > 0 ? SampleProc(o_.server_pid) : ProcSample{};
  if (o_.server_pid > 0 && ProcessGone(o_.server_pid) && !server_gone_) {
    server_gone_at_ = SecondsSince(start_);
    server_gone_ = true;
  }
  if (!server_gone_) FinalChecks(before, after);
  return Report(before, after);
}

}  // namespace loraplex::soak

int main(int argc, char** argv) {
  loraplex::soak::Options o;
  if (!loraplex::soak::ParseArgs(argc, argv, &o)) {
    std::cerr << "usage: loraplex-soak --server HOST:PORT [--server-pid PID] [--duration S] "
                 "[--seed N] --generate-bin PATH --model stories260K.gguf --adapter-root DIR "
                 "[--admin-token T] [--stream-threads N] [--greedy-threads N] [--max-probe-s S] "
                 "[--upload-limit BYTES] [--rss-slack-frac F] [--rss-slack-mib M] "
                 "[--thread-slack N] [--fd-slack N]\n";
    return 2;
  }
  if (o.disconnect_child) return loraplex::soak::DisconnectChild(o);
  if (!o.seed_given) o.seed = std::random_device()() ^ static_cast<uint64_t>(getpid());
  signal(SIGPIPE, SIG_IGN);
  loraplex::soak::Soak soak(o);
  return soak.Run();
}
