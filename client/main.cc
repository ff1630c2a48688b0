// loraplex: the bundled gRPC client. `loraplex COMMAND [flags]`; see docs/client.md.
#include <iostream>
#include <string>
#include <vector>

#include "client/commands.h"
#include "client/rpc.h"

namespace {

constexpr const char* kUsage =
    "usage: loraplex COMMAND [flags]\n"
    "\n"
    "commands:\n"
    "  generate PROMPT...   stream a completion (--adapter, sampling flags, --logprobs, --json)\n"
    "  chat                 interactive chat; /adapter NAME switches the adapter\n"
    "  adapters VERB ...    list | get NAME | load NAME PATH | upload NAME DIR | unload NAME |\n"
    "                       merge NAME | unmerge NAME\n"
    "  health               grpc.health.v1 check\n"
    "  info                 the served model\n"
    "  stats                the engine's counters: batch, KV blocks, prefix cache\n"
    "  bench                load test; writes results.json and report.html with --out DIR\n"
    "\n"
    "every command takes --server HOST:PORT (env LORAPLEX_SERVER), --token (env LORAPLEX_TOKEN),\n"
    "--tls-ca/--tls-cert/--tls-key, --deadline SECONDS and --json; `loraplex COMMAND --help`\n"
    "lists the rest.\n";

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << kUsage;
    return loraplex::client::kExitUsage;
  }
  const std::string cmd = argv[1];
  const std::vector<std::string> args(argv + 2, argv + argc);
  using namespace loraplex::client;
  if (cmd == "generate") return RunGenerate(args);
  if (cmd == "chat") return RunChat(args);
  if (cmd == "adapters") return RunAdapters(args);
  if (cmd == "health") return RunHealth(args);
  if (cmd == "info") return RunInfo(args);
  if (cmd == "stats") return RunStats(args);
  if (cmd == "bench") return RunBench(args);
  if (cmd == "--help" || cmd == "-h" || cmd == "help") {
    std::cout << kUsage;
    return kExitOk;
  }
  std::cerr << "loraplex: unknown command '" << cmd << "'\n" << kUsage;
  return kExitUsage;
}
