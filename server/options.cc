#include "server/options.h"

#include <cctype>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>

#include "absl/flags/flag.h"
#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "common/logging.h"
#include "common/status.h"
#include "model/device.h"

ABSL_FLAG(std::string, model, "", "GGUF file or HF model folder (required)");
ABSL_FLAG(std::string, listen, "127.0.0.1:50051", "gRPC address HOST:PORT (port 0: any free one)");
ABSL_FLAG(std::string, dtype, "native",
          "storage of the base weights: native (a GGUF file's quantized matrices as stored, read "
          "in place from the file, on integer kernels; on CUDA, and for the other tensors, bf16), "
          "bf16, f32, q8_0 or q4_0");
ABSL_FLAG(std::string, kv_dtype, "auto",
          "KV cache elements: auto (f16 on the CPU when base weights are quantized, as with "
          "--dtype native on a quantized GGUF; else f32), f32 or f16 (CPU only)");
ABSL_FLAG(
    std::string, device, "auto",
    "auto (CUDA when a device is usable, else the CPU), cpu or cuda (fails without a device)");
ABSL_FLAG(int64_t, max_batch_tokens, 512, "tokens per engine step (decodes + prefill chunks)");
ABSL_FLAG(int64_t, max_running, 64, "sequences per engine step");
ABSL_FLAG(std::string, fairness, "vtc",
          "admission order across adapters: vtc (a fair share per adapter, Virtual Token Counter) "
          "or fifo");
ABSL_FLAG(std::string, max_running_per_adapter, "auto",
          "running sequences one adapter may hold: auto (under vtc, its share of --max-running "
          "among the adapters active within --fairness-window-s; a lone adapter gets every slot; "
          "no cap under fifo), N, or 0 (no cap beyond --max-running)");
ABSL_FLAG(double, fairness_window_s, 30,
          "seconds an adapter counts as active after its last request, for "
          "--max-running-per-adapter auto");
ABSL_FLAG(std::vector<std::string>, adapter_shares, {},
          "NAME=WEIGHT[,...] VTC shares (default 1 each; @base: the base model, @mix: the mixes)");
ABSL_FLAG(std::string, merge_policy, "off",
          "auto: merge the adapter that dominates the load into the base weights while that pays "
          "(measured LoRA and switch costs; needs --dtype bf16 or f32), unmerge when it stops "
          "paying; off: merges only by SetAdapterMode");
ABSL_FLAG(bool, batch_invariant, false,
          "CPU: compute every token as if alone in its step (one-token kernel loops, no token "
          "tiles), so a request's outputs do not depend on the load; slower batched steps");
ABSL_FLAG(std::string, prefix_cache, "on",
          "on: reuse the KV of full blocks of a prompt prefix seen before with the same adapter "
          "version (LRU, in the KV pool's free blocks); off");
ABSL_FLAG(int64_t, max_queue, 256, "requests waiting for KV memory before RESOURCE_EXHAUSTED");
ABSL_FLAG(std::string, kv_memory, "",
          "KV cache size, e.g. 512MiB or 2G (default: max_running full contexts, at most 1 GiB)");
ABSL_FLAG(int64_t, kv_blocks, 0, "KV cache size in blocks (overrides --kv-memory)");
ABSL_FLAG(int64_t, kv_block_size, 16, "token slots per KV block");
ABSL_FLAG(int32_t, max_lora_rank, 64, "largest LoRA rank accepted");
ABSL_FLAG(std::string, metrics_listen, "", "Prometheus HTTP address HOST:PORT (empty: off)");
ABSL_FLAG(std::string, http_listen, "",
          "OpenAI-compatible HTTP API address HOST:PORT (empty: off; port 0: any free one)");
ABSL_FLAG(std::string, served_model_name, "",
          "the base model's name in the HTTP API (default: the model file's name without .gguf)");
