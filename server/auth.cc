#include "server/auth.h"

#include <openssl/crypto.h>
#include <openssl/sha.h>

#include <fstream>
#include <sstream>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"

namespace loraplex::server {
namespace {

std::string Digest(absl::string_view text) {
  unsigned char out[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(text.data()), text.size(), out);
  return std::string(reinterpret_cast<const char*>(out), sizeof(out));
}

absl::StatusOr<std::string> ReadPem(const std::string& path, const char* flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(flag, " ", path, ": cannot read"));
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace

TokenAuth::TokenAuth(std::string token, std::string service)
    : enabled_(!token.empty()), digest_(Digest(token)), service_(std::move(service)) {
  // The token itself is not kept: only its digest, which is what Check compares.
}

absl::Status TokenAuth::Check(const grpc::ServerContextBase& context) const {
  if (!enabled_) return absl::OkStatus();
  const auto& metadata = context.client_metadata();
  auto it = metadata.find("authorization");
  if (it == metadata.end()) return CheckHeader(std::nullopt);
  return CheckHeader(absl::string_view(it->second.data(), it->second.size()));
}

absl::Status TokenAuth::CheckHeader(std::optional<absl::string_view> authorization) const {
  if (!enabled_) return absl::OkStatus();
  if (!authorization.has_value()) {
    return absl::UnauthenticatedError(
        absl::StrCat(service_, " needs 'authorization: Bearer <token>'; none was sent"));
  }
  constexpr absl::string_view kBearer = "Bearer ";
  if (!absl::StartsWithIgnoreCase(*authorization, kBearer)) {
    return absl::UnauthenticatedError(
        absl::StrCat(service_, ": the authorization is not a Bearer token"));
  }
  const std::string got = Digest(authorization->substr(kBearer.size()));
  if (CRYPTO_memcmp(got.data(), digest_.data(), digest_.size()) != 0) {
    return absl::PermissionDeniedError(absl::StrCat(service_, ": the bearer token is not valid"));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::shared_ptr<grpc::ServerCredentials>> MakeServerCredentials(
    const TlsFiles& files) {
  if (files.cert.empty() && files.key.empty()) {
    if (!files.client_ca.empty()) {
      return absl::InvalidArgumentError("--tls-client-ca needs --tls-cert and --tls-key");
    }
    return grpc::InsecureServerCredentials();
  }
  if (files.cert.empty() || files.key.empty()) {
    return absl::InvalidArgumentError("--tls-cert and --tls-key go together");
  }
  grpc::SslServerCredentialsOptions options;
  grpc::SslServerCredentialsOptions::PemKeyCertPair pair;
  absl::StatusOr<std::string> cert = ReadPem(files.cert, "--tls-cert");
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPem(files.key, "--tls-key");
  if (!key.ok()) return key.status();
  pair.cert_chain = *std::move(cert);
  pair.private_key = *std::move(key);
  options.pem_key_cert_pairs.push_back(std::move(pair));
  if (!files.client_ca.empty()) {
    absl::StatusOr<std::string> ca = ReadPem(files.client_ca, "--tls-client-ca");
    if (!ca.ok()) return ca.status();
    options.pem_root_certs = *std::move(ca);
    options.client_certificate_request = GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY;
  }
  return grpc::SslServerCredentials(options);
}

}  // namespace loraplex::server
