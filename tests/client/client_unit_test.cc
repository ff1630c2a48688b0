// Unit tests of the loraplex client pieces that need no server: argument parsing, error
// descriptions, workload samplers, adapter-file helpers (checked with formats/safetensors.h, a
// reader written separately) and the bench summary/report.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>

#include "absl/strings/str_cat.h"
#include "client/adapter_files.h"
#include "client/args.h"
#include "client/bench_report.h"
#include "client/bench_workload.h"
#include "client/format.h"
#include "client/rpc.h"
#include "formats/gguf.h"
#include "formats/safetensors.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "tests/testing/testing.h"

namespace loraplex::client {
namespace {

using ::loraplex::testing::StatusIs;

TEST(ArgParserTest, FormsOfFlagsAndPositionals) {
  ArgParser p("loraplex x", "ARGS");
  std::string s = "default";
  int64_t n = 0;
  double d = 0;
  bool b = false, t = true;
  std::vector<std::string> list;
  p.AddString("name-a", &s, "");
  p.AddInt("max-tokens", &n, "");
  p.AddDouble("top-p", &d, "");
  p.AddBool("flag", &b, "");
  p.AddBool("on", &t, "");
  p.AddList("stop", &list, "", /*split_commas=*/true);
  auto pos = p.Parse({"one", "--name-a", "v", "--max_tokens=12", "--top-p", "0.5", "--flag",
                      "--no-on", "--stop", "a,b", "--stop=c", "-", "--", "--not-a-flag"});
  ASSERT_TRUE(pos.ok()) << pos.status();
  EXPECT_EQ(*pos, (std::vector<std::string>{"one", "-", "--not-a-flag"}));
  EXPECT_EQ(s, "v");
  EXPECT_EQ(n, 12);
  EXPECT_DOUBLE_EQ(d, 0.5);
  EXPECT_TRUE(b);
  EXPECT_FALSE(t);
  EXPECT_EQ(list, (std::vector<std::string>{"a", "b", "c"}));
}

TEST(ArgParserTest, ErrorsNameTheFlag) {
  ArgParser p("loraplex x", "");
  int64_t n = 0;
  p.AddInt("max-tokens", &n, "");
  EXPECT_THAT(p.Parse({"--bogus"}), StatusIs(absl::StatusCode::kInvalidArgument, "--bogus"));
  EXPECT_THAT(p.Parse({"--max-tokens", "x"}),
              StatusIs(absl::StatusCode::kInvalidArgument, "--max-tokens wants an integer"));
  EXPECT_THAT(p.Parse({"--max-tokens"}),
              StatusIs(absl::StatusCode::kInvalidArgument, "--max-tokens needs a value"));
  ASSERT_TRUE(p.Parse({"--help"}).ok());
  EXPECT_TRUE(p.help_requested());
  EXPECT_NE(p.Usage().find("--max-tokens N"), std::string::npos);
}

TEST(RpcTest, ExitCodesAndMessages) {
  ConnectionOptions opts;
  opts.server = "127.0.0.1:9";
  EXPECT_EQ(ExitCodeFor(grpc::OK), kExitOk);
  EXPECT_EQ(ExitCodeFor(grpc::UNAVAILABLE), kExitUnavailable);
  EXPECT_EQ(ExitCodeFor(grpc::UNAUTHENTICATED), kExitAuth);
  EXPECT_EQ(ExitCodeFor(grpc::NOT_FOUND), kExitNotFound);
  EXPECT_EQ(ExitCodeFor(grpc::INVALID_ARGUMENT), kExitRefused);
  EXPECT_EQ(ExitCodeFor(grpc::UNIMPLEMENTED), kExitUnimplemented);
  EXPECT_EQ(ExitCodeFor(grpc::INTERNAL), kExitFailed);
  const std::string down =
      DescribeError(grpc::Status(grpc::UNAVAILABLE, "failed to connect"), "info", opts);
  EXPECT_NE(down.find("cannot reach the loraplex server at 127.0.0.1:9"), std::string::npos);
  const std::string auth =
      DescribeError(grpc::Status(grpc::UNAUTHENTICATED, "bad token"), "generate", opts);
  EXPECT_NE(auth.find("refused the token"), std::string::npos);
  EXPECT_NE(auth.find("LORAPLEX_TOKEN"), std::string::npos);
  EXPECT_EQ(DescribeError(grpc::Status(grpc::INTERNAL, "boom"), "x", opts), "x: INTERNAL: boom");
}

TEST(FormatTest, TableBytesNumbers) {
  EXPECT_EQ(FormatTable({{"A", "BB"}, {"ccc", "d"}}), "A    BB\nccc  d\n");
  EXPECT_EQ(HumanBytes(512), "512 B");
  EXPECT_EQ(HumanBytes(1536), "1.5 KiB");
  EXPECT_EQ(Num(12.3456, 2), "12.35");
  EXPECT_EQ(Num(3.0, 2), "3");
}

TEST(PopularityTest, ParseAndProbabilities) {
  EXPECT_THAT(ParsePopularity("zipf:-1"), StatusIs(absl::StatusCode::kInvalidArgument, "zipf"));
  EXPECT_THAT(ParsePopularity("pareto"), StatusIs(absl::StatusCode::kInvalidArgument, "pareto"));
  auto z = ParsePopularity("zipf:1");
  ASSERT_TRUE(z.ok());
  // Weights 1, 1/2, 1/3 sum to 11/6: probabilities 6/11, 3/11, 2/11.
  AdapterPicker picker(*z, 3, 7);
  ASSERT_EQ(picker.Probabilities().size(), 3u);
  EXPECT_NEAR(picker.Probabilities()[0], 6.0 / 11, 1e-12);
  EXPECT_NEAR(picker.Probabilities()[1], 3.0 / 11, 1e-12);
  EXPECT_NEAR(picker.Probabilities()[2], 2.0 / 11, 1e-12);
  // 110000 draws (fixed seed): each frequency within 1% of its probability (sd is ~0.15%).
  std::vector<int> counts(3, 0);
  for (int i = 0; i < 110000; ++i) ++counts[picker.Pick(i)];
  EXPECT_NEAR(counts[0] / 110000.0, 6.0 / 11, 0.01);
  EXPECT_NEAR(counts[2] / 110000.0, 2.0 / 11, 0.01);

  AdapterPicker distinct(*ParsePopularity("distinct"), 4, 1);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(distinct.Pick(i), i % 4);
  AdapterPicker identical(*ParsePopularity("identical"), 4, 1);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(identical.Pick(i), 0);

  EXPECT_THAT(ParsePopularity("hot:1.5"), StatusIs(absl::StatusCode::kInvalidArgument, "hot"));
  EXPECT_THAT(ParsePopularity("hot:0"), StatusIs(absl::StatusCode::kInvalidArgument, "hot"));
  AdapterPicker hot(*ParsePopularity("hot:0.9"), 5, 3);
  EXPECT_NEAR(hot.Probabilities()[0], 0.9, 1e-12);
  EXPECT_NEAR(hot.Probabilities()[4], 0.025, 1e-12);
  counts.assign(5, 0);
  for (int i = 0; i < 100000; ++i) ++counts[hot.Pick(i)];
  EXPECT_NEAR(counts[0] / 100000.0, 0.9, 0.01);
  EXPECT_NEAR(counts[3] / 100000.0, 0.025, 0.005);
}

TEST(WorkloadTest, LengthsAndArrivals) {
  auto fixed = ParseLengthDist("max-tokens", "16");
  ASSERT_TRUE(fixed.ok());
  std::mt19937_64 rng(3);
  EXPECT_EQ(fixed->Sample(rng), 16);
  auto uni = ParseLengthDist("max-tokens", "uniform:4:6");
  ASSERT_TRUE(uni.ok());
  for (int i = 0; i < 100; ++i) {
    const int64_t v = uni->Sample(rng);
    EXPECT_GE(v, 4);
    EXPECT_LE(v, 6);
  }
  EXPECT_THAT(ParseLengthDist("max-tokens", "uniform:6:4"),
              StatusIs(absl::StatusCode::kInvalidArgument, "--max-tokens"));
  EXPECT_THAT(ParseLengthDist("prompt-tokens", "0"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseArrivals("poisson", 0), StatusIs(absl::StatusCode::kInvalidArgument, "--rate"));
  EXPECT_THAT(ParseArrivals("weibull", 1), StatusIs(absl::StatusCode::kInvalidArgument));
  // Mean gap 1/rate for Poisson and gamma (fixed seed; the sample mean of 40000 gaps is within
  // 2% of 0.25 s by a wide margin: the standard error is 0.5% for Poisson, 1% for shape 0.25).
  for (const char* a : {"poisson", "gamma:0.25", "gamma:4"}) {
    auto arr = ParseArrivals(a, 4.0);
    ASSERT_TRUE(arr.ok()) << a;
    double sum = 0;
    for (int i = 0; i < 40000; ++i) sum += arr->NextGap(rng);
    EXPECT_NEAR(sum / 40000, 0.25, 0.25 * 0.03) << a;
  }
}

TEST(WorkloadTest, PromptsJsonl) {
  const std::string dir = testing::MakeTempDir("lp-client-unit");
  {
    std::ofstream(dir + "/good.jsonl")
        << "{\"prompt\": \"a\"}\n\n{\"prompt\": \"b\", \"max_tokens\": 5}\n";
    std::ofstream(dir + "/bad.jsonl") << "{\"prompt\": \"a\"}\n{\"text\": 1}\n";
  }
  auto good = ReadPromptsJsonl(dir + "/good.jsonl");
  ASSERT_TRUE(good.ok()) << good.status();
  ASSERT_EQ(good->size(), 2u);
  EXPECT_EQ((*good)[1].prompt, "b");
  EXPECT_EQ((*good)[1].max_tokens, 5);
  EXPECT_THAT(ReadPromptsJsonl(dir + "/bad.jsonl"),
              StatusIs(absl::StatusCode::kInvalidArgument, "bad.jsonl:2"));
  EXPECT_THAT(ReadPromptsJsonl(dir + "/none.jsonl"), StatusIs(absl::StatusCode::kNotFound));
  std::filesystem::remove_all(dir);
}

std::string PeftDir() { return testing::FixturesDir() + "/peft/stories260k/qv"; }

TEST(AdapterFilesTest, PerturbChangesOnlyLoraWeightsWithinTheScale) {
  auto files = ReadPeftDir(PeftDir());
  ASSERT_TRUE(files.ok()) << files.status();
  ASSERT_TRUE(ValidateSafetensors(files->safetensors, "qv").ok());
  auto perturbed = PerturbLoraWeights(files->safetensors, 42, 0.1);
  ASSERT_TRUE(perturbed.ok()) << perturbed.status();
  EXPECT_EQ(perturbed->size(), files->safetensors.size());
  EXPECT_NE(*perturbed, files->safetensors);
  // Read both with the project's safetensors reader (separately written) and compare values.
  const std::string dir = testing::MakeTempDir("lp-client-perturb");
  std::ofstream(dir + "/a.safetensors", std::ios::binary) << files->safetensors;
  std::ofstream(dir + "/b.safetensors", std::ios::binary) << *perturbed;
  auto a = formats::SafetensorsFile::Open(dir + "/a.safetensors");
  auto b = formats::SafetensorsFile::Open(dir + "/b.safetensors");
  ASSERT_TRUE(a.ok() && b.ok());
  int changed = 0;
  for (const auto& t : (*a)->tensors()) {
    const formats::TensorInfo* u = (*b)->Find(t.name);
    ASSERT_NE(u, nullptr) << t.name;
    auto va = formats::DequantizeToF32(t);
    auto vb = formats::DequantizeToF32(*u);
    ASSERT_TRUE(va.ok() && vb.ok());
    for (size_t i = 0; i < va->size(); ++i) {
      const float x = (*va)[i], y = (*vb)[i];
      // |y - x| <= 0.1 |x|, plus the rounding of F16/BF16 storage (2^-8 relative covers both).
      EXPECT_LE(std::fabs(y - x), 0.1f * std::fabs(x) * (1 + 1.0f / 256) + 1e-30f) << t.name;
      changed += (x != y);
    }
  }
  EXPECT_GT(changed, 0);
  std::filesystem::remove_all(dir);

  std::string truncated = files->safetensors.substr(0, files->safetensors.size() - 10);
  EXPECT_THAT(ValidateSafetensors(truncated, "x.safetensors"),
              StatusIs(absl::StatusCode::kInvalidArgument, "x.safetensors"));
  EXPECT_THAT(ReadPeftDir("/nonexistent/adapter"), StatusIs(absl::StatusCode::kNotFound));
}

TEST(AdapterFilesTest, Sha256OfKnownStrings) {
  // FIPS 180-2 test vectors.
  EXPECT_EQ(Sha256Hex("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
  EXPECT_EQ(Sha256Hex(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

// An in-process Adapters service that reassembles an upload, to check the client's stream:
// header first, then chunks of each file in order, and the sha256 of the weights.
class RecordingAdapters final : public v1::Adapters::Service {
 public:
  grpc::Status UploadAdapter(grpc::ServerContext* ctx,
                             grpc::ServerReader<v1::UploadAdapterRequest>* reader,
                             v1::AdapterInfo* info) override {
    v1::UploadAdapterRequest msg;
    bool first = true;
    while (reader->Read(&msg)) {
      if (first != msg.has_header()) {
        return grpc::Status(grpc::INVALID_ARGUMENT, "header must come first, once");
      }
      if (ends > 0) return grpc::Status(grpc::INVALID_ARGUMENT, "a message after the end");
      if (first) {
        header = msg.header();
      } else if (msg.has_end()) {
        ++ends;
        end = msg.end();
      } else {
        ++chunks;
        files[msg.chunk().file_name()] += msg.chunk().data();
      }
      first = false;
    }
    auto md = ctx->client_metadata().find("authorization");
    if (md != ctx->client_metadata().end())
      auth = std::string(md->second.data(), md->second.size());
    auto route = ctx->client_metadata().find(kRoutingHeader);
    if (route != ctx->client_metadata().end())
      routing = std::string(route->second.data(), route->second.size());
    info->set_name(header.name());
    info->set_version(1);
    return grpc::Status::OK;
  }
  v1::UploadAdapterHeader header;
  std::map<std::string, std::string> files;
  int chunks = 0;
  int ends = 0;  // end messages
  v1::UploadAdapterEnd end;
  std::string auth;
  std::string routing;  // the x-loraplex-adapter metadata
};

TEST(AdapterFilesTest, UploadStreamsHeaderThenChunksThenEnd) {
  RecordingAdapters service;
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
  builder.RegisterService(&service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  ASSERT_NE(port, 0);
  ConnectionOptions conn;
  conn.server = absl::StrCat("127.0.0.1:", port);
  conn.token = "t0k";
  auto channel = MakeChannel(conn);
  ASSERT_TRUE(channel.ok());
  auto stub = v1::Adapters::NewStub(*channel);
  auto files = ReadPeftDir(PeftDir());
  ASSERT_TRUE(files.ok());
  v1::AdapterInfo info;
  grpc::Status st = UploadPeft(*stub, conn, "qv", *files, /*replace=*/true, /*pin=*/false,
                               /*chunk_bytes=*/4096, &info);
  ASSERT_TRUE(st.ok()) << st.error_message();
  EXPECT_EQ(info.name(), "qv");
  EXPECT_EQ(service.header.name(), "qv");
  EXPECT_TRUE(service.header.replace());
  EXPECT_EQ(service.header.sha256(), Sha256Hex(files->safetensors));
  EXPECT_EQ(service.files["adapter_config.json"], files->config_json);
  EXPECT_EQ(service.files["adapter_model.safetensors"], files->safetensors);
  const size_t want_chunks =
      (files->config_json.size() + 4095) / 4096 + (files->safetensors.size() + 4095) / 4096;
  EXPECT_EQ(service.chunks, static_cast<int>(want_chunks));
  // Last, the end message with each file's byte count: the server commits only after it.
  EXPECT_EQ(service.ends, 1);
  EXPECT_EQ(service.end.config_bytes(), static_cast<int64_t>(files->config_json.size()));
  EXPECT_EQ(service.end.model_bytes(), static_cast<int64_t>(files->safetensors.size()));
  EXPECT_EQ(service.auth, "Bearer t0k");
  EXPECT_EQ(service.routing, "qv") << "load balancers route an adapter's calls by its name";
  server->Shutdown();
}

TEST(RpcTest, RequestsRouteByTheirAdapterName) {
  v1::GenerateRequest req;
  EXPECT_EQ(RoutingAdapter(req), "") << "the base model";
  req.add_adapters()->set_name("b@2");
  req.add_adapters()->set_name("c");
  EXPECT_EQ(RoutingAdapter(req), "b@2") << "a mix: its first part";
  req.set_adapter("a@7");
  EXPECT_EQ(RoutingAdapter(req), "a@7");
}

// Generate fails every other call with `code` (the first included) and otherwise streams one
// token with finish_reason "length".
class FlakyInference final : public v1::Inference::Service {
 public:
  explicit FlakyInference(grpc::StatusCode code) : code_(code) {}
  grpc::Status Generate(grpc::ServerContext* ctx, const v1::GenerateRequest* req,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    if (calls_.fetch_add(1) % 2 == 0) return grpc::Status(code_, "replica went away");
    v1::GenerateResponse r;
    r.add_token_ids(7);
    r.set_finish_reason("length");
    r.mutable_usage()->set_prompt_tokens(req->prompt_token_ids_size());
    r.mutable_usage()->set_completion_tokens(1);
    writer->Write(r);
    return grpc::Status::OK;
  }
  std::atomic<int> calls_{0};

 private:
  const grpc::StatusCode code_;
};

// --retries: a request failing with UNAVAILABLE (or what a proxy reports when its upstream dies,
// INTERNAL) is sent again and counts once, as completed; other codes and exhausted retries stay
// errors.
TEST(BenchRunnerTest, RetriesSendFailedRequestsAgain) {
  struct Case {
    grpc::StatusCode code;
    int retries;
    int64_t want_errors, want_retries;
  };
  for (const Case& c :
       {Case{grpc::StatusCode::UNAVAILABLE, 2, 0, 4}, Case{grpc::StatusCode::INTERNAL, 1, 0, 4},
        Case{grpc::StatusCode::UNAVAILABLE, 0, 2, 0},
        Case{grpc::StatusCode::RESOURCE_EXHAUSTED, 2, 2, 0}}) {
    FlakyInference service(c.code);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service);
    std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
    ASSERT_NE(port, 0);
    ConnectionOptions conn;
    conn.server = absl::StrCat("127.0.0.1:", port);
    auto channel = MakeChannel(conn);
    ASSERT_TRUE(channel.ok());
    auto stub = v1::Inference::NewStub(*channel);
    LoadSpec spec;
    spec.concurrency = 1;  // one at a time: every request meets a failing call first
    spec.requests = 4;
    spec.prompt_tokens = {2, 2};
    spec.max_tokens = {1, 1};
    spec.vocab_size = 32;
    spec.retries = c.retries;
    const PhaseRun run = RunPhase(*stub, conn, spec, nullptr);
    const nlohmann::json summary = PhaseSummary(run);
    EXPECT_EQ(summary["requests"], 4) << CodeName(c.code) << " retries " << c.retries;
    EXPECT_EQ(summary["errors"], c.want_errors) << CodeName(c.code) << " retries " << c.retries;
    EXPECT_EQ(summary["retries"], c.want_retries) << CodeName(c.code);
    if (c.want_retries > 0) {
      EXPECT_EQ(summary["retried_by_code"][CodeName(c.code)], c.want_retries);
      for (const RequestRecord& r : run.records) EXPECT_EQ(r.retries, 1);
    }
    server->Shutdown();
  }
}

RequestRecord Rec(double start, double first, double end, int tokens, std::string adapter,
                  int code = 0) {
  RequestRecord r;
  r.start_s = start;
  r.first_token_s = first;
  r.end_s = end;
  r.output_tokens = tokens;
  r.prompt_tokens = 4;
  r.adapter = std::move(adapter);
  r.grpc_code = code;
  for (int i = 0; i < tokens; ++i) {
    r.chunk_times_s.push_back(first + (end - first) * i / std::max(1, tokens - 1));
    r.chunk_tokens.push_back(1);
  }
  if (code != 0) r.error = "nope";
  return r;
}

TEST(BenchReportTest, SummaryAccountsForEveryRequest) {
  PhaseRun run;
  run.warmup_end_s = 1.0;
  run.wall_s = 5;
  run.records = {Rec(0.0, 0.2, 1.5, 5, "a"),      // warm-up
                 Rec(1.0, 1.1, 2.0, 10, "a"),     // measured
                 Rec(2.0, 2.2, 3.0, 10, "b"),     // measured
                 Rec(2.5, -1, 2.6, 0, "zz", 5)};  // measured, NOT_FOUND
  const nlohmann::json j = PhaseSummary(run);
  EXPECT_EQ(j["requests"], 3);
  EXPECT_EQ(j["completed"], 2);
  EXPECT_EQ(j["errors"], 1);
  EXPECT_EQ(j["errors_by_code"]["NOT_FOUND"], 1);
  EXPECT_EQ(j["warmup_requests"], 1);
  EXPECT_EQ(j["sent"], 4);
  // Measured window: 1.0 .. 3.0 s; 20 output tokens, 2 completed requests.
  EXPECT_DOUBLE_EQ(j["duration_s"].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(j["output_tokens_per_s"].get<double>(), 10.0);
  EXPECT_DOUBLE_EQ(j["requests_per_s"].get<double>(), 1.0);
  // TTFT 100 and 200 ms; E2E 1000 and 1000 ms; TPOT 900/9 = 100 and 800/9 ms.
  EXPECT_NEAR(j["ttft"]["mean"].get<double>(), 150, 1e-9);
  EXPECT_NEAR(j["e2e"]["p50"].get<double>(), 1000, 1e-9);
  EXPECT_NEAR(j["tpot"]["p99"].get<double>(), 100 - 0.01 * (100 - 800.0 / 9), 1e-9);
  EXPECT_EQ(j["per_adapter"]["a"]["requests"], 1);
  EXPECT_EQ(j["per_adapter"]["zz"]["errors"], 1);

  nlohmann::json results = j;
  results["config"] = {{"scenario", ""}};
  const std::string html = RenderHtmlReport(results, {run}, {"run"});
  EXPECT_NE(html.find("<svg"), std::string::npos);
  EXPECT_NE(html.find("TTFT CDF"), std::string::npos);
  EXPECT_NE(html.find("Output tokens per second"), std::string::npos);
  EXPECT_NE(html.find("End-to-end latency by adapter"), std::string::npos);
  // Self-contained: nothing fetched (the SVG namespace is an identifier, not a fetch).
  EXPECT_EQ(html.find("src="), std::string::npos);
  EXPECT_EQ(html.find("<script"), std::string::npos);
  EXPECT_EQ(html.find("<link"), std::string::npos);
}

}  // namespace
}  // namespace loraplex::client
