#include "server/http_front.h"

#include <grpcpp/client_context.h>
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <random>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "common/logging.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "loraplex/v1/inference.grpc.pb.h"
#include "server/openai_api.h"
#include "server/reactors.h"
#include "server/status_mapping.h"

namespace loraplex::server {
namespace {

using json = nlohmann::json;

uint64_t RandomU64() {
  thread_local std::mt19937_64 rng(std::random_device{}());
  return rng();
}

std::string RequestId(const char* prefix) {
  return absl::StrFormat("%s-%016x%08x", prefix, RandomU64(), RandomU64() & 0xffffffffu);
}

void SendJson(httplib::Response& res, int status, const json& body) {
  res.status = status;
  res.set_content(openai::Dump(body), "application/json");
}

void SendError(httplib::Response& res, const openai::HttpError& e) {
  SendJson(res, e.status, e.body);
}

// The Authorization header as gRPC metadata may carry it (printable ASCII), else nullopt: no
// header, or one gRPC would refuse, which the services then report as missing.
std::optional<std::string> Authorization(const httplib::Request& req) {
  if (!req.has_header("Authorization")) return std::nullopt;
  std::string value = req.get_header_value("Authorization");
  for (unsigned char c : value) {
    if (c < 0x20 || c > 0x7e) return std::nullopt;
  }
  return value;
}

// A client context for one in-process call, carrying the caller's credentials. Created and
// destroyed inside IgnoreGrpc (server/reactors.h): it is gRPC's inline code.
std::unique_ptr<grpc::ClientContext> CallContext(const httplib::Request& req) {
  IgnoreGrpc ignore;
  auto context = std::make_unique<grpc::ClientContext>();
  if (std::optional<std::string> auth = Authorization(req)) {
    context->AddMetadata("authorization", *auth);
  }
  return context;
}

void DestroyContext(std::unique_ptr<grpc::ClientContext> context) {
  IgnoreGrpc ignore;
  context.reset();
}

// One unary call of this process's services with the caller's credentials:
// call(ClientContext*) makes it.
template <typename Call>
grpc::Status Unary(const httplib::Request& req, Call call) {
  std::unique_ptr<grpc::ClientContext> context = CallContext(req);
  grpc::Status status;
  {
    IgnoreGrpc ignore;
    status = call(context.get());
  }
  DestroyContext(std::move(context));
  return status;
}

// body[name] when body is an object holding a string there, else nullptr.
const json* StringField(const json& body, const char* name) {
  if (!body.is_object()) return nullptr;
  auto it = body.find(name);
  return it == body.end() || !it->is_string() ? nullptr : &*it;
}

absl::StatusOr<json> ParseBody(const httplib::Request& req) {
  json body = json::parse(req.body, nullptr, /*allow_exceptions=*/false);
  if (body.is_discarded()) {
    return absl::InvalidArgumentError("the request body is not valid JSON");
  }
  return body;
}

// One Generate call read as server-sent events. Owned by the response's content provider; if
// the provider never ran or stopped early, the destructor cancels the call and reaps it.
struct EventStream {
  openai::ParsedRequest request;
  std::unique_ptr<openai::ChunkWriter> writer;
  std::unique_ptr<grpc::ClientContext> context;
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader;
  v1::GenerateResponse first;
  bool done = false;  // Finish was called

  bool Read(v1::GenerateResponse* message) {
    IgnoreGrpc ignore;
    return reader->Read(message);
  }
  absl::Status Finish() {
    done = true;
    IgnoreGrpc ignore;
    return FromGrpcStatus(reader->Finish());
  }
  ~EventStream() {
    if (!done) {
      {
        IgnoreGrpc ignore;
        context->TryCancel();
      }
      v1::GenerateResponse drop;
      while (Read(&drop)) {
      }
      (void)Finish();
    }
    IgnoreGrpc ignore;
    reader.reset();
    context.reset();
  }
};

bool WriteEvent(httplib::DataSink& sink, const std::string& data) {
  const std::string event = absl::StrCat("data: ", data, "\n\n");
  return sink.write(event.data(), event.size());
}

}  // namespace

struct HttpFront::Impl {
  HttpFrontOptions options;
  Backend backend;
  std::unique_ptr<v1::Inference::Stub> inference;
  std::unique_ptr<v1::Adapters::Stub> adapters;
  openai::TokenBytes token_bytes;
  int64_t started = 0;  // Unix seconds: the models' "created"
  httplib::Server http;
  std::thread listener;
  std::atomic<bool> listener_returned{false};

