#include "tests/testing/server_process.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <signal.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "tests/testing/testing.h"

extern char** environ;

namespace loraplex::testing {

ServerProcess::ServerProcess(const std::string& binary, std::vector<std::string> args,
                             std::string work_dir, double timeout_s) {
  own_dir_ = work_dir.empty();
  dir_ = own_dir_ ? MakeTempDir("lp-e2e-server") : work_dir;
  const std::string port_file = dir_ + "/port";
  std::filesystem::remove(port_file);
  std::error_code ec;
  const auto log_size = std::filesystem::file_size(dir_ + "/server.log", ec);
  log_start_ = ec ? 0 : static_cast<size_t>(log_size);
  std::vector<std::string> argv_s = {binary, "--listen=127.0.0.1:0", "--metrics-listen=127.0.0.1:0",
                                     "--port-file=" + port_file};
  argv_s.insert(argv_s.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (std::string& a : argv_s) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawn_file_actions_init(&fa);
  // The log goes to a file: shown by tests on failure, not mixed into their output.
  posix_spawn_file_actions_addopen(&fa, 2, (dir_ + "/server.log").c_str(),
                                   O_WRONLY | O_CREAT | O_APPEND, 0644);
  const int rc = posix_spawn(&pid_, argv[0], &fa, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&fa);
  if (rc != 0) {
    ADD_FAILURE() << "cannot start " << binary;
    pid_ = -1;
    return;
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(timeout_s);
  while (absl::Now() < deadline) {
    std::ifstream f(port_file);
    if (f >> port_ >> metrics_port_) return;
    port_ = 0;
    if (waitpid(pid_, &exit_status_, WNOHANG) == pid_) {
      pid_ = -1;  // exited during start-up: ok() is false
      FailOnSanitizerReports();
      return;
    }
    absl::SleepFor(absl::Milliseconds(20));
  }
}

ServerProcess::~ServerProcess() {
  Kill();
  FailOnSanitizerReports();
  if (own_dir_) {
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }
}

std::string ServerProcess::SanitizerReports() const {
  const std::string all = log();
  if (all.size() <= log_start_) return "";
  const std::string mine = all.substr(log_start_);
  for (const char* marker : {"WARNING: ThreadSanitizer", "ERROR: AddressSanitizer",
                             "ERROR: LeakSanitizer", "runtime error:"}) {
    if (size_t at = mine.find(marker); at != std::string::npos) {
      // From the line before the report (TSan prints a separator there) to the end.
      const size_t line = mine.rfind("\n==", at);
      return mine.substr(line == std::string::npos ? at : line + 1);
    }
  }
  return "";
}

void ServerProcess::FailOnSanitizerReports() {
  if (reports_checked_ || dir_.empty()) return;
  if (const std::string reports = SanitizerReports(); !reports.empty()) {
    reports_checked_ = true;
    ADD_FAILURE() << "loraplex-server reported:\n" << reports;
  }
}

std::string ServerProcess::address() const { return absl::StrCat("127.0.0.1:", port_); }

std::string ServerProcess::log() const {
  std::ifstream f(dir_ + "/server.log");
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void ServerProcess::Signal(int sig) {
  if (pid_ > 0) kill(pid_, sig);
}

int ServerProcess::Wait() {
  if (pid_ <= 0) return -1;
  int status = 0;
  waitpid(pid_, &status, 0);
  pid_ = -1;
  FailOnSanitizerReports();
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

int ServerProcess::SignalAndWait(int sig) {
  Signal(sig);
  return Wait();
}

void ServerProcess::Kill() {
  if (pid_ > 0) {
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
    FailOnSanitizerReports();
  }
}

std::string FetchMetrics(int port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
  std::string body;
  if (connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) {
    const std::string get = "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    if (write(fd, get.data(), get.size()) == static_cast<ssize_t>(get.size())) {
      char buf[4096];
      for (ssize_t n; (n = read(fd, buf, sizeof(buf))) > 0;) body.append(buf, n);
    }
  }
  close(fd);
  return body;
}

std::vector<int32_t> Stories260KGreedyIds(const std::string& generate_binary,
                                          const std::string& adapter_dir, int max_tokens) {
  const std::string cmd =
      absl::StrCat(generate_binary, " --model ", Stories260KDir(), "/stories260K.gguf",
                   " --dtype f32 --prompt-ids 1 --ignore-eos --json --max-tokens ", max_tokens,
                   adapter_dir.empty() ? "" : " --adapter " + adapter_dir, " 2>/dev/null");
  std::string out;
  if (FILE* p = popen(cmd.c_str(), "r")) {
    char buf[4096];
    for (size_t n; (n = fread(buf, 1, sizeof(buf), p)) > 0;) out.append(buf, n);
    pclose(p);
  }
  nlohmann::json j = nlohmann::json::parse(out, nullptr, /*allow_exceptions=*/false);
  EXPECT_FALSE(j.is_discarded()) << cmd << " printed: " << out;
  return j.is_discarded() ? std::vector<int32_t>{} : j["token_ids"].get<std::vector<int32_t>>();
}

}  // namespace loraplex::testing
