// A loraplex-server child process for end-to-end tests: spawned with the given flags, its log in a
// file, ready once it has written its ports to --port-file. One class for every e2e test so that
// start-up, shutdown and the handling of a server that refuses its flags behave the same
// everywhere. No gRPC here: tests make their own channels to address().
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <vector>

namespace loraplex::testing {

class ServerProcess {
 public:
  // Starts `binary` with `args` (flags only; --listen=127.0.0.1:0, --metrics-listen=127.0.0.1:0
  // and --port-file are added, so they must not be in args) and waits up to `timeout_s` for it to
  // serve. `work_dir` holds the port file and server.log; empty: a fresh temporary directory,
  // removed by the destructor. ok() is false when the server exited first (exit_status() says how)
  // or never wrote its ports.
  ServerProcess(const std::string& binary, std::vector<std::string> args, std::string work_dir = "",
                double timeout_s = 60);
  ~ServerProcess();  // SIGKILL if still running
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  bool ok() const { return pid_ > 0 && port_ > 0; }
  int port() const { return port_; }
  int metrics_port() const { return metrics_port_; }
  std::string address() const;  // "127.0.0.1:PORT"
  // Raw wait status of a server that exited during start-up (see waitpid).
  int exit_status() const { return exit_status_; }
  // What the server wrote to stderr so far.
  std::string log() const;
  // The sanitizer reports (ThreadSanitizer, AddressSanitizer, UBSan) in the log since this server
  // started; "" when none. Wait, Kill and the destructor add a test failure with them, so a race
  // in the server fails the test even when the server was killed (CI runs it with
  // halt_on_error=1: it exits at the first report).
  std::string SanitizerReports() const;

  void Signal(int sig);
  // Waits for the exit; returns the exit code, -1 when killed by a signal or not running.
  int Wait();
  int SignalAndWait(int sig);
  void Kill();  // SIGKILL and reap

 private:
  void FailOnSanitizerReports();

  std::string dir_;
  bool own_dir_ = false;
  size_t log_start_ = 0;  // size of server.log before this server started
  bool reports_checked_ = false;
  pid_t pid_ = -1;
  int port_ = 0, metrics_port_ = 0, exit_status_ = 0;
};

// The body of GET /metrics from the metrics endpoint on 127.0.0.1:port ("" when it cannot be
// reached).
std::string FetchMetrics(int port);

// The reference of the e2e tests: `generate_binary` (loraplex-generate) run greedily from BOS on
// stories260K (f32) for max_tokens tokens, with the PEFT folder `adapter_dir` ("" for the base
// model); its --json token_ids. Adds a test failure (and returns {}) when it prints no JSON.
std::vector<int32_t> Stories260KGreedyIds(const std::string& generate_binary,
                                          const std::string& adapter_dir, int max_tokens);

}  // namespace loraplex::testing
