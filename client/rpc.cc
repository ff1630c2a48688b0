#include "client/rpc.h"

#include <chrono>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace loraplex::client {
namespace {

std::string Env(const char* name, const std::string& fallback) {
  const char* v = std::getenv(name);
  return (v != nullptr && *v != '\0') ? std::string(v) : fallback;
}

}  // namespace

void AddConnectionFlags(ArgParser& parser, ConnectionOptions& opts) {
  opts.server = Env("LORAPLEX_SERVER", "127.0.0.1:50051");
  opts.token = Env("LORAPLEX_TOKEN", "");
  parser.AddString("server", &opts.server, "server HOST:PORT (env LORAPLEX_SERVER)");
  parser.AddString("token", &opts.token, "bearer token (env LORAPLEX_TOKEN)");
  parser.AddBool("tls", &opts.tls, "use TLS with the system CA roots");
  parser.AddString("tls-ca", &opts.tls_ca, "PEM CA certificate of the server (implies --tls)");
  parser.AddString("tls-cert", &opts.tls_cert, "PEM client certificate (mutual TLS)");
  parser.AddString("tls-key", &opts.tls_key, "PEM client key (mutual TLS)");
  parser.AddString("tls-server-name", &opts.tls_server_name,
                   "name to check the server certificate against");
  parser.AddDouble("deadline", &opts.deadline_s, "seconds per call (0: the command's default)");
  parser.AddBool("json", &opts.json, "print JSON for scripts");
}

absl::StatusOr<std::string> ReadFileToString(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  std::ostringstream ss;
  ss << f.rdbuf();
  if (f.bad()) return absl::InvalidArgumentError(absl::StrCat(path, ": read error"));
  return ss.str();
}

absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ConnectionOptions& opts) {
  if (opts.server.empty()) {
    return absl::InvalidArgumentError("--server is empty; give HOST:PORT");
  }
  grpc::ChannelArguments args;
  // Large enough for adapter upload chunks and long generations; the server enforces its limits.
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetMaxSendMessageSize(64 << 20);
  if (!opts.tls_server_name.empty()) {
    args.SetSslTargetNameOverride(opts.tls_server_name);
  }
  std::shared_ptr<grpc::ChannelCredentials> creds;
  if (opts.tls || !opts.tls_ca.empty() || !opts.tls_cert.empty()) {
    grpc::SslCredentialsOptions ssl;
    if (!opts.tls_ca.empty()) {
      auto ca = ReadFileToString(opts.tls_ca);
      if (!ca.ok())
        return absl::InvalidArgumentError(absl::StrCat("--tls-ca ", ca.status().message()));
      ssl.pem_root_certs = *ca;
    }
    if (opts.tls_cert.empty() != opts.tls_key.empty()) {
      return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
    }
    if (!opts.tls_cert.empty()) {
      auto cert = ReadFileToString(opts.tls_cert);
      if (!cert.ok())
        return absl::InvalidArgumentError(absl::StrCat("--tls-cert ", cert.status().message()));
      auto key = ReadFileToString(opts.tls_key);
      if (!key.ok())
        return absl::InvalidArgumentError(absl::StrCat("--tls-key ", key.status().message()));
      ssl.pem_cert_chain = *cert;
      ssl.pem_private_key = *key;
    }
    creds = grpc::SslCredentials(ssl);
  } else {
    creds = grpc::InsecureChannelCredentials();
  }
  return grpc::CreateCustomChannel(opts.server, creds, args);
}

void SetRoutingAdapter(grpc::ClientContext& ctx, const std::string& adapter) {
  const std::string name = adapter.substr(0, adapter.find('@'));
  if (!name.empty()) ctx.AddMetadata(kRoutingHeader, name);
}

std::string RoutingAdapter(const v1::GenerateRequest& req) {
  if (!req.adapter().empty()) return req.adapter();
  return req.adapters().empty() ? std::string() : req.adapters(0).name();
}

void PrepareContext(grpc::ClientContext& ctx, const ConnectionOptions& opts,
                    double default_deadline_s) {
  if (!opts.token.empty()) ctx.AddMetadata("authorization", "Bearer " + opts.token);
  const double d = opts.deadline_s > 0 ? opts.deadline_s : default_deadline_s;
  if (d > 0) {
    ctx.set_deadline(std::chrono::system_clock::now() +
                     std::chrono::microseconds(static_cast<int64_t>(d * 1e6)));
  }
}