ABSL_FLAG(std::string, http_max_body_bytes, "8MiB", "largest HTTP request body (413 above)");
ABSL_FLAG(int32_t, http_threads, 64, "HTTP connections served at once");
ABSL_FLAG(std::string, adapter_dir, "", "root that LoadAdapter paths are relative to");
ABSL_FLAG(bool, load_on_demand, false,
          "a request naming an unregistered adapter registers --adapter-dir/NAME first");
ABSL_FLAG(std::string, state_dir, "",
          "where registered adapters and their manifest persist (empty: a temporary directory)");
ABSL_FLAG(std::string, admin_token, "",
          "bearer token the Adapters service requires (empty: open); prefer --admin-token-file");
ABSL_FLAG(std::string, admin_token_file, "", "file holding the admin token (keeps it out of ps)");
ABSL_FLAG(int64_t, max_loaded_adapters, 0, "adapters in compute memory at once (0: no limit)");
ABSL_FLAG(std::string, adapter_memory, "", "bytes of adapter weights in compute memory, e.g. 2G");
ABSL_FLAG(std::string, max_adapter_bytes, "1G", "largest UploadAdapter (both files together)");
ABSL_FLAG(std::string, tls_client_ca, "",
          "PEM roots: clients must present a certificate they sign");
ABSL_FLAG(std::string, api_token, "", "bearer token the Inference service requires (empty: open)");
ABSL_FLAG(std::string, tls_cert, "", "PEM certificate chain: serve gRPC over TLS");
ABSL_FLAG(std::string, tls_key, "", "PEM private key of --tls-cert");
ABSL_FLAG(std::vector<std::string>, adapter, {},
          "NAME=DIR[,NAME=DIR...] PEFT adapters to serve from the start (version 1)");
ABSL_FLAG(double, shutdown_grace_s, 30, "seconds calls in flight may take to finish on SIGTERM");
ABSL_FLAG(
    std::string, port_file, "",
    "file to write the bound gRPC port and metrics port (0: none) to, a line each, once serving");

namespace loraplex::server {

absl::StatusOr<int64_t> ParseByteSize(const std::string& text) {
  std::string s(absl::StripAsciiWhitespace(text));
  size_t digits = 0;
  while (digits < s.size() && std::isdigit(static_cast<unsigned char>(s[digits]))) ++digits;
  int64_t value = 0;
  if (digits == 0 || !absl::SimpleAtoi(s.substr(0, digits), &value)) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is not a size like 512MiB"));
  }
  const std::string unit = absl::AsciiStrToLower(s.substr(digits));
  int shift = 0;
  if (unit.empty() || unit == "b") {
    shift = 0;
  } else if (unit == "k" || unit == "kb" || unit == "kib") {
    shift = 10;
  } else if (unit == "m" || unit == "mb" || unit == "mib") {
    shift = 20;
  } else if (unit == "g" || unit == "gb" || unit == "gib") {
    shift = 30;
  } else {
    return absl::InvalidArgumentError(
        absl::StrCat("'", text, "': unknown unit '", unit, "' (use K, M or G)"));
  }
  if (value > (INT64_MAX >> shift)) {
    return absl::InvalidArgumentError(absl::StrCat("'", text, "' is too large"));
  }
  return value << shift;
}

