// Output helpers of the `loraplex` CLI: protobuf messages as JSON (numbers stay numbers, enums are
// names), aligned text tables, and human units. Thread-compatible.
#pragma once

#include <google/protobuf/message.h>

#include <string>
#include <vector>

#include "nlohmann/json.hpp"

namespace loraplex::client {

// Every field of `msg`, unset proto3 scalars included (with their defaults), keyed by the proto
// field name. Unlike the proto3 JSON mapping, int64 fields are JSON numbers, not strings: the
// values here (sizes, counts, versions) fit a double exactly.
nlohmann::json ProtoToJson(const google::protobuf::Message& msg);

// Columns padded to the widest cell, two spaces apart; the first row is the header.
std::string FormatTable(const std::vector<std::vector<std::string>>& rows);

// 1536 -> "1.5 KiB".
std::string HumanBytes(int64_t bytes);
// Three significant decimals at most: 12.3456 -> "12.346", 3 -> "3".
std::string Num(double v, int decimals = 2);

}  // namespace loraplex::client
