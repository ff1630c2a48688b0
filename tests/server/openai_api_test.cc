// server/openai_api.h without a server: request bodies to GenerateRequest, responses and stream
// chunks to OpenAI's shapes, errors to OpenAI's error object. The served path (the official
// openai Python client against a real server) is tests/python/test_openai.py.
#include "server/openai_api.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "absl/strings/str_cat.h"

namespace loraplex::server::openai {
namespace {

using json = nlohmann::json;
using ::testing::HasSubstr;

absl::StatusOr<ParsedRequest> Parse(Endpoint e, const char* body) {
  return ParseRequest(e, json::parse(body), "base-model", 777);
}

TEST(OpenAiRequestTest, CompletionFieldsMapToTheProto) {
  absl::StatusOr<ParsedRequest> r = Parse(Endpoint::kCompletions, R"({
      "model": "qv", "prompt": "Once", "max_tokens": 7, "temperature": 0, "top_p": 0.5,
      "seed": 42, "stop": ["a", "bc"], "top_k": 3, "ignore_eos": true,
      "stop_token_ids": [2], "logprobs": 2, "stream": true,
      "stream_options": {"include_usage": true}, "user": "ignored", "n": 1})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->model, "qv");
  EXPECT_EQ(r->proto.adapter(), "qv");
  EXPECT_EQ(r->proto.prompt(), "Once");
  EXPECT_EQ(r->proto.max_tokens(), 7);
  EXPECT_EQ(r->proto.temperature(), 0.0f);
  EXPECT_FLOAT_EQ(r->proto.top_p(), 0.5f);
  EXPECT_EQ(r->proto.seed(), 42u);
  EXPECT_THAT(r->proto.stop(), ::testing::ElementsAre("a", "bc"));
  EXPECT_EQ(r->proto.top_k(), 3);
  EXPECT_TRUE(r->proto.ignore_eos());
  EXPECT_THAT(r->proto.stop_token_ids(), ::testing::ElementsAre(2));
  EXPECT_EQ(r->logprobs, 2);
  EXPECT_EQ(r->proto.logprobs(), 2);
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
}

TEST(OpenAiRequestTest, DefaultsFollowOpenAi) {
  absl::StatusOr<ParsedRequest> r =
      Parse(Endpoint::kCompletions, R"({"model": "base-model", "prompt": [1, 2, 3]})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->proto.adapter().empty()) << "the base model's name selects no adapter";
  EXPECT_THAT(r->proto.prompt_token_ids(), ::testing::ElementsAre(1, 2, 3));
  EXPECT_FALSE(r->proto.has_prompt());
  EXPECT_EQ(r->proto.temperature(), 1.0f);
  EXPECT_FALSE(r->proto.has_top_p());
  EXPECT_FALSE(r->proto.has_max_tokens());
  EXPECT_EQ(r->proto.seed(), 777u) << "no seed: the caller's random one";
  EXPECT_EQ(r->logprobs, -1);
  EXPECT_EQ(r->proto.logprobs(), 0);
  EXPECT_FALSE(r->stream);
}

TEST(OpenAiRequestTest, PromptForms) {
  for (const char* one : {R"(["x"])", R"("x")"}) {
    absl::StatusOr<ParsedRequest> r = Parse(
        Endpoint::kCompletions, (std::string(R"({"model": "m", "prompt": )") + one + "}").c_str());
    ASSERT_TRUE(r.ok()) << one;
    EXPECT_EQ(r->proto.prompt(), "x");
  }
  absl::StatusOr<ParsedRequest> ids =
      Parse(Endpoint::kCompletions, R"({"model": "m", "prompt": [[5, 6]]})");
  ASSERT_TRUE(ids.ok());
  EXPECT_THAT(ids->proto.prompt_token_ids(), ::testing::ElementsAre(5, 6));
  absl::StatusOr<ParsedRequest> big =
      Parse(Endpoint::kCompletions, R"({"model": "m", "prompt": [9999999999]})");
  ASSERT_TRUE(big.ok());
  EXPECT_THAT(big->proto.prompt_token_ids(), ::testing::ElementsAre(-1))
      << "an id no int32 holds must stay out of range, not wrap into it";
  absl::StatusOr<ParsedRequest> batch =
      Parse(Endpoint::kCompletions, R"({"model": "m", "prompt": ["a", "b"]})");
  EXPECT_EQ(batch.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(batch.status().message(), HasSubstr("one prompt per request"));
}

TEST(OpenAiRequestTest, ChatMessagesAndItsOwnFields) {
  absl::StatusOr<ParsedRequest> r = Parse(Endpoint::kChat, R"({
      "model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}],
      "max_tokens": 3, "max_completion_tokens": 5, "logprobs": true, "top_logprobs": 0})");
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->proto.messages_size(), 2);
  EXPECT_EQ(r->proto.messages(0).role(), "system");
  EXPECT_EQ(r->proto.messages(1).content(), "Hi there");
  EXPECT_EQ(r->proto.max_tokens(), 5) << "max_completion_tokens wins";
  EXPECT_EQ(r->logprobs, 0);
  EXPECT_EQ(r->proto.logprobs(), 1) << "the engine must compute the chosen token's";
}

