// loraplex-server: parse flags, load the model, serve until SIGTERM/SIGINT, shut down gracefully.
#include <malloc.h>

#include <csignal>
#include <cstdio>
#include <fstream>

#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/time/time.h"
#include "common/flags.h"
#include "common/logging.h"
#include "kernels/kernels.h"
#include "server/options.h"
#include "server/server.h"

namespace {

// glibc malloc serves a block of at least M_MMAP_THRESHOLD bytes with its own mmap, unmapped on
// free; smaller blocks come from the arenas (one per thread, up to 8 per core), which give memory
// back only from their top. By default the threshold rises to the size of any mmapped block freed
// (up to 32 MiB), so after a few large frees, buffers of several MiB (GGUF dequantisation
// temporaries, adapter uploads, an adapter's matrices: one block each, adapters/lora_adapter.h)
// land in an arena and stay resident after their free, in whichever arena the freeing thread
// used. Measured on loraplex-server (SmolLM2 bf16, a benchmark uploading, using and deleting 32
// rank-16 adapters, then 64 more kept; docs/benchmarks.md): 130 MiB of free chunks resident in the
// arenas before, 13 MiB with the fixed thresholds below. Steady-state steps allocate nothing this
// large (their scratch is kept), so this costs a few mmap calls per adapter load.
constexpr int kMallocMmapThreshold = 1 << 20;
constexpr int kMallocTrimThreshold = 1 << 20;

}  // namespace

int main(int argc, char** argv) {
  mallopt(M_MMAP_THRESHOLD, kMallocMmapThreshold);
  mallopt(M_TRIM_THRESHOLD, kMallocTrimThreshold);
  // Block the shutdown signals before any thread starts, so every thread inherits the mask and
  // only the sigwait below receives them.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // Abseil's time zone code makes its one mutex on the first load of a zone, through a static
  // whose fast path, inside the uninstrumented library, TSan cannot see. Loading one here, before
  // any thread starts, orders that for every thread (gRPC's threads load zones: a TSan run of
  // ReliabilityE2eTest reported the mutex as racing between two of them).
  absl::TimeZone local;
  (void)absl::LoadTimeZone("localtime", &local);

  absl::SetProgramUsageMessage("loraplex-server --model PATH --listen HOST:PORT [flags]");
  loraplex::DashedArgs args(argc, argv);  // --max-lora-rank etc. as DESIGN.md spells them
  absl::ParseCommandLine(args.argc(), args.argv());
  absl::StatusOr<loraplex::server::CommandLine> cl = loraplex::server::CommandLineFromFlags();
  if (!cl.ok()) {
    LP_LOG(ERROR) << cl.status().ToString();
    return 2;
  }
  loraplex::kernels::SetBatchInvariant(cl->batch_invariant);
  auto model = loraplex::model::LlamaModel::Load(cl->model_path, cl->load);
  if (!model.ok()) {
    LP_LOG(ERROR) << "--model " << cl->model_path << ": " << model.status().ToString();
    return 1;
  }
  // Loading freed its file buffers and dequantisation temporaries; give any free pages left
  // inside the heap back to the OS before serving.
  malloc_trim(0);
  auto server = loraplex::server::Server::Start(*std::move(model), cl->server);
  if (!server.ok()) {
    LP_LOG(ERROR) << server.status().ToString();
    return 1;
  }
  if (!cl->port_file.empty()) {
    // Written whole then renamed, so a reader never sees a partial number.
    const std::string tmp = cl->port_file + ".tmp";
    std::ofstream(tmp) << (*server)->port() << "\n"
                       << (*server)->metrics_port() << "\n"
                       << (*server)->http_port() << "\n";
    std::rename(tmp.c_str(), cl->port_file.c_str());
  }
  int sig = 0;
  sigwait(&signals, &sig);
  LP_LOG(INFO) << "received " << (sig == SIGTERM ? "SIGTERM" : "SIGINT");
  (*server)->Shutdown(cl->shutdown_grace);
  return 0;
}
