// The `loraplex` subcommands. Each takes the arguments after its name, prints to stdout/stderr and
// returns the process exit code (client/rpc.h ExitCode). None throws or aborts on bad input.
#pragma once

#include <string>
#include <vector>

namespace loraplex::client {

int RunGenerate(const std::vector<std::string>& args);
int RunChat(const std::vector<std::string>& args);
int RunInfo(const std::vector<std::string>& args);
int RunStats(const std::vector<std::string>& args);
int RunHealth(const std::vector<std::string>& args);
int RunAdapters(const std::vector<std::string>& args);
int RunBench(const std::vector<std::string>& args);

}  // namespace loraplex::client
