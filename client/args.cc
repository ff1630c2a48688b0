#include "client/args.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace loraplex::client {
namespace {

std::string Normalize(std::string name) {
  std::replace(name.begin(), name.end(), '_', '-');
  return name;
}

}  // namespace

ArgParser::ArgParser(std::string command, std::string synopsis)
    : command_(std::move(command)), synopsis_(std::move(synopsis)) {}

void ArgParser::AddString(const std::string& name, std::string* out, const std::string& help) {
  flags_.push_back({name, Kind::kString, out, help});
}
void ArgParser::AddInt(const std::string& name, int64_t* out, const std::string& help) {
  flags_.push_back({name, Kind::kInt, out, help});
}
void ArgParser::AddDouble(const std::string& name, double* out, const std::string& help) {
  flags_.push_back({name, Kind::kDouble, out, help});
}
void ArgParser::AddBool(const std::string& name, bool* out, const std::string& help) {
  flags_.push_back({name, Kind::kBool, out, help});
}
void ArgParser::AddList(const std::string& name, std::vector<std::string>* out,
                        const std::string& help, bool split_commas) {
  flags_.push_back({name, Kind::kList, out, help, split_commas});
}

const ArgParser::Flag* ArgParser::Find(const std::string& name) const {
  for (const Flag& f : flags_) {
    if (f.name == name) return &f;
  }
  return nullptr;
}

absl::Status ArgParser::Set(const Flag& flag, const std::string& value) const {
  auto bad = [&](const char* what) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag.name, " wants ", what, ", got '", value, "'"));
  };
  switch (flag.kind) {
    case Kind::kString:
      *static_cast<std::string*>(flag.out) = value;
      return absl::OkStatus();
    case Kind::kInt: {
      int64_t v = 0;
      if (!absl::SimpleAtoi(value, &v)) return bad("an integer");
      *static_cast<int64_t*>(flag.out) = v;
      return absl::OkStatus();
    }
    case Kind::kDouble: {
      double v = 0;
      if (!absl::SimpleAtod(value, &v) || !std::isfinite(v)) return bad("a number");
      *static_cast<double*>(flag.out) = v;
      return absl::OkStatus();
    }
    case Kind::kBool: {
      bool v = false;
      if (!absl::SimpleAtob(value, &v)) return bad("true or false");
      *static_cast<bool*>(flag.out) = v;
      return absl::OkStatus();
    }
    case Kind::kList: {
      auto* list = static_cast<std::vector<std::string>*>(flag.out);
      if (flag.split_commas) {
        for (absl::string_view part : absl::StrSplit(value, ',', absl::SkipEmpty())) {
          list->emplace_back(part);
        }
      } else {
        list->push_back(value);
      }
      return absl::OkStatus();
    }
  }
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::string>> ArgParser::Parse(const std::vector<std::string>& args) {
  std::vector<std::string> positional;
  for (size_t i = 0; i < args.size(); ++i) {
    const std::string& arg = args[i];
    if (arg == "--") {
      positional.insert(positional.end(), args.begin() + i + 1, args.end());
      break;
    }
    if (arg == "--help" || arg == "-h") {
      help_requested_ = true;
      return positional;
    }
    if (arg.size() < 3 || arg.rfind("--", 0) != 0) {
      positional.push_back(arg);  // includes "-" (stdin) and negative numbers as positionals
      continue;
    }
    std::string name = arg.substr(2);
    std::string value;
    bool has_value = false;
    if (size_t eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name = name.substr(0, eq);
      has_value = true;
    }
    name = Normalize(name);
    const Flag* flag = Find(name);
    if (flag == nullptr && !has_value && name.rfind("no-", 0) == 0) {
      const Flag* negated = Find(name.substr(3));
      if (negated != nullptr && negated->kind == Kind::kBool) {
        *static_cast<bool*>(negated->out) = false;
        continue;
      }
    }
    if (flag == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("unknown flag --", name, " for '", command_, "' (see --help)"));
    }
    if (!has_value) {
      if (flag->kind == Kind::kBool) {
        *static_cast<bool*>(flag->out) = true;
        continue;
      }
      if (i + 1 >= args.size()) {
        return absl::InvalidArgumentError(absl::StrCat("--", name, " needs a value"));
      }
      value = args[++i];
    }
    if (absl::Status s = Set(*flag, value); !s.ok()) return s;
  }
  return positional;
}

std::string ArgParser::Usage() const {
  std::string out = absl::StrCat("usage: ", command_, " ", synopsis_, "\n\nflags:\n");
  for (const Flag& f : flags_) {
    std::string left = absl::StrCat("  --", f.name);
    switch (f.kind) {
      case Kind::kString:
      case Kind::kList:
        absl::StrAppend(&left, " STR");
        break;
      case Kind::kInt:
        absl::StrAppend(&left, " N");
        break;
      case Kind::kDouble:
        absl::StrAppend(&left, " X");
        break;
      case Kind::kBool:
        break;
    }
    if (left.size() < 26)
      left.resize(26, ' ');
    else
      left += "  ";
    absl::StrAppend(&out, left, f.help, "\n");
  }
  return out;
}

}  // namespace loraplex::client
