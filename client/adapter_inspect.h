// `loraplex adapters inspect`: the InspectAdapter answer as a table, as JSON, and as SVG spectra.
#pragma once

#include <string>

#include "absl/status/status.h"
#include "loraplex/v1/adapters.pb.h"
#include "nlohmann/json.hpp"

namespace loraplex::client {

// {"adapter", "version", ["against", "against_version",] "modules": [{"module", "rank",
// "singular_values", "fro_norm", "relative_norm", "effective_rank", "amplification"
// [, "similarity"]}]}, numbers as JSON numbers.
nlohmann::json InspectionJson(const v1::InspectAdapterResponse& r);

// One row per module: rank, ||dW||_F, relative norm, effective rank, amplification, the top
// singular values and (with --against) the similarity.
std::string InspectionTable(const v1::InspectAdapterResponse& r);

// Writes DIR/layer-<l>.svg for every layer: each module's singular values (log scale) against
// their index, one line per module. Creates DIR.
absl::Status WriteSpectraSvg(const v1::InspectAdapterResponse& r, const std::string& dir);

}  // namespace loraplex::client
