// Soak: one soak run against a running loraplex-server (soak_driver.cc describes the whole: what
// it sends, what it checks). Its members are defined by responsibility:
//   soak_driver.cc        Run (setup, the warm-up and soak phases, the wait for idle), the threads
//                         of a phase;
//   soak_workload.cc      the client loops: streams, greedy Complete/Generate, disconnect children;
//   soak_bad_requests.cc  the bad folders and the table of bad requests with their codes;
//   soak_admin.cc         the admin calls and the admin churn (registrations, uploads, cancelled
//                         uploads, replacements, unloads, merges);
//   soak_checks.cc        the greedy references (loraplex-generate), the liveness prober, the final
//                         checks (greedy answers, registry, resources) and the report.
//
// Thread-safety: Run is called once, from the main thread. The loops of a phase run concurrently
// on threads of their own and share this object: everything recorded (violations, outcomes,
// counts, registrations, greedy answers, probe latencies, cancelled uploads) is under mu_;
// published_, server_gone_ and the sequence numbers are atomics; o_ and the stubs (thread-safe)
// are set once at construction. references_ and checkable_ are written during setup and only read
// after it.
#pragma once

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <initializer_list>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "loraplex/v1/inference.grpc.pb.h"
#include "tests/soak/soak_options.h"
#include "tests/soak/soak_proc.h"
#include "tests/soak/soak_util.h"

namespace loraplex::soak {

// A greedy answer that came back OK, checked against the references at the end.
struct GreedyResult {
  std::string kind;       // complete, stream, slow
  std::string requested;  // adapter spec as sent
  std::string adapter;    // as the response reports it
  int64_t version = 0;
  int64_t floor = 0;  // the version a replace/registration had returned when the request started
  int prompt = 0;     // index into kPrompts
  int max_tokens = 0;
  std::vector<int32_t> ids;
  std::string finish_reason;
};

// The disconnect child (loraplex-soak --disconnect-child, spawned by DisconnectLoop): opens 1-3
// Generate streams on a connection of its own, reads a message or two from each and _exits: the
// kernel closes the socket under the server's writes. Never returns.
int DisconnectChild(const Options& o);

class Soak {
 public:
  explicit Soak(Options o);

  // The whole run: setup, warm-up, soak, checks, report. Returns the exit status (0: all passed).
  int Run();

 private:
  // Checks: a violation is a line under the check's name; a check passes with none.
  void Violation(const std::string& check, const std::string& what) {
    std::lock_guard<std::mutex> lock(mu_);
    auto& v = violations_[check];
    if (v.size() < 1000)
      v.push_back(what);
    else
      ++violations_overflow_[check];
  }
  // Counts `status` under `what`; a code outside `allowed` is a violation of "codes".
  void Outcome(const std::string& what, const grpc::Status& status,
               const std::vector<StatusCode>& allowed, const std::string& detail = "") {
    {
      std::lock_guard<std::mutex> lock(mu_);
      ++outcomes_[what][status.error_code()];
    }
    if (std::find(allowed.begin(), allowed.end(), status.error_code()) == allowed.end() &&
        !server_gone_.load()) {
      Violation("codes", absl::StrCat(what, ": ", CodeName(status.error_code()), " \"",
                                      status.error_message(), "\" ", detail));
    }
  }
  void Count(const std::string& what, int64_t n = 1) {
    std::lock_guard<std::mutex> lock(mu_);
    counts_[what] += n;
  }
  void Authorize(grpc::ClientContext* ctx, std::chrono::milliseconds deadline) const {
    if (!o_.admin_token.empty()) ctx->AddMetadata("authorization", "Bearer " + o_.admin_token);
    ctx->set_deadline(In(deadline));
  }
  std::string Folder(const std::string& f) const { return o_.adapter_root + "/" + f; }
  void Registered(const std::string& name, int64_t version, const std::string& folder) {
    std::lock_guard<std::mutex> lock(mu_);
    auto [it, inserted] = versions_.emplace(std::make_pair(name, version), folder);
    if (!inserted && it->second != folder) {
      versions_reused_.push_back(absl::StrCat(name, " v", version, " registered from ", it->second,
                                              " and again from ", folder));
    }
  }

