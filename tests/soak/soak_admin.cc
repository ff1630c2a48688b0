// The admin side of loraplex-soak (members of Soak, see soak.h): the admin calls (LoadAdapter,
// UploadAdapter, possibly cancelled at a chosen point, UnloadAdapter, SetAdapterMode, GetAdapter)
// and the two admin churn threads: registrations/replacements/uploads/unloads, and
// merges/unmerges; and the check that cancelled uploads never appear.
#include <chrono>
#include <cstdint>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "loraplex/v1/adapters.grpc.pb.h"
#include "tests/soak/soak.h"
#include "tests/soak/soak_mix.h"
#include "tests/soak/soak_util.h"

namespace loraplex::soak {

grpc::Status Soak::Load(const std::string& name, const std::string& path, bool replace, bool pin,
                        v1::AdapterInfo* info, const std::string& token_override) {
  grpc::ClientContext ctx;
  ctx.set_deadline(In(std::chrono::seconds(120)));
  const std::string token = token_override == "-" ? o_.admin_token : token_override;
  if (!token.empty()) ctx.AddMetadata("authorization", "Bearer " + token);
  v1::LoadAdapterRequest req;
  req.set_name(name);
  req.set_path(path);
  req.set_replace(replace);
  req.set_pin(pin);
  v1::AdapterInfo local;
  return admin_->LoadAdapter(&ctx, req, info != nullptr ? info : &local);
}

grpc::Status Soak::Upload(v1::Adapters::Stub& stub, const std::string& name, const std::string& dir,
                          bool replace, bool sha, Cut cut, Rng& rng, v1::AdapterInfo* info) {
  grpc::ClientContext ctx;
  Authorize(&ctx, std::chrono::seconds(120));
  v1::AdapterInfo local;
  auto writer = stub.UploadAdapter(&ctx, info != nullptr ? info : &local);
  const std::string config = ReadAll(dir + "/adapter_config.json");
  const std::string weights = ReadAll(dir + "/adapter_model.safetensors");
  v1::UploadAdapterRequest header;
  header.mutable_header()->set_name(name);
  header.mutable_header()->set_replace(replace);
  // With a sha256 the server checks what it received against it; without, it only hashes.
  if (sha) header.mutable_header()->set_sha256(Sha256Hex(weights));
  bool open = writer->Write(header);
  std::vector<std::pair<std::string, std::string>> chunks;
  for (const auto& [file, data] :
       {std::make_pair(std::string("adapter_config.json"), &config),
        std::make_pair(std::string("adapter_model.safetensors"), &weights)}) {
    for (size_t at = 0; at < data->size(); at += 8192)
      chunks.emplace_back(file, data->substr(at, 8192));
  }
  size_t stop = chunks.size();
  if (cut == Cut::kAfterHeader) stop = 0;
  if (cut == Cut::kMidStream) stop = Uniform(rng, 1, static_cast<int>(chunks.size()) - 1);
  for (size_t i = 0; i < stop && open; ++i) {
    v1::UploadAdapterRequest m;
    m.mutable_chunk()->set_file_name(chunks[i].first);
    m.mutable_chunk()->set_data(chunks[i].second);
    open = writer->Write(m);
  }
  if (open && (cut == Cut::kNone || cut == Cut::kAfterEnd)) {
    v1::UploadAdapterRequest m;
    m.mutable_end()->set_config_bytes(static_cast<int64_t>(config.size()));
    m.mutable_end()->set_model_bytes(static_cast<int64_t>(weights.size()));
    open = writer->Write(m);
  }
  if (cut != Cut::kNone) {
    // Let the server read what was sent (at most everything but the half-close), then cancel:
    // the upload must be discarded, never committed.
    SleepMs(Uniform(rng, 0, 200));
    ctx.TryCancel();
    return writer->Finish();
  }
  writer->WritesDone();
  return writer->Finish();
}

grpc::Status Soak::Unload(const std::string& name) {
  grpc::ClientContext ctx;
  Authorize(&ctx, std::chrono::seconds(120));
  v1::UnloadAdapterRequest req;
  req.set_name(name);
  v1::UnloadAdapterResponse resp;
  return admin_->UnloadAdapter(&ctx, req, &resp);
}

grpc::Status Soak::SetMode(const std::string& name, v1::AdapterMode mode, v1::AdapterInfo* info) {
  grpc::ClientContext ctx;
  Authorize(&ctx, std::chrono::seconds(120));
  v1::SetAdapterModeRequest req;
  req.set_name(name);
  req.set_mode(mode);
  return admin_->SetAdapterMode(&ctx, req, info);
}

grpc::Status Soak::GetAdapter(v1::Adapters::Stub& stub, const std::string& name,
                              v1::AdapterInfo* info, std::chrono::milliseconds deadline) {
  grpc::ClientContext ctx;
  Authorize(&ctx, deadline);
  v1::GetAdapterRequest req;
  req.set_name(name);
  return stub.GetAdapter(&ctx, req, info);
}

// Registrations, replacements, uploads (some cancelled), unloads and re-registrations of the churn
// names; the only thread that registers them, so published_ is exact.
void Soak::RegistrationLoop(Clock::time_point end) {
  Rng rng(o_.seed * 1000003 + 400 + 7919 * phase_seq_.load());
  auto stub = v1::Adapters::NewStub(NewChannel(o_.server));
  for (int n = 0; n < 100000 && Clock::now() < end && !server_gone_; ++n) {
    CheckCancelledUploads(false);
    const int i = Uniform(rng, 0, static_cast<int>(kChurnNames.size()) - 1);
    const std::string& name = kChurnNames[i];
    const std::string folder = Pick(rng, kChurnFolders);
    const bool registered = published_[i].load() > 0;
    const int op = Uniform(rng, 0, 99);
    const Clock::time_point t0 = Clock::now();
    std::string what;
    v1::AdapterInfo info;
    if (op < 25) {  // LoadAdapter, replace
      what = absl::StrCat("LoadAdapter ", name, " <- ", folder);
      grpc::Status st = Load(name, folder, true, false, &info);
      Outcome("admin LoadAdapter", st, {StatusCode::OK}, what);
      if (st.ok()) {
        Registered(name, info.version(), folder);
        published_[i] = info.version();
        Count(registered ? "swaps (replace=true on a registered name)" : "registrations");
      }
    } else if (op < 45) {  // UploadAdapter, replace
      what = absl::StrCat("UploadAdapter ", name, " <- ", folder);
      grpc::Status st =
          Upload(*stub, name, Folder(folder), true, Chance(rng, 0.5), Cut::kNone, rng, &info);
      Outcome("admin UploadAdapter", st, {StatusCode::OK}, what);
      if (st.ok()) {
        Registered(name, info.version(), folder);
        published_[i] = info.version();
        Count("uploads committed");
        Count(registered ? "swaps (replace=true on a registered name)" : "registrations");
      }
    } else if (op <
               70) {  // an upload cancelled after the header, mid-stream or after the last chunk
      const int c = Uniform(rng, 0, 9);
      const Cut cut = c < 2   ? Cut::kAfterHeader
                      : c < 4 ? Cut::kMidStream
                      : c < 7 ? Cut::kAfterLastChunk
                              : Cut::kAfterEnd;
      const char* cut_name = c < 2   ? "after the header"
                             : c < 4 ? "mid-stream"
                             : c < 7 ? "after the last chunk"
                                     : "after the end message";
      // Mostly to a fresh name (its appearance is the evidence), sometimes over a churn name (an
      // unexpected version then shows in the greedy and registry checks).
      // A cancel after the end message races with the commit the end message asked for (as for
      // any call cancelled after the server has all of it): the server discards the upload when
      // it sees the cancel before the manifest's rename, else the version is registered, whole.
      // So those go to fresh names, whose registration is not held against the server.
      const bool fresh = cut == Cut::kAfterEnd || Chance(rng, 0.7);
      const std::string target =
          fresh ? absl::StrCat("cx-", cancelled_upload_seq_.fetch_add(1)) : name;
      what = absl::StrCat("cancelled UploadAdapter ", target, " <- ", folder, " ", cut_name);
      grpc::Status st =
          Upload(*stub, target, Folder(folder), true, Chance(rng, 0.5), cut, rng, &info);
      Outcome("admin UploadAdapter cancelled", st, {StatusCode::CANCELLED}, what);
      Count(absl::StrCat("uploads cancelled ", cut_name));
      if (fresh && cut != Cut::kAfterEnd) {
        std::lock_guard<std::mutex> lock(mu_);
        cancelled_uploads_[target] = Clock::now();
      }
    } else if (op < 85) {  // unload, or re-register an unloaded name
      if (registered) {
        what = absl::StrCat("UnloadAdapter ", name);
        grpc::Status st = Unload(name);
        Outcome("admin UnloadAdapter", st, {StatusCode::OK}, what);
        if (st.ok()) {
          published_[i] = 0;
          Count("unloads");
        }
      } else {
        what = absl::StrCat("LoadAdapter (re-register) ", name, " <- ", folder);
        grpc::Status st = Load(name, folder, /*replace=*/false, false, &info);
        Outcome("admin LoadAdapter", st, {StatusCode::OK}, what);
        if (st.ok()) {
          Registered(name, info.version(), folder);
          published_[i] = info.version();
          Count("re-registrations");
        }
      }
    } else {  // GetAdapter agrees with what this thread did last
      what = absl::StrCat("GetAdapter ", name);
      grpc::Status st = GetAdapter(*stub, name, &info);
      Outcome("admin GetAdapter", st, {StatusCode::OK, StatusCode::NOT_FOUND}, what);
      const int64_t seen = st.ok() ? info.version() : 0;
      if ((st.ok() || st.error_code() == StatusCode::NOT_FOUND) && seen != published_[i].load()) {
        Violation("registry", absl::StrCat("GetAdapter ", name, " says v", seen,
                                           ", this thread's last call left v", published_[i].load(),
                                           " (0 = unloaded)"));
      }
    }
    const double took = SecondsSince(t0);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (took > worst_admin_s_) worst_admin_s_ = took, worst_admin_what_ = what;
    }
    SleepMs(Uniform(rng, 20, 250));
  }
}