TEST(OpenAiRequestTest, RefusesWhatItWouldOtherwiseIgnore) {
  struct Case {
    Endpoint endpoint;
    const char* body;
    const char* param;
  };
  const Case cases[] = {
      {Endpoint::kCompletions, R"({"prompt": "x"})", "model"},
      {Endpoint::kCompletions, R"({"model": "m"})", "prompt"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "n": 2})", "n"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "best_of": 3})", "best_of"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "echo": true})", "echo"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "suffix": "y"})", "suffix"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "presence_penalty": 1})",
       "presence_penalty"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "logit_bias": {"5": 1}})",
       "logit_bias"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "logprobs": 21})", "logprobs"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "temperature": "hot"})",
       "temperature"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "max_tokens": 0})", "max_tokens"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "top_p": 0})", "top_p"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "stop": 5})", "stop"},
      {Endpoint::kCompletions, R"({"model": "m", "prompt": "x", "stream_options": {}})",
       "stream_options"},
      {Endpoint::kChat, R"({"model": "m", "messages": []})", "messages"},
      {Endpoint::kChat, R"({"model": "m", "messages": [{"role": "user"}]})", "messages[0].content"},
      {Endpoint::kChat,
       R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{}]})", "tools"},
      {Endpoint::kChat,
       R"({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})",
       "top_logprobs"},
      {Endpoint::kChat,
       R"({"model": "m", "messages": [{"role": "user", "content": "x"}],
           "response_format": {"type": "json_object"}})",
       "response_format"},
  };
  for (const Case& c : cases) {
    absl::StatusOr<ParsedRequest> r = Parse(c.endpoint, c.body);
    ASSERT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << c.body;
    const HttpError e = ToHttpError(r.status());
    EXPECT_EQ(e.status, 400) << c.body;
    EXPECT_EQ(e.body["error"]["param"], c.param) << c.body << ": " << r.status();
    EXPECT_EQ(e.body["error"]["type"], "invalid_request_error");
  }
}

// Token 9 ends inside a UTF-8 character (the first two bytes of U+20AC); the others are "t<id>".
const TokenBytes kBytes = [](int32_t id) {
  return id == 9 ? std::string("\xe2\x82") : absl::StrCat("t", id);
};

v1::GenerateResponse Answer() {
  v1::GenerateResponse r;
  r.add_token_ids(4);
  r.add_token_ids(9);
  r.set_text("t4!");
  for (int id : {4, 9}) {
    v1::TokenLogprobs* lp = r.add_logprobs();
    lp->set_token_id(id);
    lp->set_logprob(-0.5f);
    for (int alt : {id, 1}) {
      v1::TokenLogprob* t = lp->add_top();
      t->set_token_id(alt);
      t->set_logprob(alt == id ? -0.5f : -2.0f);
    }
  }
  r.set_finish_reason("eos");
  r.mutable_usage()->set_prompt_tokens(3);
  r.mutable_usage()->set_completion_tokens(2);
  r.set_adapter("qv");
  r.set_adapter_version(4);
  return r;
}

TEST(OpenAiResponseTest, CompletionShape) {
  absl::StatusOr<ParsedRequest> req =
      Parse(Endpoint::kCompletions, R"({"model": "qv", "prompt": "x", "logprobs": 1})");
  ASSERT_TRUE(req.ok());
  const json out = CompletionResponse(*req, {"cmpl-1", 100, &kBytes}, Answer());
  EXPECT_EQ(out["object"], "text_completion");
  EXPECT_EQ(out["model"], "qv");
  EXPECT_EQ(out["system_fingerprint"], "loraplex:qv@4");
  const json& c = out["choices"][0];
  EXPECT_EQ(c["text"], "t4!");
  EXPECT_EQ(c["finish_reason"], "stop") << "eos is a natural stop";
  EXPECT_EQ(c["token_ids"], json({4, 9}));
  EXPECT_EQ(c["logprobs"]["tokens"], json({"t4", "\xe2\x82"}));
  EXPECT_EQ(c["logprobs"]["text_offset"], json({0, 2}));
  EXPECT_EQ(c["logprobs"]["top_logprobs"][0].size(), 1u) << "logprobs=1: one alternative";
  EXPECT_EQ(out["usage"]["total_tokens"], 5);
  // A token ending inside a UTF-8 character is dumped with U+FFFD, not thrown on.
  EXPECT_THAT(Dump(out), HasSubstr("\xef\xbf\xbd"));
}

