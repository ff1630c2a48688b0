// Access control of the gRPC services: bearer tokens (`authorization: Bearer <token>` metadata)
// and the TLS server credentials.
//
// Tokens are compared in constant time (CRYPTO_memcmp over SHA-256 digests, so neither the
// content nor the length of the expected token leaks through timing). Tokens and keys are never
// logged; error messages name the metadata key, never its value.
//
// Thread-safety: TokenAuth is immutable after construction; Check may be called from any thread.
#pragma once

#include <grpcpp/security/server_credentials.h>
#include <grpcpp/server_context.h>

#include <memory>
#include <optional>
#include <string>

#include "absl/status/statusor.h"

namespace loraplex::server {

class TokenAuth {
 public:
  // An empty token turns the check off (every call passes).
  TokenAuth(std::string token, std::string service);

  bool enabled() const { return enabled_; }
  // OK when off or when the call carries `authorization: Bearer <token>`. UNAUTHENTICATED when
  // the metadata is missing or not a Bearer credential; PERMISSION_DENIED when the token differs.
  absl::Status Check(const grpc::ServerContextBase& context) const;
  // The same check of an `authorization` value (an HTTP header); nullopt when none was sent.
  absl::Status CheckHeader(std::optional<absl::string_view> authorization) const;

 private:
  bool enabled_;
  std::string digest_;  // SHA-256 of the expected token
  std::string service_;
};

struct TlsFiles {
  std::string cert;       // PEM certificate chain; empty: plaintext
  std::string key;        // PEM private key
  std::string client_ca;  // PEM roots; when set, clients must present a certificate they sign
};

// Insecure credentials when files.cert and files.key are empty; TLS (mTLS with client_ca) else.
// INVALID_ARGUMENT when only one of cert/key is given or client_ca comes without them;
// NOT_FOUND naming the flag when a file cannot be read.
absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files);

}  // namespace loraplex::server
