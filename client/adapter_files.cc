#include "client/adapter_files.h"

#include <openssl/evp.h>

#include <cstring>
#include <filesystem>
#include <random>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "nlohmann/json.hpp"

namespace loraplex::client {
namespace {

struct TensorSpan {
  std::string name;
  std::string dtype;
  size_t begin = 0;  // absolute byte offsets in the file image
  size_t end = 0;
};

absl::StatusOr<std::vector<TensorSpan>> ParseSafetensors(const std::string& bytes,
                                                         const std::string& what) {
  auto bad = [&](const std::string& msg) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": ", msg));
  };
  if (bytes.size() < 8) return bad("shorter than the 8-byte header length");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<uint8_t>(bytes[i]);
  if (header_len > bytes.size() - 8) return bad("header length runs past the end of the file");
  nlohmann::json header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + header_len,
                                                nullptr, /*allow_exceptions=*/false);
  if (!header.is_object()) return bad("header is not a JSON object");
  const size_t data_begin = 8 + header_len;
  const size_t data_size = bytes.size() - data_begin;
  std::vector<TensorSpan> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const nlohmann::json& t = it.value();
    if (!t.is_object() || !t.contains("dtype") || !t["dtype"].is_string() || !t.contains("shape") ||
        !t["shape"].is_array() || !t.contains("data_offsets") || !t["data_offsets"].is_array() ||
        t["data_offsets"].size() != 2) {
      return bad(absl::StrCat("tensor '", it.key(), "' lacks dtype, shape or data_offsets"));
    }
    const std::string dtype = t["dtype"];
    size_t elem = 0;
    if (dtype == "F32" || dtype == "I32")
      elem = 4;
    else if (dtype == "F16" || dtype == "BF16" || dtype == "I16")
      elem = 2;
    else if (dtype == "F64" || dtype == "I64")
      elem = 8;
    else if (dtype == "I8" || dtype == "U8" || dtype == "BOOL")
      elem = 1;
    else
      return bad(absl::StrCat("tensor '", it.key(), "' has unknown dtype ", dtype));
    uint64_t n = 1;
    for (const auto& d : t["shape"]) {
      if (!d.is_number_unsigned()) return bad(absl::StrCat("tensor '", it.key(), "': bad shape"));
      n *= d.get<uint64_t>();
    }
    const auto& off = t["data_offsets"];
    if (!off[0].is_number_unsigned() || !off[1].is_number_unsigned()) {
      return bad(absl::StrCat("tensor '", it.key(), "': bad data_offsets"));
    }
    const uint64_t b = off[0], e = off[1];
    if (b > e || e > data_size) {
      return bad(absl::StrCat("tensor '", it.key(), "': data_offsets [", b, ", ", e,
                              ") outside the ", data_size, "-byte data section"));
    }
    if (e - b != n * elem) {
      return bad(absl::StrCat("tensor '", it.key(), "': ", e - b, " bytes for ", n, " ", dtype,
                              " elements"));
    }
    spans.push_back({it.key(), dtype, data_begin + b, data_begin + e});
  }
  return spans;
}

}  // namespace

absl::StatusOr<PeftFiles> ReadPeftDir(const std::string& dir) {
  namespace fs = std::filesystem;
  PeftFiles files;
  const fs::path config = fs::path(dir) / "adapter_config.json";
  const fs::path model = fs::path(dir) / "adapter_model.safetensors";
  if (!fs::is_directory(dir)) return absl::NotFoundError(absl::StrCat(dir, ": not a directory"));
  if (!fs::exists(config)) return absl::NotFoundError(absl::StrCat(config.string(), ": missing"));
  if (!fs::exists(model)) {
    const bool has_bin = fs::exists(fs::path(dir) / "adapter_model.bin");
    return absl::NotFoundError(absl::StrCat(
        model.string(), ": missing",
        has_bin ? " (adapter_model.bin is a pickle, which loraplex does not load; convert it)"
                : ""));
  }
  auto c = ReadFileToString(config.string());
  if (!c.ok()) return c.status();
  auto m = ReadFileToString(model.string());
  if (!m.ok()) return m.status();
  if (!nlohmann::json::parse(*c, nullptr, false).is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(config.string(), ": not a JSON object"));
  }
  files.config_json = std::move(*c);
  files.safetensors = std::move(*m);
  return files;
}