  void Routes();
  void Generate(openai::Endpoint endpoint, const httplib::Request& req, httplib::Response& res);
  void Stream(std::shared_ptr<EventStream> stream, httplib::Response& res);
  void Models(const httplib::Request& req, httplib::Response& res, const std::string& only);
  void LoadLora(const httplib::Request& req, httplib::Response& res);
  void UnloadLora(const httplib::Request& req, httplib::Response& res);
};

void HttpFront::Impl::Routes() {
  http.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    if (backend.serving()) {
      res.set_content("", "text/plain");
    } else {
      SendError(res, openai::MakeHttpError(503, "the server is shutting down", "unavailable"));
    }
  });
  http.Get("/v1/models",
           [this](const httplib::Request& req, httplib::Response& res) { Models(req, res, ""); });
  http.Get(R"(/v1/models/(.+))", [this](const httplib::Request& req, httplib::Response& res) {
    Models(req, res, req.matches[1].str());
  });
  http.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Generate(openai::Endpoint::kCompletions, req, res);
  });
  http.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
    Generate(openai::Endpoint::kChat, req, res);
  });
  http.Post("/v1/load_lora_adapter",
            [this](const httplib::Request& req, httplib::Response& res) { LoadLora(req, res); });
  http.Post("/v1/unload_lora_adapter",
            [this](const httplib::Request& req, httplib::Response& res) { UnloadLora(req, res); });
  // What cpp-httplib answers by itself (no route, 413 for a body over the limit, a malformed
  // request) gets OpenAI's error object too.
  http.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    std::string message;
    switch (res.status) {
      case 404:
        message = absl::StrCat("no route ", req.method, " ", req.path);
        break;
      case 413:
        // cpp-httplib parses form-encoded bodies (curl -d without a Content-Type) and caps them
        // at 8 KiB whatever the limit.
        message = absl::StartsWith(req.get_header_value("Content-Type"),
                                   "application/x-www-form-urlencoded")
                      ? "a form-encoded body is limited to 8 KiB: send the JSON with "
                        "'Content-Type: application/json'"
                      : "the request body is larger than --http-max-body-bytes";
        break;
      default:
        message = absl::StrCat("HTTP ", res.status);
    }
    SendError(res, openai::MakeHttpError(res.status, message));
  });
  http.set_exception_handler(
      [](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "internal error";
        try {
          std::rethrow_exception(ep);
        } catch (const std::exception& e) {
          what = e.what();
        } catch (...) {
        }
        SendError(res, openai::MakeHttpError(500, what));
      });
}

void HttpFront::Impl::Generate(openai::Endpoint endpoint, const httplib::Request& req,
                               httplib::Response& res) {
  absl::StatusOr<json> body = ParseBody(req);
  if (!body.ok()) return SendError(res, openai::ToHttpError(body.status()));
  absl::StatusOr<openai::ParsedRequest> parsed =
      openai::ParseRequest(endpoint, *body, options.model_name, RandomU64());
  if (!parsed.ok()) return SendError(res, openai::ToHttpError(parsed.status()));
  openai::ResponseContext context;
  context.id = RequestId(endpoint == openai::Endpoint::kChat ? "chatcmpl" : "cmpl");
  context.created = absl::ToUnixSeconds(absl::Now());
  context.token_bytes = &token_bytes;

  if (!parsed->stream) {
    v1::GenerateResponse response;
    const grpc::Status status = Unary(req, [&](grpc::ClientContext* c) {
      return inference->Complete(c, parsed->proto, &response);
    });
    if (!status.ok()) return SendError(res, openai::ToHttpError(FromGrpcStatus(status), true));
    return SendJson(res, 200, openai::CompletionResponse(*parsed, context, response));
  }

  auto stream = std::make_shared<EventStream>();
  stream->request = *std::move(parsed);
  stream->writer = std::make_unique<openai::ChunkWriter>(stream->request, std::move(context));
  stream->context = CallContext(req);
  {
    IgnoreGrpc ignore;
    stream->reader = inference->Generate(stream->context.get(), stream->request.proto);
  }
  // The first message (or the refusal) comes before the response starts, so that a bad request
  // gets its HTTP status rather than an error event in a 200 stream.
  if (!stream->Read(&stream->first)) {
    const absl::Status status = stream->Finish();
    return SendError(
        res, openai::ToHttpError(
                 status.ok() ? absl::InternalError("the stream ended empty") : status, true));
  }
  Stream(std::move(stream), res);
}

