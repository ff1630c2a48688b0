// Server pieces without a network: the status mapping, flag parsing helpers and the proto -> engine
// request mapping with DESIGN.md's error table (on the real stories260K; the rules on values are
// Engine::Validate's, reached through the mapping).
#include <gtest/gtest.h>

#include <memory>
#include <string>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/flags/reflection.h"
#include "model/device.h"
#include "server/options.h"
#include "server/request_mapping.h"
#include "server/status_mapping.h"
#include "tests/testing/testing.h"

ABSL_DECLARE_FLAG(std::string, model);
ABSL_DECLARE_FLAG(std::string, device);
ABSL_DECLARE_FLAG(std::string, max_running_per_adapter);
ABSL_DECLARE_FLAG(double, fairness_window_s);
ABSL_DECLARE_FLAG(bool, batch_invariant);

namespace loraplex::server {
namespace {

using engine::kMaxStopBytes;
using engine::kMaxStopStrings;
using ::loraplex::testing::StatusIs;

TEST(StatusMappingTest, EveryCanonicalCodeMapsOneToOneWithItsMessage) {
  const std::pair<absl::StatusCode, grpc::StatusCode> pairs[] = {
      {absl::StatusCode::kInvalidArgument, grpc::StatusCode::INVALID_ARGUMENT},
      {absl::StatusCode::kNotFound, grpc::StatusCode::NOT_FOUND},
      {absl::StatusCode::kAlreadyExists, grpc::StatusCode::ALREADY_EXISTS},
      {absl::StatusCode::kFailedPrecondition, grpc::StatusCode::FAILED_PRECONDITION},
      {absl::StatusCode::kResourceExhausted, grpc::StatusCode::RESOURCE_EXHAUSTED},
      {absl::StatusCode::kUnauthenticated, grpc::StatusCode::UNAUTHENTICATED},
      {absl::StatusCode::kPermissionDenied, grpc::StatusCode::PERMISSION_DENIED},
      {absl::StatusCode::kUnavailable, grpc::StatusCode::UNAVAILABLE},
      {absl::StatusCode::kInternal, grpc::StatusCode::INTERNAL},
      {absl::StatusCode::kCancelled, grpc::StatusCode::CANCELLED},
      {absl::StatusCode::kDeadlineExceeded, grpc::StatusCode::DEADLINE_EXCEEDED},
      {absl::StatusCode::kUnimplemented, grpc::StatusCode::UNIMPLEMENTED},
  };
  for (const auto& [a, g] : pairs) {
    grpc::Status s = ToGrpcStatus(absl::Status(a, "why"));
    EXPECT_EQ(s.error_code(), g) << absl::StatusCodeToString(a);
    EXPECT_EQ(s.error_message(), "why");
    EXPECT_EQ(FromGrpcStatus(s), absl::Status(a, "why"));
  }
  EXPECT_TRUE(ToGrpcStatus(absl::OkStatus()).ok());
}

TEST(OptionsTest, ParseByteSize) {
  EXPECT_EQ(*ParseByteSize("1024"), 1024);
  EXPECT_EQ(*ParseByteSize("512MiB"), int64_t{512} << 20);
  EXPECT_EQ(*ParseByteSize("2G"), int64_t{2} << 30);
  EXPECT_EQ(*ParseByteSize("64k"), int64_t{64} << 10);
  EXPECT_THAT(ParseByteSize("lots"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseByteSize("5TB"), StatusIs(absl::StatusCode::kInvalidArgument, "unit"));
}

// CommandLineFromFlags with a model path and the CPU device set; the flags are restored after.
class FlagsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::SetFlag(&FLAGS_model, "unused.gguf");
    absl::SetFlag(&FLAGS_device, "cpu");
  }
  absl::FlagSaver restore_;
};

// --max-running-per-adapter: auto (the engine's share cap, the default), a count, or 0 (none).
TEST_F(FlagsTest, MaxRunningPerAdapterIsAutoOrACount) {
  absl::StatusOr<CommandLine> cl = CommandLineFromFlags();
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_EQ(cl->server.engine.max_running_per_adapter, engine::EngineOptions::kRunningShare);
  EXPECT_EQ(cl->server.engine.fairness_window_ms, 30000);
  absl::SetFlag(&FLAGS_max_running_per_adapter, "8");
  absl::SetFlag(&FLAGS_fairness_window_s, 2.5);
  cl = CommandLineFromFlags();
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_EQ(cl->server.engine.max_running_per_adapter, 8);
  EXPECT_EQ(cl->server.engine.fairness_window_ms, 2500);
  absl::SetFlag(&FLAGS_max_running_per_adapter, "0");
  cl = CommandLineFromFlags();
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_EQ(cl->server.engine.max_running_per_adapter, 0);
  for (const char* bad : {"-1", "many", ""}) {
    absl::SetFlag(&FLAGS_max_running_per_adapter, bad);
    EXPECT_THAT(CommandLineFromFlags(),
                StatusIs(absl::StatusCode::kInvalidArgument, "--max-running-per-adapter"))
        << bad;
  }
  absl::SetFlag(&FLAGS_max_running_per_adapter, "auto");
  absl::SetFlag(&FLAGS_fairness_window_s, -1.0);
  EXPECT_THAT(CommandLineFromFlags(),
              StatusIs(absl::StatusCode::kInvalidArgument, "--fairness-window-s"));
}

// --batch-invariant is carried to main (which sets it before the model loads), CPU only.
TEST_F(FlagsTest, BatchInvariantIsForTheCpu) {
  absl::StatusOr<CommandLine> cl = CommandLineFromFlags();
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_FALSE(cl->batch_invariant);
  absl::SetFlag(&FLAGS_batch_invariant, true);
  cl = CommandLineFromFlags();
  ASSERT_TRUE(cl.ok()) << cl.status();
  EXPECT_TRUE(cl->batch_invariant);
  std::string why;
  if (model::CudaBackendAvailable(&why)) {
    absl::SetFlag(&FLAGS_device, "cuda");
    EXPECT_THAT(CommandLineFromFlags(),
                StatusIs(absl::StatusCode::kInvalidArgument, "--batch-invariant"));
  }
}

class RequestMappingTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto m = model::LlamaModel::Load(loraplex::testing::Stories260KDir() + "/stories260K.gguf");
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(m).value().release();
    auto e = engine::Engine::Create(model_, {.kv_block_size = 16, .kv_blocks = 8});
    ASSERT_TRUE(e.ok()) << e.status();
    engine_ = std::move(e).value().release();
  }
  static void TearDownTestSuite() {
    delete engine_;
    delete model_;
  }
  absl::StatusOr<engine::GenerationRequest> Map(const v1::GenerateRequest& r) {
    return ToGenerationRequest(r, *engine_);
  }
  static v1::GenerateRequest Ids(std::vector<int32_t> ids) {
    v1::GenerateRequest r;
    for (int32_t id : ids) r.add_prompt_token_ids(id);
    return r;
  }

  static model::LlamaModel* model_;
  static engine::Engine* engine_;
};
model::LlamaModel* RequestMappingTest::model_ = nullptr;
engine::Engine* RequestMappingTest::engine_ = nullptr;