TEST(OpenAiResponseTest, ChatShapeWithLogprobs) {
  absl::StatusOr<ParsedRequest> req =
      Parse(Endpoint::kChat,
            R"({"model": "qv", "messages": [{"role": "user", "content": "x"}], "logprobs": true})");
  ASSERT_TRUE(req.ok());
  const json out = CompletionResponse(*req, {"chatcmpl-1", 100, &kBytes}, Answer());
  EXPECT_EQ(out["object"], "chat.completion");
  const json& c = out["choices"][0];
  EXPECT_EQ(c["message"]["role"], "assistant");
  EXPECT_EQ(c["message"]["content"], "t4!");
  ASSERT_EQ(c["logprobs"]["content"].size(), 2u);
  EXPECT_EQ(c["logprobs"]["content"][1]["bytes"], json({0xe2, 0x82}));
  EXPECT_TRUE(c["logprobs"]["content"][0]["top_logprobs"].empty()) << "top_logprobs 0";
}

TEST(OpenAiResponseTest, ChatStreamChunks) {
  absl::StatusOr<ParsedRequest> req = Parse(Endpoint::kChat, R"({
      "model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true,
      "stream_options": {"include_usage": true}})");
  ASSERT_TRUE(req.ok());
  ChunkWriter writer(*req, {"chatcmpl-2", 5, &kBytes});
  v1::GenerateResponse first;
  first.add_token_ids(4);
  first.set_text("t4");
  std::vector<json> a = writer.Chunks(first);
  ASSERT_EQ(a.size(), 2u) << "the role delta, then the content";
  EXPECT_EQ(a[0]["choices"][0]["delta"]["role"], "assistant");
  EXPECT_EQ(a[1]["choices"][0]["delta"]["content"], "t4");
  EXPECT_TRUE(a[1]["choices"][0]["finish_reason"].is_null());
  v1::GenerateResponse last = Answer();
  last.set_text("");
  last.clear_token_ids();
  last.set_finish_reason("length");
  std::vector<json> b = writer.Chunks(last);
  ASSERT_EQ(b.size(), 2u) << "the finish, then usage";
  EXPECT_EQ(b[0]["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(b[0]["choices"][0]["delta"].empty());
  EXPECT_EQ(b[0]["system_fingerprint"], "loraplex:qv@4");
  EXPECT_TRUE(b[1]["choices"].empty());
  EXPECT_EQ(b[1]["usage"]["completion_tokens"], 2);
  for (const json& c : {a[0], a[1], b[0], b[1]}) {
    EXPECT_EQ(c["id"], "chatcmpl-2");
    EXPECT_EQ(c["object"], "chat.completion.chunk");
  }
}

TEST(OpenAiErrorTest, CodesMapToHttp) {
  EXPECT_EQ(ToHttpError(absl::NotFoundError("no adapter"), true).body["error"]["code"],
            "model_not_found");
  EXPECT_EQ(ToHttpError(absl::NotFoundError("x"), true).status, 404);
  EXPECT_EQ(ToHttpError(absl::UnauthenticatedError("x")).status, 401);
  EXPECT_EQ(ToHttpError(absl::PermissionDeniedError("x")).status, 403);
  EXPECT_EQ(ToHttpError(absl::AlreadyExistsError("x")).status, 409);
  EXPECT_EQ(ToHttpError(absl::UnavailableError("x")).status, 503);
  const HttpError queue =
      ToHttpError(absl::ResourceExhaustedError("the request queue is full (4 waiting)"));
  EXPECT_EQ(queue.status, 429);
  const HttpError context = ToHttpError(absl::ResourceExhaustedError(
      "prompt (10 tokens) + max_tokens (600) exceeds the context length 512"));
  EXPECT_EQ(context.status, 400);
  EXPECT_EQ(context.body["error"]["code"], "context_length_exceeded");
  EXPECT_EQ(context.body["error"]["type"], "invalid_request_error");
}

TEST(OpenAiModelsTest, BaseFirstThenAdapters) {
  const json list = ModelList("base", {"qv", "all"}, 9);
  ASSERT_EQ(list["data"].size(), 3u);
  EXPECT_EQ(list["data"][0]["id"], "base");
  EXPECT_TRUE(list["data"][0]["parent"].is_null());
  EXPECT_EQ(list["data"][2]["id"], "all");
  EXPECT_EQ(list["data"][2]["parent"], "base");
}

}  // namespace
}  // namespace loraplex::server::openai
