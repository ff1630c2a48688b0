// Fuzzes the registry's persisted state: manifest.json (adapters/manifest.h ReadManifest) and what
// a restart does with it (AdapterRegistry::Open), in a state directory holding the real files of
// stories260k "qv" at every version the manifest names for "qv" (restored before every input,
// since Open removes versions the manifest does not list); after a good restart "qv" is replaced
// once more, as LoadAdapter with replace would.
// Invariants: a bad manifest is DATA_LOSS (never a crash, never another code from ReadManifest);
// what ReadManifest accepts survives WriteManifest + ReadManifest unchanged; Open either fails with
// DATA_LOSS or serves exactly the manifest's names at their versions; a replacement then gets the
// next version.
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "adapters/manifest.h"
#include "adapters/registry.h"
#include "common/logging.h"
#include "fuzz/fuzz_util.h"
#include "model/llama_config.h"

namespace {

using loraplex::adapters::ManifestEntry;

struct Setup {
  loraplex::adapters::RegistryOptions options;
  std::string config, weights;  // the bytes of stories260k's qv adapter
  std::string roundtrip_dir;
  std::string qv_dir;  // a pristine copy to register from
};

const Setup& GetSetup() {
  static const Setup* setup = [] {
    loraplex::SetMinLogLevel(loraplex::LogLevel::kError);  // Open logs every start at INFO
    auto* s = new Setup();
    auto base =
        loraplex::model::LlamaConfig::FromHfJson(loraplex::fuzz::Stories260KDir() + "/config.json");
    LP_FUZZ_CHECK_OK(base.status());
    s->options.base = *base;
    s->options.state_dir = loraplex::fuzz::ScratchDir("manifest");
    s->options.loader_threads = 1;
    s->roundtrip_dir = loraplex::fuzz::ScratchDir("manifest-roundtrip");
    const std::string qv = loraplex::fuzz::RepoRoot() + "/tests/fixtures/peft/stories260k/qv/";
    s->config = loraplex::fuzz::ReadFileOrDie(qv + loraplex::adapters::kAdapterConfigFile);
    s->weights = loraplex::fuzz::ReadFileOrDie(qv + loraplex::adapters::kAdapterWeightsFile);
    s->qv_dir = loraplex::fuzz::ScratchDir("manifest-qv");
    loraplex::fuzz::WriteFileOrDie(s->qv_dir + "/" + loraplex::adapters::kAdapterConfigFile,
                                   s->config);
    loraplex::fuzz::WriteFileOrDie(s->qv_dir + "/" + loraplex::adapters::kAdapterWeightsFile,
                                   s->weights);
    return s;
  }();
  return *setup;
}

bool Same(const ManifestEntry& a, const ManifestEntry& b) {
  return a.name == b.name && a.version == b.version && a.sha256 == b.sha256 &&
         a.pinned == b.pinned && a.source == b.source && a.merged == b.merged;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const Setup& setup = GetSetup();
  const std::string& root = setup.options.state_dir;
  loraplex::fuzz::WriteFileOrDie(root + "/manifest.json",
                                 std::string_view(reinterpret_cast<const char*>(data), size));
  auto entries = loraplex::adapters::ReadManifest(root);
  if (!entries.ok()) {
    LP_FUZZ_CHECK(entries.status().code() == absl::StatusCode::kDataLoss);
    return 0;
  }
  int merged = 0;
  for (const ManifestEntry& e : *entries) {
    LP_FUZZ_CHECK(e.version >= 1);
    merged += e.merged;
  }
  LP_FUZZ_CHECK(merged <= 1);

  LP_FUZZ_CHECK_OK(loraplex::adapters::WriteManifest(setup.roundtrip_dir, *entries));
  auto again = loraplex::adapters::ReadManifest(setup.roundtrip_dir);
  LP_FUZZ_CHECK_OK(again.status());
  LP_FUZZ_CHECK(again->size() == entries->size());
  for (size_t i = 0; i < entries->size(); ++i) LP_FUZZ_CHECK(Same((*entries)[i], (*again)[i]));

  std::set<int64_t> versions = {1};
  for (const ManifestEntry& e : *entries) {
    if (e.name == "qv" && versions.size() < 4) versions.insert(e.version);
  }
  for (int64_t v : versions) {
    const std::string dir = loraplex::adapters::VersionDir(root, "qv", v);
    std::filesystem::create_directories(dir);
    loraplex::fuzz::WriteFileOrDie(dir + "/" + loraplex::adapters::kAdapterConfigFile,
                                   setup.config);
    loraplex::fuzz::WriteFileOrDie(dir + "/" + loraplex::adapters::kAdapterWeightsFile,
                                   setup.weights);
  }
  auto registry = loraplex::adapters::AdapterRegistry::Open(setup.options);
  if (!registry.ok()) {
    LP_FUZZ_CHECK(registry.status().code() == absl::StatusCode::kDataLoss);
    return 0;
  }
  const std::vector<loraplex::adapters::AdapterInfo> listed = (*registry)->List();
  LP_FUZZ_CHECK(listed.size() == entries->size());
  for (const ManifestEntry& e : *entries) {
    auto info = (*registry)->Get(e.name);
    LP_FUZZ_CHECK_OK(info.status());
    LP_FUZZ_CHECK(info->version == e.version && info->pinned == e.pinned);
    auto lease = (*registry)->Acquire(e.name);
    LP_FUZZ_CHECK_OK(lease.status());
  }
  auto before = (*registry)->Get("qv");
  auto replaced = (*registry)->RegisterFromDir("qv", setup.qv_dir, /*replace=*/true, /*pin=*/false);
  LP_FUZZ_CHECK_OK(replaced.status());
  if (before.ok()) LP_FUZZ_CHECK(replaced->version == before->version + 1);
  return 0;
}