namespace {

absl::Status HttpFromFlags(const std::string& model_path, const std::string& adapter_dir,
                           HttpFrontOptions* http) {
  http->listen = absl::GetFlag(FLAGS_http_listen);
  http->adapter_dir = adapter_dir;
  http->model_name = absl::GetFlag(FLAGS_served_model_name);
  if (http->model_name.empty()) {
    std::filesystem::path p(model_path);
    if (!p.has_filename()) p = p.parent_path();  // "dir/"
    http->model_name = p.extension() == ".gguf" ? p.stem().string() : p.filename().string();
  }
  absl::StatusOr<int64_t> body = ParseByteSize(absl::GetFlag(FLAGS_http_max_body_bytes));
  if (!body.ok() || *body < 1) {
    return absl::InvalidArgumentError(
        "--http-max-body-bytes: expected a size of at least 1 byte, e.g. 8MiB");
  }
  http->max_body_bytes = *body;
  http->threads = absl::GetFlag(FLAGS_http_threads);
  if (http->threads < 1) return absl::InvalidArgumentError("--http-threads must be at least 1");
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<CommandLine> CommandLineFromFlags() {
  CommandLine cl;
  cl.model_path = absl::GetFlag(FLAGS_model);
  if (cl.model_path.empty()) return absl::InvalidArgumentError("--model is required");

  const std::string dtype = absl::GetFlag(FLAGS_dtype);
  LP_RETURN_IF_ERROR(model::ParseWeightStorage(dtype, &cl.load));
  LP_RETURN_IF_ERROR(model::ParseKvDType(absl::GetFlag(FLAGS_kv_dtype), &cl.load));
  std::string device_reason;
  LP_ASSIGN_OR_RETURN(cl.load.device,
                      model::ResolveDevice(absl::GetFlag(FLAGS_device), &device_reason));
  LP_LOG(INFO) << device_reason;
  cl.batch_invariant = absl::GetFlag(FLAGS_batch_invariant);
  if (cl.batch_invariant && cl.load.device != model::Device::kCpu) {
    return absl::InvalidArgumentError(
        "--batch-invariant is for the CPU kernels; the CUDA backend's cuBLAS GEMMs pick their "
        "reduction order by shape (use --device cpu)");
  }
  {
    AdapterAdminOptions& a = cl.server.admin;
    a.adapter_dir = absl::GetFlag(FLAGS_adapter_dir);
    a.load_on_demand = absl::GetFlag(FLAGS_load_on_demand);
    if (a.load_on_demand && a.adapter_dir.empty()) {
      return absl::InvalidArgumentError("--load-on-demand loads from --adapter-dir; give one");
    }
    a.state_dir = absl::GetFlag(FLAGS_state_dir);
    a.admin_token = absl::GetFlag(FLAGS_admin_token);
    a.api_token = absl::GetFlag(FLAGS_api_token);
    if (const std::string f = absl::GetFlag(FLAGS_admin_token_file); !f.empty()) {
      std::ifstream in(f);
      if (!in || !std::getline(in, a.admin_token) || a.admin_token.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--admin-token-file ", f, ": cannot read a token from its first line"));
      }
    }
    a.tls = {absl::GetFlag(FLAGS_tls_cert), absl::GetFlag(FLAGS_tls_key),
             absl::GetFlag(FLAGS_tls_client_ca)};
    a.max_loaded = absl::GetFlag(FLAGS_max_loaded_adapters);
    if (a.max_loaded < 0) return absl::InvalidArgumentError("--max-loaded-adapters must be >= 0");
    if (const std::string m = absl::GetFlag(FLAGS_adapter_memory); !m.empty()) {
      absl::StatusOr<int64_t> bytes = ParseByteSize(m);
      if (!bytes.ok()) {
        return absl::InvalidArgumentError(
            absl::StrCat("--adapter-memory: ", bytes.status().message()));
      }
      a.memory_bytes = *bytes;
    }
    absl::StatusOr<int64_t> max_bytes = ParseByteSize(absl::GetFlag(FLAGS_max_adapter_bytes));
    if (!max_bytes.ok() || *max_bytes < 1) {
      return absl::InvalidArgumentError("--max-adapter-bytes must be a size like 256MiB");
    }
    a.max_adapter_bytes = *max_bytes;
  }
  for (const std::string& spec : absl::GetFlag(FLAGS_adapter)) {
    std::vector<std::string> parts = absl::StrSplit(spec, absl::MaxSplits('=', 1));
    if (parts.size() != 2 || parts[0].empty() || parts[1].empty()) {
      return absl::InvalidArgumentError(absl::StrCat("--adapter wants NAME=DIR, got '", spec, "'"));
    }
    cl.server.adapters.emplace_back(parts[0], parts[1]);
  }

  ServerOptions& s = cl.server;
  s.listen = absl::GetFlag(FLAGS_listen);
  s.metrics_listen = absl::GetFlag(FLAGS_metrics_listen);
  LP_RETURN_IF_ERROR(HttpFromFlags(cl.model_path, cl.server.admin.adapter_dir, &s.http));
  s.engine.max_batch_tokens = absl::GetFlag(FLAGS_max_batch_tokens);
  s.engine.max_running = absl::GetFlag(FLAGS_max_running);
  s.engine.max_queue = absl::GetFlag(FLAGS_max_queue);
  LP_ASSIGN_OR_RETURN(s.engine.fairness, engine::ParseFairness(absl::GetFlag(FLAGS_fairness)));
  if (const std::string cap = absl::GetFlag(FLAGS_max_running_per_adapter); cap == "auto") {
    s.engine.max_running_per_adapter = engine::EngineOptions::kRunningShare;
  } else if (!absl::SimpleAtoi(cap, &s.engine.max_running_per_adapter) ||
             s.engine.max_running_per_adapter < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--max-running-per-adapter wants auto or N >= 0, got '", cap, "'"));
  }
  if (const double w = absl::GetFlag(FLAGS_fairness_window_s); !(w >= 0) || w > 1e6) {
    return absl::InvalidArgumentError(
        absl::StrCat("--fairness-window-s wants 0..1e6 seconds, got ", w));
  } else {
    s.engine.fairness_window_ms = static_cast<int64_t>(std::llround(w * 1000));
  }
  for (const std::string& spec : absl::GetFlag(FLAGS_adapter_shares)) {
    std::vector<std::string> parts = absl::StrSplit(spec, absl::MaxSplits('=', 1));
    double share = 0;
    if (parts.size() != 2 || parts[0].empty() || !absl::SimpleAtod(parts[1], &share) ||
        !(share > 0) || !std::isfinite(share)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--adapter-shares wants NAME=WEIGHT with WEIGHT > 0, got '", spec, "'"));
    }
    s.engine.adapter_shares[parts[0] == "@base" ? "" : parts[0]] = share;
  }
  if (const std::string mp = absl::GetFlag(FLAGS_merge_policy); mp == "auto" || mp == "off") {
    s.merge_policy = mp == "auto";
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--merge-policy ", mp, ": must be auto or off"));
  }
  if (const std::string pc = absl::GetFlag(FLAGS_prefix_cache); pc == "on" || pc == "off") {
    s.engine.prefix_cache = pc == "on";
  } else {
    return absl::InvalidArgumentError(absl::StrCat("--prefix-cache ", pc, ": must be on or off"));
  }
  s.engine.kv_block_size = absl::GetFlag(FLAGS_kv_block_size);
  s.engine.kv_blocks = absl::GetFlag(FLAGS_kv_blocks);
  if (const std::string kv = absl::GetFlag(FLAGS_kv_memory); !kv.empty()) {
    absl::StatusOr<int64_t> bytes = ParseByteSize(kv);
    if (!bytes.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("--kv-memory: ", bytes.status().message()));
    }
    s.engine.kv_memory_bytes = *bytes;
  }
  s.info.model_path = cl.model_path;
  s.info.dtype = dtype;
  s.info.device = model::DeviceName(cl.load.device);
  s.info.max_lora_rank = absl::GetFlag(FLAGS_max_lora_rank);
  if (s.info.max_lora_rank < 1) {
    return absl::InvalidArgumentError("--max-lora-rank must be at least 1");
  }
  const double grace = absl::GetFlag(FLAGS_shutdown_grace_s);
  if (!(grace >= 0)) return absl::InvalidArgumentError("--shutdown-grace-s must be >= 0");
  cl.shutdown_grace = absl::Seconds(grace);
  cl.port_file = absl::GetFlag(FLAGS_port_file);
  return cl;
}

}  // namespace loraplex::server
