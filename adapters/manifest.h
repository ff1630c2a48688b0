// The adapter registry's durable state in --state-dir, and the file helpers that keep it
// crash-safe.
//
// Layout of a state directory:
//   manifest.json                     the registered adapters (below); replaced atomically
//   adapters/<name>/v<version>/       adapter_config.json + adapter_model.safetensors of a version
//   staging/<random>/                 uploads and copies in progress; deleted at every start
//
// Crash safety: a version's files are written and fsynced in staging/, renamed into adapters/
// (then the parent directory is fsynced), and only then is the manifest rewritten (write to
// manifest.json.tmp, fsync, rename, fsync the directory). A registration returns OK only after the
// manifest rename is durable, so after a crash (kill -9 at any moment) the manifest lists exactly
// the registrations that returned OK; folders it does not list are garbage and are removed.
//
// Thread-safety: free functions; callers serialise writes to one manifest.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace loraplex::adapters {

inline constexpr char kAdapterConfigFile[] = "adapter_config.json";
inline constexpr char kAdapterWeightsFile[] = "adapter_model.safetensors";

// One registered adapter as the manifest records it: the version that serves requests.
struct ManifestEntry {
  std::string name;
  int64_t version = 0;
  std::string sha256;  // of adapter_model.safetensors, lowercase hex
  bool pinned = false;
  std::string source;  // where it came from ("path:<rel>", "upload", "flag:<dir>"); informational
  // Merged into the base weights (SetAdapterMode MERGED): the server merges it again after a
  // restart. At most one entry has it. Manifests written before the field existed lack it (false).
  bool merged = false;
  // Rank compression asked at registration (AdapterLoadOptions::compress_rank; 0 = none): every
  // load of the version applies it again. Older manifests lack it (0).
  int64_t max_rank = 0;
};

// Reads <state_dir>/manifest.json. A missing file is an empty manifest. DATA_LOSS naming the file
// and field when it is malformed (a version outside [1, 2^53) included), or when more than one
// entry is merged (it is only ever replaced whole, so that means outside damage).
absl::StatusOr<std::vector<ManifestEntry>> ReadManifest(const std::string& state_dir);

// Replaces <state_dir>/manifest.json atomically and durably. FAILED_PRECONDITION naming the file
// and the errno of the failing step (read-only or full disk, missing directory).
absl::Status WriteManifest(const std::string& state_dir, const std::vector<ManifestEntry>& entries);
// WriteManifest's two steps, for a caller that overlaps the first with other fsyncs: writes and
// fsyncs manifest.json.tmp (nothing reads it); then renames it over manifest.json and fsyncs the
// directory. Same errors.
absl::Status StageManifest(const std::string& state_dir, const std::vector<ManifestEntry>& entries);
absl::Status PublishManifest(const std::string& state_dir);

// Writes `data` to `path` (truncating), fsyncs it. Errors name the file.
absl::Status WriteFileDurably(const std::string& path, const std::string& data);
// fsync of a file or directory by path.
absl::Status SyncPath(const std::string& path);

// SHA-256 of a file's bytes as lowercase hex. NOT_FOUND / FAILED_PRECONDITION naming the file.
absl::StatusOr<std::string> Sha256OfFile(const std::string& path);
// SHA-256 of bytes as lowercase hex.
std::string Sha256Hex(const void* data, size_t size);

// The folder of one version: <state_dir>/adapters/<name>/v<version>.
std::string VersionDir(const std::string& state_dir, const std::string& name, int64_t version);

}  // namespace loraplex::adapters
