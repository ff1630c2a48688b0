// What the adapter-lifecycle e2e tests share: a loraplex-server child on stories260K with stubs
// for both services, the admin token, the stories260K PEFT fixtures and their offline greedy
// outputs, the upload stream, the admin calls and greedy generation from BOS.
#pragma once

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "absl/time/clock.h"
#include "adapters/manifest.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "loraplex/v1/inference.grpc.pb.h"
#include "tests/testing/server_process.h"
#include "tests/testing/testing.h"

namespace loraplex::e2e {

inline constexpr char kAdminToken[] = "s3cret-admin-token";

// A stories260K PEFT fixture folder (tests/fixtures/peft/stories260k/NAME).
inline std::string Fixture(const std::string& name) {
  return testing::FixturesDir() + "/peft/stories260k/" + name;
}

inline std::string ReadAll(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

// Environment variables: name, value.
using Env = std::vector<std::pair<std::string, std::string>>;

// Sets `env` in this process while it lives and then puts back what was there (set or unset).
// ServerProcess hands its child this process's environment, so one around a spawn sets variables
// for that child only. Not thread-safe: nothing else may read or write the environment meanwhile.
class ScopedEnv {
 public:
  explicit ScopedEnv(const Env& env) {
    for (const auto& [key, value] : env) {
      const char* old = std::getenv(key.c_str());
      saved_.emplace_back(key, old != nullptr ? std::optional<std::string>(old) : std::nullopt);
      setenv(key.c_str(), value.c_str(), 1);
    }
  }
  ~ScopedEnv() {
    for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) {
      if (it->second.has_value()) {
        setenv(it->first.c_str(), it->second->c_str(), 1);
      } else {
        unsetenv(it->first.c_str());
      }
    }
  }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;

 private:
  std::vector<std::pair<std::string, std::optional<std::string>>> saved_;
};

// A loraplex-server child process (`binary`) on stories260K (tests/testing/server_process.h)
// whose port file and log live in `dir`, with stubs for both services; `extra` are its flags
// besides the model.
class AdminServer {
 public:
  AdminServer(const std::string& binary, const std::string& dir, std::vector<std::string> extra,
              std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials(),
              grpc::ChannelArguments channel_args = {})
      : process_(binary, WithModel(std::move(extra)), dir) {
    if (!process_.ok()) return;  // exited: ok() is false, exit_status() says how
    auto channel = grpc::CreateCustomChannel(process_.address(), creds, channel_args);
    inference_ = v1::Inference::NewStub(channel);
    admin_ = v1::Adapters::NewStub(channel);
  }
  // The same with `env` set for the child (ScopedEnv around the spawn), e.g. LD_PRELOAD.
  AdminServer(const Env& env, const std::string& binary, const std::string& dir,
              std::vector<std::string> extra,
              std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials(),
              grpc::ChannelArguments channel_args = {})
      : AdminServer(ScopedEnv(env), binary, dir, std::move(extra), std::move(creds),
                    std::move(channel_args)) {}
  void Kill() { process_.Kill(); }
  bool ok() const { return process_.ok(); }
  int exit_status() const { return process_.exit_status(); }
  int port() const { return process_.port(); }
  int metrics_port() const { return process_.metrics_port(); }
  std::string log() const { return process_.log(); }
  testing::ServerProcess& process() { return process_; }
  v1::Inference::Stub& inference() { return *inference_; }
  v1::Adapters::Stub& admin() { return *admin_; }

