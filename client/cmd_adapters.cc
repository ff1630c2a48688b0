// `loraplex adapters list|get|load|upload|unload|merge|unmerge|inspect` over the Adapters admin
// service.
#include <iostream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "client/adapter_files.h"
#include "client/adapter_inspect.h"
#include "client/commands.h"
#include "client/format.h"
#include "client/rpc.h"
#include "loraplex/v1/adapters.grpc.pb.h"

namespace loraplex::client {
namespace {

constexpr const char* kSynopsis =
    "list | get NAME | load NAME PATH | upload NAME DIR [--max-rank R] | unload NAME | merge NAME "
    "| "
    "unmerge NAME | inspect NAME [--against NAME2] [--out DIR]   [flags]";

std::string StateName(v1::AdapterState s) {
  std::string n = v1::AdapterState_Name(s);
  return n == "ADAPTER_STATE_UNSPECIFIED" ? "-" : n;
}
std::string ResidencyName(v1::Residency r) {
  std::string n = v1::Residency_Name(r);
  return n == "RESIDENCY_UNSPECIFIED" ? "-" : n;
}

std::string Modules(const v1::AdapterInfo& a) {
  return a.target_modules().empty() ? "-" : absl::StrJoin(a.target_modules(), ",");
}

void PrintList(const v1::ListAdaptersResponse& resp) {
  if (resp.adapters().empty()) {
    std::cout << "no adapters loaded\n";
    return;
  }
  std::vector<std::vector<std::string>> rows = {{"NAME", "VERSION", "STATE", "RANK", "ALPHA",
                                                 "MODULES", "RESIDENCY", "MERGED", "PINNED",
                                                 "REQUESTS", "SIZE"}};
  for (const auto& a : resp.adapters()) {
    rows.push_back(
        {a.name(), absl::StrCat(a.version()), StateName(a.state()), absl::StrCat(a.rank()),
         Num(a.alpha()), Modules(a), ResidencyName(a.residency()),
         a.merged() ? (a.auto_merged() ? "auto" : "yes") : "no", a.pinned() ? "yes" : "no",
         absl::StrCat(a.requests_served()), HumanBytes(a.bytes())});
  }
  std::cout << FormatTable(rows);
}

void PrintInfo(const v1::AdapterInfo& a) {
  std::vector<std::vector<std::string>> rows = {
      {"name", a.name()},
      {"version", absl::StrCat(a.version())},
      {"state", StateName(a.state())},
      {"rank", absl::StrCat(a.rank())},
      {"alpha", Num(a.alpha())},
      {"dora", a.dora() ? "yes" : "no"},
      {"target modules", Modules(a)},
      {"size", HumanBytes(a.bytes())},
      {"residency", ResidencyName(a.residency())},
      {"merged", a.merged() ? (a.auto_merged() ? "yes (by the merge policy)" : "yes") : "no"},
      {"pinned", a.pinned() ? "yes" : "no"},
      {"requests served", absl::StrCat(a.requests_served())},
      {"last used (unix ms)", a.last_used_unix_ms() ? absl::StrCat(a.last_used_unix_ms()) : "-"},
      {"sha256", a.sha256().empty() ? "-" : a.sha256()},
      {"path", a.path().empty() ? "-" : a.path()},
  };
  for (const auto& [module, rank] : a.ranks()) {
    rows.push_back({absl::StrCat("rank of ", module), absl::StrCat(rank)});
  }
  if (a.has_compression()) {
    const v1::Compression& c = a.compression();
    const v1::ModuleCompression* worst = nullptr;
    int truncated = 0;
    for (const v1::ModuleCompression& m : c.modules()) {
      if (m.rank() < m.trained_rank()) ++truncated;
      if (worst == nullptr || m.relative_error() > worst->relative_error()) worst = &m;
    }
    rows.push_back({"compressed", absl::StrCat("max rank ", c.max_rank(), " (trained rank ",
                                               c.trained_rank(), "), ", truncated, " of ",
                                               c.modules_size(), " modules truncated")});
    rows.push_back({"relative error", Num(c.relative_error(), 4)});
    if (worst != nullptr) {
      rows.push_back({"largest module error",
                      absl::StrCat(Num(worst->relative_error(), 4), " (", worst->module(), ")")});
    }
  }
  std::cout << FormatTable(rows);
}

std::string Compressed(const v1::AdapterInfo& a) {
  if (!a.has_compression()) return "";
  return absl::StrCat(" compressed from ", a.compression().trained_rank(), ", relative error ",
                      Num(a.compression().relative_error(), 4));
}

}  // namespace

int RunAdapters(const std::vector<std::string>& args) {
  ArgParser p("loraplex adapters", kSynopsis);
  ConnectionOptions conn;
  bool replace = false, pin = false;
  int64_t chunk_kib = 1024, max_rank = 0;
  AddConnectionFlags(p, conn);
  p.AddBool("replace", &replace, "load/upload: replace an adapter of that name (version N+1)");
  p.AddBool("pin", &pin, "load/upload: never evict this adapter");
  p.AddInt("chunk-kib", &chunk_kib, "upload: chunk size in KiB");
  p.AddInt("max-rank", &max_rank,
           "load/upload: serve it compressed to this rank (truncated SVD of each module's "
           "update; 0 = as trained)");
  std::string against, out_dir;
  p.AddString("against", &against,
              "inspect: a second adapter (name or name@version) to compare subspaces with");
  p.AddString("out", &out_dir, "inspect: also write the singular value spectra as DIR/layer-N.svg");
  auto pos = p.Parse(args);
  if (!pos.ok()) {
    std::cerr << "loraplex adapters: " << pos.status().message() << "\n";
    return kExitUsage;
  }
  if (p.help_requested()) {
    std::cout << p.Usage();
    return kExitOk;
  }
  const std::vector<std::string>& a = *pos;
  const std::string verb = a.empty() ? "" : a[0];
  const size_t want = verb == "list" ? 1 : (verb == "load" || verb == "upload") ? 3 : 2;
  const bool known = verb == "list" || verb == "get" || verb == "load" || verb == "upload" ||
                     verb == "unload" || verb == "merge" || verb == "unmerge" || verb == "inspect";
  if (!known || a.size() != want) {
    std::cerr << "loraplex adapters: "
              << (known          ? absl::StrCat("'", verb, "' takes ", want - 1, " argument(s)")
                  : verb.empty() ? std::string("which one?")
                                 : absl::StrCat("unknown subcommand '", verb, "'"))
              << "; usage: loraplex adapters " << kSynopsis << "\n";
    return kExitUsage;
  }
  auto channel = MakeChannel(conn);
  if (!channel.ok()) {
    std::cerr << "loraplex adapters: " << channel.status().message() << "\n";
    return kExitUsage;
  }
  auto stub = v1::Adapters::NewStub(*channel);
  const std::string what = absl::StrJoin(a.begin(), a.begin() + std::min<size_t>(a.size(), 2), " ");
  grpc::ClientContext ctx;
  PrepareContext(ctx, conn, 60);
  if (verb != "list") SetRoutingAdapter(ctx, a[1]);
  grpc::Status st;
  v1::AdapterInfo info;
  if (verb == "list") {
    v1::ListAdaptersResponse resp;
    st = stub->ListAdapters(&ctx, v1::ListAdaptersRequest(), &resp);
    if (!st.ok()) return ReportError(st, "adapters list", conn);
    if (conn.json) {
      std::cout << ProtoToJson(resp)["adapters"].dump(2) << "\n";
    } else {
      PrintList(resp);
    }
    return kExitOk;
  }
  if (verb == "inspect") {
    v1::InspectAdapterRequest req;
    req.set_name(a[1]);
    req.set_against(against);
    v1::InspectAdapterResponse resp;
    st = stub->InspectAdapter(&ctx, req, &resp);
    if (!st.ok()) return ReportError(st, absl::StrCat("adapters ", what), conn);
    if (!out_dir.empty()) {
      if (absl::Status w = WriteSpectraSvg(resp, out_dir); !w.ok()) {
        std::cerr << "loraplex adapters inspect: " << w.message() << "\n";
        return kExitFailed;
      }
    }
    if (conn.json) {
      std::cout << InspectionJson(resp).dump(2) << "\n";
    } else {
      std::cout << InspectionTable(resp);
      if (!out_dir.empty()) std::cout << "spectra: " << out_dir << "/layer-*.svg\n";
    }
    return kExitOk;
  }
  if (verb == "get") {
    v1::GetAdapterRequest req;
    req.set_name(a[1]);
    st = stub->GetAdapter(&ctx, req, &info);
  } else if (verb == "load") {
    v1::LoadAdapterRequest req;
    req.set_name(a[1]);
    req.set_path(a[2]);
    req.set_replace(replace);
    req.set_pin(pin);
    req.set_max_rank(static_cast<int32_t>(max_rank));
    st = stub->LoadAdapter(&ctx, req, &info);
  } else if (verb == "upload") {
    auto files = ReadPeftDir(a[2]);
    if (!files.ok()) {
      std::cerr << "loraplex adapters upload: " << files.status().message() << "\n";
      return kExitUsage;
    }
    if (absl::Status v =
            ValidateSafetensors(files->safetensors, a[2] + "/adapter_model.safetensors");
        !v.ok()) {
      std::cerr << "loraplex adapters upload: " << v.message() << "\n";
      return kExitUsage;
    }
    st = UploadPeft(*stub, conn, a[1], *files, replace, pin, chunk_kib * 1024, &info, max_rank);
  } else if (verb == "unload") {
    v1::UnloadAdapterRequest req;
    req.set_name(a[1]);
    v1::UnloadAdapterResponse resp;
    st = stub->UnloadAdapter(&ctx, req, &resp);
    info = resp.adapter();
  } else {  // merge, unmerge
    v1::SetAdapterModeRequest req;
    req.set_name(a[1]);
    req.set_mode(verb == "merge" ? v1::MERGED : v1::UNMERGED);
    st = stub->SetAdapterMode(&ctx, req, &info);
  }
  if (!st.ok()) return ReportError(st, absl::StrCat("adapters ", what), conn);
  if (conn.json) {
    std::cout << ProtoToJson(info).dump(2) << "\n";
    return kExitOk;
  }
  if (verb == "get") {
    PrintInfo(info);
  } else {
    const std::string done = verb == "load"     ? "loaded"
                             : verb == "upload" ? "uploaded"
                             : verb == "unload" ? "unloaded"
                             : verb == "merge"  ? "merged"
                                                : "unmerged";
    std::cout << done << " " << (info.name().empty() ? a[1] : info.name()) << " version "
              << info.version() << " (" << StateName(info.state()) << ", rank " << info.rank()
              << Compressed(info) << ", " << HumanBytes(info.bytes()) << ")\n";
  }
  return kExitOk;
}

}  // namespace loraplex::client
