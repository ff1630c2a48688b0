// The bad requests of loraplex-soak (members of Soak, see soak.h): the bad adapter folders it
// makes under --adapter-root, and every kind of bad request of docs/api.md's error table with the
// code it must get.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "loraplex/v1/inference.grpc.pb.h"
#include "nlohmann/json.hpp"
#include "tests/soak/soak.h"
#include "tests/soak/soak_mix.h"
#include "tests/soak/soak_util.h"
#include "tests/testing/peft_files.h"

namespace loraplex::soak {

namespace fs = std::filesystem;

// Bad adapter folders under --adapter-root/soak-bad (LoadAdapter paths).
void Soak::MakeBadFolders() {
  const std::string root = o_.adapter_root + "/" + kBadRoot;
  const std::string config = ReadAll(Folder("qv") + "/adapter_config.json");
  const std::string weights = ReadAll(Folder("qv") + "/adapter_model.safetensors");
  auto make = [&](const std::string& name, const std::string& c, const std::string& w) {
    fs::create_directories(root + "/" + name);
    if (!c.empty()) std::ofstream(root + "/" + name + "/adapter_config.json") << c;
    if (!w.empty()) {
      std::ofstream(root + "/" + name + "/adapter_model.safetensors", std::ios::binary) << w;
    }
  };
  std::string dora = config;
  if (size_t at = dora.find("\"use_dora\": false"); at != std::string::npos) {
    dora.replace(at, 17, "\"use_dora\": true");
  }
  make("json", "{\"r\": ", weights);
  make("missing", config, "");
  make("truncated", config, weights.substr(0, weights.size() - 100));
  make("dora", dora, weights);
  // q_proj's lora_A reads 48 features; stories260K has 64.
  make("shape", config,
       testing::SelfAttnSafetensors({{"q_proj.lora_A", {8, 48}},
                                     {"q_proj.lora_B", {64, 8}},
                                     {"v_proj.lora_A", {8, 64}},
                                     {"v_proj.lora_B", {32, 8}}}));
  // Rank 128, over the server's --max-lora-rank (64).
  std::string r128 = config;
  if (size_t at = r128.find("\"r\": 8"); at != std::string::npos) r128.replace(at, 6, "\"r\": 128");
  make("rank128", r128,
       testing::SelfAttnSafetensors({{"q_proj.lora_A", {128, 64}},
                                     {"q_proj.lora_B", {64, 128}},
                                     {"v_proj.lora_A", {128, 64}},
                                     {"v_proj.lora_B", {32, 128}}}));
}

// A well-formed upload of rank1 as "bad-up" but for its end: end 0 = no end message, -1 = one byte
// too few in model_bytes, 1 = right; extra_after_end adds a chunk after it.
grpc::Status Soak::UploadRaw(int end, bool extra_after_end) {
  grpc::ClientContext ctx;
  Authorize(&ctx, std::chrono::seconds(60));
  v1::AdapterInfo info;
  auto w = admin_->UploadAdapter(&ctx, &info);
  v1::UploadAdapterRequest m;
  m.mutable_header()->set_name("bad-up");
  bool open = w->Write(m);
  const std::string config = ReadAll(Folder("rank1") + "/adapter_config.json");
  const std::string weights = ReadAll(Folder("rank1") + "/adapter_model.safetensors");
  m.mutable_chunk()->set_file_name("adapter_config.json");
  m.mutable_chunk()->set_data(config);
  open = open && w->Write(m);
  m.mutable_chunk()->set_file_name("adapter_model.safetensors");
  m.mutable_chunk()->set_data(weights);
  open = open && w->Write(m);
  if (end != 0) {
    m.mutable_end()->set_config_bytes(static_cast<int64_t>(config.size()));
    m.mutable_end()->set_model_bytes(static_cast<int64_t>(weights.size()) + (end < 0 ? -1 : 0));
    open = open && w->Write(m);
  }
  if (extra_after_end) {
    m.mutable_chunk()->set_file_name("adapter_config.json");
    m.mutable_chunk()->set_data(" ");
    open = open && w->Write(m);
  }
  if (open) w->WritesDone();
  return w->Finish();
}

// One bad request of the table (docs/api.md, the protos' comments, docs/operations.md), i % size.
// Returns false when it got another code than documented.
bool Soak::RunBadCase(int i, Rng& rng) {
  using SC = StatusCode;
  struct GenCase {
    const char* what;
    std::function<void(v1::GenerateRequest*)> edit;
    SC want;
  };
  static const std::vector<GenCase> kGen = {
      {"unknown adapter", [](auto* r) { r->set_adapter("no-such-adapter"); }, SC::NOT_FOUND},
      {"unknown version", [](auto* r) { r->set_adapter("s0@999999"); }, SC::NOT_FOUND},
      {"malformed adapter spec (version not a number)", [](auto* r) { r->set_adapter("s0@abc"); },
       SC::INVALID_ARGUMENT},
      {"malformed adapter spec (version 0)", [](auto* r) { r->set_adapter("s0@0"); },
       SC::INVALID_ARGUMENT},
      {"malformed adapter spec (slash)", [](auto* r) { r->set_adapter("a/b"); },
       SC::INVALID_ARGUMENT},
      {"malformed adapter spec (200 characters)",
       [](auto* r) { r->set_adapter(std::string(200, 'x')); }, SC::INVALID_ARGUMENT},
      {"both prompt forms", [](auto* r) { r->set_prompt("both"); }, SC::INVALID_ARGUMENT},
      {"no prompt", [](auto* r) { r->clear_prompt_token_ids(); }, SC::INVALID_ARGUMENT},
      {"token id past the vocabulary", [](auto* r) { r->add_prompt_token_ids(100000); },
       SC::INVALID_ARGUMENT},
      {"negative token id", [](auto* r) { r->add_prompt_token_ids(-3); }, SC::INVALID_ARGUMENT},
      {"negative temperature", [](auto* r) { r->set_temperature(-1); }, SC::INVALID_ARGUMENT},
      {"NaN temperature", [](auto* r) { r->set_temperature(std::nanf("")); }, SC::INVALID_ARGUMENT},
      {"top_p 0", [](auto* r) { r->set_top_p(0); }, SC::INVALID_ARGUMENT},
      {"top_p > 1", [](auto* r) { r->set_top_p(1.01f); }, SC::INVALID_ARGUMENT},
      {"negative top_k", [](auto* r) { r->set_top_k(-1); }, SC::INVALID_ARGUMENT},
      {"logprobs 21", [](auto* r) { r->set_logprobs(21); }, SC::INVALID_ARGUMENT},
      {"negative logprobs", [](auto* r) { r->set_logprobs(-1); }, SC::INVALID_ARGUMENT},
      {"max_tokens 0", [](auto* r) { r->set_max_tokens(0); }, SC::INVALID_ARGUMENT},
      {"negative max_tokens", [](auto* r) { r->set_max_tokens(-5); }, SC::INVALID_ARGUMENT},
      {"max_tokens past the context", [](auto* r) { r->set_max_tokens(100000); },
       SC::RESOURCE_EXHAUSTED},
      {"prompt past the context",
       [](auto* r) {
         for (int k = 0; k < 5000; ++k) r->add_prompt_token_ids(1);
       },
       SC::RESOURCE_EXHAUSTED},
      {"bad chat role",
       [](auto* r) {
         r->clear_prompt_token_ids();
         auto* m = r->add_messages();
         m->set_role("wizard");
         m->set_content("hi");
       },
       SC::INVALID_ARGUMENT},
      {"bad token id and unknown adapter (fields first, no reload)",
       [](auto* r) {
         r->add_prompt_token_ids(9999);
         r->set_adapter("no-such-adapter");
       },
       SC::INVALID_ARGUMENT},
      {"bad token id on an evictable adapter",
       [](auto* r) {
         r->add_prompt_token_ids(-1);
         r->set_adapter("s1");
       },
       SC::INVALID_ARGUMENT},
  };
  struct AdminCase {
    const char* what;
    std::function<grpc::Status(Soak*, Rng&)> call;
    SC want;
  };
  static const std::vector<AdminCase> kAdmin = {
      {"LoadAdapter without a token",
       [](Soak* s, Rng&) { return s->Load("n", "qv", false, false, nullptr, ""); },
       SC::UNAUTHENTICATED},
      {"LoadAdapter with a wrong token",
       [](Soak* s, Rng&) { return s->Load("n", "qv", false, false, nullptr, "guess"); },
       SC::PERMISSION_DENIED},
      {"LoadAdapter malformed json",
       [](Soak* s, Rng&) { return s->Load("n", "soak-bad/json", false, false, nullptr); },
       SC::INVALID_ARGUMENT},
      {"LoadAdapter missing weights file",
       [](Soak* s, Rng&) { return s->Load("n", "soak-bad/missing", false, false, nullptr); },
       SC::NOT_FOUND},
      {"LoadAdapter no such folder",
       [](Soak* s, Rng&) { return s->Load("n", "soak-bad/none", false, false, nullptr); },
       SC::NOT_FOUND},
      {"LoadAdapter truncated safetensors",
       [](Soak* s, Rng&) { return s->Load("n", "soak-bad/truncated", false, false, nullptr); },
       SC::INVALID_ARGUMENT},
      {"LoadAdapter DoRA",
       [](Soak* s, Rng&) { return s->Load("n", "soak-bad/dora", false, false, nullptr); },
       SC::INVALID_ARGUMENT},
      {"LoadAdapter shapes that do not fit the base",
       [](Soak* s, Rng&) { return s->Load("n", "soak-bad/shape", false, false, nullptr); },
       SC::FAILED_PRECONDITION},
      {"LoadAdapter rank over --max-lora-rank",
       [](Soak* s, Rng&) { return s->Load("n", "soak-bad/rank128", false, false, nullptr); },
       SC::FAILED_PRECONDITION},
      {"LoadAdapter path traversal",
       [](Soak* s, Rng&) { return s->Load("n", "../../etc", false, false, nullptr); },
       SC::PERMISSION_DENIED},
      {"LoadAdapter name with a slash",
       [](Soak* s, Rng&) { return s->Load("a/b", "qv", false, false, nullptr); },
       SC::INVALID_ARGUMENT},
      {"LoadAdapter existing name without replace",
       [](Soak* s, Rng&) { return s->Load(kKeepName, "qv", false, false, nullptr); },
       SC::ALREADY_EXISTS},
      {"UploadAdapter wrong sha256",
       [](Soak* s, Rng& rng) {
         grpc::ClientContext ctx;
         s->Authorize(&ctx, std::chrono::seconds(60));
         v1::AdapterInfo info;
         auto w = s->admin_->UploadAdapter(&ctx, &info);
         v1::UploadAdapterRequest m;
         m.mutable_header()->set_name("bad-up");
         m.mutable_header()->set_sha256(std::string(64, 'a'));
         bool open = w->Write(m);
         int64_t sizes[2];
         int k = 0;
         for (const char* f : {"adapter_config.json", "adapter_model.safetensors"}) {
           m.mutable_chunk()->set_file_name(f);
           m.mutable_chunk()->set_data(ReadAll(s->Folder("rank1") + "/" + f));
           sizes[k++] = static_cast<int64_t>(m.chunk().data().size());
           open = open && w->Write(m);
         }
         m.mutable_end()->set_config_bytes(sizes[0]);
         m.mutable_end()->set_model_bytes(sizes[1]);
         if (open && w->Write(m)) w->WritesDone();
         return w->Finish();
       },
       SC::INVALID_ARGUMENT},
      {"UploadAdapter half-closed without the end message",
       [](Soak* s, Rng& rng) { return s->UploadRaw(/*end=*/0, /*extra_after_end=*/false); },
       SC::INVALID_ARGUMENT},
      {"UploadAdapter with a wrong byte count in the end message",
       [](Soak* s, Rng& rng) { return s->UploadRaw(/*end=*/-1, /*extra_after_end=*/false); },
       SC::INVALID_ARGUMENT},
      {"UploadAdapter with a chunk after the end message",
       [](Soak* s, Rng& rng) { return s->UploadRaw(/*end=*/1, /*extra_after_end=*/true); },
       SC::INVALID_ARGUMENT},
      {"UploadAdapter over --max-adapter-bytes",
       [](Soak* s, Rng&) {
         grpc::ClientContext ctx;
         s->Authorize(&ctx, std::chrono::seconds(60));
         v1::AdapterInfo info;
         auto w = s->admin_->UploadAdapter(&ctx, &info);
         v1::UploadAdapterRequest m;
         m.mutable_header()->set_name("bad-up");
         bool open = w->Write(m);
         m.mutable_chunk()->set_file_name("adapter_model.safetensors");
         m.mutable_chunk()->set_data(std::string(64 << 10, 'z'));
         for (int64_t sent = 0; open && sent <= s->o_.upload_limit + (64 << 10); sent += 64 << 10) {
           open = w->Write(m);
         }
         if (open) w->WritesDone();
         return w->Finish();
       },
       SC::RESOURCE_EXHAUSTED},
      {"UploadAdapter chunk before the header",
       [](Soak* s, Rng&) {
         grpc::ClientContext ctx;
         s->Authorize(&ctx, std::chrono::seconds(60));
         v1::AdapterInfo info;
         auto w = s->admin_->UploadAdapter(&ctx, &info);
         v1::UploadAdapterRequest m;
         m.mutable_chunk()->set_file_name("adapter_config.json");
         m.mutable_chunk()->set_data("{}");
         if (w->Write(m)) w->WritesDone();
         return w->Finish();
       },
       SC::INVALID_ARGUMENT},
      {"UploadAdapter unknown file name",
       [](Soak* s, Rng&) {
         grpc::ClientContext ctx;
         s->Authorize(&ctx, std::chrono::seconds(60));
         v1::AdapterInfo info;
         auto w = s->admin_->UploadAdapter(&ctx, &info);
         v1::UploadAdapterRequest m;
         m.mutable_header()->set_name("bad-up");
         bool open = w->Write(m);
         m.mutable_chunk()->set_file_name("../evil.bin");
         m.mutable_chunk()->set_data("x");
         if (open && w->Write(m)) w->WritesDone();
         return w->Finish();
       },
       SC::INVALID_ARGUMENT},
      {"UploadAdapter with two headers",
       [](Soak* s, Rng&) {
         grpc::ClientContext ctx;
         s->Authorize(&ctx, std::chrono::seconds(60));
         v1::AdapterInfo info;
         auto w = s->admin_->UploadAdapter(&ctx, &info);
         v1::UploadAdapterRequest m;
         m.mutable_header()->set_name("bad-up");
         if (w->Write(m) && w->Write(m)) w->WritesDone();
         return w->Finish();
       },
       SC::INVALID_ARGUMENT},
      {"UploadAdapter empty stream",
       [](Soak* s, Rng&) {
         grpc::ClientContext ctx;
         s->Authorize(&ctx, std::chrono::seconds(60));
         v1::AdapterInfo info;
         auto w = s->admin_->UploadAdapter(&ctx, &info);
         w->WritesDone();
         return w->Finish();
       },
       SC::INVALID_ARGUMENT},
      {"UploadAdapter without a token",
       [](Soak* s, Rng&) {
         grpc::ClientContext ctx;
         ctx.set_deadline(In(std::chrono::seconds(60)));
         v1::AdapterInfo info;
         auto w = s->admin_->UploadAdapter(&ctx, &info);
         v1::UploadAdapterRequest m;
         m.mutable_header()->set_name("bad-up");
         if (w->Write(m)) w->WritesDone();
         return w->Finish();
       },
       SC::UNAUTHENTICATED},
      {"UnloadAdapter unknown name", [](Soak* s, Rng&) { return s->Unload("no-such-adapter"); },
       SC::NOT_FOUND},
      {"UnloadAdapter malformed name", [](Soak* s, Rng&) { return s->Unload("a b"); },
       SC::INVALID_ARGUMENT},
      {"GetAdapter unknown name",
       [](Soak* s, Rng&) {
         v1::AdapterInfo info;
         return s->GetAdapter(*s->admin_, "no-such-adapter", &info);
       },
       SC::NOT_FOUND},
      {"GetAdapter malformed spec",
       [](Soak* s, Rng&) {
         v1::AdapterInfo info;
         return s->GetAdapter(*s->admin_, "s0@abc", &info);
       },
       SC::INVALID_ARGUMENT},
      {"SetAdapterMode unspecified mode",
       [](Soak* s, Rng&) {
         v1::AdapterInfo info;
         return s->SetMode(kKeepName, v1::ADAPTER_MODE_UNSPECIFIED, &info);
       },
       SC::INVALID_ARGUMENT},
      {"SetAdapterMode unknown adapter",
       [](Soak* s, Rng&) {
         v1::AdapterInfo info;
         return s->SetMode("no-such-adapter", v1::MERGED, &info);
       },
       SC::NOT_FOUND},
      {"ListAdapters without a token",
       [](Soak* s, Rng&) {
         grpc::ClientContext ctx;
         ctx.set_deadline(In(std::chrono::seconds(30)));
         v1::ListAdaptersResponse resp;
         return s->admin_->ListAdapters(&ctx, {}, &resp);
       },
       SC::UNAUTHENTICATED},
      {"Detokenize a token id past the vocabulary",
       [](Soak* s, Rng&) {
         grpc::ClientContext ctx;
         ctx.set_deadline(In(std::chrono::seconds(30)));
         v1::DetokenizeRequest req;
         req.add_token_ids(1);
         req.add_token_ids(512);
         v1::DetokenizeResponse resp;
         return s->inference_->Detokenize(&ctx, req, &resp);
       },
       SC::INVALID_ARGUMENT},
  };
  const int total = static_cast<int>(kGen.size() + kAdmin.size());
  i %= total;
  std::string what;
  grpc::Status st;
  SC want;
  bool streamed_messages = false;
  if (i < static_cast<int>(kGen.size())) {
    const GenCase& c = kGen[i];
    v1::GenerateRequest req = IdsRequest({1, 5}, 8);
    c.edit(&req);
    grpc::ClientContext ctx;
    ctx.set_deadline(In(std::chrono::seconds(60)));
    v1::GenerateResponse resp;
    if (Chance(rng, 0.5)) {
      what = absl::StrCat(c.what, " (Generate)");
      auto reader = inference_->Generate(&ctx, req);
      while (reader->Read(&resp)) streamed_messages = true;
      st = reader->Finish();
    } else {
      what = absl::StrCat(c.what, " (Complete)");
      st = inference_->Complete(&ctx, req, &resp);
    }
    want = c.want;
  } else {
    const AdminCase& c = kAdmin[i - kGen.size()];
    what = c.what;
    st = c.call(this, rng);
    want = c.want;
  }
  Outcome("bad requests", st,
          {want, StatusCode::OK, StatusCode::CANCELLED, StatusCode::INVALID_ARGUMENT,
           StatusCode::NOT_FOUND, StatusCode::ALREADY_EXISTS, StatusCode::PERMISSION_DENIED,
           StatusCode::RESOURCE_EXHAUSTED, StatusCode::FAILED_PRECONDITION,
           StatusCode::UNAUTHENTICATED, StatusCode::UNIMPLEMENTED});
  const bool good = st.error_code() == want && !st.error_message().empty() && !streamed_messages &&
                    st.error_message().find(o_.admin_token.empty() ? "\x01" : o_.admin_token) ==
                        std::string::npos;
  if (!good) {
    Violation("bad", absl::StrCat(what, ": got ", CodeName(st.error_code()), " \"",
                                  st.error_message(), "\", documented ", CodeName(want),
                                  streamed_messages ? " (and it streamed messages)" : ""));
  }
  Count("bad requests sent");
  return good;
}

void Soak::BadLoop(Clock::time_point end) {
  Rng rng(o_.seed * 1000003 + 300 + 7919 * phase_seq_.load());
  for (int n = 0; n < 100000 && Clock::now() < end && !server_gone_; ++n) {
    RunBadCase(Uniform(rng, 0, 1 << 20), rng);
    SleepMs(Uniform(rng, 5, 60));
  }
}

}  // namespace loraplex::soak
