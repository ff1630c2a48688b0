// `loraplex info` (Inference.GetModelInfo) and `loraplex health` (grpc.health.v1.Health/Check).
#include <grpcpp/generic/generic_stub.h>

#include <functional>
#include <future>
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "client/commands.h"
#include "client/format.h"
#include "client/rpc.h"
#include "loraplex/v1/inference.grpc.pb.h"

namespace loraplex::client {
namespace {

// grpc.health.v1 is not among our generated protos; its two messages are one field each, so they
// are encoded by hand: HealthCheckRequest{string service = 1}, HealthCheckResponse{enum status =
// 1}.
std::string EncodeHealthRequest(const std::string& service) {
  std::string out;
  if (service.empty()) return out;
  out.push_back(0x0a);  // field 1, length-delimited
  size_t n = service.size();
  while (n >= 0x80) {
    out.push_back(static_cast<char>((n & 0x7f) | 0x80));
    n >>= 7;
  }
  out.push_back(static_cast<char>(n));
  return out + service;
}

// Returns the status field (0 when absent), or -1 when the bytes are not a HealthCheckResponse.
int DecodeHealthStatus(const std::string& bytes) {
  int status = 0;
  size_t i = 0;
  while (i < bytes.size()) {
    const uint8_t tag = static_cast<uint8_t>(bytes[i++]);
    if ((tag & 7) != 0) return -1;  // only varint fields are expected
    uint64_t v = 0;
    int shift = 0;
    while (true) {
      if (i >= bytes.size() || shift > 63) return -1;
      const uint8_t b = static_cast<uint8_t>(bytes[i++]);
      v |= static_cast<uint64_t>(b & 0x7f) << shift;
      if ((b & 0x80) == 0) break;
      shift += 7;
    }
    if ((tag >> 3) == 1) status = static_cast<int>(v);
  }
  return status;
}

const char* HealthName(int status) {
  switch (status) {
    case 0:
      return "UNKNOWN";
    case 1:
      return "SERVING";
    case 2:
      return "NOT_SERVING";
    case 3:
      return "SERVICE_UNKNOWN";
    default:
      return "INVALID";
  }
}

using Rows = std::vector<std::vector<std::string>>;

Rows InfoRows(const v1::ModelInfo& info) {
  const int64_t ctx_len = info.context_length();
  return {
      {"model", info.model_path()},
      {"architecture", info.architecture()},
      {"device / dtype", absl::StrCat(info.device(), " / ", info.dtype())},
      {"layers", absl::StrCat(info.num_layers())},
      {"hidden / intermediate", absl::StrCat(info.hidden_size(), " / ", info.intermediate_size())},
      {"heads / kv heads / head dim",
       absl::StrCat(info.num_heads(), " / ", info.num_kv_heads(), " / ", info.head_dim())},
      {"vocab", absl::StrCat(info.vocab_size(), " (bos ", info.bos_token_id(), ", eos ",
                             info.eos_token_id(), ")")},
      {"context length", absl::StrCat(ctx_len)},
      {"weights", absl::StrCat(HumanBytes(info.weight_bytes()), " (", info.weight_formats(),
                               info.weight_mapped_bytes() > 0
                                   ? absl::StrCat("; ", HumanBytes(info.weight_mapped_bytes()),
                                                  " read in place from the file")
                                   : "",
                               ")")},
      {"kv cache",
       absl::StrCat(info.kv_blocks_total(), " blocks x ", info.kv_block_size(), " tokens, ",
                    info.kv_dtype(), ", prefix cache ", info.prefix_cache() ? "on" : "off")},
      {"cpu kernels",
       info.cpu_kernels().empty()
           ? std::string("-")
           : absl::StrCat(info.cpu_kernels(), " (quantized weights ", info.quant_kernels(), ")",
                          info.batch_invariant() ? ", batch-invariant" : "")},
      {"max batch tokens / queue", absl::StrCat(info.max_batch_tokens(), " / ", info.max_queue())},
      {"max lora rank", absl::StrCat(info.max_lora_rank())},
      {"max adapters",
       info.max_adapters() == 0 ? "no limit besides memory" : absl::StrCat(info.max_adapters())},
  };
}

Rows StatsRows(const v1::EngineStats& s) {
  const int64_t lookups = s.prefix_cache_lookup_tokens();
  return {
      {"running / waiting", absl::StrCat(s.running(), " / ", s.waiting())},
      {"kv blocks used / free / total",
       absl::StrCat(s.kv_blocks_used(), " / ", s.kv_blocks_free(), " / ", s.kv_blocks_total())},
      {"steps", absl::StrCat(s.steps())},
      {"generated tokens", absl::StrCat(s.generated_tokens(), " (",
                                        absl::StrFormat("%.1f", s.tokens_per_second()), "/s)")},
      {"requests finished / cancelled",
       absl::StrCat(s.finished_requests(), " / ", s.cancelled_requests())},
      {"preemptions", absl::StrCat(s.preemptions())},
      {"prefix cache blocks", absl::StrCat(s.prefix_cache_blocks())},
      {"prefix cache hits",
       absl::StrCat(s.prefix_cache_hit_tokens(), " of ", lookups, " tokens",
                    lookups > 0 ? absl::StrFormat(" (%.1f%%)", 100.0 * s.prefix_cache_hit_tokens() /
                                                                   static_cast<double>(lookups))
                                : "")},
  };
}

// `loraplex NAME [flags]` for a command that takes no arguments and shows the answer of one
// Inference call: parses the connection flags, makes the call, prints the answer as JSON with
// --json and as the table `rows` makes of it otherwise; handles --help and usage errors.
template <typename Response>
int RunUnaryCommand(
    const std::string& name, const std::vector<std::string>& args,
    const std::function<grpc::Status(v1::Inference::Stub&, grpc::ClientContext*, Response*)>& call,
    const std::function<Rows(const Response&)>& rows) {
  ArgParser p("loraplex " + name, "[flags]");
  ConnectionOptions conn;
  AddConnectionFlags(p, conn);
  auto positional = p.Parse(args);
  if (!positional.ok() || (!positional->empty() && !p.help_requested())) {
    std::cerr << "loraplex " << name << ": "
              << (positional.ok() ? "takes no arguments"
                                  : std::string(positional.status().message()))
              << "\n";
    return kExitUsage;
  }
  if (p.help_requested()) {
    std::cout << p.Usage();
    return kExitOk;
  }
  auto channel = MakeChannel(conn);
  if (!channel.ok()) {
    std::cerr << "loraplex " << name << ": " << channel.status().message() << "\n";
    return kExitUsage;
  }
  auto stub = v1::Inference::NewStub(*channel);
  grpc::ClientContext ctx;
  PrepareContext(ctx, conn, 30);
  Response response;
  grpc::Status st = call(*stub, &ctx, &response);
  if (!st.ok()) return ReportError(st, name, conn);
  if (conn.json) {
    std::cout << ProtoToJson(response).dump(2) << "\n";
  } else {
    std::cout << FormatTable(rows(response));
  }
  return kExitOk;
}

}  // namespace

int RunInfo(const std::vector<std::string>& args) {
  return RunUnaryCommand<v1::ModelInfo>(
      "info", args,
      [](v1::Inference::Stub& stub, grpc::ClientContext* ctx, v1::ModelInfo* r) {
        return stub.GetModelInfo(ctx, v1::GetModelInfoRequest(), r);
      },
      InfoRows);
}

int RunStats(const std::vector<std::string>& args) {
  return RunUnaryCommand<v1::EngineStats>(
      "stats", args,
      [](v1::Inference::Stub& stub, grpc::ClientContext* ctx, v1::EngineStats* r) {
        return stub.GetEngineStats(ctx, v1::GetEngineStatsRequest(), r);
      },
      StatsRows);
}

int RunHealth(const std::vector<std::string>& args) {
  ArgParser p("loraplex health", "[flags]");
  ConnectionOptions conn;
  std::string service;
  AddConnectionFlags(p, conn);
  p.AddString("service", &service, "service name to check (empty: the whole server)");
  auto positional = p.Parse(args);
  if (!positional.ok()) {
    std::cerr << "loraplex health: " << positional.status().message() << "\n";
    return kExitUsage;
  }
  if (p.help_requested()) {
    std::cout << p.Usage();
    return kExitOk;
  }
  auto channel = MakeChannel(conn);
  if (!channel.ok()) {
    std::cerr << "loraplex health: " << channel.status().message() << "\n";
    return kExitUsage;
  }
  grpc::GenericStub generic(*channel);
  grpc::ClientContext ctx;
  PrepareContext(ctx, conn, 10);
  const std::string req_bytes = EncodeHealthRequest(service);
  grpc::Slice slice(req_bytes);
  grpc::ByteBuffer request(&slice, 1), response;
  std::promise<grpc::Status> done;
  generic.UnaryCall(&ctx, "/grpc.health.v1.Health/Check", grpc::StubOptions(), &request, &response,
                    [&](grpc::Status s) { done.set_value(std::move(s)); });
  grpc::Status st = done.get_future().get();
  if (!st.ok()) return ReportError(st, "health", conn);
  std::vector<grpc::Slice> slices;
  std::string bytes;
  if (response.Dump(&slices).ok()) {
    for (const auto& s : slices) bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
  }
  const int status = DecodeHealthStatus(bytes);
  if (conn.json) {
    std::cout << nlohmann::json{{"server", conn.server},
                                {"service", service},
                                {"status", HealthName(status)}}
                     .dump()
              << "\n";
  } else {
    std::cout << HealthName(status) << "\n";
  }
  return status == 1 ? kExitOk : kExitFailed;
}

}  // namespace loraplex::client
