// Fuzzes LoadAdapter's request handling: bytes parsed as a LoadAdapterRequest, then what
// AdaptersService::LoadAdapter does with it (AdapterRegistry::RegisterFromPath: name validation,
// path resolution under --adapter-dir, copy, validation, commit), against a registry whose
// --adapter-dir holds the stories260k "qv" adapter at qv/ and nested/deep/qv/, a symlink to a copy
// outside the root (out/, also reachable as ../outside/evil) and a folder whose config is a
// symlink to a file outside (half_out/).
// Invariants: the codes are the documented ones; a bad name is INVALID_ARGUMENT;
// ValidateAdapterName agrees with its contract; nothing resolving outside the root ever registers.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>

#include "adapters/manifest.h"
#include "adapters/registry.h"
#include "common/logging.h"
#include "fuzz/fuzz_util.h"
#include "google/protobuf/stubs/logging.h"
#include "loraplex/v1/adapters.pb.h"
#include "model/llama_config.h"

namespace {

namespace fs = std::filesystem;

struct Setup {
  std::string root;     // --adapter-dir, canonical
  std::string outside;  // a folder beside it holding a valid adapter
  std::unique_ptr<loraplex::adapters::AdapterRegistry> registry;
};

void CopyAdapter(const std::string& to) {
  const std::string qv = loraplex::fuzz::RepoRoot() + "/tests/fixtures/peft/stories260k/qv/";
  fs::create_directories(to);
  for (const char* f :
       {loraplex::adapters::kAdapterConfigFile, loraplex::adapters::kAdapterWeightsFile}) {
    fs::copy_file(loraplex::fuzz::RequireFile(qv + f), to + "/" + f,
                  fs::copy_options::overwrite_existing);
  }
}

Setup& GetSetup() {
  static Setup* setup = [] {
    loraplex::SetMinLogLevel(loraplex::LogLevel::kError);
    google::protobuf::SetLogHandler(nullptr);  // invalid UTF-8 in a string field is logged
    auto* s = new Setup();
    // <scratch>/root is --adapter-dir; <scratch>/outside is "../outside" from it.
    const std::string scratch = fs::canonical(loraplex::fuzz::ScratchDir("load_adapter")).string();
    s->root = scratch + "/root";
    s->outside = scratch + "/outside";
    CopyAdapter(s->root + "/qv");
    CopyAdapter(s->root + "/nested/deep/qv");
    CopyAdapter(s->outside + "/evil");
    fs::create_directory_symlink(s->outside + "/evil", s->root + "/out");
    fs::create_directories(s->root + "/half_out");
    fs::copy_file(s->root + "/qv/" + loraplex::adapters::kAdapterWeightsFile,
                  s->root + "/half_out/" + loraplex::adapters::kAdapterWeightsFile);
    fs::create_symlink(s->outside + "/evil/" + loraplex::adapters::kAdapterConfigFile,
                       s->root + "/half_out/" + loraplex::adapters::kAdapterConfigFile);
    auto base =
        loraplex::model::LlamaConfig::FromHfJson(loraplex::fuzz::Stories260KDir() + "/config.json");
    LP_FUZZ_CHECK_OK(base.status());
    loraplex::adapters::RegistryOptions options;
    options.base = *base;
    options.state_dir = scratch + "/state";
    options.adapter_dir = s->root;
    options.loader_threads = 1;
    auto registry = loraplex::adapters::AdapterRegistry::Open(options);
    LP_FUZZ_CHECK_OK(registry.status());
    s->registry = *std::move(registry);
    return s;
  }();
  return *setup;
}

// ValidateAdapterName's contract, written out independently.
bool NameIsValid(std::string_view name) {
  if (name.empty() || name.size() > loraplex::adapters::kMaxAdapterNameLength) return false;
  if (name == "." || name == "..") return false;
  for (char c : name) {
    const bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                    c == '.' || c == '_' || c == '-';
    if (!ok) return false;
  }
  return true;
}

bool IsUnder(const fs::path& p, const fs::path& root) {
  auto r = root.begin();
  for (auto it = p.begin(); r != root.end(); ++it, ++r) {
    if (it == p.end() || *it != *r) return false;
  }
  return true;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Setup& setup = GetSetup();
  loraplex::v1::LoadAdapterRequest request;
  if (!request.ParseFromArray(data, static_cast<int>(size))) return 0;

  const absl::Status name_ok = loraplex::adapters::ValidateAdapterName(request.name());
  LP_FUZZ_CHECK(name_ok.ok() == NameIsValid(request.name()));
  LP_FUZZ_CHECK(name_ok.ok() || name_ok.code() == absl::StatusCode::kInvalidArgument);

  auto info = setup.registry->RegisterFromPath(request.name(), request.path(), request.replace(),
                                               request.pin());
  if (!info.ok()) {
    const absl::StatusCode code = info.status().code();
    LP_FUZZ_CHECK(code == absl::StatusCode::kInvalidArgument ||
                  code == absl::StatusCode::kPermissionDenied ||
                  code == absl::StatusCode::kNotFound || code == absl::StatusCode::kAlreadyExists ||
                  code == absl::StatusCode::kFailedPrecondition ||
                  code == absl::StatusCode::kResourceExhausted);
    if (!name_ok.ok()) LP_FUZZ_CHECK(code == absl::StatusCode::kInvalidArgument);
    return 0;
  }
  LP_FUZZ_CHECK(name_ok.ok());
  LP_FUZZ_CHECK(info->name == request.name() && info->version >= 1);
  // It registered: the folder and both files it read must lie under the root once every symlink
  // is resolved. (Like the registry, resolve lexically where components do not exist: it accepts
  // "ghost/../qv" as qv, which the OS would refuse; harmless, as it copies from the resolved path.)
  std::error_code ec;
  const fs::path dir =
      fs::canonical(fs::weakly_canonical(fs::path(setup.root) / request.path(), ec), ec);
  LP_FUZZ_CHECK(!ec);
  LP_FUZZ_CHECK(IsUnder(dir, setup.root));
  for (const char* f :
       {loraplex::adapters::kAdapterConfigFile, loraplex::adapters::kAdapterWeightsFile}) {
    const fs::path file = fs::canonical(dir / f, ec);
    LP_FUZZ_CHECK(!ec && IsUnder(file, setup.root));
  }
  auto got = setup.registry->Get(request.name());
  LP_FUZZ_CHECK_OK(got.status());
  LP_FUZZ_CHECK(got->version == info->version);
  // Keep the state directory small: the version drains at once (no leases).
  LP_FUZZ_CHECK_OK(setup.registry->Unload(request.name()).status());
  return 0;
}