void HttpFront::Impl::Stream(std::shared_ptr<EventStream> stream, httplib::Response& res) {
  res.set_header("Cache-Control", "no-cache");
  res.set_chunked_content_provider("text/event-stream", [stream](size_t, httplib::DataSink& sink) {
    v1::GenerateResponse message = std::move(stream->first);
    bool more = true;
    while (more) {
      for (const json& chunk : stream->writer->Chunks(message)) {
        // The client went away: the destructor cancels the request.
        if (!WriteEvent(sink, openai::Dump(chunk))) return false;
      }
      if (!message.finish_reason().empty()) break;
      message.Clear();
      more = stream->Read(&message);
    }
    const absl::Status status = stream->Finish();
    if (!status.ok()) {
      // Cancelled or failed after the 200 went out: OpenAI's error object as an event.
      if (!WriteEvent(sink, openai::Dump(openai::ToHttpError(status, true).body))) {
        return false;
      }
    }
    if (!WriteEvent(sink, "[DONE]")) return false;
    sink.done();
    return true;
  });
}

void HttpFront::Impl::Models(const httplib::Request& req, httplib::Response& res,
                             const std::string& only) {
  std::optional<std::string> auth = Authorization(req);
  if (absl::Status s = backend.api_auth->CheckHeader(auth ? std::optional<absl::string_view>(*auth)
                                                          : std::nullopt);
      !s.ok()) {
    return SendError(res, openai::ToHttpError(s));
  }
  std::vector<std::string> names;
  for (const adapters::AdapterInfo& a : backend.registry->List()) {
    // A replaced version still draining shares the name of the ready one.
    if (a.state == adapters::AdapterState::kReady &&
        std::find(names.begin(), names.end(), a.name) == names.end()) {
      names.push_back(a.name);
    }
  }
  const json list = openai::ModelList(options.model_name, names, started);
  if (only.empty()) return SendJson(res, 200, list);
  for (const json& m : list["data"]) {
    if (m["id"] == only) return SendJson(res, 200, m);
  }
  SendError(res, openai::MakeHttpError(404, absl::StrCat("model '", only, "' does not exist"),
                                       "model_not_found"));
}

void HttpFront::Impl::LoadLora(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<json> body = ParseBody(req);
  if (!body.ok()) return SendError(res, openai::ToHttpError(body.status()));
  const json* name = StringField(*body, "lora_name");
  const json* path = StringField(*body, "lora_path");
  if (name == nullptr || path == nullptr) {
    return SendError(res, openai::ToHttpError(absl::InvalidArgumentError(
                              "the body must be {\"lora_name\": ..., \"lora_path\": ...}")));
  }
  v1::LoadAdapterRequest request;
  request.set_name(name->get<std::string>());
  std::string rel = path->get<std::string>();
  const std::string root = absl::StrCat(options.adapter_dir, "/");
  if (!options.adapter_dir.empty() && absl::StartsWith(rel, root)) rel = rel.substr(root.size());
  request.set_path(rel);
  v1::AdapterInfo info;
  const grpc::Status status =
      Unary(req, [&](grpc::ClientContext* c) { return adapters->LoadAdapter(c, request, &info); });
  if (!status.ok()) return SendError(res, openai::ToHttpError(FromGrpcStatus(status)));
  res.set_content(absl::StrCat("Success: LoRA adapter '", info.name(), "' added successfully."),
                  "text/plain");
}

