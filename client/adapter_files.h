// Local PEFT adapter folders on the client side: reading them for UploadAdapter, making perturbed
// copies for `loraplex bench --make-adapters`, and streaming them to the server in chunks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "client/rpc.h"
#include "loraplex/v1/adapters.grpc.pb.h"

namespace loraplex::client {

// The two files of a PEFT adapter, in memory.
struct PeftFiles {
  std::string config_json;  // adapter_config.json
  std::string safetensors;  // adapter_model.safetensors
};

// Reads DIR/adapter_config.json and DIR/adapter_model.safetensors. NOT_FOUND naming the missing
// file (a .bin pickle is pointed out: it is not supported); INVALID_ARGUMENT if the config is not a
// JSON object.
absl::StatusOr<PeftFiles> ReadPeftDir(const std::string& dir);

// Checks a safetensors image: 8-byte little-endian header length, a JSON object header, every
// tensor's dtype/shape/data_offsets consistent and inside the data section. INVALID_ARGUMENT
// naming `what` and the tensor otherwise.
absl::Status ValidateSafetensors(const std::string& bytes, const std::string& what);

// Returns a copy of a safetensors image whose lora_A and lora_B tensors (F32, F16 or BF16) are
// multiplied element-wise by (1 + scale * u), u uniform in [-1, 1) from a generator seeded with
// `seed`; header and layout are unchanged (a perturbed value is rounded to the tensor's dtype).
// Errors as ValidateSafetensors, UNIMPLEMENTED for another dtype of a LoRA tensor.
absl::StatusOr<std::string> PerturbLoraWeights(const std::string& bytes, uint64_t seed,
                                               double scale);

// Lower-case hex SHA-256.
std::string Sha256Hex(const std::string& bytes);

// Streams a header and then both files in chunks of `chunk_bytes` to Adapters.UploadAdapter.
// The sha256 of the safetensors file is sent for the server to check; max_rank > 0 asks the
// server to serve it compressed to that rank. Returns the gRPC status.
grpc::Status UploadPeft(v1::Adapters::Stub& stub, const ConnectionOptions& conn,
                        const std::string& name, const PeftFiles& files, bool replace, bool pin,
                        int64_t chunk_bytes, v1::AdapterInfo* info, int64_t max_rank = 0);

}  // namespace loraplex::client
