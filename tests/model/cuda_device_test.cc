// --device and the CPU/CUDA seams that run on every machine: device resolution, LoadOptions.device
// without a device, KV caches without host storage, LoraWeightsView ids; and the real binaries:
// loraplex-generate and loraplex-server refuse --device cuda at startup without a device, --device
// auto runs on the CPU then, and with a device loraplex-generate --device cuda reproduces
// stories260K's 60-token greedy story (../shared/models/stories260K/golden-greedy.json).
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "model/device.h"
#include "model/llama_model.h"
#include "nlohmann/json.hpp"
#include "tests/testing/testing.h"

namespace loraplex::model {
namespace {

using ::loraplex::testing::StatusIs;
using ::loraplex::testing::Stories260KDir;

bool HaveCuda(std::string* why) { return CudaBackendAvailable(why); }

bool RequireCuda() {
  const char* v = std::getenv("LP_REQUIRE_CUDA");
  return v != nullptr && std::strcmp(v, "1") == 0;
}

TEST(DeviceTest, ResolvesFlagValues) {
  std::string reason;
  ASSERT_OK_AND_ASSIGN(Device cpu, ResolveDevice("cpu", &reason));
  EXPECT_EQ(cpu, Device::kCpu);
  EXPECT_THAT(ResolveDevice("gpu", &reason),
              StatusIs(absl::StatusCode::kInvalidArgument, "auto, cpu or cuda"));
  std::string why;
  ASSERT_OK_AND_ASSIGN(Device automatic, ResolveDevice("auto", &reason));
  if (HaveCuda(&why)) {
    EXPECT_EQ(automatic, Device::kCuda);
    EXPECT_OK(ResolveDevice("cuda", &reason));
  } else {
    EXPECT_EQ(automatic, Device::kCpu);
    EXPECT_NE(reason.find("no CUDA device found: " + why), std::string::npos) << reason;
    EXPECT_THAT(ResolveDevice("cuda", &reason),
                StatusIs(absl::StatusCode::kFailedPrecondition, "no CUDA device found: " + why));
  }
  EXPECT_STREQ(DeviceName(Device::kCpu), "cpu");
  EXPECT_STREQ(DeviceName(Device::kCuda), "cuda");
}

TEST(DeviceTest, LoadingOnCudaWithoutADeviceIsUnavailable) {
  std::string why;
  if (HaveCuda(&why)) GTEST_SKIP() << "a CUDA device is present; cuda_model_test covers it";
  LoadOptions o;
  o.device = Device::kCuda;
  EXPECT_THAT(LlamaModel::Load(Stories260KDir() + "/stories260K.gguf", o),
              StatusIs(absl::StatusCode::kUnavailable, "no CUDA device found"));
}

TEST(DeviceTest, CpuModelRefusesACacheWithoutHostStorage) {
  ASSERT_OK_AND_ASSIGN(auto m, LlamaModel::Load(Stories260KDir() + "/stories260K.gguf"));
  ASSERT_OK_AND_ASSIGN(KvCache own, m->CreateKvCache(2, 16));
  EXPECT_TRUE(own.has_host_storage());
  ASSERT_OK_AND_ASSIGN(KvCache bare, KvCache::Create(m->config(), 2, 16, /*host_storage=*/false));
  EXPECT_FALSE(bare.has_host_storage());
  EXPECT_EQ(bare.k(0), nullptr);
  ForwardBatch b;
  b.tokens = {1};
  b.positions = {0};
  b.token_seq = {0};
  b.max_blocks_per_seq = 1;
  b.block_tables = {*bare.AllocateBlock()};
  b.logit_rows = {0};
  std::vector<float> logits;
  EXPECT_THAT(m->Forward(b, &bare, &logits),
              StatusIs(absl::StatusCode::kFailedPrecondition, "no host storage"));
}

TEST(DeviceTest, LoraViewIdsAreUniqueAndFreshOnCopy) {
  LoraWeightsView a, b;
  EXPECT_NE(a.id, 0u);
  EXPECT_NE(a.id, b.id);
  LoraWeightsView c = a;
  EXPECT_NE(c.id, a.id);
  const uint64_t old = b.id;
  b = a;
  EXPECT_NE(b.id, old);
  EXPECT_NE(b.id, a.id);
  LoraWeightsView d = std::move(c);
  EXPECT_NE(d.id, c.id);
}

struct RunResult {
  int exit_code = -1;
  std::string out;  // stdout and stderr together
};

// The binaries built beside this test; LP_GENERATE_BIN / LP_SERVER_BIN in the environment override
// the build paths compiled in (scripts/gpu-check.sh runs a prebuilt pack from another folder).
std::string Binary(const char* env, const char* built) {
  const char* v = std::getenv(env);
  return v != nullptr && *v != '\0' ? v : built;
}
std::string GenerateBin() { return Binary("LP_GENERATE_BIN", LP_GENERATE_BIN); }
std::string ServerBin() { return Binary("LP_SERVER_BIN", LP_SERVER_BIN); }

RunResult RunCommand(const std::string& cmd) {
  RunResult r;
  FILE* p = popen((cmd + " 2>&1").c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = pclose(p);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

std::vector<int32_t> GoldenIds() {
  std::ifstream in(Stories260KDir() + "/golden-greedy.json");
  return nlohmann::json::parse(in)["greedy_ids_after_bos"].get<std::vector<int32_t>>();
}

std::string StoryArgs(const std::string& model) {
  return " --model " + model + " --dtype f32 --prompt-ids 1 --max-tokens 60 --ignore-eos --json";
}

TEST(DeviceE2eTest, CudaWithoutADeviceFailsAtStartup) {
  std::string why;
  if (HaveCuda(&why)) GTEST_SKIP() << "a CUDA device is present";
  RunResult g = RunCommand(GenerateBin() + StoryArgs(Stories260KDir() + "/stories260K.gguf") +
                           " --device cuda");
  EXPECT_NE(g.exit_code, 0) << g.out;
  EXPECT_NE(g.out.find("no CUDA device found"), std::string::npos) << g.out;
  ASSERT_TRUE(std::filesystem::exists(ServerBin()))
      << ServerBin() << " missing: build loraplex-server too (CI builds everything)";
  RunResult s = RunCommand(ServerBin() + " --model " + Stories260KDir() +
                           "/stories260K.gguf --listen 127.0.0.1:0 --device cuda");
  EXPECT_NE(s.exit_code, 0) << s.out;
  EXPECT_NE(s.out.find("no CUDA device found"), std::string::npos) << s.out;
}

TEST(DeviceE2eTest, AutoRunsTheGoldenStoryOnWhateverIsThere) {
  std::string why;
  const bool cuda = HaveCuda(&why);
  RunResult r = RunCommand(GenerateBin() + StoryArgs(Stories260KDir() + "/stories260K.gguf") +
                           " --device auto");
  ASSERT_EQ(r.exit_code, 0) << r.out;
  nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["device"], cuda ? "cuda" : "cpu") << j["device_reason"];
  EXPECT_EQ(j["token_ids"].get<std::vector<int32_t>>(), GoldenIds());
}

TEST(DeviceE2eTest, CudaReproducesTheGoldenStory) {
  std::string why;
  if (!HaveCuda(&why)) {
    if (RequireCuda()) FAIL() << "LP_REQUIRE_CUDA=1 but no CUDA device found: " << why;
    GTEST_SKIP() << "no CUDA device found: " << why;
  }
  // The GGUF file and the HF copy, as tests/e2e/generate_e2e_test.cc does on the CPU.
  for (const std::string& model : {Stories260KDir() + "/stories260K.gguf", Stories260KDir()}) {
    RunResult r = RunCommand(GenerateBin() + StoryArgs(model) + " --device cuda");
    ASSERT_EQ(r.exit_code, 0) << r.out;
    nlohmann::json j = nlohmann::json::parse(r.out);
    EXPECT_EQ(j["device"], "cuda");
    EXPECT_EQ(j["token_ids"].get<std::vector<int32_t>>(), GoldenIds()) << model;
  }
}

}  // namespace
}  // namespace loraplex::model
