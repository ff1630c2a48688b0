// Command-line helpers shared by the binaries.
#pragma once

#include <string>
#include <vector>

namespace loraplex {

// Abseil flags are identifiers (max_tokens); our documented flags use dashes (--max-tokens).
// Returns argv with "--a-b[=v]" rewritten to "--a_b[=v]" (values and positional args untouched),
// for absl::ParseCommandLine. The returned strings back the returned pointers.
class DashedArgs {
 public:
  DashedArgs(int argc, char** argv);
  int argc() const { return static_cast<int>(ptrs_.size()); }
  char** argv() { return ptrs_.data(); }

 private:
  std::vector<std::string> storage_;
  std::vector<char*> ptrs_;
};

}  // namespace loraplex
