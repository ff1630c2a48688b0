// The client loops of loraplex-soak (members of Soak, see soak.h): Generate streams cancelled,
// timed out, read slowly, abandoned (one in five of them for a weighted mix of two adapters);
// greedy Complete/Generate whose answers are recorded for the final check; and the disconnect
// children (processes that _exit mid-stream).
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "loraplex/v1/inference.grpc.pb.h"
#include "tests/soak/soak.h"
#include "tests/soak/soak_mix.h"
#include "tests/soak/soak_util.h"

extern char** environ;

namespace loraplex::soak {

namespace fs = std::filesystem;

int DisconnectChild(const Options& o) {
  alarm(60);  // never outlive the soak
  Rng rng(o.seed);
  auto stub = v1::Inference::NewStub(NewChannel(o.server));
  const int n = Uniform(rng, 1, 3);
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>>> readers;
  for (int i = 0; i < n; ++i) {
    v1::GenerateRequest req = IdsRequest(Pick(rng, kPrompts), Uniform(rng, 64, 200));
    req.set_ignore_eos(true);
    if (Chance(rng, 0.7)) req.set_adapter(Pick(rng, kChurnNames));
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    contexts.back()->set_deadline(In(std::chrono::seconds(30)));
    readers.push_back(stub->Generate(contexts.back().get(), req));
  }
  v1::GenerateResponse msg;
  for (auto& r : readers) {
    for (int k = Uniform(rng, 0, 2); k > 0 && r->Read(&msg); --k) {
    }
  }
  _exit(0);
}

std::string Soak::PickTarget(Rng& rng, int64_t* floor, bool allow_versioned) {
  *floor = 0;
  const int r = Uniform(rng, 0, 99);
  if (r < 20) return "";
  if (r < 30) return kKeepName;
  const int i = Uniform(rng, 0, static_cast<int>(kChurnNames.size()) - 1);
  *floor = published_[i].load();
  if (allow_versioned && r < 40 && *floor > 0) return absl::StrCat(kChurnNames[i], "@", *floor);
  return kChurnNames[i];
}

void Soak::StreamLoop(int index, Clock::time_point end) {
  Rng rng(o_.seed * 1000003 + 100 + index + 7919 * phase_seq_.load());
  auto stub = v1::Inference::NewStub(NewChannel(o_.server));
  for (int n = 0; n < 100000 && Clock::now() < end && !server_gone_; ++n) {
    int64_t floor = 0;
    const std::string target = PickTarget(rng, &floor, true);
    const int p = Uniform(rng, 0, static_cast<int>(kPrompts.size()) - 1);
    const int kind = Uniform(rng, 0, 99);
    // Slow readers are greedy and checked; the others sample now and then (other sampler paths).
    const bool greedy = kind >= 75 || Chance(rng, 0.6);
    v1::GenerateRequest req =
        IdsRequest(kPrompts[p], kind >= 75 ? Pick(rng, kMaxTokens) : Uniform(rng, 8, 96));
    req.set_ignore_eos(true);
    req.set_adapter(target);
    // One in five of the unchecked calls asks for a weighted mix of two adapters instead, which a
    // registry loader thread builds while the call can be cancelled, time out or meet SIGTERM. A
    // mix's rank is the sum of its parts': over --max-lora-rank it is refused
    // (FAILED_PRECONDITION).
    const bool mix = kind < 75 && Chance(rng, 0.2);
    std::string label = target;
    if (mix) {
      req.clear_adapter();
      label.clear();
      std::set<std::string> names;
      for (int tries = 0; req.adapters_size() < 2 && tries < 16; ++tries) {
        int64_t part_floor = 0;
        const std::string part = PickTarget(rng, &part_floor, true);
        if (part.empty() || !names.insert(part.substr(0, part.find('@'))).second) continue;
        v1::WeightedAdapter* a = req.add_adapters();
        a->set_name(part);
        a->set_weight(static_cast<float>(Uniform(rng, -10, 20)) / 10.0f);
        label = absl::StrCat(label, label.empty() ? "" : "+", part);
      }
      Count("weighted mix of 2 adapters");
    }
    // What a call may end with: its own codes, and a mix's refusal.
    const auto codes = [mix](std::vector<StatusCode> allowed) {
      if (mix) allowed.push_back(StatusCode::FAILED_PRECONDITION);
      return allowed;
    };
    const std::string prefix = mix ? "mix " : "";
    if (!greedy) {
      req.set_temperature(0.8f);
      if (Chance(rng, 0.5)) req.set_top_p(0.9f);
      if (Chance(rng, 0.5)) req.set_top_k(20);
      if (Chance(rng, 0.3)) req.set_logprobs(3);
      req.set_seed(rng());
    }
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(120)));
    v1::GenerateResponse msg;
    const auto adapter_codes = {StatusCode::OK, StatusCode::NOT_FOUND,
                                StatusCode::RESOURCE_EXHAUSTED};
    if (kind < 18) {  // cancel after k messages (k = 0: after the call started, before a read)
      const int k = Uniform(rng, 0, 6);
      auto reader = stub->Generate(&ctx, req);
      int read = 0;
      bool more = true;
      while (read < k && (more = reader->Read(&msg))) ++read;
      ctx.TryCancel();
      while (more && reader->Read(&msg)) {
      }
      grpc::Status st = reader->Finish();
      Count(k == 0 ? "cancel before the first message" : "cancel after k messages");
      Outcome(prefix + "stream cancelled", st,
              codes({StatusCode::CANCELLED, StatusCode::OK, StatusCode::NOT_FOUND,
                     StatusCode::RESOURCE_EXHAUSTED}),
              label);
    } else if (kind < 36) {  // deadline of 1-30 ms
      ctx.set_deadline(In(std::chrono::milliseconds(Uniform(rng, 1, 30))));
      grpc::Status st;
      if (Chance(rng, 0.5)) {
        auto reader = stub->Generate(&ctx, req);
        while (reader->Read(&msg)) {
        }
        st = reader->Finish();
        Count("deadline (Generate)");
      } else {
        st = stub->Complete(&ctx, req, &msg);
        Count("deadline (Complete)");
      }
      Outcome(prefix + "deadline 1-30 ms", st,
              codes({StatusCode::DEADLINE_EXCEEDED, StatusCode::OK, StatusCode::NOT_FOUND,
                     StatusCode::RESOURCE_EXHAUSTED}),
              label);
    } else if (kind < 50) {  // abandoned unread: the reader and its context go away
      auto reader = stub->Generate(&ctx, req);
      const int k = Uniform(rng, 0, 2);
      for (int i = 0; i < k && reader->Read(&msg); ++i) {
      }
      reader.reset();  // no Finish: ~ClientContext cancels the call
      Count(k == 0 ? "abandoned unread (context destroyed)"
                   : "abandoned after k (context destroyed)");
    } else if (kind < 60) {  // TryCancel without reading, then dropped
      auto reader = stub->Generate(&ctx, req);
      if (Chance(rng, 0.5)) SleepMs(Uniform(rng, 0, 20));
      ctx.TryCancel();
      reader.reset();
      Count("abandoned (TryCancel, no read)");
    } else if (kind < 75) {  // a slow reader that gives up: read a few slowly, then cancel
      auto reader = stub->Generate(&ctx, req);
      bool more = true;
      for (int i = Uniform(rng, 1, 4); i > 0 && (more = reader->Read(&msg)); --i) {
        SleepMs(Uniform(rng, 20, 200));
      }
      ctx.TryCancel();
      while (more && reader->Read(&msg)) {
      }
      Count("cancel by a slow reader");
      Outcome(prefix + "stream cancelled", reader->Finish(),
              codes({StatusCode::CANCELLED, StatusCode::OK, StatusCode::NOT_FOUND,
                     StatusCode::RESOURCE_EXHAUSTED}),
              label);
    } else {  // slow reader to the end: a checked greedy answer
      // One in four holds its adapter's lease for 1-4 s (32 tokens, 30-120 ms a read): with 2
      // adapter slots, merges and reloads of a third adapter then wait for a slot.
      const bool long_lease = kind >= 94 && !target.empty();
      if (long_lease) req.set_max_tokens(32);
      GreedyResult g;
      g.kind = long_lease ? "slow (long lease)" : "slow";
      g.requested = target;
      g.floor = floor;
      g.prompt = p;
      g.max_tokens = req.max_tokens();
      auto reader = stub->Generate(&ctx, req);
      const int pause = long_lease ? Uniform(rng, 30, 120) : Uniform(rng, 10, 120);
      while (reader->Read(&msg)) {
        g.ids.insert(g.ids.end(), msg.token_ids().begin(), msg.token_ids().end());
        if (!msg.finish_reason().empty()) {
          g.finish_reason = msg.finish_reason();
          g.adapter = msg.adapter();
          g.version = msg.adapter_version();
        }
        SleepMs(pause);
      }
      grpc::Status st = reader->Finish();
      Outcome("greedy slow reader", st, adapter_codes, target);
      if (st.ok()) {
        std::lock_guard<std::mutex> lock(mu_);
        greedy_.push_back(std::move(g));
      }
    }
  }
}

