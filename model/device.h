// Choosing where the model runs: the --device flag of loraplex-server and loraplex-generate.
//
//   auto  CUDA when a device is usable (CudaBackendAvailable), else the CPU
//   cpu   the CPU
//   cuda  CUDA; FAILED_PRECONDITION "no CUDA device found: <reason>" when none is usable
//
// Thread-safe (the CUDA probe may initialise the driver once).
#pragma once

#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "model/llama_model.h"

namespace loraplex::model {

// True when this build has the CUDA backend and a device can be used; otherwise false and *why
// (when non-null) says which of the two is missing and, for the device, the driver's reason.
bool CudaBackendAvailable(std::string* why);

// Resolves a --device value. *reason (when non-null) gets a sentence for the log saying what was
// chosen and why. INVALID_ARGUMENT for a value other than auto, cpu or cuda; FAILED_PRECONDITION
// for cuda without a usable device (the message starts "no CUDA device found: ").
absl::StatusOr<Device> ResolveDevice(absl::string_view flag, std::string* reason);

}  // namespace loraplex::model
