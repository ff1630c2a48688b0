#include "adapters/manifest.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <openssl/sha.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"

namespace loraplex::adapters {
namespace {

constexpr char kManifestFile[] = "manifest.json";
constexpr char kManifestFormat[] = "loraplex-adapter-manifest";
constexpr int kManifestVersion = 1;
constexpr int64_t kMaxVersion = int64_t{1} << 53;

absl::Status Errno(const std::string& what, const std::string& path) {
  return absl::FailedPreconditionError(absl::StrCat(what, " ", path, ": ", std::strerror(errno)));
}

std::string Hex(const unsigned char* digest, size_t n) {
  static const char kDigits[] = "0123456789abcdef";
  std::string out(2 * n, '0');
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = kDigits[digest[i] >> 4];
    out[2 * i + 1] = kDigits[digest[i] & 15];
  }
  return out;
}

}  // namespace

std::string VersionDir(const std::string& state_dir, const std::string& name, int64_t version) {
  return absl::StrCat(state_dir, "/adapters/", name, "/v", version);
}

absl::Status SyncPath(const std::string& path) {
  const int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Errno("cannot open", path);
  const int rc = fsync(fd);
  close(fd);
  if (rc != 0) return Errno("cannot fsync", path);
  return absl::OkStatus();
}

absl::Status WriteFileDurably(const std::string& path, const std::string& data) {
  const int fd = open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Errno("cannot create", path);
  size_t done = 0;
  while (done < data.size()) {
    const ssize_t n = write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      absl::Status s = Errno("cannot write", path);
      close(fd);
      return s;
    }
    done += static_cast<size_t>(n);
  }
  if (fsync(fd) != 0) {
    absl::Status s = Errno("cannot fsync", path);
    close(fd);
    return s;
  }
  if (close(fd) != 0) return Errno("cannot close", path);
  return absl::OkStatus();
}

std::string Sha256Hex(const void* data, size_t size) {
  unsigned char digest[SHA256_DIGEST_LENGTH];
  SHA256(static_cast<const unsigned char*>(data), size, digest);
  return Hex(digest, sizeof(digest));
}

absl::StatusOr<std::string> Sha256OfFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open"));
  // The EVP interface: OpenSSL 3 deprecates the SHA256_* streaming functions.
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (ctx == nullptr || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    return absl::ResourceExhaustedError("cannot start a SHA-256 digest");
  }
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), static_cast<std::streamsize>(buffer.size()));
    if (in.gcount() > 0) {
      EVP_DigestUpdate(ctx.get(), buffer.data(), static_cast<size_t>(in.gcount()));
    }
  }
  if (in.bad()) return absl::FailedPreconditionError(absl::StrCat(path, ": read error"));
  unsigned char digest[SHA256_DIGEST_LENGTH];
  unsigned int length = 0;
  EVP_DigestFinal_ex(ctx.get(), digest, &length);
  return Hex(digest, sizeof(digest));
}

absl::StatusOr<std::vector<ManifestEntry>> ReadManifest(const std::string& state_dir) {
  const std::string path = absl::StrCat(state_dir, "/", kManifestFile);
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::vector<ManifestEntry>();  // a fresh state directory
  std::stringstream text;
  text << in.rdbuf();
  nlohmann::json j = nlohmann::json::parse(text.str(), nullptr, /*allow_exceptions=*/false);
  auto bad = [&](const std::string& what) {
    return absl::DataLossError(absl::StrCat(path, ": ", what));
  };
  if (j.is_discarded() || !j.is_object()) return bad("not a JSON object");
  if (!j.contains("format") || j["format"] != kManifestFormat) {
    return bad(absl::StrCat("\"format\" is not \"", kManifestFormat, "\""));
  }
  if (!j.contains("format_version") || j["format_version"] != kManifestVersion) {
    return bad(absl::StrCat("\"format_version\" is not ", kManifestVersion));
  }
  if (!j.contains("adapters") || !j["adapters"].is_array())
    return bad("\"adapters\" is not a list");
  std::vector<ManifestEntry> entries;
  int merged = 0;
  for (size_t i = 0; i < j["adapters"].size(); ++i) {
    const nlohmann::json& a = j["adapters"][i];
    const std::string where = absl::StrCat("adapters[", i, "]");
    if (!a.is_object() || !a.contains("name") || !a["name"].is_string() || !a.contains("version") ||
        !a["version"].is_number_integer() || !a.contains("sha256") || !a["sha256"].is_string()) {
      return bad(
          absl::StrCat(where, " needs string \"name\", integer \"version\", string \"sha256\""));
    }
    ManifestEntry e;
    e.name = a["name"].get<std::string>();
    e.version = a["version"].get<int64_t>();
    e.sha256 = a["sha256"].get<std::string>();
    if (a.contains("pinned") && a["pinned"].is_boolean()) e.pinned = a["pinned"].get<bool>();
    if (a.contains("source") && a["source"].is_string()) e.source = a["source"].get<std::string>();
    if (a.contains("merged")) {
      if (!a["merged"].is_boolean()) return bad(absl::StrCat(where, ".merged must be a boolean"));
      e.merged = a["merged"].get<bool>();
      if (e.merged && ++merged > 1) {
        return bad(absl::StrCat(where, " is the second adapter marked merged (one at a time)"));
      }
    }
    if (a.contains("max_rank")) {
      if (!a["max_rank"].is_number_integer() || a["max_rank"].get<int64_t>() < 0) {
        return bad(absl::StrCat(where, ".max_rank must be an integer >= 0"));
      }
      e.max_rank = a["max_rank"].get<int64_t>();
    }
    // No process registers 2^53 versions of a name; a larger number is damage, and at INT64_MAX
    // the next registration's version would overflow.
    if (e.version < 1 || e.version >= kMaxVersion) {
      return bad(absl::StrCat(where, ".version must be in [1, 2^53)"));
    }
    entries.push_back(std::move(e));
  }
  return entries;
}

absl::Status WriteManifest(const std::string& state_dir,
                           const std::vector<ManifestEntry>& entries) {
  if (absl::Status s = StageManifest(state_dir, entries); !s.ok()) return s;
  return PublishManifest(state_dir);
}

absl::Status StageManifest(const std::string& state_dir,
                           const std::vector<ManifestEntry>& entries) {
  nlohmann::json j;
  j["format"] = kManifestFormat;
  j["format_version"] = kManifestVersion;
  j["adapters"] = nlohmann::json::array();
  for (const ManifestEntry& e : entries) {
    j["adapters"].push_back({{"name", e.name},
                             {"version", e.version},
                             {"sha256", e.sha256},
                             {"pinned", e.pinned},
                             {"source", e.source},
                             {"merged", e.merged},
                             {"max_rank", e.max_rank}});
  }
  const std::string path = absl::StrCat(state_dir, "/", kManifestFile);
  return WriteFileDurably(path + ".tmp", j.dump(2) + "\n");
}

absl::Status PublishManifest(const std::string& state_dir) {
  const std::string path = absl::StrCat(state_dir, "/", kManifestFile);
  const std::string tmp = path + ".tmp";
  if (std::rename(tmp.c_str(), path.c_str()) != 0) return Errno("cannot rename into", path);
  return SyncPath(state_dir);
}

}  // namespace loraplex::adapters
