// The checks of loraplex-soak (members of Soak, see soak.h): the greedy references (offline runs
// of loraplex-generate, with where each stops being checkable), the liveness prober (which also
// notices that the server exited), the final checks (greedy answers, versions, registry, cancelled
// uploads, resources) and the report that scripts/soak.sh reads.
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <map>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "loraplex/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/soak/soak.h"
#include "tests/soak/soak_mix.h"
#include "tests/soak/soak_proc.h"
#include "tests/soak/soak_util.h"

namespace loraplex::soak {

bool Soak::ComputeReferences() {
  std::vector<std::string> folders = kChurnFolders;
  folders.push_back(kKeepFolder);
  folders.push_back("");  // the base model
  std::vector<std::pair<std::string, int>> jobs;
  for (const std::string& f : folders) {
    for (int p = 0; p < static_cast<int>(kPrompts.size()); ++p) jobs.emplace_back(f, p);
  }
  std::atomic<size_t> next{0};
  std::atomic<bool> ok{true};
  auto worker = [&] {
    for (size_t job; (job = next.fetch_add(1)) < jobs.size();) {
      const auto& [folder, p] = jobs[job];
      std::vector<std::string> ids;
      for (int32_t id : kPrompts[p]) ids.push_back(std::to_string(id));
      const std::string cmd = absl::StrCat(
          o_.generate_bin, " --model ", o_.model, " --dtype f32 --prompt-ids ",
          absl::StrJoin(ids, ","), " --ignore-eos --json --logprobs 2 --max-tokens ",
          kReferenceTokens, folder.empty() ? "" : " --adapter " + Folder(folder), " 2>/dev/null");
      std::string out;
      if (FILE* f = popen(cmd.c_str(), "r")) {
        char buf[4096];
        for (size_t n; (n = fread(buf, 1, sizeof(buf), f)) > 0;) out.append(buf, n);
        pclose(f);
      }
      nlohmann::json j = nlohmann::json::parse(out, nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || !j.contains("token_ids")) {
        std::cerr << "soak: reference failed: " << cmd << "\n" << out << "\n";
        ok = false;
        continue;
      }
      int checkable = kReferenceTokens;
      for (int k = 0; k < static_cast<int>(j["logprobs"].size()); ++k) {
        const auto& top = j["logprobs"][k]["top"];
        if (top.size() >= 2 &&
            top[0]["logprob"].get<double>() - top[1]["logprob"].get<double>() < kTieMargin) {
          checkable = k;
          break;
        }
      }
      std::lock_guard<std::mutex> lock(mu_);
      references_[{folder, p}] = j["token_ids"].get<std::vector<int32_t>>();
      checkable_[{folder, p}] = checkable;
    }
  };
  std::thread a(worker), b(worker);
  a.join();
  b.join();
  if (ok) {
    // The fixtures must tell the versions apart, or a wrong version would go unnoticed.
    std::set<std::vector<int32_t>> distinct;
    for (const std::string& f : kChurnFolders) distinct.insert(references_[{f, 1}]);
    std::vector<std::string> ties;
    for (const auto& [key, n] : checkable_) {
      if (n < kReferenceTokens) {
        ties.push_back(absl::StrCat(key.first.empty() ? "base" : key.first, " prompt #", key.second,
                                    " at token ", n));
      }
    }
    std::cout << "references: " << references_.size() << " offline runs, " << distinct.size()
              << " distinct outputs over " << kChurnFolders.size() << " churn folders; near ties: "
              << (ties.empty() ? "none" : absl::StrJoin(ties, ", ")) << "\n";
  }
  return ok;
}

void Soak::ProbeLoop(Clock::time_point end) {
  Rng rng(o_.seed * 1000003 + 600 + 7919 * phase_seq_.load());
  auto channel = NewChannel(o_.server);
  auto inference = v1::Inference::NewStub(channel);
  auto admin = v1::Adapters::NewStub(channel);
  Clock::time_point next = Clock::now(), report = Clock::now() + std::chrono::seconds(15);
  for (int n = 0; n < 1000000 && Clock::now() < end; ++n) {
    std::this_thread::sleep_until(next);
    if (o_.server_pid > 0 && ProcessGone(o_.server_pid)) {
      std::lock_guard<std::mutex> lock(mu_);
      server_gone_at_ = SecondsSince(start_);
      server_gone_ = true;
      std::cout << "the server process exited at t=" << static_cast<int>(server_gone_at_)
                << " s; stopping" << std::endl;
      break;
    }
    next += std::chrono::milliseconds(100);
    const int op = n % 4;
    const Clock::time_point t0 = Clock::now();
    grpc::Status st;
    std::string what;
    {
      grpc::ClientContext ctx;
      Authorize(&ctx, std::chrono::seconds(30));
      if (op == 0) {
        std::vector<std::string> names = kChurnNames;
        names.push_back(kKeepName);
        what = "GetAdapter";
        v1::GetAdapterRequest req;
        req.set_name(Pick(rng, names));
        v1::AdapterInfo info;
        st = admin->GetAdapter(&ctx, req, &info);
      } else if (op == 1) {
        what = "ListAdapters";
        v1::ListAdaptersResponse resp;
        st = admin->ListAdapters(&ctx, {}, &resp);
      } else if (op == 2) {
        what = "GetEngineStats";
        v1::EngineStats stats;
        st = inference->GetEngineStats(&ctx, {}, &stats);
      } else {
        what = "Tokenize";
        v1::TokenizeRequest req;
        req.set_text("Once upon a time");
        req.set_add_bos(true);
        v1::TokenizeResponse resp;
        st = inference->Tokenize(&ctx, req, &resp);
      }
    }
    const double took = SecondsSince(t0);
    // DEADLINE_EXCEEDED (30 s) is the liveness check's to report.
    if (op == 0) {
      Outcome("probe " + what, st,
              {StatusCode::OK, StatusCode::NOT_FOUND, StatusCode::DEADLINE_EXCEEDED});
    } else {
      Outcome("probe " + what, st, {StatusCode::OK, StatusCode::DEADLINE_EXCEEDED});
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++counts_["probes"];
      probe_latencies_.push_back(took);
      if (took > o_.max_probe_s) ++slow_probes_;
      if (took > worst_probe_s_) {
        worst_probe_s_ = took;
        worst_probe_what_ =
            absl::StrCat(what, " at t=", static_cast<int>(SecondsSince(start_)), " s");
      }
    }
    if (took > o_.max_probe_s) {
      std::cout << "probe: " << what << " took " << took
                << " s at t=" << static_cast<int>(SecondsSince(start_)) << " s" << std::endl;
    }
    if (next < Clock::now()) next = Clock::now();
    if (Clock::now() > report) {
      report += std::chrono::seconds(15);
      std::lock_guard<std::mutex> lock(mu_);
      int64_t requests = 0;
      for (const auto& [w, codes] : outcomes_) {
        for (const auto& [c, k] : codes) requests += k;
      }
      int64_t problems = 0;
      for (const auto& [check, v] : violations_) problems += v.size();
      std::cout << "t=" << static_cast<int>(SecondsSince(start_)) << " s: " << requests
                << " calls, " << greedy_.size() << " greedy answers, worst probe " << worst_probe_s_
                << " s, " << problems << " violations" << std::endl;
    }
  }
}

void Soak::FinalChecks(const ProcSample& before, const ProcSample& after) {
  // Greedy answers against the offline reference of the folder their version was registered from.
  int64_t checked = 0, mismatches = 0, unknown = 0, tokens = 0, cut = 0;
  {
    std::vector<GreedyResult> results;
    std::map<std::pair<std::string, int64_t>, std::string> versions;
    {
      std::lock_guard<std::mutex> lock(mu_);
      results = greedy_;
      versions = versions_;
      for (const std::string& v : versions_reused_) violations_["versions"].push_back(v);
    }
    for (const GreedyResult& g : results) {
      const std::string where =
          absl::StrCat(g.kind, " adapter '", g.requested, "' prompt #", g.prompt, " max_tokens ",
                       g.max_tokens, ": reported '", g.adapter, "' v", g.version);
      const std::string requested_name = g.requested.substr(0, g.requested.rfind('@'));
      if (g.adapter != requested_name) {
        Violation("versions", where + ": the response names another adapter");
        continue;
      }
      if (size_t at = g.requested.find('@');
          at != std::string::npos && std::to_string(g.version) != g.requested.substr(at + 1)) {
        Violation("versions", where + ": not the version asked for");
      }
      if (g.version < g.floor) {
        Violation("versions", absl::StrCat(where, ": started after v", g.floor,
                                           " was registered, ran on an older version"));
      }
      std::string folder;
      if (!g.requested.empty()) {
        auto it = versions.find({g.adapter, g.version});
        if (it == versions.end()) {
          ++unknown;
          Violation("greedy", where +
                                  ": no registration returned this version (a cancelled "
                                  "upload committed?)");
          continue;
        }
        folder = it->second;
      } else if (g.version != 0) {
        Violation("versions", where + ": the base model reports a version");
      }
      const std::vector<int32_t>& ref = references_.at({folder, g.prompt});
      const int n = std::min(g.max_tokens, checkable_.at({folder, g.prompt}));
      ++checked;
      tokens += n;
      if (n < g.max_tokens) ++cut;
      const bool equal = static_cast<int>(g.ids.size()) == g.max_tokens &&
                         std::equal(g.ids.begin(), g.ids.begin() + n, ref.begin()) &&
                         g.finish_reason == "length";
      if (!equal) {
        ++mismatches;
        std::vector<std::string> got, want;
        for (int32_t id : g.ids) got.push_back(std::to_string(id));
        for (int k = 0; k < g.max_tokens; ++k) want.push_back(std::to_string(ref[k]));
        Violation("greedy",
                  absl::StrCat(where, " (folder '", folder, "'): got [", absl::StrJoin(got, ","),
                               "] ", g.finish_reason, ", offline [", absl::StrJoin(want, ","),
                               "], compared ", n, " (near tie after)"));
      }
    }
  }
  Count("greedy answers checked", checked);
  Count("greedy tokens compared", tokens);
  Count("greedy answers compared up to a near tie only", cut);
  Count("greedy mismatches", mismatches);
  Count("greedy answers on unknown versions", unknown);

  // The registry as the registration thread left it; no cancelled upload anywhere.
  CheckCancelledUploads(true);
  {
    grpc::ClientContext ctx;
    Authorize(&ctx, std::chrono::seconds(30));
    v1::ListAdaptersResponse resp;
    grpc::Status st = admin_->ListAdapters(&ctx, {}, &resp);
    if (!st.ok()) {
      Violation("registry", "ListAdapters: " + st.error_message());
    } else {
      std::map<std::string, int64_t> listed;
      for (const v1::AdapterInfo& a : resp.adapters()) {
        if (a.state() != v1::READY) {
          Violation("registry", absl::StrCat(a.name(), " v", a.version(), " is still ",
                                             v1::AdapterState_Name(a.state()), " after the run"));
        }
        if (a.state() == v1::READY) listed[a.name()] = a.version();
        if (a.name().rfind("cx-", 0) == 0) {
          Violation("uploads", absl::StrCat("cancelled upload ", a.name(), " is registered (v",
                                            a.version(), ")"));
        }
      }
      for (size_t i = 0; i < kChurnNames.size(); ++i) {
        const int64_t want = published_[i].load();
        auto it = listed.find(kChurnNames[i]);
        const int64_t got = it == listed.end() ? 0 : it->second;
        if (got != want) {
          Violation("registry",
                    absl::StrCat(kChurnNames[i], " is at v", got,
                                 ", the last registration/unload left v", want, " (0 = unloaded)"));
        }
      }
      if (!listed.count(kKeepName)) Violation("registry", "the pinned adapter 'keep' is gone");
    }
  }

  if (o_.server_pid > 0 && kill(o_.server_pid, 0) != 0) {
    Violation("alive", "the server process is gone");
  }

  // Resources after vs after the warm-up.
  if (o_.server_pid > 0) {
    const int64_t rss_limit =
        before.rss_kib + std::max<int64_t>(static_cast<int64_t>(before.rss_kib * o_.rss_slack_frac),
                                           o_.rss_slack_mib * 1024);
    if (before.rss_kib < 0 || after.rss_kib < 0 || after.rss_kib > rss_limit) {
      Violation("rss",
                absl::StrCat("VmRSS ", after.rss_kib / 1024, " MiB after, ", before.rss_kib / 1024,
                             " MiB after the warm-up (limit ", rss_limit / 1024, " MiB)"));
    }
    if (before.threads < 0 || after.threads > before.threads + o_.thread_slack) {
      Violation("threads", absl::StrCat(after.threads, " threads after, ", before.threads,
                                        " after the warm-up (limit +", o_.thread_slack, ")"));
    }
    if (before.fds < 0 || after.fds > before.fds + o_.fd_slack) {
      Violation("fds", absl::StrCat(after.fds, " fds after, ", before.fds,
                                    " after the warm-up (limit +", o_.fd_slack, ")"));
    }
  }
}

int Soak::Report(const ProcSample& before, const ProcSample& after) {
  std::lock_guard<std::mutex> lock(mu_);
  std::cout << "\n== outcomes (gRPC code per kind of call)\n";
  std::map<StatusCode, int64_t> total;
  for (const auto& [what, codes] : outcomes_) {
    std::vector<std::string> parts;
    for (const auto& [c, k] : codes) {
      parts.push_back(absl::StrCat(CodeName(c), "=", k));
      total[c] += k;
    }
    std::cout << "  " << what << ": " << absl::StrJoin(parts, " ") << "\n";
  }
  {
    std::vector<std::string> parts;
    int64_t all = 0;
    for (const auto& [c, k] : total) parts.push_back(absl::StrCat(CodeName(c), "=", k)), all += k;
    std::cout << "  all " << all << " calls: " << absl::StrJoin(parts, " ") << "\n";
  }
  std::cout << "== counts\n";
  for (const auto& [what, k] : counts_) std::cout << "  " << what << ": " << k << "\n";
  std::cout << "  worst probe latency: " << worst_probe_s_ << " s (" << worst_probe_what_ << "), "
            << slow_probes_ << " probes over " << o_.max_probe_s << " s\n";
  if (!probe_latencies_.empty()) {
    std::vector<double> l = probe_latencies_;
    std::sort(l.begin(), l.end());
    auto at = [&](double q) {
      return l[std::min(l.size() - 1, static_cast<size_t>(q * l.size()))];
    };
    std::cout << "  probe latency: p50 " << at(0.5) << " s, p99 " << at(0.99) << " s over "
              << l.size() << " probes\n";
  }
  std::cout << "  slowest admin call: " << worst_admin_s_ << " s (" << worst_admin_what_ << ")\n";
  std::cout << "  server: VmRSS " << before.rss_kib / 1024 << " -> " << after.rss_kib / 1024
            << " MiB, threads " << before.threads << " -> " << after.threads << ", fds "
            << before.fds << " -> " << after.fds << "\n";
  std::cout << "== checks\n";
  const std::vector<std::pair<std::string, std::string>> checks = {
      {"alive", "the server process is alive after the run"},
      {"codes", "every call got a code its situation allows"},
      {"bad", "every bad request got its documented code (and no message)"},
      {"greedy", "greedy answers equal loraplex-generate on the folder of their reported version"},
      {"versions",
       "responses name the adapter and version asked for, never older than a "
       "returned replace; versions are never reused"},
      {"uploads", "cancelled uploads are never committed"},
      {"registry", "the registry ends as the admin thread left it"},
      {"idle", "engine idle after the run: 0 KV blocks used, 0 running, 0 waiting"},
      {"prefix", "the prefix cache served K/V (hit tokens > 0; answers checked under greedy)"},
      {"liveness", absl::StrCat("no probe took more than ", o_.max_probe_s, " s (worst ",
                                worst_probe_s_, " s)")},
      {"children", "every disconnect child exited"},
      {"rss", absl::StrCat("VmRSS within +", static_cast<int>(o_.rss_slack_frac * 100), "% or +",
                           o_.rss_slack_mib, " MiB of the warm-up level")},
      {"threads", absl::StrCat("threads within +", o_.thread_slack, " of the warm-up level")},
      {"fds", absl::StrCat("open fds within +", o_.fd_slack, " of the warm-up level")},
  };
  if (slow_probes_ > 0) {
    violations_["liveness"].push_back(absl::StrCat(slow_probes_, " probes over ", o_.max_probe_s,
                                                   " s, worst ", worst_probe_s_, " s (",
                                                   worst_probe_what_, ")"));
  }
  if (!o_.violations_file.empty()) {
    std::ofstream out(o_.violations_file);
    for (const auto& [key, v] : violations_) {
      for (const std::string& line : v) out << key << ": " << line << "\n";
    }
  }
  if (server_gone_) {
    violations_["alive"].push_back(
        absl::StrCat("the server process exited at t=", static_cast<int>(server_gone_at_),
                     " s (its log says why); the checks that need it are skipped"));
  }
  int passed = 0, failed = 0;
  for (const auto& [key, text] : checks) {
    const auto it = violations_.find(key);
    const bool ok = it == violations_.end() || it->second.empty();
    if (key == "rss" || key == "threads" || key == "fds") {
      if (o_.server_pid <= 0) continue;
    }
    if (server_gone_ && key != "alive" && key != "codes" && key != "bad" && key != "uploads" &&
        key != "liveness" && key != "children") {
      std::cout << "SKIP " << text << "\n";
      continue;
    }
    (ok ? passed : failed)++;
    std::cout << (ok ? "PASS " : "FAIL ") << text << "\n";
    if (!ok) {
      const size_t n = it->second.size() + violations_overflow_[key];
      for (size_t k = 0; k < std::min<size_t>(it->second.size(), 8); ++k) {
        std::cout << "     " << it->second[k] << "\n";
      }
      if (n > 8) std::cout << "     ... " << n << " in all\n";
    }
  }
  std::cout << "seed " << o_.seed << "\n"
            << passed << " passed, " << failed << " failed" << std::endl;
  return failed == 0 ? 0 : 1;
}

}  // namespace loraplex::soak