void HttpFront::Impl::UnloadLora(const httplib::Request& req, httplib::Response& res) {
  absl::StatusOr<json> body = ParseBody(req);
  if (!body.ok()) return SendError(res, openai::ToHttpError(body.status()));
  const json* name = StringField(*body, "lora_name");
  if (name == nullptr) {
    return SendError(res, openai::ToHttpError(
                              absl::InvalidArgumentError("the body must be {\"lora_name\": ...}")));
  }
  v1::UnloadAdapterRequest request;
  request.set_name(name->get<std::string>());
  v1::UnloadAdapterResponse response;
  const grpc::Status status = Unary(
      req, [&](grpc::ClientContext* c) { return adapters->UnloadAdapter(c, request, &response); });
  if (!status.ok()) return SendError(res, openai::ToHttpError(FromGrpcStatus(status)));
  res.set_content(
      absl::StrCat("Success: LoRA adapter '", request.name(), "' removed successfully."),
      "text/plain");
}

absl::StatusOr<std::unique_ptr<HttpFront>> HttpFront::Start(const HttpFrontOptions& options,
                                                            Backend backend) {
  auto front = std::unique_ptr<HttpFront>(new HttpFront());
  front->impl_ = std::make_unique<Impl>();
  Impl& impl = *front->impl_;
  impl.options = options;
  impl.backend = std::move(backend);
  {
    IgnoreGrpc ignore;
    impl.inference = v1::Inference::NewStub(impl.backend.channel);
    impl.adapters = v1::Adapters::NewStub(impl.backend.channel);
  }
  const model::Tokenizer* tokenizer = impl.backend.tokenizer;
  impl.token_bytes = [tokenizer](int32_t id) {
    return tokenizer == nullptr ? std::string() : tokenizer->DecodeBytes({id});
  };
  impl.started = absl::ToUnixSeconds(absl::Now());
  impl.Routes();
  impl.http.set_payload_max_length(static_cast<size_t>(options.max_body_bytes));
  // cpp-httplib writes a response's headers and body apart: with Nagle on, the body would wait
  // for the client's delayed ACK of the headers.
  impl.http.set_tcp_nodelay(true);
  impl.http.set_read_timeout(30);
  impl.http.set_write_timeout(30);
  const int threads = options.threads;
  impl.http.new_task_queue = [threads] { return new httplib::ThreadPool(threads); };

  const size_t colon = options.listen.rfind(':');
  int port = -1;
  if (colon == std::string::npos || !absl::SimpleAtoi(options.listen.substr(colon + 1), &port) ||
      port < 0 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrCat("--http-listen ", options.listen, ": expected HOST:PORT"));
  }
  std::string host = options.listen.substr(0, colon);
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    host = host.substr(1, host.size() - 2);
  }
  front->port_ = port == 0 ? impl.http.bind_to_any_port(host)
                           : (impl.http.bind_to_port(host, port) ? port : -1);
  if (front->port_ <= 0) {
    return absl::UnavailableError(
        absl::StrCat("--http-listen ", options.listen, ": cannot listen there (in use?)"));
  }
  impl.listener = std::thread([&impl] {
    impl.http.listen_after_bind();
    impl.listener_returned.store(true);
  });
  // Stop only stops a server that is already running; listen_after_bind says so at once.
  while (!impl.http.is_running() && !impl.listener_returned.load()) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  LP_LOG(INFO) << "serving the OpenAI-compatible HTTP API on port " << front->port_ << " as model '"
               << options.model_name << "'";
  return front;
}

void HttpFront::Stop() {
  if (impl_ == nullptr || !impl_->listener.joinable()) return;
  impl_->http.stop();
  impl_->listener.join();
}

HttpFront::~HttpFront() { Stop(); }

}  // namespace loraplex::server