// Cancelled uploads to fresh names must never appear: 1.5 s after the cancel (a wrongly started
// commit has finished by then) and at the end.
void Soak::CheckCancelledUploads(bool final_check) {
  std::vector<std::string> due;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = cancelled_uploads_.begin(); it != cancelled_uploads_.end();) {
      if (final_check || SecondsSince(it->second) > 1.5) {
        due.push_back(it->first);
        it = cancelled_uploads_.erase(it);
      } else {
        ++it;
      }
    }
  }
  for (const std::string& name : due) {
    v1::AdapterInfo info;
    grpc::Status st = GetAdapter(*admin_, name, &info);
    if (st.ok()) {
      Violation("uploads", absl::StrCat("cancelled upload ", name, " was committed: v",
                                        info.version(), " ", v1::AdapterState_Name(info.state())));
      Count("cancelled uploads committed (bug)");
      Unload(name);  // keep the registry small; the violation stays
    } else if (st.error_code() != StatusCode::NOT_FOUND) {
      Outcome("admin GetAdapter", st, {StatusCode::NOT_FOUND}, name);
    }
  }
}

void Soak::MergeLoop(Clock::time_point end) {
  Rng rng(o_.seed * 1000003 + 500 + 7919 * phase_seq_.load());
  std::string merged;
  for (int n = 0; n < 100000 && Clock::now() < end && !server_gone_; ++n) {
    const Clock::time_point t0 = Clock::now();
    std::string what;
    v1::AdapterInfo info;
    if (merged.empty() || Chance(rng, 0.2)) {
      std::vector<std::string> names = kChurnNames;
      names.push_back(kKeepName);
      std::string name = Pick(rng, names);
      if (Chance(rng, 0.6)) {
        // Prefer an adapter evicted to disk: merging it must bring it back first, which waits
        // for a slot while every slot is leased.
        grpc::ClientContext ctx;
        Authorize(&ctx, std::chrono::seconds(30));
        v1::ListAdaptersResponse list;
        if (admin_->ListAdapters(&ctx, {}, &list).ok()) {
          std::vector<std::string> on_disk;
          for (const v1::AdapterInfo& a : list.adapters()) {
            if (a.residency() == v1::DISK && a.name().rfind("cx-", 0) != 0) {
              on_disk.push_back(a.name());
            }
          }
          if (!on_disk.empty()) name = Pick(rng, on_disk);
        }
      }
      what = absl::StrCat("SetAdapterMode ", name, " MERGED");
      grpc::Status st = SetMode(name, v1::MERGED, &info);
      // FAILED_PRECONDITION: another one is merged; NOT_FOUND: unloaded; ABORTED: replaced while
      // its merge waited for it to come back from disk; RESOURCE_EXHAUSTED: it could not be
      // brought into memory (every slot in use for 60 s).
      Outcome("admin SetAdapterMode MERGED", st,
              {StatusCode::OK, StatusCode::FAILED_PRECONDITION, StatusCode::NOT_FOUND,
               StatusCode::ABORTED, StatusCode::RESOURCE_EXHAUSTED},
              what);
      if (st.ok()) {
        Count("merges");
        if (!info.merged()) Violation("codes", what + ": OK but AdapterInfo.merged is false");
        merged = name;
      }
    } else {
      what = absl::StrCat("SetAdapterMode ", merged, " UNMERGED");
      grpc::Status st = SetMode(merged, v1::UNMERGED, &info);
      Outcome("admin SetAdapterMode UNMERGED", st, {StatusCode::OK, StatusCode::NOT_FOUND}, what);
      if (st.ok()) {
        Count("unmerges");
        if (info.merged()) Violation("codes", what + ": OK but AdapterInfo.merged is true");
      }
      merged.clear();
    }
    const double took = SecondsSince(t0);
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (took > worst_admin_s_) worst_admin_s_ = took, worst_admin_what_ = what;
    }
    SleepMs(Uniform(rng, 100, 600));
  }
}

}  // namespace loraplex::soak