void Soak::GreedyLoop(int index, Clock::time_point end) {
  Rng rng(o_.seed * 1000003 + 200 + index + 7919 * phase_seq_.load());
  auto stub = v1::Inference::NewStub(NewChannel(o_.server));
  for (int n = 0; n < 100000 && Clock::now() < end && !server_gone_; ++n) {
    GreedyResult g;
    g.requested = PickTarget(rng, &g.floor, true);
    g.prompt = Uniform(rng, 0, static_cast<int>(kPrompts.size()) - 1);
    g.max_tokens = Pick(rng, kMaxTokens);
    v1::GenerateRequest req = IdsRequest(kPrompts[g.prompt], g.max_tokens);
    req.set_ignore_eos(true);
    req.set_adapter(g.requested);
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(120)));
    grpc::Status st;
    if (Chance(rng, 0.5)) {
      g.kind = "complete";
      v1::GenerateResponse resp;
      st = stub->Complete(&ctx, req, &resp);
      g.ids.assign(resp.token_ids().begin(), resp.token_ids().end());
      g.finish_reason = resp.finish_reason();
      g.adapter = resp.adapter();
      g.version = resp.adapter_version();
    } else {
      g.kind = "stream";
      auto reader = stub->Generate(&ctx, req);
      v1::GenerateResponse msg;
      while (reader->Read(&msg)) {
        g.ids.insert(g.ids.end(), msg.token_ids().begin(), msg.token_ids().end());
        if (!msg.finish_reason().empty()) {
          g.finish_reason = msg.finish_reason();
          g.adapter = msg.adapter();
          g.version = msg.adapter_version();
        }
      }
      st = reader->Finish();
    }
    if (g.requested.empty()) {
      Outcome("greedy " + g.kind, st, {StatusCode::OK}, "base");
    } else {
      Outcome("greedy " + g.kind, st,
              {StatusCode::OK, StatusCode::NOT_FOUND, StatusCode::RESOURCE_EXHAUSTED}, g.requested);
    }
    if (st.ok()) {
      std::lock_guard<std::mutex> lock(mu_);
      greedy_.push_back(std::move(g));
    }
  }
}

void Soak::DisconnectLoop(Clock::time_point end) {
  Rng rng(o_.seed * 1000003 + 700 + 7919 * phase_seq_.load());
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  for (int n = 0; n < 10000 && Clock::now() < end && !server_gone_; ++n) {
    SleepMs(Uniform(rng, 500, 3000));
    if (Clock::now() >= end || server_gone_) break;
    std::vector<std::string> args = {self,     "--disconnect-child", "--server", o_.server,
                                     "--seed", std::to_string(rng())};
    std::vector<char*> argv;
    for (std::string& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    pid_t pid = -1;
    if (posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ) != 0) {
      Violation("children", "cannot spawn the disconnect child");
      continue;
    }
    int status = 0;
    const Clock::time_point t0 = Clock::now();
    bool exited = false;
    while (SecondsSince(t0) < 90) {
      if (waitpid(pid, &status, WNOHANG) == pid) {
        exited = true;
        break;
      }
      SleepMs(20);
    }
    if (!exited) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      Violation("children", "a disconnect child hung for 90 s (its streams never got a message)");
    }
    Count("disconnects (client process exited mid-stream)");
  }
}

}  // namespace loraplex::soak