  // soak_driver.cc
  bool Setup();
  void RunPhase(double seconds, const std::string& label);
  v1::EngineStats WaitIdle(double seconds, bool* idle, grpc::Status* last);

  // soak_workload.cc
  void StreamLoop(int index, Clock::time_point end);
  void GreedyLoop(int index, Clock::time_point end);
  void DisconnectLoop(Clock::time_point end);
  // A target for a generation: "" (base), a churn name, "keep", or name@version.
  std::string PickTarget(Rng& rng, int64_t* floor, bool allow_versioned);

  // soak_bad_requests.cc
  void MakeBadFolders();
  void BadLoop(Clock::time_point end);
  bool RunBadCase(int i, Rng& rng);
  grpc::Status UploadRaw(int end, bool extra_after_end);

  // soak_admin.cc
  void RegistrationLoop(Clock::time_point end);
  void MergeLoop(Clock::time_point end);
  void CheckCancelledUploads(bool final_check);
  grpc::Status Load(const std::string& name, const std::string& path, bool replace, bool pin,
                    v1::AdapterInfo* info, const std::string& token_override = "-");
  // Where a cancelled upload stops: after the header, after some chunks, after the last chunk,
  // after the end message (everything but the half-close).
  enum class Cut { kNone, kAfterHeader, kMidStream, kAfterLastChunk, kAfterEnd };
  grpc::Status Upload(v1::Adapters::Stub& stub, const std::string& name, const std::string& dir,
                      bool replace, bool sha, Cut cut, Rng& rng, v1::AdapterInfo* info);
  grpc::Status Unload(const std::string& name);
  grpc::Status SetMode(const std::string& name, v1::AdapterMode mode, v1::AdapterInfo* info);
  grpc::Status GetAdapter(v1::Adapters::Stub& stub, const std::string& name, v1::AdapterInfo* info,
                          std::chrono::milliseconds deadline = std::chrono::seconds(30));

  // soak_checks.cc
  bool ComputeReferences();
  void ProbeLoop(Clock::time_point end);
  void FinalChecks(const ProcSample& before, const ProcSample& after);
  // Prints the outcomes, counts and checks (PASS/FAIL/SKIP lines, then "N passed, M failed");
  // returns the exit status.
  int Report(const ProcSample& before, const ProcSample& after);

  const Options o_;
  std::unique_ptr<v1::Inference::Stub> inference_;
  std::unique_ptr<v1::Adapters::Stub> admin_;

  std::mutex mu_;  // guards everything below but the atomics
  std::map<std::string, std::vector<std::string>> violations_;
  std::map<std::string, int64_t> violations_overflow_;
  std::map<std::string, std::map<StatusCode, int64_t>> outcomes_;
  std::map<std::string, int64_t> counts_;
  std::map<std::pair<std::string, int64_t>, std::string> versions_;  // (name, version) -> folder
  std::vector<std::string> versions_reused_;
  std::vector<GreedyResult> greedy_;
  std::map<std::pair<std::string, int>, std::vector<int32_t>> references_;  // (folder, prompt)
  std::map<std::pair<std::string, int>, int> checkable_;  // tokens before the first near tie
  // Cancelled uploads to fresh names: name -> when cancelled (checked 1.5 s later and at the end).
  std::map<std::string, Clock::time_point> cancelled_uploads_;
  double worst_probe_s_ = 0;
  std::string worst_probe_what_;
  int64_t slow_probes_ = 0;
  std::vector<double> probe_latencies_;
  double worst_admin_s_ = 0;
  std::string worst_admin_what_;

  // The admin registration thread's view: the version its last call on each churn name returned
  // (0: unloaded). Generations read it as a floor.
  std::array<std::atomic<int64_t>, 4> published_{};  // one per kChurnNames
  std::atomic<int> cancelled_upload_seq_{0};
  std::atomic<int> phase_seq_{0};
  // Set by the prober when the server process has exited (a sanitizer halted it, or it crashed):
  // every loop stops, and the checks that need the server are skipped.
  std::atomic<bool> server_gone_{false};
  double server_gone_at_ = 0;
  Clock::time_point start_ = Clock::now();
};

}  // namespace loraplex::soak
