// The one place where absl::Status becomes grpc::Status (and back, for clients and tests). Codes
// map one to one (both follow google.rpc.Code); the message is kept.
#pragma once

#include <grpcpp/support/status.h>

#include "absl/status/status.h"

namespace loraplex::server {

grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace loraplex::server
