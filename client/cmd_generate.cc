// `loraplex generate` and `loraplex chat`: streamed generation over Inference.Generate.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <iostream>
#include <map>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/commands.h"
#include "client/format.h"
#include "client/rpc.h"
#include "loraplex/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"

namespace loraplex::client {
namespace {

using Clock = std::chrono::steady_clock;

struct SamplingFlags {
  std::vector<std::string> adapters;  // none: the base model; several: a weighted mix
  std::string adapter_weights;        // with a mix: one weight per --adapter (default 1 each)
  int64_t max_tokens = 0;             // 0: the server's default
  double temperature = 0;
  int64_t top_k = 0;
  double top_p = 1;
  int64_t seed = 0;
  std::vector<std::string> stop;
  std::string stop_token_ids;
  bool ignore_eos = false;
  int64_t logprobs = 0;
};

void AddSamplingFlags(ArgParser& p, SamplingFlags& s) {
  p.AddList("adapter", &s.adapters,
            "adapter name or name@version (none: the base model); repeat for a weighted mix");
  p.AddString(
      "adapter-weights", &s.adapter_weights,
      "a mix's weights, one per --adapter, comma-separated (e.g. 0.7,-0.4; default 1 each)");
  p.AddInt("max-tokens", &s.max_tokens, "tokens to generate (0: the server's default)");
  p.AddDouble("temperature", &s.temperature, "0 = greedy");
  p.AddInt("top-k", &s.top_k, "0 = off");
  p.AddDouble("top-p", &s.top_p, "nucleus sampling, in (0, 1]");
  p.AddInt("seed", &s.seed, "sampling seed");
  p.AddList("stop", &s.stop, "stop string (repeatable)");
  p.AddString("stop-token-ids", &s.stop_token_ids, "comma-separated token ids that stop");
  p.AddBool("ignore-eos", &s.ignore_eos, "keep generating past end-of-sequence");
  p.AddInt("logprobs", &s.logprobs, "top alternatives per generated token (0-20)");
}

absl::StatusOr<std::vector<int32_t>> ParseIds(const std::string& flag, const std::string& text) {
  std::vector<int32_t> ids;
  for (absl::string_view part : absl::StrSplit(text, ',', absl::SkipWhitespace())) {
    int32_t id = 0;
    if (!absl::SimpleAtoi(part, &id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", flag, ": '", std::string(part), "' is not a token id"));
    }
    ids.push_back(id);
  }
  return ids;
}

absl::Status FillSampling(const SamplingFlags& s, v1::GenerateRequest& req) {
  std::vector<double> weights;
  for (absl::string_view part : absl::StrSplit(s.adapter_weights, ',', absl::SkipWhitespace())) {
    double w = 0;
    if (!absl::SimpleAtod(part, &w)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--adapter-weights: '", std::string(part), "' is not a number"));
    }
    weights.push_back(w);
  }
  if (!weights.empty() && weights.size() != s.adapters.size()) {
    return absl::InvalidArgumentError(absl::StrCat("--adapter-weights: ", weights.size(),
                                                   " weights for ", s.adapters.size(),
                                                   " --adapter flags"));
  }
  if (s.adapters.size() == 1 && weights.empty()) {
    req.set_adapter(s.adapters[0]);
  } else {
    for (size_t i = 0; i < s.adapters.size(); ++i) {
      v1::WeightedAdapter* a = req.add_adapters();
      a->set_name(s.adapters[i]);
      if (!weights.empty()) a->set_weight(static_cast<float>(weights[i]));
    }
  }
  if (s.max_tokens != 0) req.set_max_tokens(static_cast<int32_t>(s.max_tokens));
  req.set_temperature(static_cast<float>(s.temperature));
  req.set_top_k(static_cast<int32_t>(s.top_k));
  if (s.top_p != 1) req.set_top_p(static_cast<float>(s.top_p));
  req.set_seed(static_cast<uint64_t>(s.seed));
  for (const std::string& st : s.stop) req.add_stop(st);
  auto ids = ParseIds("stop-token-ids", s.stop_token_ids);
  if (!ids.ok()) return ids.status();
  for (int32_t id : *ids) req.add_stop_token_ids(id);
  req.set_ignore_eos(s.ignore_eos);
  req.set_logprobs(static_cast<int32_t>(s.logprobs));
  return absl::OkStatus();
}

// Everything one streamed generation returned.
struct StreamOutcome {
  grpc::Status status;
  std::string text;
  std::vector<int32_t> token_ids;
  std::vector<v1::TokenLogprobs> logprobs;
  std::string finish_reason;
  v1::Usage usage;
  std::string adapter;
  int64_t adapter_version = 0;
  double ttft_ms = -1;
  double e2e_ms = 0;
};

// Streams one request; `on_text` sees every text delta as it arrives.
template <typename OnText>
StreamOutcome Stream(v1::Inference::Stub& stub, const v1::GenerateRequest& req,
                     const ConnectionOptions& conn, OnText on_text) {
  StreamOutcome out;
  grpc::ClientContext ctx;
  PrepareContext(ctx, conn, /*default_deadline_s=*/600);
  SetRoutingAdapter(ctx, RoutingAdapter(req));
  const auto start = Clock::now();
  auto reader = stub.Generate(&ctx, req);
  v1::GenerateResponse msg;
  while (reader->Read(&msg)) {
    if (out.ttft_ms < 0 && msg.token_ids_size() > 0) {
      out.ttft_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    }
    out.token_ids.insert(out.token_ids.end(), msg.token_ids().begin(), msg.token_ids().end());
    for (const auto& lp : msg.logprobs()) out.logprobs.push_back(lp);
    if (!msg.text().empty()) {
      out.text += msg.text();
      on_text(msg.text());
    }
    if (!msg.finish_reason().empty()) {
      out.finish_reason = msg.finish_reason();
      out.usage = msg.usage();
      out.adapter = msg.adapter();
      out.adapter_version = msg.adapter_version();
    }
  }
  out.status = reader->Finish();
  out.e2e_ms = std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  return out;
}

// The text of single tokens for the logprobs table (one Detokenize call per distinct id).
std::map<int32_t, std::string> Pieces(v1::Inference::Stub& stub, const ConnectionOptions& conn,
                                      const std::vector<v1::TokenLogprobs>& lps) {
  std::map<int32_t, std::string> pieces;
  auto fetch = [&](int32_t id) {
    if (pieces.count(id)) return;
    grpc::ClientContext ctx;
    PrepareContext(ctx, conn, 30);
    v1::DetokenizeRequest req;
    req.add_token_ids(id);
    v1::DetokenizeResponse resp;
    pieces[id] = stub.Detokenize(&ctx, req, &resp).ok() ? resp.text() : "?";
  };
  for (const auto& lp : lps) {
    fetch(lp.token_id());
    for (const auto& t : lp.top()) fetch(t.token_id());
  }
  return pieces;
}

std::string Quoted(const std::string& s) { return nlohmann::json(s).dump(); }

}  // namespace

int RunGenerate(const std::vector<std::string>& args) {
  ArgParser p("loraplex generate", "[flags] PROMPT...   (PROMPT '-' reads stdin)");
  ConnectionOptions conn;
  SamplingFlags s;
  std::string prompt_flag, prompt_ids, system;
  bool stats = false, chat = false;
  AddConnectionFlags(p, conn);
  AddSamplingFlags(p, s);
  p.AddBool("chat", &chat,
            "send the prompt as a user message: the server applies the model's chat template");
  p.AddString("system", &system, "system message for --chat (empty: the template's default)");
  p.AddString("prompt", &prompt_flag, "prompt text (instead of positional words)");
  p.AddString("prompt-ids", &prompt_ids, "comma-separated prompt token ids (no BOS added)");
  p.AddBool("stats", &stats, "print finish reason, token counts and timings to stderr");
  auto positional = p.Parse(args);
  if (!positional.ok()) {
    std::cerr << "loraplex generate: " << positional.status().message() << "\n";
    return kExitUsage;
  }
  if (p.help_requested()) {
    std::cout << p.Usage();
    return kExitOk;
  }
  v1::GenerateRequest req;
  if (absl::Status st = FillSampling(s, req); !st.ok()) {
    std::cerr << "loraplex generate: " << st.message() << "\n";
    return kExitUsage;
  }
  std::string prompt = prompt_flag;
  if (!positional->empty()) {
    if (!prompt.empty()) {
      std::cerr << "loraplex generate: give the prompt either with --prompt or as words\n";
      return kExitUsage;
    }
    prompt = absl::StrJoin(*positional, " ");
    if (prompt == "-") {
      std::ostringstream ss;
      ss << std::cin.rdbuf();
      prompt = ss.str();
    }
  }
  const bool has_text = !prompt_flag.empty() || !positional->empty();
  if (has_text == !prompt_ids.empty()) {
    std::cerr << "loraplex generate: give exactly one of a prompt (words, --prompt or '-') and "
                 "--prompt-ids\n";
    return kExitUsage;
  }
  if (chat && !has_text) {
    std::cerr << "loraplex generate: --chat needs a prompt text, not --prompt-ids\n";
    return kExitUsage;
  }
  if (chat) {
    if (!system.empty()) {
      auto* m = req.add_messages();
      m->set_role("system");
      m->set_content(system);
    }
    auto* m = req.add_messages();
    m->set_role("user");
    m->set_content(prompt);
  } else if (has_text) {
    req.set_prompt(prompt);
  } else {
    auto ids = ParseIds("prompt-ids", prompt_ids);
    if (!ids.ok()) {
      std::cerr << "loraplex generate: " << ids.status().message() << "\n";
      return kExitUsage;
    }
    for (int32_t id : *ids) req.add_prompt_token_ids(id);
  }
  auto channel = MakeChannel(conn);
  if (!channel.ok()) {
    std::cerr << "loraplex generate: " << channel.status().message() << "\n";
    return kExitUsage;
  }
  auto stub = v1::Inference::NewStub(*channel);
  StreamOutcome out = Stream(*stub, req, conn, [&](const std::string& delta) {
    if (!conn.json) {
      std::fwrite(delta.data(), 1, delta.size(), stdout);
      std::fflush(stdout);
    }
  });
  if (!conn.json && !out.text.empty() && out.text.back() != '\n') std::fputs("\n", stdout);
  if (!out.status.ok()) {
    std::fflush(stdout);
    return ReportError(out.status, "generate", conn);
  }
  if (conn.json) {
    nlohmann::json j;
    j["text"] = out.text;
    j["token_ids"] = out.token_ids;
    j["finish_reason"] = out.finish_reason;
    j["usage"] = {{"prompt_tokens", out.usage.prompt_tokens()},
                  {"completion_tokens", out.usage.completion_tokens()}};
    j["adapter"] = out.adapter;
    j["adapter_version"] = out.adapter_version;
    nlohmann::json lps = nlohmann::json::array();
    for (const auto& lp : out.logprobs) lps.push_back(ProtoToJson(lp));
    j["logprobs"] = lps;
    j["ttft_ms"] = out.ttft_ms;
    j["e2e_ms"] = out.e2e_ms;
    std::cout << j.dump(2) << "\n";
    return kExitOk;
  }
  if (!out.logprobs.empty()) {
    const auto pieces = Pieces(*stub, conn, out.logprobs);
    std::vector<std::vector<std::string>> rows = {{"#", "TOKEN", "ID", "LOGPROB", "TOP"}};
    for (size_t i = 0; i < out.logprobs.size(); ++i) {
      const auto& lp = out.logprobs[i];
      std::vector<std::string> top;
      for (const auto& t : lp.top()) {
        top.push_back(absl::StrCat(Quoted(pieces.at(t.token_id())), " ", Num(t.logprob(), 3)));
      }
      rows.push_back({absl::StrCat(i), Quoted(pieces.at(lp.token_id())),
                      absl::StrCat(lp.token_id()), Num(lp.logprob(), 3), absl::StrJoin(top, ", ")});
    }
    std::cout << "\n" << FormatTable(rows);
  }
  if (stats) {
    const double decode_s = (out.e2e_ms - out.ttft_ms) / 1e3;
    const int n = out.usage.completion_tokens();
    std::cerr << "[finish " << out.finish_reason << ", " << out.usage.prompt_tokens()
              << " prompt + " << n << " generated tokens, adapter "
              << (out.adapter.empty() ? "(base)" : out.adapter) << " v" << out.adapter_version
              << ", TTFT " << Num(out.ttft_ms, 1) << " ms, "
              << (n > 1 && decode_s > 0 ? Num((n - 1) / decode_s, 1) : std::string("-"))
              << " tok/s]\n";
  }
  return kExitOk;
}

int RunChat(const std::vector<std::string>& args) {
  ArgParser p("loraplex chat", "[flags]   (lines from stdin; /adapter NAME, /reset, /exit)");
  ConnectionOptions conn;
  SamplingFlags s;
  std::string system;  // empty: the chat template's default system prompt, if it has one
  s.max_tokens = 256;
  AddConnectionFlags(p, conn);
  AddSamplingFlags(p, s);
  p.AddString("system", &system, "system message (empty: the template's default)");
  auto positional = p.Parse(args);
  if (!positional.ok()) {
    std::cerr << "loraplex chat: " << positional.status().message() << "\n";
    return kExitUsage;
  }
  if (p.help_requested()) {
    std::cout << p.Usage();
    return kExitOk;
  }
  auto channel = MakeChannel(conn);
  if (!channel.ok()) {
    std::cerr << "loraplex chat: " << channel.status().message() << "\n";
    return kExitUsage;
  }
  auto stub = v1::Inference::NewStub(*channel);
  // The conversation goes to the server as messages; it applies the model's own chat template.
  std::vector<std::pair<std::string, std::string>> history;
  auto reset = [&] {
    history.clear();
    if (!system.empty()) history.emplace_back("system", system);
  };
  reset();
  const bool tty = isatty(STDIN_FILENO);
  std::string line;
  while (true) {
    if (tty) {
      const std::string shown = absl::StrJoin(s.adapters, "+");
      std::cout << (shown.empty() ? "" : "[" + shown + "] ") << "you> " << std::flush;
    }
    if (!std::getline(std::cin, line)) break;
    if (line.empty()) continue;
    if (line == "/exit" || line == "/quit") break;
    if (line == "/reset") {
      reset();
      std::cout << "(conversation cleared)\n";
      continue;
    }
    if (line.rfind("/adapter", 0) == 0) {
      const std::string name(absl::StripAsciiWhitespace(line.substr(8)));
      s.adapters.clear();
      s.adapter_weights.clear();
      if (!name.empty()) s.adapters.push_back(name);
      std::cout << "(adapter: " << (name.empty() ? "base model" : name) << ")\n";
      continue;
    }
    v1::GenerateRequest req;
    if (absl::Status st = FillSampling(s, req); !st.ok()) {
      std::cerr << "loraplex chat: " << st.message() << "\n";
      return kExitUsage;
    }
    history.emplace_back("user", line);
    for (const auto& [role, content] : history) {
      auto* m = req.add_messages();
      m->set_role(role);
      m->set_content(content);
    }
    if (tty) std::cout << "assistant> " << std::flush;
    StreamOutcome out = Stream(*stub, req, conn, [](const std::string& delta) {
      std::fwrite(delta.data(), 1, delta.size(), stdout);
      std::fflush(stdout);
    });
    std::cout << "\n" << std::flush;
    if (!out.status.ok()) {
      const int code = ReportError(out.status, "chat", conn);
      history.pop_back();  // the turn did not happen
      // A bad adapter name is worth another try; anything else ends the session.
      if (out.status.error_code() == grpc::NOT_FOUND && tty) continue;
      return code;
    }
    history.emplace_back("assistant", out.text);
  }
  return kExitOk;
}

}  // namespace loraplex::client