absl::Status ValidateSafetensors(const std::string& bytes, const std::string& what) {
  return ParseSafetensors(bytes, what).status();
}

absl::StatusOr<std::string> PerturbLoraWeights(const std::string& bytes, uint64_t seed,
                                               double scale) {
  auto spans = ParseSafetensors(bytes, "adapter_model.safetensors");
  if (!spans.ok()) return spans.status();
  std::string out = bytes;
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (const TensorSpan& t : *spans) {
    if (t.name.find("lora_A") == std::string::npos && t.name.find("lora_B") == std::string::npos) {
      continue;
    }
    char* p = out.data() + t.begin;
    const size_t nbytes = t.end - t.begin;
    auto factor = [&]() { return 1.0f + static_cast<float>(scale) * u(rng); };
    if (t.dtype == "F32") {
      for (size_t i = 0; i < nbytes; i += 4) {
        float v;
        std::memcpy(&v, p + i, 4);
        v *= factor();
        std::memcpy(p + i, &v, 4);
      }
    } else if (t.dtype == "F16" || t.dtype == "BF16") {
      const bool bf = t.dtype == "BF16";
      for (size_t i = 0; i < nbytes; i += 2) {
        uint16_t h;
        std::memcpy(&h, p + i, 2);
        const float v = (bf ? Bf16ToF32(h) : F16ToF32(h)) * factor();
        h = bf ? F32ToBf16(v) : F32ToF16(v);
        std::memcpy(p + i, &h, 2);
      }
    } else {
      return absl::UnimplementedError(absl::StrCat("adapter_model.safetensors: tensor '", t.name,
                                                   "' is ", t.dtype,
                                                   "; perturbing needs F32, "
                                                   "F16 or BF16"));
    }
  }
  return out;
}

std::string Sha256Hex(const std::string& bytes) {
  unsigned char digest[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest, &len, EVP_sha256(), nullptr);
  static const char* kHex = "0123456789abcdef";
  std::string out;
  for (unsigned int i = 0; i < len; ++i) {
    out.push_back(kHex[digest[i] >> 4]);
    out.push_back(kHex[digest[i] & 15]);
  }
  return out;
}

grpc::Status UploadPeft(v1::Adapters::Stub& stub, const ConnectionOptions& conn,
                        const std::string& name, const PeftFiles& files, bool replace, bool pin,
                        int64_t chunk_bytes, v1::AdapterInfo* info, int64_t max_rank) {
  grpc::ClientContext ctx;
  PrepareContext(ctx, conn, 120);
  SetRoutingAdapter(ctx, name);
  auto writer = stub.UploadAdapter(&ctx, info);
  v1::UploadAdapterRequest msg;
  auto* h = msg.mutable_header();
  h->set_name(name);
  h->set_replace(replace);
  h->set_pin(pin);
  h->set_max_rank(static_cast<int32_t>(max_rank));
  h->set_sha256(Sha256Hex(files.safetensors));
  bool ok = writer->Write(msg);
  const size_t step = static_cast<size_t>(std::max<int64_t>(1, chunk_bytes));
  for (const auto& [file_name, data] :
       {std::pair<const char*, const std::string*>{"adapter_config.json", &files.config_json},
        {"adapter_model.safetensors", &files.safetensors}}) {
    for (size_t off = 0; ok && off < data->size(); off += step) {
      msg.Clear();
      msg.mutable_chunk()->set_file_name(file_name);
      msg.mutable_chunk()->set_data(data->substr(off, step));
      ok = writer->Write(msg);
    }
  }
  if (ok) {
    msg.Clear();
    msg.mutable_end()->set_config_bytes(static_cast<int64_t>(files.config_json.size()));
    msg.mutable_end()->set_model_bytes(static_cast<int64_t>(files.safetensors.size()));
    ok = writer->Write(msg);
  }
  // A failed Write means the server has ended the call; Finish says why.
  writer->WritesDone();
  return writer->Finish();
}

}  // namespace loraplex::client
