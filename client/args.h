// Argument parsing for the `loraplex` subcommands. Each subcommand declares its own flags (absl
// flags are process-global and cannot differ per subcommand); flags use dashes (--max-tokens),
// underscores are accepted too. Accepted forms: --name=value, --name value, --flag / --no-flag for
// booleans, repeated string-list flags, "--" ends the flags. Not thread-safe; one per command.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace loraplex::client {

class ArgParser {
 public:
  // `command` ("loraplex generate") and `synopsis` (positional arguments) appear in Usage().
  ArgParser(std::string command, std::string synopsis);

  // Each Add* binds a flag to `out`, which must outlive Parse(); `out` keeps its value when the
  // flag is absent (so the caller sets defaults, e.g. from the environment, beforehand).
  void AddString(const std::string& name, std::string* out, const std::string& help);
  void AddInt(const std::string& name, int64_t* out, const std::string& help);
  void AddDouble(const std::string& name, double* out, const std::string& help);
  void AddBool(const std::string& name, bool* out, const std::string& help);
  // Every occurrence appends; a value with commas is split ("--stop a,b" adds two) only when
  // `split_commas`.
  void AddList(const std::string& name, std::vector<std::string>* out, const std::string& help,
               bool split_commas = false);

  // Returns the positional arguments. INVALID_ARGUMENT naming the flag for an unknown flag, a
  // missing value or a value that does not parse. --help/-h sets help_requested() and stops.
  absl::StatusOr<std::vector<std::string>> Parse(const std::vector<std::string>& args);
  bool help_requested() const { return help_requested_; }
  std::string Usage() const;

 private:
  enum class Kind { kString, kInt, kDouble, kBool, kList };
  struct Flag {
    std::string name;
    Kind kind;
    void* out;
    std::string help;
    bool split_commas = false;
  };
  const Flag* Find(const std::string& name) const;
  absl::Status Set(const Flag& flag, const std::string& value) const;

  std::string command_;
  std::string synopsis_;
  std::vector<Flag> flags_;
  bool help_requested_ = false;
};

}  // namespace loraplex::client
