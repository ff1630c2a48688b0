// End to end: the adapter lifecycle over gRPC against a real loraplex-server process on loopback.
// Base model stories260K (../shared/models/stories260K); adapters are the stories260K PEFT
// fixtures (tests/fixtures/peft/stories260k, made with HF PEFT by tools/make_peft_goldens.py).
// The reference for every adapter output is loraplex-generate --adapter on the same folder, which
// tests/adapters checks against PEFT's logits.
#include <arpa/inet.h>
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "adapters/manifest.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "loraplex/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/e2e/admin_e2e.h"
#include "tests/testing/peft_files.h"
#include "tests/testing/server_process.h"
#include "tests/testing/testing.h"

namespace loraplex {
namespace {

namespace fs = std::filesystem;
using grpc::StatusCode;

constexpr int kTokens = e2e::kGreedyTokens;  // greedy tokens per comparison
constexpr const char* kToken = e2e::kAdminToken;
using e2e::AdminServer;
using e2e::Authorize;
using e2e::Complete;
using e2e::Fixture;
using e2e::Generated;
using e2e::Load;
using e2e::ReadAll;
using e2e::Upload;

// A loraplex-server child on stories260K (tests/e2e/admin_e2e.h).
class Server : public e2e::AdminServer {
 public:
  Server(const std::string& dir, std::vector<std::string> extra,
         std::shared_ptr<grpc::ChannelCredentials> creds = grpc::InsecureChannelCredentials(),
         grpc::ChannelArguments channel_args = {})
      : AdminServer(LP_SERVER_BINARY, dir, std::move(extra), std::move(creds),
                    std::move(channel_args)) {}
};

std::vector<v1::AdapterInfo> List(AdminServer& s) {
  std::vector<v1::AdapterInfo> list;
  grpc::Status st = e2e::List(s, &list);
  EXPECT_TRUE(st.ok()) << st.error_message();
  return list;
}

// The value of one sample line "name{labels} value" in a metrics page, or -1.
double Sample(const std::string& page, const std::string& series) {
  size_t at = page.find(series + " ");
  return at == std::string::npos ? -1 : std::stod(page.substr(at + series.size() + 1));
}

// The folders, their offline outputs (computed once) and a scratch area shared by the tests
// (tests/e2e/admin_e2e.h); rank64 is only copied.
class LifecycleE2eTest : public e2e::AdapterRootTest {
 protected:
  static void SetUpTestSuite() {
    SetUpAdapterRoot("lp-lifecycle",
                     {"qv", "all_linear", "rank1", "layers", "regex", "patterns", "rank64",
                      "dora_qv", "dora_all"},
                     LP_GENERATE_BINARY, kTokens, {"rank64"});
  }
  // A server over the shared adapter root with the admin token and its own state directory.
  std::unique_ptr<AdminServer> Start(std::vector<std::string> extra = {}) {
    return StartServer(LP_SERVER_BINARY, std::move(extra));
  }
};

TEST_F(LifecycleE2eTest, RegisteredAtRuntimeOutputsEqualLoraplexGenerate) {
  auto s = Start();
  ASSERT_TRUE(s->ok());
  v1::AdapterInfo a, b, c;
  ASSERT_TRUE(Load(*s, "a", "qv", false, &a).ok());
  ASSERT_TRUE(Load(*s, "b", "all_linear", false, &b).ok());
  grpc::Status up = Upload(*s, "c", Fixture("rank1"), false, "auto", &c);
  ASSERT_TRUE(up.ok()) << up.error_message();
  EXPECT_EQ(a.version(), 1);
  EXPECT_EQ(a.state(), v1::READY);
  EXPECT_EQ(a.rank(), 8);
  EXPECT_EQ(b.target_modules_size(), 7);
  EXPECT_EQ(c.rank(), 1);
  EXPECT_EQ(c.sha256(),
            adapters::Sha256Hex(ReadAll(Fixture("rank1/adapter_model.safetensors")).data(),
                                ReadAll(Fixture("rank1/adapter_model.safetensors")).size()));
  for (const auto& [name, folder] : std::vector<std::pair<std::string, std::string>>{
           {"a", "qv"}, {"b", "all_linear"}, {"c", "rank1"}}) {
    Generated g = Complete(*s, name);
    ASSERT_TRUE(g.status.ok()) << name << ": " << g.status.error_message();
    EXPECT_EQ(g.ids, Expected(folder)) << name;
    EXPECT_EQ(g.version, 1);
  }
  EXPECT_NE(Expected("qv"), Expected("all_linear")) << "the fixtures should differ in output";
  std::vector<v1::AdapterInfo> list = List(*s);
  ASSERT_EQ(list.size(), 3u);
  EXPECT_EQ(list[0].requests_served(), 1);
  EXPECT_EQ(list[0].residency(), v1::DEVICE);
  EXPECT_GT(list[0].last_used_unix_ms(), 0);
}

// 8 client threads generate with x while x is replaced 20 times (qv on odd versions, all_linear
// on even ones): no request fails, each reports its version and produces that version's output,
// and none started after a replace returned runs on an older version.
TEST_F(LifecycleE2eTest, HotSwapUnderLoadFailsNothing) {
  auto s = Start();
  ASSERT_TRUE(s->ok());
  ASSERT_TRUE(Load(*s, "x", "qv", false).ok());
  std::atomic<int64_t> published{1};
  std::atomic<bool> stop{false};
  std::atomic<int> requests{0};
  std::vector<std::string> errors[8];
  std::vector<std::thread> clients;
  for (int t = 0; t < 8; ++t) {
    clients.emplace_back([&, t] {
      while (!stop.load()) {
        const int64_t floor = published.load();
        Generated g = Complete(*s, "x", 12);
        requests.fetch_add(1);
        const std::vector<int32_t>& want = Expected(g.version % 2 == 1 ? "qv" : "all_linear");
        if (!g.status.ok()) {
          errors[t].push_back("failed: " + g.status.error_message());
        } else if (g.version < floor) {
          errors[t].push_back(absl::StrCat("ran on v", g.version, " after v", floor, " was live"));
        } else if (!std::equal(g.ids.begin(), g.ids.end(), want.begin()) || g.ids.size() != 12) {
          errors[t].push_back(absl::StrCat("v", g.version, " output differs from its folder's"));
        }
      }
    });
  }
  for (int v = 2; v <= 21; ++v) {
    absl::SleepFor(absl::Milliseconds(30));
    v1::AdapterInfo info;
    grpc::Status st = Load(*s, "x", v % 2 == 1 ? "qv" : "all_linear", true, &info);
    ASSERT_TRUE(st.ok()) << st.error_message();
    ASSERT_EQ(info.version(), v);
    published.store(v);
  }
  absl::SleepFor(absl::Milliseconds(100));
  stop.store(true);
  for (std::thread& c : clients) c.join();
  for (int t = 0; t < 8; ++t) {
    EXPECT_TRUE(errors[t].empty())
        << "client " << t << ": " << errors[t].size() << " bad, first: " << errors[t][0];
  }
  EXPECT_GT(requests.load(), 40);
  Generated last = Complete(*s, "x@21", 12);
  EXPECT_TRUE(last.status.ok());
  EXPECT_EQ(Complete(*s, "x@20", 12).status.error_code(), StatusCode::NOT_FOUND);
  bool drained = false;  // handles are dropped just after the last responses went out
  for (int i = 0; i < 200 && !drained; ++i) {
    drained = List(*s).size() == 1;
    if (!drained) absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_TRUE(drained) << "replaced versions should have drained";
}

TEST_F(LifecycleE2eTest, UnloadWhileInUseFinishesRunningRequests) {
  auto s = Start();
  ASSERT_TRUE(s->ok());
  ASSERT_TRUE(Load(*s, "u", "qv", false).ok());
  v1::GenerateRequest long_req = e2e::GreedyRequest("u", 480);
  grpc::ClientContext stream_ctx;
  auto stream = s->inference().Generate(&stream_ctx, long_req);
  v1::GenerateResponse msg;
  ASSERT_TRUE(stream->Read(&msg));  // running: it holds its lease on u v1
  std::vector<int32_t> ids(msg.token_ids().begin(), msg.token_ids().end());

  grpc::ClientContext ctx;
  Authorize(&ctx);
  v1::UnloadAdapterRequest req;
  req.set_name("u");
  v1::UnloadAdapterResponse resp;
  ASSERT_TRUE(s->admin().UnloadAdapter(&ctx, req, &resp).ok());
  EXPECT_EQ(resp.adapter().state(), v1::DRAINING);
  EXPECT_EQ(Complete(*s, "u").status.error_code(), StatusCode::NOT_FOUND);
  int64_t version = 0;
  while (stream->Read(&msg)) {
    ids.insert(ids.end(), msg.token_ids().begin(), msg.token_ids().end());
    if (!msg.finish_reason().empty()) version = msg.adapter_version();
  }
  grpc::Status st = stream->Finish();
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(ids.size(), 480u);
  EXPECT_EQ(version, 1);
  EXPECT_TRUE(std::equal(Expected("qv").begin(), Expected("qv").end(), ids.begin()));
  // The server drops its handle just after the client sees the end of the stream.
  bool drained = false;
  for (int i = 0; i < 200 && !drained; ++i) {
    drained = List(*s).empty();
    if (!drained) absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_TRUE(drained) << "the drained version should be gone";
}

TEST_F(LifecycleE2eTest, EvictionWithTwoSlotsKeepsOutputsCorrect) {
  auto s = Start({"--max-loaded-adapters=2"});
  ASSERT_TRUE(s->ok());
  const std::vector<std::string> folders = {"qv",     "all_linear", "rank1",
                                            "layers", "regex",      "patterns"};
  for (const std::string& f : folders) ASSERT_TRUE(Load(*s, f, f, false).ok()) << f;
  for (int round = 0; round < 2; ++round) {
    for (const std::string& f : folders) {
      Generated g = Complete(*s, f);
      ASSERT_TRUE(g.status.ok()) << f << ": " << g.status.error_message();
      EXPECT_EQ(g.ids, Expected(f)) << f << " round " << round;
    }
  }
  int resident = 0;
  for (const v1::AdapterInfo& info : List(*s)) resident += info.residency() == v1::DEVICE;
  EXPECT_EQ(resident, 2);
  absl::SleepFor(absl::Milliseconds(400));  // one metrics refresh
  const std::string page = testing::FetchMetrics(s->metrics_port());
  double evictions = 0, reloads = 0;
  for (const std::string& f : folders) {
    evictions +=
        std::max(0.0, Sample(page, "loraplex_adapter_evictions_total{adapter=\"" + f + "\"}"));
    reloads += std::max(0.0, Sample(page, "loraplex_adapter_reloads_total{adapter=\"" + f + "\"}"));
  }
  // Round robin over 6 with 2 slots: every one of the 12 requests reloads its adapter.
  EXPECT_EQ(reloads, 12);
  EXPECT_EQ(evictions, 4 + 12);  // 4 while registering, then one per reload
  EXPECT_EQ(Sample(page, "loraplex_adapter_requests_total{adapter=\"qv\"}"), 2);
}

TEST_F(LifecycleE2eTest, RestartAndKillNineServeWhatReturnedOk) {
  {
    auto s = Start();
    ASSERT_TRUE(s->ok());
    ASSERT_TRUE(Load(*s, "p", "qv", false).ok());
    ASSERT_TRUE(Load(*s, "p", "all_linear", true).ok());  // v2
    ASSERT_TRUE(Upload(*s, "q", Fixture("rank1"), false, "auto").ok());
    // An upload cut off by kill -9: header and part of the weights sent, never finished.
    grpc::ClientContext ctx;
    Authorize(&ctx);
    v1::AdapterInfo info;
    auto writer = s->admin().UploadAdapter(&ctx, &info);
    v1::UploadAdapterRequest m;
    m.mutable_header()->set_name("partial");
    ASSERT_TRUE(writer->Write(m));
    m.mutable_chunk()->set_file_name(adapters::kAdapterWeightsFile);
    m.mutable_chunk()->set_data(
        ReadAll(Fixture("layers/adapter_model.safetensors")).substr(0, 20000));
    ASSERT_TRUE(writer->Write(m));
    absl::SleepFor(absl::Milliseconds(100));
    s->Kill();  // SIGKILL
    writer->Finish();
  }
  auto s = Start();
  ASSERT_TRUE(s->ok());
  std::vector<v1::AdapterInfo> list = List(*s);
  ASSERT_EQ(list.size(), 2u);
  EXPECT_EQ(list[0].name(), "p");
  EXPECT_EQ(list[0].version(), 2);
  EXPECT_EQ(list[1].name(), "q");
  EXPECT_EQ(list[1].version(), 1);
  Generated p = Complete(*s, "p@2");
  ASSERT_TRUE(p.status.ok()) << p.status.error_message();
  EXPECT_EQ(p.ids, Expected("all_linear"));
  EXPECT_EQ(Complete(*s, "q").ids, Expected("rank1"));
  EXPECT_TRUE(fs::is_empty(dir_ + "/state/staging"));
  EXPECT_FALSE(fs::exists(dir_ + "/state/adapters/partial"));
  EXPECT_FALSE(fs::exists(dir_ + "/state/adapters/p/v1"));
}

TEST_F(LifecycleE2eTest, BadRequestsGetTheirCodesAndDisturbNothing) {
  auto s = Start({"--max-lora-rank=16", "--max-adapter-bytes=200K"});
  ASSERT_TRUE(s->ok());
  ASSERT_TRUE(Load(*s, "good", "qv", false).ok());
  const std::string bad_root = *root_ + "/adapters/bad-" + std::to_string(getpid());
  auto make = [&](const std::string& name, const std::string& config, const std::string& weights) {
    fs::create_directories(bad_root + "/" + name);
    if (!config.empty()) std::ofstream(bad_root + "/" + name + "/adapter_config.json") << config;
    if (!weights.empty()) {
      std::ofstream(bad_root + "/" + name + "/adapter_model.safetensors", std::ios::binary)
          << weights;
    }
  };
  const std::string config = ReadAll(Fixture("qv/adapter_config.json"));
  const std::string weights = ReadAll(Fixture("qv/adapter_model.safetensors"));
  std::string dora = config;
  dora.replace(dora.find("\"use_dora\": false"), 17, "\"use_dora\": true");
  make("json", "{\"r\": ", weights);
  make("missing", config, "");
  make("truncated", config, weights.substr(0, weights.size() - 100));
  make("dora", dora, weights);
  // Shapes that do not fit the base: q_proj's lora_A reads 48 features, stories260K has 64.
  make("shape", config,
       testing::SelfAttnSafetensors({{"q_proj.lora_A", {8, 48}},
                                     {"q_proj.lora_B", {64, 8}},
                                     {"v_proj.lora_A", {8, 64}},
                                     {"v_proj.lora_B", {32, 8}}}));
  const std::string rel = fs::path(bad_root).filename().string();

  // Traffic on "good" while the bad loads come in: it must not notice.
  std::atomic<bool> stop{false};
  std::atomic<int> traffic_errors{0}, traffic{0};
  std::thread background([&] {
    while (!stop.load()) {
      Generated g = Complete(*s, "good", 8);
      traffic.fetch_add(1);
      if (!g.status.ok() || !std::equal(g.ids.begin(), g.ids.end(), Expected("qv").begin())) {
        traffic_errors.fetch_add(1);
      }
    }
  });
  struct Case {
    const char* what;
    grpc::Status status;
    StatusCode want;
  };
  std::vector<Case> cases = {
      {"no token", Load(*s, "n", "qv", false, nullptr, ""), StatusCode::UNAUTHENTICATED},
      {"wrong token", Load(*s, "n", "qv", false, nullptr, "guess"), StatusCode::PERMISSION_DENIED},
      {"malformed json", Load(*s, "n", rel + "/json", false), StatusCode::INVALID_ARGUMENT},
      {"missing file", Load(*s, "n", rel + "/missing", false), StatusCode::NOT_FOUND},
      {"truncated safetensors", Load(*s, "n", rel + "/truncated", false),
       StatusCode::INVALID_ARGUMENT},
      {"shape mismatch", Load(*s, "n", rel + "/shape", false), StatusCode::FAILED_PRECONDITION},
      {"rank over the limit", Load(*s, "n", "rank64", false), StatusCode::FAILED_PRECONDITION},
      {"dora", Load(*s, "n", rel + "/dora", false), StatusCode::INVALID_ARGUMENT},
      {"wrong sha256", Upload(*s, "n", Fixture("qv"), false, std::string(64, 'a')),
       StatusCode::INVALID_ARGUMENT},
      {"oversized upload", Upload(*s, "n", Fixture("rank64"), false, ""),
       StatusCode::RESOURCE_EXHAUSTED},
      {"name with a slash", Load(*s, "a/b", "qv", false), StatusCode::INVALID_ARGUMENT},
      {"path traversal", Load(*s, "n", "../../etc", false), StatusCode::PERMISSION_DENIED},
      {"existing name", Load(*s, "good", "all_linear", false), StatusCode::ALREADY_EXISTS},
      {"unknown adapter", Complete(*s, "nope").status, StatusCode::NOT_FOUND},
  };
  stop.store(true);
  background.join();
  for (const Case& c : cases) {
    EXPECT_EQ(c.status.error_code(), c.want) << c.what << ": " << c.status.error_message();
    EXPECT_FALSE(c.status.error_message().empty()) << c.what;
    EXPECT_EQ(c.status.error_message().find(kToken), std::string::npos) << c.what;
  }
  EXPECT_EQ(traffic_errors.load(), 0) << "of " << traffic.load();
  std::vector<v1::AdapterInfo> list = List(*s);
  ASSERT_EQ(list.size(), 1u);
  EXPECT_EQ(list[0].name(), "good");
  EXPECT_EQ(list[0].version(), 1);
  fs::remove_all(bad_root);
}

TEST_F(LifecycleE2eTest, TlsRoundTripWithATestCertificate) {
  const std::string cert = dir_ + "/cert.pem", key = dir_ + "/key.pem";
  const std::string cmd = absl::StrCat(
      "openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=localhost -addext "
      "subjectAltName=IP:127.0.0.1,DNS:localhost -keyout ",
      key, " -out ", cert, " 2>/dev/null");
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  grpc::SslCredentialsOptions ssl;
  ssl.pem_root_certs = ReadAll(cert);
  Server tls(dir_,
             {"--tls-cert=" + cert, "--tls-key=" + key, std::string("--admin-token=") + kToken},
             grpc::SslCredentials(ssl));
  ASSERT_TRUE(tls.ok());
  std::vector<v1::AdapterInfo> listed;
  grpc::Status st = e2e::List(tls, &listed);
  EXPECT_TRUE(st.ok()) << st.error_message();
  grpc::ClientContext ctx2;
  ctx2.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  v1::ModelInfo info;
  EXPECT_TRUE(tls.inference().GetModelInfo(&ctx2, {}, &info).ok());
  EXPECT_EQ(info.vocab_size(), 512);
  // A plaintext client cannot talk to it.
  auto plain = v1::Inference::NewStub(grpc::CreateChannel(absl::StrCat("127.0.0.1:", tls.port()),
                                                          grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx3;
  ctx3.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(3));
  EXPECT_FALSE(plain->GetModelInfo(&ctx3, {}, &info).ok());
  tls.Kill();

  // mTLS: the self-signed certificate is also the client CA; a client without it is refused.
  grpc::SslCredentialsOptions with_cert = ssl;
  with_cert.pem_private_key = ReadAll(key);
  with_cert.pem_cert_chain = ReadAll(cert);
  Server mtls(dir_, {"--tls-cert=" + cert, "--tls-key=" + key, "--tls-client-ca=" + cert},
              grpc::SslCredentials(with_cert));
  ASSERT_TRUE(mtls.ok());
  grpc::ClientContext ctx4;
  ctx4.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  EXPECT_TRUE(mtls.inference().GetModelInfo(&ctx4, {}, &info).ok());
  auto anonymous = v1::Inference::NewStub(
      grpc::CreateChannel(absl::StrCat("127.0.0.1:", mtls.port()), grpc::SslCredentials(ssl)));
  grpc::ClientContext ctx5;
  ctx5.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(3));
  EXPECT_FALSE(anonymous->GetModelInfo(&ctx5, {}, &info).ok());
}

TEST_F(LifecycleE2eTest, ApiTokenGuardsInference) {
  auto s = Start({"--api-token=inference-token"});
  ASSERT_TRUE(s->ok());
  v1::GenerateRequest req;
  req.add_prompt_token_ids(1);
  req.set_max_tokens(4);
  v1::GenerateResponse resp;
  {
    grpc::ClientContext ctx;
    EXPECT_EQ(s->inference().Complete(&ctx, req, &resp).error_code(), StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext ctx;
    auto stream = s->inference().Generate(&ctx, req);
    while (stream->Read(&resp)) {
    }
    EXPECT_EQ(stream->Finish().error_code(), StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer wrong");
    v1::ModelInfo info;
    EXPECT_EQ(s->inference().GetModelInfo(&ctx, {}, &info).error_code(),
              StatusCode::PERMISSION_DENIED);
  }
  {
    grpc::ClientContext ctx;
    ctx.AddMetadata("authorization", "Bearer inference-token");
    EXPECT_TRUE(s->inference().Complete(&ctx, req, &resp).ok());
    EXPECT_EQ(resp.token_ids_size(), 4);
  }
  // The admin token is a different credential.
  grpc::ClientContext ctx;
  Authorize(&ctx);
  EXPECT_EQ(s->inference().Complete(&ctx, req, &resp).error_code(), StatusCode::PERMISSION_DENIED);
}

grpc::Status SetMode(AdminServer& s, const std::string& name, v1::AdapterMode mode,
                     v1::AdapterInfo* info) {
  grpc::ClientContext ctx;
  Authorize(&ctx);
  v1::SetAdapterModeRequest req;
  req.set_name(name);
  req.set_mode(mode);
  return s.admin().SetAdapterMode(&ctx, req, info);
}

TEST_F(LifecycleE2eTest, MergedAdapterAndMixedModeKeepOutputs) {
  auto s = Start();
  ASSERT_TRUE(s->ok());
  ASSERT_TRUE(Load(*s, "m", "qv", false).ok());
  ASSERT_TRUE(Load(*s, "o", "all_linear", false).ok());
  v1::AdapterInfo info;
  ASSERT_TRUE(SetMode(*s, "m", v1::MERGED, &info).ok());
  EXPECT_TRUE(info.merged());
  // Merged, the adapter's own tokens pay no LoRA; others and the base run in mixed mode.
  EXPECT_EQ(Complete(*s, "m").ids, Expected("qv"));
  EXPECT_EQ(Complete(*s, "o").ids, Expected("all_linear"));
  EXPECT_EQ(Complete(*s, "").ids, Expected("base"));
  EXPECT_EQ(SetMode(*s, "o", v1::MERGED, &info).error_code(), StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(SetMode(*s, "m", v1::ADAPTER_MODE_UNSPECIFIED, &info).error_code(),
            StatusCode::INVALID_ARGUMENT);
  // Replacing the merged adapter unmerges it; the new version starts unmerged.
  ASSERT_TRUE(Load(*s, "m", "rank1", true, &info).ok());
  EXPECT_FALSE(info.merged());
  EXPECT_EQ(Complete(*s, "m").ids, Expected("rank1"));
  EXPECT_EQ(Complete(*s, "").ids, Expected("base"));
  ASSERT_TRUE(SetMode(*s, "o", v1::MERGED, &info).ok());
  EXPECT_EQ(Complete(*s, "o").ids, Expected("all_linear"));
  ASSERT_TRUE(SetMode(*s, "o", v1::UNMERGED, &info).ok());
  EXPECT_FALSE(info.merged());
  EXPECT_EQ(Complete(*s, "").ids, Expected("base"));
  EXPECT_EQ(Complete(*s, "o").ids, Expected("all_linear"));
}

v1::AdapterInfo GetInfo(AdminServer& s, const std::string& name) {
  v1::AdapterInfo info;
  grpc::Status st = e2e::Get(s, name, &info);
  EXPECT_TRUE(st.ok()) << name << ": " << st.error_message();
  return info;
}

// --merge-policy auto: hot traffic on one adapter gets it merged by the policy (every answer
// unchanged, other adapters and the base in mixed mode), a restart does not merge it again, the
// load moving to the base model unmerges it, both transitions are counted, and an adapter whose
// mode a client set stays as set.
TEST_F(LifecycleE2eTest, MergePolicyFollowsTheLoad) {
  // 4 client threads generate with `name` until `done` holds (polled every 100 ms) or `seconds`
  // pass; every answer must be the folder's. True when `done` held.
  auto drive = [this](AdminServer& s, const std::string& name, const std::string& folder,
                      double seconds, const std::function<bool()>& done) {
    std::atomic<bool> stop{false};
    std::atomic<int> wrong{0};
    std::vector<std::thread> threads;
    for (int i = 0; i < 4; ++i) {
      threads.emplace_back([&] {
        while (!stop.load()) {
          Generated g = Complete(s, name);
          if (!g.status.ok() || g.ids != Expected(folder)) wrong.fetch_add(1);
        }
      });
    }
    bool reached = false;
    for (int i = 0; i < seconds * 10 && !reached; ++i) {
      absl::SleepFor(absl::Milliseconds(100));
      reached = done();
    }
    stop.store(true);
    for (std::thread& t : threads) t.join();
    EXPECT_EQ(wrong.load(), 0) << "answers of '" << name << "' changed";
    return reached;
  };
  v1::AdapterInfo info;
  {
    auto s = Start({"--merge-policy=auto"});
    ASSERT_TRUE(s->ok());
    ASSERT_TRUE(Load(*s, "hot", "qv", false).ok());
    ASSERT_TRUE(Load(*s, "cold", "all_linear", false).ok());
    ASSERT_TRUE(drive(*s, "hot", "qv", 30, [&] { return GetInfo(*s, "hot").auto_merged(); }))
        << "not merged under traffic that is all its own";
    info = GetInfo(*s, "hot");
    EXPECT_TRUE(info.merged());
    EXPECT_FALSE(GetInfo(*s, "cold").merged());
    EXPECT_EQ(Complete(*s, "cold").ids, Expected("all_linear"));
    EXPECT_EQ(Complete(*s, "").ids, Expected("base"));
    s->Kill();  // SIGKILL while merged by the policy
  }
  auto s = Start({"--merge-policy=auto"});
  ASSERT_TRUE(s->ok());
  EXPECT_FALSE(GetInfo(*s, "hot").merged()) << "a merge of the policy came back after a restart";
  ASSERT_TRUE(drive(*s, "hot", "qv", 30, [&] { return GetInfo(*s, "hot").auto_merged(); }));
  ASSERT_TRUE(drive(*s, "", "base", 30, [&] { return !GetInfo(*s, "hot").merged(); }))
      << "still merged with the load on the base model";
  absl::SleepFor(absl::Milliseconds(400));  // one metrics refresh
  const std::string page = testing::FetchMetrics(s->metrics_port());
  EXPECT_EQ(
      Sample(page, "loraplex_adapter_merge_transitions_total{adapter=\"hot\",direction=\"merge\"}"),
      1);
  EXPECT_EQ(
      Sample(page,
             "loraplex_adapter_merge_transitions_total{adapter=\"hot\",direction=\"unmerge\"}"),
      1);
  // Set by hand: the policy leaves it unmerged, however hot.
  ASSERT_TRUE(SetMode(*s, "hot", v1::UNMERGED, &info).ok());
  EXPECT_FALSE(drive(*s, "hot", "qv", 4, [&] { return GetInfo(*s, "hot").merged(); }));
  // And a client's merge of another adapter is left alone too.
  ASSERT_TRUE(SetMode(*s, "cold", v1::MERGED, &info).ok());
  EXPECT_FALSE(info.auto_merged());
  EXPECT_FALSE(drive(*s, "", "base", 4, [&] { return !GetInfo(*s, "cold").merged(); }));
}

// The merge mode is in the manifest: after kill -9 and a restart the same version is merged again
// and every output (merged, mixed, base) is unchanged; unmerging or replacing it is recorded too.
TEST_F(LifecycleE2eTest, MergedModeSurvivesARestart) {
  v1::AdapterInfo info;
  {
    auto s = Start();
    ASSERT_TRUE(s->ok());
    ASSERT_TRUE(Load(*s, "m", "qv", false).ok());
    ASSERT_TRUE(Load(*s, "o", "all_linear", false).ok());
    ASSERT_TRUE(SetMode(*s, "m", v1::MERGED, &info).ok());
    s->Kill();  // SIGKILL, right after SetAdapterMode returned
  }
  {
    auto s = Start();
    ASSERT_TRUE(s->ok());
    info = GetInfo(*s, "m");
    EXPECT_TRUE(info.merged()) << "the merge was not restored";
    EXPECT_EQ(info.version(), 1);
    EXPECT_FALSE(GetInfo(*s, "o").merged());
    EXPECT_EQ(Complete(*s, "m").ids, Expected("qv"));
    EXPECT_EQ(Complete(*s, "o").ids, Expected("all_linear"));
    EXPECT_EQ(Complete(*s, "").ids, Expected("base"));
    // One at a time still holds for a restored merge.
    EXPECT_EQ(SetMode(*s, "o", v1::MERGED, &info).error_code(), StatusCode::FAILED_PRECONDITION);
    ASSERT_TRUE(SetMode(*s, "m", v1::UNMERGED, &info).ok());
    ASSERT_TRUE(SetMode(*s, "o", v1::MERGED, &info).ok());
    s->Kill();
  }
  {
    auto s = Start();
    ASSERT_TRUE(s->ok());
    EXPECT_FALSE(GetInfo(*s, "m").merged());
    EXPECT_TRUE(GetInfo(*s, "o").merged());
    EXPECT_EQ(Complete(*s, "").ids, Expected("base"));
    EXPECT_EQ(Complete(*s, "o").ids, Expected("all_linear"));
    // Replacing the merged adapter unmerges it, and the new version is recorded unmerged.
    ASSERT_TRUE(Load(*s, "o", "rank1", true, &info).ok());
    EXPECT_FALSE(info.merged());
    s->Kill();
  }
  auto s = Start();
  ASSERT_TRUE(s->ok());
  info = GetInfo(*s, "o");
  EXPECT_EQ(info.version(), 2);
  EXPECT_FALSE(info.merged());
  EXPECT_FALSE(GetInfo(*s, "m").merged());
  EXPECT_EQ(Complete(*s, "o").ids, Expected("rank1"));
  EXPECT_EQ(Complete(*s, "").ids, Expected("base"));
}

// DoRA adapters (use_dora) through the server: registered at runtime with their norms read on the
// engine thread, each gives loraplex-generate's output (which StoriesDoraTest holds to PEFT's),
// also all in flight together with a plain adapter and the base model; evicted and reloaded;
// merged, with the others in mixed mode; restored merged after kill -9 (the norms then read before
// the engine starts); refused in a mix.
TEST_F(LifecycleE2eTest, DoraAdaptersServeReloadMergeAndRestart) {
  v1::AdapterInfo info;
  auto all_at_once = [](AdminServer& s) {
    const std::vector<std::pair<std::string, std::string>> asked = {
        {"d", "dora_qv"}, {"e", "dora_all"}, {"p", "qv"}, {"", "base"}};
    std::vector<std::future<Generated>> running;
    for (int i = 0; i < 8; ++i) {
      running.push_back(std::async(std::launch::async,
                                   [&s, &asked, i] { return Complete(s, asked[i % 4].first); }));
    }
    for (int i = 0; i < 8; ++i) {
      Generated g = running[i].get();
      ASSERT_TRUE(g.status.ok()) << asked[i % 4].first << ": " << g.status.error_message();
      EXPECT_EQ(g.ids, Expected(asked[i % 4].second)) << asked[i % 4].first;
    }
  };
  EXPECT_NE(Expected("dora_qv"), Expected("base"));
  EXPECT_NE(Expected("dora_all"), Expected("base"));
  {
    auto s = Start({"--max-loaded-adapters=2"});
    ASSERT_TRUE(s->ok());
    ASSERT_TRUE(Load(*s, "d", "dora_qv", false, &info).ok());
    EXPECT_TRUE(info.dora());
    ASSERT_TRUE(Load(*s, "e", "dora_all", false).ok());
    ASSERT_TRUE(Load(*s, "p", "qv", false, &info).ok());  // a third: one of them goes to disk
    EXPECT_FALSE(info.dora());
    EXPECT_EQ(GetInfo(*s, "d").residency(), v1::DISK);
    EXPECT_EQ(Complete(*s, "d").ids, Expected("dora_qv"));  // reloaded
    EXPECT_EQ(Complete(*s, "e").ids, Expected("dora_all"));
    all_at_once(*s);
    ASSERT_TRUE(SetMode(*s, "d", v1::MERGED, &info).ok());
    EXPECT_TRUE(info.merged());
    all_at_once(*s);
    v1::GenerateRequest mix = e2e::GreedyRequest("", 4);
    mix.add_adapters()->set_name("p");
    mix.add_adapters()->set_name("e");
    grpc::ClientContext ctx;
    v1::GenerateResponse resp;
    grpc::Status refused = s->inference().Complete(&ctx, mix, &resp);
    EXPECT_EQ(refused.error_code(), StatusCode::INVALID_ARGUMENT);
    EXPECT_NE(refused.error_message().find("DoRA"), std::string::npos) << refused.error_message();
    s->Kill();
  }
  auto s = Start();
  ASSERT_TRUE(s->ok());
  info = GetInfo(*s, "d");
  EXPECT_TRUE(info.merged()) << "the merge was not restored";
  EXPECT_TRUE(info.dora());
  all_at_once(*s);
  ASSERT_TRUE(SetMode(*s, "d", v1::UNMERGED, &info).ok());
  all_at_once(*s);
}

// Requests for an evicted adapter whose reload is held up (its adapter_config.json in the state
// directory made a FIFO that nothing writes yet) wait without holding gRPC threads: with 16 of
// them waiting (more than gRPC's callback threads on any machine up to 32 cores), base-model and
// resident (pinned) adapter requests still complete, a waiter whose deadline passes ends at once,
// and once the reload goes on every waiter gets the adapter's output.
TEST_F(LifecycleE2eTest, SlowReloadDoesNotBlockOtherRequests) {
  auto s = Start({"--max-loaded-adapters=1"});
  ASSERT_TRUE(s->ok());
  ASSERT_TRUE(Load(*s, "slow", "qv", false).ok());
  ASSERT_TRUE(Load(*s, "pinned", "all_linear", false, nullptr, kToken, /*pin=*/true).ok());
  ASSERT_TRUE(Load(*s, "other", "rank1", false).ok());  // the one slot: "slow" goes to disk
  ASSERT_EQ(GetInfo(*s, "slow").residency(), v1::DISK);

  const std::string config = dir_ + "/state/adapters/slow/v1/adapter_config.json";
  const std::string text = ReadAll(config);
  ASSERT_TRUE(fs::remove(config));
  ASSERT_EQ(mkfifo(config.c_str(), 0600), 0);

  std::vector<Generated> waited(16);
  std::vector<std::thread> waiters;
  for (size_t i = 0; i < waited.size(); ++i) {
    waiters.emplace_back([&, i] { waited[i] = Complete(*s, "slow", kTokens, 120); });
  }
  absl::SleepFor(absl::Milliseconds(500));  // all of them in the server, waiting

  const absl::Time t = absl::Now();
  Generated impatient = Complete(*s, "slow", kTokens, 1);
  EXPECT_EQ(impatient.status.error_code(), StatusCode::DEADLINE_EXCEEDED);
  // No ASSERT until the waiters are joined: returning early would leave them blocked.
  Generated base = Complete(*s, "", kTokens, 20);
  EXPECT_TRUE(base.status.ok()) << "base model request while a reload is held up: "
                                << base.status.error_message();
  EXPECT_EQ(base.ids, Expected("base"));
  Generated pinned = Complete(*s, "pinned", kTokens, 20);
  EXPECT_TRUE(pinned.status.ok()) << pinned.status.error_message();
  EXPECT_EQ(pinned.ids, Expected("all_linear"));
  EXPECT_LT(absl::Now() - t, absl::Seconds(20));
  EXPECT_EQ(GetInfo(*s, "pinned").residency(), v1::DEVICE);

  // Let the reload go on.
  e2e::FeedFifo(*s, config, text);
  for (std::thread& w : waiters) w.join();
  for (const Generated& g : waited) {
    ASSERT_TRUE(g.status.ok()) << g.status.error_message();
    EXPECT_EQ(g.ids, Expected("qv"));
  }
  EXPECT_EQ(GetInfo(*s, "slow").residency(), v1::DEVICE);
}

}  // namespace
}  // namespace loraplex
