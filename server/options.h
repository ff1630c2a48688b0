// The loraplex-server command line (ABSL_FLAG definitions live in options.cc) turned into
// ServerOptions, refusing what this build cannot honour yet instead of pretending to.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "model/llama_model.h"
#include "server/server.h"

namespace loraplex::server {

struct CommandLine {
  std::string model_path;
  model::LoadOptions load;
  ServerOptions server;
  absl::Duration shutdown_grace;
  bool batch_invariant = false;  // kernels::SetBatchInvariant before the model loads (CPU only)
  std::string
      port_file;  // once serving: the gRPC port, then the metrics port (0: none), a line each
};

// Reads the flags. INVALID_ARGUMENT naming the flag for malformed values; UNIMPLEMENTED for
// features that later issues bring (--device cuda, TLS, tokens, --state-dir).
absl::StatusOr<CommandLine> CommandLineFromFlags();

// Parses "512MiB", "2G", "1048576" (bytes). INVALID_ARGUMENT otherwise.
absl::StatusOr<int64_t> ParseByteSize(const std::string& text);

}  // namespace loraplex::server
