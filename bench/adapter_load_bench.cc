// LoadAdapter -> READY latency (issue 5, target under 50 ms): times AdapterRegistry::
// RegisterFromPath, the call LoadAdapter makes, on a rank-16 all-linear PEFT adapter with
// SmolLM2-135M's shapes, and prints the registry's own phase breakdown (RegistrationPhases) per run
// plus the medians. Beside it, the floor of a crash-safe registration: one fsync of a freshly
// written copy of the weights file on the same filesystem.
//
// A plain timed binary, not Google Benchmark: a registration is one long, IO-bound operation whose
// phases are the point, and its first run (cold) differs from the rest.
//
// Usage: adapter_load_bench [--runs N] [--dtype bf16|f32] [--compute bf16|f32] [--model GGUF]
//                           [--dir DIR]
//   --dtype    the weights file's dtype (PEFT saves f32 unless told otherwise); default bf16
//   --compute  the server's --dtype (the compute layout); default bf16
//   --model    a GGUF whose config gives the shapes; default models/SmolLM2-135M-Instruct.Q4_1.gguf
//              when present, else SmolLM2-135M's shapes written below
//   --dir      where the adapter folder and the state directory go (same filesystem, as a server
//              with --adapter-dir and --state-dir on one disk); default a new folder in /tmp
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "adapters/registry.h"
#include "common/half.h"
#include "formats/gguf.h"
#include "model/llama_config.h"
#include "nlohmann/json.hpp"

