// What every `loraplex` subcommand shares: where the server is, how to reach it (TLS, token,
// deadline), and how a failed call becomes one line a person can act on plus an exit code.
#pragma once

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "client/args.h"
#include "loraplex/v1/inference.pb.h"

namespace loraplex::client {

// Exit codes of `loraplex` (documented in docs/client.md).
enum ExitCode : int {
  kExitOk = 0,
  kExitFailed = 1,       // anything not below (INTERNAL, UNKNOWN, a health check NOT_SERVING)
  kExitUsage = 2,        // bad flags or arguments, unreadable local files
  kExitUnavailable = 3,  // server down or unreachable, deadline exceeded
  kExitAuth = 4,         // UNAUTHENTICATED, PERMISSION_DENIED
  kExitNotFound = 5,     // unknown adapter (or version)
  kExitRefused = 6,  // INVALID_ARGUMENT, FAILED_PRECONDITION, ALREADY_EXISTS, RESOURCE_EXHAUSTED
  kExitUnimplemented = 7  // the server does not offer this call (yet)
};

struct ConnectionOptions {
  std::string server;    // HOST:PORT; default $LORAPLEX_SERVER or 127.0.0.1:50051
  std::string token;     // sent as "authorization: Bearer <token>"; default $LORAPLEX_TOKEN
  std::string tls_ca;    // PEM file of the CA that signed the server (turns TLS on)
  std::string tls_cert;  // client certificate PEM (mutual TLS), with tls_key
  std::string tls_key;
  std::string tls_server_name;  // overrides the name checked against the server certificate
  bool tls = false;             // TLS with the system roots when no --tls-ca
  double deadline_s = 0;        // per call; 0 = the subcommand's default
  bool json = false;            // machine-readable output
};

// Sets the defaults from the environment and registers --server, --token, --tls*, --deadline and
// --json on `parser`.
void AddConnectionFlags(ArgParser& parser, ConnectionOptions& opts);

// A channel to opts.server. INVALID_ARGUMENT for an empty address or unreadable PEM files.
absl::StatusOr<std::shared_ptr<grpc::Channel>> MakeChannel(const ConnectionOptions& opts);

// Applies the token and the deadline (opts.deadline_s, else default_deadline_s; <= 0: none).
void PrepareContext(grpc::ClientContext& ctx, const ConnectionOptions& opts,
                    double default_deadline_s);

// The call metadata load balancers route by (docker/nginx.conf hashes it), so that one adapter's
// calls stay on the replica that holds it. Sent on calls that name an adapter.
inline constexpr char kRoutingHeader[] = "x-loraplex-adapter";
// Adds kRoutingHeader for `adapter`: its name without "@version" (every version routes alike);
// nothing for "" (the base model).
void SetRoutingAdapter(grpc::ClientContext& ctx, const std::string& adapter);
// What a generation request routes by: its adapter, else the first part of its mix, else "".
std::string RoutingAdapter(const v1::GenerateRequest& req);

// One line saying what went wrong with `what` ("generate", "adapters get foo") and what to do,
// without the gRPC debug string; e.g. "cannot reach the loraplex server at 127.0.0.1:1
// (UNAVAILABLE: failed to connect to all addresses); is it running? Set --server or
// LORAPLEX_SERVER".
std::string DescribeError(const grpc::Status& status, const std::string& what,
                          const ConnectionOptions& opts);
int ExitCodeFor(grpc::StatusCode code);
std::string CodeName(grpc::StatusCode code);

// Prints "loraplex: <DescribeError>" to stderr and returns ExitCodeFor(code).
int ReportError(const grpc::Status& status, const std::string& what, const ConnectionOptions& opts);

// Reads a whole file; NOT_FOUND / INVALID_ARGUMENT name the path.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

}  // namespace loraplex::client