TEST_F(RequestMappingTest, TextPromptGetsBosAndDefaults) {
  v1::GenerateRequest r;
  r.set_prompt("Once upon a time");
  ASSERT_OK_AND_ASSIGN(engine::GenerationRequest req, Map(r));
  ASSERT_FALSE(req.prompt_ids.empty());
  EXPECT_EQ(req.prompt_ids[0], 1);  // stories260K adds BOS
  EXPECT_EQ(req.sampling.temperature, 0.0f);
  EXPECT_EQ(req.sampling.top_p, 1.0f);
  EXPECT_GE(req.max_tokens, 1);
  EXPECT_EQ(req.adapter, nullptr);
}

TEST_F(RequestMappingTest, ErrorTable) {
  using absl::StatusCode;
  v1::GenerateRequest both = Ids({1});
  both.set_prompt("x");
  EXPECT_THAT(Map(both), StatusIs(StatusCode::kInvalidArgument, "only one of"));
  EXPECT_THAT(Map(v1::GenerateRequest()), StatusIs(StatusCode::kInvalidArgument, "give a prompt"));
  EXPECT_THAT(Map(Ids({1, 512})), StatusIs(StatusCode::kInvalidArgument, "prompt_token_ids[1]"));
  v1::GenerateRequest r = Ids({1});
  r.set_temperature(-0.5f);
  EXPECT_THAT(Map(r), StatusIs(StatusCode::kInvalidArgument, "temperature"));
  for (float p : {0.0f, -0.1f, 1.5f}) {
    r = Ids({1});
    r.set_top_p(p);
    EXPECT_THAT(Map(r), StatusIs(StatusCode::kInvalidArgument, "top_p")) << p;
  }
  r = Ids({1});
  r.set_max_tokens(0);
  EXPECT_THAT(Map(r), StatusIs(StatusCode::kInvalidArgument, "max_tokens"));
  r = Ids({1});
  r.set_logprobs(21);
  EXPECT_THAT(Map(r), StatusIs(StatusCode::kInvalidArgument, "logprobs"));
  r = Ids({1});
  for (int i = 0; i <= kMaxStopStrings; ++i) r.add_stop("s");
  EXPECT_THAT(Map(r), StatusIs(StatusCode::kInvalidArgument, "stop strings"));
  r = Ids({1});
  r.add_stop(std::string(kMaxStopBytes + 1, 'x'));
  EXPECT_THAT(Map(r), StatusIs(StatusCode::kInvalidArgument, "stop[0]"));
  r = Ids({1});
  r.add_stop("");
  EXPECT_THAT(Map(r), StatusIs(StatusCode::kInvalidArgument, "stop[0]"));
  r = Ids({1});
  for (int i = 0; i <= kMaxStopStrings; ++i) r.add_stop_token_ids(2);
  EXPECT_THAT(Map(r), StatusIs(StatusCode::kInvalidArgument, "stop_token_ids"));
  // The adapter is the caller's to resolve (the server takes a lease from the registry).
  r = Ids({1});
  r.set_adapter("nope");
  ASSERT_OK_AND_ASSIGN(engine::GenerationRequest unresolved, Map(r));
  EXPECT_EQ(unresolved.adapter, nullptr);
  const int64_t ctx = model_->config().max_position_embeddings;
  r = Ids({1});
  r.set_max_tokens(static_cast<int32_t>(ctx));
  EXPECT_THAT(Map(r), StatusIs(StatusCode::kResourceExhausted, "context"));
  r = Ids(std::vector<int32_t>(ctx, 1));
  EXPECT_THAT(Map(r), StatusIs(StatusCode::kResourceExhausted, "context"));
}

