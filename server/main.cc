// loraplex-server: parse flags, load the model, serve until SIGTERM/SIGINT, shut down gracefully.
#include <csignal>
#include <cstdio>
#include <fstream>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "common/flags.h"
#include "common/logging.h"
#include "server/options.h"
#include "server/server.h"

int main(int argc, char** argv) {
  // Block the shutdown signals before any thread starts, so every thread inherits the mask and
  // only the sigwait below receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  absl::SetProgramUsageMessage("loraplex-server --model PATH --listen HOST:PORT [flags]");
  loraplex::DashedArgs args(argc, argv);  // --max-lora-rank etc. as DESIGN.md spells them
  absl::ParseCommandLine(args.argc(), args.argv());
  absl::StatusOr<loraplex::server::CommandLine> cl = loraplex::server::CommandLineFromFlags();
  if (!cl.ok()) {
    LP_LOG(ERROR) << cl.status().ToString();
    return 2;
  }
  auto model = loraplex::model::LlamaModel::Load(cl->model_path, cl->load);
  if (!model.ok()) {
    LP_LOG(ERROR) << "--model " << cl->model_path << ": " << model.status().ToString();
    return 1;
  }
  auto server = loraplex::server::Server::Start(*std::move(model), cl->server);
  if (!server.ok()) {
    LP_LOG(ERROR) << server.status().ToString();
    return 1;
  }
  if (!cl->port_file.empty()) {
    // Written whole then renamed, so a reader never sees a partial number.
    const std::string tmp = cl->port_file + ".tmp";
    std::ofstream(tmp) << (*server)->port() << "\n" << (*server)->metrics_port() << "\n";
    std::rename(tmp.c_str(), cl->port_file.c_str());
  }
  int sig = 0;
  sigwait(&signals, &sig);
  LP_LOG(INFO) << "received " << (sig == SIGTERM ? "SIGTERM" : "SIGINT");
  (*server)->Shutdown(cl->shutdown_grace);
  return 0;
}
