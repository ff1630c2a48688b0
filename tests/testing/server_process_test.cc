// ServerProcess (tests/testing/server_process.h) fails the test that owns it when its server's log
// holds a sanitizer report: that is how the ASan and TSan stages of scripts/test.sh see a bug in a
// spawned loraplex-server, whose exit status no e2e test checks. Checked with fake servers (shell
// scripts writing what each sanitizer writes, at start-up, while serving, at exit) and, in
// sanitizer builds, with a real instrumented process (sanitizer_canary.cc) whose bug the build's
// sanitizer reports.
#include "tests/testing/server_process.h"

#include <gtest/gtest-spi.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>

#include <fstream>
#include <functional>
#include <string>
#include <vector>

#include "tests/testing/testing.h"

namespace loraplex::testing {
namespace {

// The messages of the failures `f` adds on this thread (kept from the running test).
std::vector<std::string> FailuresOf(const std::function<void()>& f) {
  ::testing::TestPartResultArray results;
  {
    ::testing::ScopedFakeTestPartResultReporter reporter(
        ::testing::ScopedFakeTestPartResultReporter::INTERCEPT_ONLY_CURRENT_THREAD, &results);
    f();
  }
  std::vector<std::string> messages;
  for (int i = 0; i < results.size(); ++i) {
    if (results.GetTestPartResult(i).failed()) {
      messages.push_back(results.GetTestPartResult(i).message());
    }
  }
  return messages;
}

// A shell script that stands in for loraplex-server: `serve` writes the port file first (so
// ServerProcess sees a serving server), then `body` runs.
std::string FakeServer(const std::string& body, bool serve) {
  const std::string path = MakeTempDir("lp-fake-server") + "/server.sh";
  std::ofstream(path) << "#!/bin/sh\n"
                      << "for a in \"$@\"; do case \"$a\" in --port-file=*) pf=\"${a#*=}\";; "
                         "esac; done\n"
                      << (serve ? "echo 40001 40002 > \"$pf\"\n" : "") << body << "\n";
  chmod(path.c_str(), 0755);
  return path;
}

::testing::AssertionResult OneFailureWith(const std::vector<std::string>& failures,
                                          const std::string& text) {
  if (failures.size() != 1 || failures[0].find(text) == std::string::npos) {
    auto r = ::testing::AssertionFailure()
             << failures.size() << " failures, want one with '" << text << "':";
    for (const std::string& f : failures) r << "\n---\n" << f;
    return r;
  }
  return ::testing::AssertionSuccess();
}

TEST(ServerProcessTest, ReportAtStartUpFailsTheTest) {
  const std::string bin = FakeServer(
      "echo '==7==ERROR: AddressSanitizer: heap-use-after-free on address 0x602' >&2; exit 1",
      /*serve=*/false);
  EXPECT_TRUE(OneFailureWith(FailuresOf([&] {
                               ServerProcess server(bin, {});
                               EXPECT_FALSE(server.ok());
                             }),
                             "heap-use-after-free"));
}

TEST(ServerProcessTest, ReportWhileServingFailsTheTestWhenTheServerIsKilled) {
  const std::string bin = FakeServer(
      "echo 'engine/x.cc:1:2: runtime error: signed integer overflow' >&2; exec sleep 60",
      /*serve=*/true);
  EXPECT_TRUE(OneFailureWith(FailuresOf([&] {
                               ServerProcess server(bin, {});
                               EXPECT_TRUE(server.ok());
                               // The destructor kills the server and reads its log.
                             }),
                             "runtime error: signed integer overflow"));
}

TEST(ServerProcessTest, ReportAtExitFailsTheTest) {
  for (const char* report :
       {"ERROR: LeakSanitizer: detected memory leaks", "WARNING: ThreadSanitizer: data race"}) {
    const std::string bin =
        // The trap is set before the port file is written: the test signals as soon as it
        // reads the ports (a TERM before the trap killed the shell: a flaky -1).
        FakeServer(std::string("trap 'echo \"==9==") + report +
                       "\" >&2; exit 0' TERM; echo 40001 40002 > \"$pf\"; echo serving >&2; "
                       "while :; do sleep 0.05; done",
                   /*serve=*/false);
    EXPECT_TRUE(OneFailureWith(FailuresOf([&] {
                                 ServerProcess server(bin, {});
                                 ASSERT_TRUE(server.ok());
                                 EXPECT_EQ(server.SignalAndWait(SIGTERM), 0);
                               }),
                               report));
  }
}

TEST(ServerProcessTest, CleanLogPasses) {
  const std::string bin = FakeServer("echo 'serving' >&2; exec sleep 60", /*serve=*/true);
  EXPECT_TRUE(FailuresOf([&] {
                ServerProcess server(bin, {});
                EXPECT_TRUE(server.ok());
                EXPECT_EQ(server.SanitizerReports(), "");
              }).empty());
}

// A real instrumented process: the report its sanitizer writes fails the test, with halt_on_error
// and the suppressions of the stage (scripts/test.sh) in the environment it inherits.
TEST(ServerProcessTest, RealSanitizerReportFailsTheTest) {
  const std::string kind = LP_SANITIZE_KIND;
  std::vector<std::pair<std::string, std::string>> bugs;  // --bug, text of the report
  if (kind == "address") {
    bugs = {{"heap-use-after-free", "ERROR: AddressSanitizer: heap-use-after-free"},
            {"signed-overflow", "runtime error: signed integer overflow"},
            {"leak", "ERROR: LeakSanitizer"}};
  } else if (kind == "thread") {
    bugs = {{"data-race", "WARNING: ThreadSanitizer: data race"}};
  } else if (kind == "undefined") {
    bugs = {{"signed-overflow", "runtime error: signed integer overflow"}};
  } else {
    GTEST_SKIP() << "not a sanitizer build (LP_SANITIZE is empty): nothing would report";
  }
  for (const auto& [bug, text] : bugs) {
    EXPECT_TRUE(OneFailureWith(FailuresOf([&] {
                                 ServerProcess server(LP_SANITIZER_CANARY, {"--bug=" + bug});
                                 EXPECT_FALSE(server.ok());
                               }),
                               text))
        << bug;
  }
}

}  // namespace
}  // namespace loraplex::testing
