// Helpers shared by the libFuzzer targets of fuzz/: where the repository is, scratch files on
// tmpfs for the parsers that only read from a path, and a check that stops the fuzzer on a broken
// invariant. Header-only so that each target stays one translation unit plus this.
#pragma once

#include <stdlib.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"

// Like assert, but also in release builds and with a message: a failed invariant is a finding.
#define LP_FUZZ_CHECK(cond)                                                                  \
  do {                                                                                       \
    if (!(cond)) {                                                                           \
      std::fprintf(stderr, "%s:%d: fuzz invariant failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                          \
    }                                                                                        \
  } while (0)

// The same with a status in the message.
#define LP_FUZZ_CHECK_OK(expr)                                                                    \
  do {                                                                                            \
    const absl::Status lp_fuzz_status_ = (expr);                                                  \
    if (!lp_fuzz_status_.ok()) {                                                                  \
      std::fprintf(stderr, "%s:%d: fuzz invariant failed: %s is %s\n", __FILE__, __LINE__, #expr, \
                   lp_fuzz_status_.ToString().c_str());                                           \
      std::abort();                                                                               \
    }                                                                                             \
  } while (0)

namespace loraplex::fuzz {

// The repository root: $LP_FUZZ_ROOT, else the source tree the binary was configured from.
inline std::string RepoRoot() {
  if (const char* root = std::getenv("LP_FUZZ_ROOT"); root != nullptr && *root != '\0') {
    return root;
  }
  return LP_FUZZ_SOURCE_DIR;
}

// ../shared/models/stories260K beside the repository (as the tests find it).
inline std::string Stories260KDir() { return RepoRoot() + "/../shared/models/stories260K"; }

// A fixture or model file that must exist; stops the fuzzer with a clear message otherwise.
inline std::string RequireFile(const std::string& path) {
  std::error_code ec;
  if (!std::filesystem::exists(path, ec)) {
    std::fprintf(stderr, "fuzz: %s is missing (set LP_FUZZ_ROOT to the repository root)\n",
                 path.c_str());
    std::abort();
  }
  return path;
}

inline std::string ReadFileOrDie(const std::string& path) {
  std::ifstream in(RequireFile(path), std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// A fresh directory for this process: under $LP_FUZZ_SCRATCH, else /dev/shm (tmpfs: the targets
// rewrite and fsync files on every input), else $TMPDIR or /tmp. Removed at normal exit; a
// crashing run leaves it behind for the reproducer's inspection (scripts/fuzz.sh cleans its own).
inline std::string ScratchDir(const std::string& tag) {
  std::string base;
  if (const char* s = std::getenv("LP_FUZZ_SCRATCH"); s != nullptr && *s != '\0') {
    base = s;
  } else if (access("/dev/shm", W_OK) == 0) {
    base = "/dev/shm";
  } else if (const char* t = std::getenv("TMPDIR"); t != nullptr && *t != '\0') {
    base = t;
  } else {
    base = "/tmp";
  }
  std::error_code ec;
  std::filesystem::create_directories(base, ec);
  std::string templ = base + "/loraplex-fuzz-" + tag + "-XXXXXX";
  if (mkdtemp(templ.data()) == nullptr) {
    std::perror(("fuzz: mkdtemp " + templ).c_str());
    std::abort();
  }
  static std::vector<std::string>* dirs = [] {
    auto* v = new std::vector<std::string>();
    std::atexit([] {
      for (const std::string& d : *dirs) {
        std::error_code ec2;
        std::filesystem::remove_all(d, ec2);
      }
    });
    return v;
  }();
  dirs->push_back(templ);
  return templ;
}

// Writes bytes to a path, replacing what was there.
inline void WriteFileOrDie(const std::string& path, std::string_view bytes) {
  // Unlink first: on ext4 truncating a file that has data forces a flush (auto_da_alloc).
  std::remove(path.c_str());
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  if (!out) {
    std::fprintf(stderr, "fuzz: cannot write %s\n", path.c_str());
    std::abort();
  }
}

}  // namespace loraplex::fuzz