 private:
  // `scope` (a parameter: it lives until this constructor returns) holds the environment set for
  // the spawn.
  AdminServer(ScopedEnv /*scope*/, const std::string& binary, const std::string& dir,
              std::vector<std::string> extra, std::shared_ptr<grpc::ChannelCredentials> creds,
              grpc::ChannelArguments channel_args)
      : AdminServer(binary, dir, std::move(extra), std::move(creds), std::move(channel_args)) {}
  static std::vector<std::string> WithModel(std::vector<std::string> args) {
    args.insert(args.begin(),
                {"--model=" + testing::Stories260KDir() + "/stories260K.gguf", "--dtype=f32"});
    return args;
  }
  testing::ServerProcess process_;
  std::unique_ptr<v1::Inference::Stub> inference_;
  std::unique_ptr<v1::Adapters::Stub> admin_;
};

// Writes `text` into the FIFO at `path` once a reader has it open (a reload the test held up by
// making a state directory file a FIFO): open fails with ENXIO until then. Waits up to 30 s; on
// failure kills `s`, so that what waits on the reload fails instead of hanging.
inline void FeedFifo(AdminServer& s, const std::string& path, const std::string& text) {
  int fd = -1;
  for (int i = 0; i < 300 && fd < 0; ++i) {
    fd = open(path.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_GE(fd, 0) << "the reload never opened " << path;
  if (fd < 0) {
    s.Kill();
    return;
  }
  EXPECT_EQ(write(fd, text.data(), text.size()), static_cast<ssize_t>(text.size()));
  close(fd);
}

// The admin token and a 60 s deadline.
inline void Authorize(grpc::ClientContext* ctx, const std::string& token = kAdminToken) {
  if (!token.empty()) ctx->AddMetadata("authorization", "Bearer " + token);
  ctx->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
}

// The messages of a whole upload of `dir`'s two files: the header, chunks of `chunk_bytes`
// (16 KiB unless told), the end message. `sha256`: "" for none, "auto" for the right one.
inline std::vector<v1::UploadAdapterRequest> UploadMessages(const std::string& name,
                                                            const std::string& dir, bool replace,
                                                            std::string sha256,
                                                            size_t chunk_bytes = 16384) {
  std::vector<v1::UploadAdapterRequest> out(1);
  const std::string weights = ReadAll(dir + "/" + adapters::kAdapterWeightsFile);
  if (sha256 == "auto") sha256 = adapters::Sha256Hex(weights.data(), weights.size());
  out[0].mutable_header()->set_name(name);
  out[0].mutable_header()->set_replace(replace);
  out[0].mutable_header()->set_sha256(sha256);
  v1::UploadAdapterRequest end;
  for (const std::string file : {adapters::kAdapterConfigFile, adapters::kAdapterWeightsFile}) {
    const std::string data = ReadAll(dir + "/" + file);
    for (size_t at = 0; at < data.size(); at += chunk_bytes) {
      v1::UploadAdapterRequest& chunk = out.emplace_back();
      chunk.mutable_chunk()->set_file_name(file);
      chunk.mutable_chunk()->set_data(data.substr(at, chunk_bytes));
    }
    if (file == adapters::kAdapterConfigFile) {
      end.mutable_end()->set_config_bytes(static_cast<int64_t>(data.size()));
    } else {
      end.mutable_end()->set_model_bytes(static_cast<int64_t>(data.size()));
    }
  }
  out.push_back(std::move(end));
  return out;
}

// Uploads `dir` (UploadMessages) and half-closes.
inline grpc::Status Upload(AdminServer& s, const std::string& name, const std::string& dir,
                           bool replace, std::string sha256, v1::AdapterInfo* info = nullptr) {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  v1::AdapterInfo local;
  auto writer = s.admin().UploadAdapter(&ctx, info != nullptr ? info : &local);
  for (const v1::UploadAdapterRequest& m : UploadMessages(name, dir, replace, std::move(sha256))) {
    if (!writer->Write(m)) break;  // the server ended the call: Finish says why
  }
  writer->WritesDone();
  return writer->Finish();
}

// LoadAdapter of the folder `path` (relative to --adapter-dir) as `name`, with `token` (none when
// empty); `info` (may be null) gets the answer.
inline grpc::Status Load(AdminServer& s, const std::string& name, const std::string& path,
                         bool replace = false, v1::AdapterInfo* info = nullptr,
                         const std::string& token = kAdminToken, bool pin = false) {
  grpc::ClientContext ctx;
  Authorize(&ctx, token);
  v1::LoadAdapterRequest req;
  req.set_name(name);
  req.set_path(path);
  req.set_replace(replace);
  req.set_pin(pin);
  v1::AdapterInfo local;
  return s.admin().LoadAdapter(&ctx, req, info != nullptr ? info : &local);
}

inline grpc::Status Get(AdminServer& s, const std::string& name, v1::AdapterInfo* info) {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  v1::GetAdapterRequest req;
  req.set_name(name);
  return s.admin().GetAdapter(&ctx, req, info);
}

inline grpc::Status List(AdminServer& s, std::vector<v1::AdapterInfo>* out) {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  v1::ListAdaptersResponse resp;
  grpc::Status st = s.admin().ListAdapters(&ctx, {}, &resp);
  out->assign(resp.adapters().begin(), resp.adapters().end());
  return st;
}

// Greedy tokens per comparison unless told: enough to tell the fixtures apart.
inline constexpr int kGreedyTokens = 24;

// A greedy request from BOS that ignores EOS: `max_tokens` with `adapter` ("" for the base model).
inline v1::GenerateRequest GreedyRequest(const std::string& adapter,
                                         int max_tokens = kGreedyTokens) {
  v1::GenerateRequest req;
  req.add_prompt_token_ids(1);
  req.set_max_tokens(max_tokens);
  req.set_ignore_eos(true);
  req.set_adapter(adapter);
  return req;
}

// What a Complete call answered.
struct Generated {
  grpc::Status status;
  std::vector<int32_t> ids;
  int64_t version = 0;
};

// Complete of GreedyRequest(adapter, max_tokens) with a `seconds` deadline.
inline Generated Complete(AdminServer& s, const std::string& adapter,
                          int max_tokens = kGreedyTokens, int seconds = 60) {
  v1::GenerateRequest req = GreedyRequest(adapter, max_tokens);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(seconds));
  v1::GenerateResponse resp;
  Generated g;
  g.status = s.inference().Complete(&ctx, req, &resp);
  g.ids.assign(resp.token_ids().begin(), resp.token_ids().end());
  g.version = resp.adapter_version();
  return g;
}

// A test suite over one adapter root: stories260K PEFT fixtures copied to ROOT/adapters (so
// LoadAdapter can name them) with loraplex-generate's greedy outputs from BOS, computed once, and a
// scratch folder with an empty state/ for each test.
class AdapterRootTest : public ::testing::Test {
 protected:
  // For SetUpTestSuite: makes the root (a temporary folder named after `prefix`), copies `folders`
  // there and keeps `generate_binary`'s greedy `max_tokens` ids of each of them but `copy_only`,
  // and as "base" those of the base model.
  static void SetUpAdapterRoot(const std::string& prefix, const std::vector<std::string>& folders,
                               const std::string& generate_binary, int max_tokens,
                               const std::set<std::string>& copy_only = {}) {
    root_ = new std::string(testing::MakeTempDir(prefix));
    expected_ = new std::map<std::string, std::vector<int32_t>>();
    std::filesystem::create_directories(*root_ + "/adapters");
    for (const std::string& name : folders) {
      std::filesystem::copy(Fixture(name), *root_ + "/adapters/" + name);
      if (copy_only.count(name) == 0) {
        (*expected_)[name] =
            testing::Stories260KGreedyIds(generate_binary, Fixture(name), max_tokens);
      }
    }
    (*expected_)["base"] = testing::Stories260KGreedyIds(generate_binary, "", max_tokens);
  }
  static void TearDownTestSuite() {
    std::filesystem::remove_all(*root_);
    delete root_;
    delete expected_;
  }
  void SetUp() override {
    dir_ = testing::MakeTempDir(*root_ + "/t");
    std::filesystem::create_directories(dir_ + "/state");
  }
  // A server (`binary`) over the shared adapter root with the admin token and this test's state
  // directory; `extra`: its other flags.
  std::unique_ptr<AdminServer> StartServer(const std::string& binary,
                                           std::vector<std::string> extra) {
    extra.push_back("--adapter-dir=" + *root_ + "/adapters");
    extra.push_back("--state-dir=" + dir_ + "/state");
    extra.push_back(std::string("--admin-token=") + kAdminToken);
    auto s = std::make_unique<AdminServer>(binary, dir_, std::move(extra));
    EXPECT_TRUE(s->ok()) << "server did not start, status " << s->exit_status();
    return s;
  }
  // The offline greedy ids of `folder` ("base": the base model).
  static const std::vector<int32_t>& Expected(const std::string& folder) {
    return expected_->at(folder);
  }

  static inline std::string* root_ = nullptr;
  static inline std::map<std::string, std::vector<int32_t>>* expected_ = nullptr;
  std::string dir_;
};

}  // namespace loraplex::e2e