std::string CodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::OK:
      return "OK";
    case grpc::CANCELLED:
      return "CANCELLED";
    case grpc::UNKNOWN:
      return "UNKNOWN";
    case grpc::INVALID_ARGUMENT:
      return "INVALID_ARGUMENT";
    case grpc::DEADLINE_EXCEEDED:
      return "DEADLINE_EXCEEDED";
    case grpc::NOT_FOUND:
      return "NOT_FOUND";
    case grpc::ALREADY_EXISTS:
      return "ALREADY_EXISTS";
    case grpc::PERMISSION_DENIED:
      return "PERMISSION_DENIED";
    case grpc::RESOURCE_EXHAUSTED:
      return "RESOURCE_EXHAUSTED";
    case grpc::FAILED_PRECONDITION:
      return "FAILED_PRECONDITION";
    case grpc::ABORTED:
      return "ABORTED";
    case grpc::OUT_OF_RANGE:
      return "OUT_OF_RANGE";
    case grpc::UNIMPLEMENTED:
      return "UNIMPLEMENTED";
    case grpc::INTERNAL:
      return "INTERNAL";
    case grpc::UNAVAILABLE:
      return "UNAVAILABLE";
    case grpc::DATA_LOSS:
      return "DATA_LOSS";
    case grpc::UNAUTHENTICATED:
      return "UNAUTHENTICATED";
    default:
      return absl::StrCat("CODE_", static_cast<int>(code));
  }
}

int ExitCodeFor(grpc::StatusCode code) {
  switch (code) {
    case grpc::OK:
      return kExitOk;
    case grpc::UNAVAILABLE:
    case grpc::DEADLINE_EXCEEDED:
      return kExitUnavailable;
    case grpc::UNAUTHENTICATED:
    case grpc::PERMISSION_DENIED:
      return kExitAuth;
    case grpc::NOT_FOUND:
      return kExitNotFound;
    case grpc::INVALID_ARGUMENT:
    case grpc::FAILED_PRECONDITION:
    case grpc::ALREADY_EXISTS:
    case grpc::OUT_OF_RANGE:
    case grpc::RESOURCE_EXHAUSTED:
      return kExitRefused;
    case grpc::UNIMPLEMENTED:
      return kExitUnimplemented;
    default:
      return kExitFailed;
  }
}

std::string DescribeError(const grpc::Status& status, const std::string& what,
                          const ConnectionOptions& opts) {
  const std::string detail =
      status.error_message().empty()
          ? CodeName(status.error_code())
          : absl::StrCat(CodeName(status.error_code()), ": ", status.error_message());
  switch (status.error_code()) {
    case grpc::UNAVAILABLE:
      return absl::StrCat(what, ": cannot reach the loraplex server at ", opts.server, " (", detail,
                          "); is it running? Set --server or LORAPLEX_SERVER");
    case grpc::DEADLINE_EXCEEDED:
      return absl::StrCat(what, ": no answer from ", opts.server, " within the deadline (", detail,
                          "); raise --deadline");
    case grpc::UNAUTHENTICATED:
      return absl::StrCat(what, ": the server refused the token (", detail, "); ",
                          opts.token.empty() ? "pass --token or set LORAPLEX_TOKEN"
                                             : "check --token / LORAPLEX_TOKEN");
    case grpc::PERMISSION_DENIED:
      if (absl::StrContains(detail, "token")) {
        return absl::StrCat(what, ": the server refused the token (", detail,
                            "); check --token / LORAPLEX_TOKEN");
      }
      return absl::StrCat(what, ": permission denied (", detail, ")");
    case grpc::NOT_FOUND:
      return absl::StrCat(what, ": not found (", detail,
                          "); `loraplex adapters list` shows what is loaded");
    case grpc::UNIMPLEMENTED:
      return absl::StrCat(what, ": the server at ", opts.server, " does not offer this call (",
                          detail, ")");
    default:
      return absl::StrCat(what, ": ", detail);
  }
}

int ReportError(const grpc::Status& status, const std::string& what,
                const ConnectionOptions& opts) {
  std::cerr << "loraplex: " << DescribeError(status, what, opts) << "\n";
  return ExitCodeFor(status.error_code());
}

}  // namespace loraplex::client