TEST_F(RequestMappingTest, AppendOutputWritesLogprobsOnlyWhenAsked) {
  OutputContext req;
  engine::StepOutput out;
  out.tokens.push_back({7, -0.25f, {{7, -0.25f}, {9, -2.0f}}});
  out.text = "hi";
  v1::GenerateResponse plain;
  AppendOutput(out, req, &plain);
  EXPECT_EQ(plain.token_ids_size(), 1);
  EXPECT_EQ(plain.logprobs_size(), 0);
  EXPECT_EQ(plain.finish_reason(), "");
  EXPECT_EQ(plain.adapter(), "");
  req.logprobs = 2;
  req.adapter = "sql";
  req.adapter_version = 3;
  out.finished = true;
  out.finish_reason = engine::FinishReason::kLength;
  out.prompt_tokens = 3;
  out.completion_tokens = 1;
  v1::GenerateResponse with;
  AppendOutput(out, req, &with);
  ASSERT_EQ(with.logprobs_size(), 1);
  EXPECT_EQ(with.logprobs(0).top_size(), 2);
  EXPECT_FLOAT_EQ(with.logprobs(0).top(1).logprob(), -2.0f);
  EXPECT_EQ(with.finish_reason(), "length");
  EXPECT_EQ(with.usage().prompt_tokens(), 3);
  EXPECT_EQ(with.text(), "hi");
  EXPECT_EQ(with.adapter(), "sql");
  EXPECT_EQ(with.adapter_version(), 3);
}

}  // namespace
}  // namespace loraplex::server