namespace loraplex {
namespace {

namespace fs = std::filesystem;

// SmolLM2-135M-Instruct (its config.json), used when no GGUF is at hand.
model::LlamaConfig SmolLm2Config() {
  model::LlamaConfig c;
  c.architecture = "llama";
  c.hidden_size = 576;
  c.intermediate_size = 1536;
  c.num_layers = 30;
  c.num_heads = 9;
  c.num_kv_heads = 3;
  c.head_dim = 64;
  c.vocab_size = 49152;
  c.max_position_embeddings = 8192;
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 100000.0f;
  c.tie_word_embeddings = true;
  return c;
}

// Writes a PEFT folder: rank `rank` on all seven linear modules of every layer, uniform random
// A and B in [-0.05, 0.05) (a trained adapter's B is not zero), lora_alpha = 2 * rank.
void WritePeftFolder(const std::string& dir, const model::LlamaConfig& c, int64_t rank, bool bf16) {
  fs::create_directories(dir);
  nlohmann::json config = {
      {"peft_type", "LORA"},
      {"task_type", "CAUSAL_LM"},
      {"r", rank},
      {"lora_alpha", 2 * rank},
      {"bias", "none"},
      {"fan_in_fan_out", false},
      {"target_modules",
       {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}}};
  std::ofstream(dir + "/adapter_config.json") << config.dump(2);

  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-0.05f, 0.05f);
  nlohmann::json header = nlohmann::json::object();
  std::string data;
  for (int64_t l = 0; l < c.num_layers; ++l) {
    for (int m = 0; m < model::kNumLinearModules; ++m) {
      const auto module = static_cast<model::LinearModule>(m);
      const int64_t in = model::LinearInFeatures(c, module);
      const int64_t out = model::LinearOutFeatures(c, module);
      const std::string key = absl::StrCat("base_model.model.", adapters::ModuleKey(l, module));
      for (const auto& [which, rows, cols] :
           {std::tuple{"A", rank, in}, std::tuple{"B", out, rank}}) {
        const size_t begin = data.size();
        for (int64_t i = 0; i < rows * cols; ++i) {
          const float x = u(rng);
          if (bf16) {
            const uint16_t h = F32ToBf16(x);
            data.append(reinterpret_cast<const char*>(&h), 2);
          } else {
            data.append(reinterpret_cast<const char*>(&x), 4);
          }
        }
        header[absl::StrCat(key, ".lora_", which, ".weight")] = {
            {"dtype", bf16 ? "BF16" : "F32"},
            {"shape", {rows, cols}},
            {"data_offsets", {begin, data.size()}}};
      }
    }
  }
  std::string h = header.dump();
  while (h.size() % 8 != 0) h += ' ';
  const uint64_t len = h.size();
  std::ofstream f(dir + "/adapter_model.safetensors", std::ios::binary);
  f.write(reinterpret_cast<const char*>(&len), 8);
  f << h << data;
}

// Seconds to write `bytes` to a new file in `dir` and fsync it: the one IO a crash-safe
// registration cannot skip.
double FsyncFloor(const std::string& dir, const std::string& bytes) {
  const std::string path = dir + "/fsync-probe";
  const absl::Time t = absl::Now();
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  size_t done = 0;
  while (fd >= 0 && done < bytes.size()) {
    const ssize_t n = write(fd, bytes.data() + done, bytes.size() - done);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
  const absl::Time written = absl::Now();
  if (fd >= 0) {
    fsync(fd);
    close(fd);
  }
  const double fsync_s = absl::ToDoubleSeconds(absl::Now() - written);
  std::printf("  write %.1f ms + fsync %.1f ms\n", absl::ToDoubleMilliseconds(written - t),
              fsync_s * 1e3);
  unlink(path.c_str());
  return fsync_s;
}

double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

std::string LoadAverage() {
  std::ifstream f("/proc/loadavg");
  std::string a, b, c;
  f >> a >> b >> c;
  return absl::StrCat(a, " ", b, " ", c);
}

int Main(int argc, char** argv) {
  int runs = 10;
  bool file_bf16 = true;
  kernels::DType compute = kernels::DType::kBF16;
  std::string model_path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
  std::string dir;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string flag = argv[i], value = argv[i + 1];
    if (flag == "--runs") {
      runs = std::max(1, std::atoi(value.c_str()));
    } else if (flag == "--dtype") {
      file_bf16 = value == "bf16";
    } else if (flag == "--compute") {
      compute = value == "f32" ? kernels::DType::kF32 : kernels::DType::kBF16;
    } else if (flag == "--model") {
      model_path = value;
    } else if (flag == "--dir") {
      dir = value;
    } else {
      std::fprintf(stderr, "unknown flag %s\n", flag.c_str());
      return 2;
    }
  }

  model::LlamaConfig config = SmolLm2Config();
  std::string shapes_from = "SmolLM2-135M shapes (hard-coded; no GGUF at " + model_path + ")";
  if (fs::exists(model_path)) {
    auto gguf = formats::GgufFile::Open(model_path);
    auto c = gguf.ok() ? model::LlamaConfig::FromGguf(**gguf)
                       : absl::StatusOr<model::LlamaConfig>(gguf.status());
    if (!c.ok()) {
      std::fprintf(stderr, "%s: %s\n", model_path.c_str(), c.status().ToString().c_str());
      return 1;
    }
    config = *c;
    shapes_from = model_path;
  }

  bool own_dir = dir.empty();
  if (own_dir) {
    std::string pattern = (fs::temp_directory_path() / "lp-adapter-load-XXXXXX").string();
    if (mkdtemp(pattern.data()) == nullptr) return 1;
    dir = pattern;
  }
  const std::string adapter_dir = dir + "/adapters";
  WritePeftFolder(adapter_dir + "/smol", config, 16, file_bf16);
  const std::string weights_path = adapter_dir + "/smol/adapter_model.safetensors";
  std::string weights;
  {
    std::ifstream f(weights_path, std::ios::binary);
    weights.assign(std::istreambuf_iterator<char>(f), {});
  }

  adapters::RegistryOptions options;
  options.state_dir = dir + "/state";
  options.adapter_dir = adapter_dir;
  options.base = config;
  options.load.dtype = compute;
  options.load.max_rank = 64;
  auto registry = adapters::AdapterRegistry::Open(options);
  if (!registry.ok()) {
    std::fprintf(stderr, "%s\n", registry.status().ToString().c_str());
    return 1;
  }

  std::printf(
      "adapter_load_bench: rank 16, all 7 linear modules x %lld layers, %s file of %.2f MB, "
      "compute %s\n  shapes: %s\n  dir: %s (state dir and adapter dir on one filesystem)\n"
      "  load average at start: %s; hardware threads: %u\n",
      static_cast<long long>(config.num_layers), file_bf16 ? "bf16" : "f32", weights.size() / 1e6,
      compute == kernels::DType::kF32 ? "f32" : "bf16", shapes_from.c_str(), dir.c_str(),
      LoadAverage().c_str(), std::thread::hardware_concurrency());
  std::printf("floor (fresh copy of the weights + fsync, same filesystem):\n");
  std::vector<double> floor;
  for (int i = 0; i < 3; ++i) floor.push_back(FsyncFloor(dir, weights) * 1e3);

  std::printf(
      "%4s %8s %8s %8s %8s %8s %8s %8s   (ms; RegisterFromPath with replace; call = "
      "until it returned, READY = until the version was current)\n",
      "run", "call", "READY", "stage", "sync", "load", "hash", "commit");
  std::vector<double> total, ready, stage, sync, load, hash, commit;
  for (int i = 0; i < runs; ++i) {
    const absl::Time t = absl::Now();
    auto info = (*registry)->RegisterFromPath("smol", "smol", /*replace=*/true, /*pin=*/false);
    const absl::Duration wall = absl::Now() - t;
    if (!info.ok()) {
      std::fprintf(stderr, "run %d: %s\n", i, info.status().ToString().c_str());
      return 1;
    }
    const adapters::RegistrationPhases p = (*registry)->last_registration();
    std::printf("%4d %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f\n", i, Ms(wall), Ms(p.total),
                Ms(p.stage), Ms(p.sync), Ms(p.load), Ms(p.hash), Ms(p.commit));
    if (i == 0 && runs > 1) continue;  // cold caches: shown, left out of the medians
    total.push_back(Ms(wall));
    ready.push_back(Ms(p.total));
    stage.push_back(Ms(p.stage));
    sync.push_back(Ms(p.sync));
    load.push_back(Ms(p.load));
    hash.push_back(Ms(p.hash));
    commit.push_back(Ms(p.commit));
  }
  std::printf("median %5.1f %8.1f %8.1f %8.1f %8.1f %8.1f %8.1f   fsync floor median %.1f ms\n",
              Median(total), Median(ready), Median(stage), Median(sync), Median(load), Median(hash),
              Median(commit), Median(floor));
  std::printf("load average at end: %s\n", LoadAverage().c_str());
  registry->reset();
  if (own_dir) fs::remove_all(dir);
  return 0;
}

}  // namespace
}  // namespace loraplex

int main(int argc, char** argv) { return loraplex::Main(argc, argv); }
