// The command line of loraplex-soak: what to soak (server, reference binary, fixtures), for how
// long, with which seed, and the thresholds of the resource checks with the reasons for their
// defaults. Plain data, parsed once in main and read-only afterwards (safe to read from any
// thread).
#pragma once

#include <cstdint>
#include <string>

namespace loraplex::soak {

struct Options {
  std::string server;      // HOST:PORT
  int server_pid = 0;      // for /proc/PID (0: no resource checks)
  double duration_s = 60;  // warm-up included
  uint64_t seed = 0;
  bool seed_given = false;
  std::string generate_bin;  // loraplex-generate, the reference
  std::string model;         // stories260K.gguf
  std::string adapter_root;  // the server's --adapter-dir (fixture copies; bad folders go here)
  std::string admin_token;
  int stream_threads = 3;
  int greedy_threads = 2;
  double max_probe_s = 2.0;
  int64_t upload_limit = 1 << 20;  // the server's --max-adapter-bytes
  // Resource thresholds (after the run vs after the warm-up). RSS: glibc keeps freed chunks in
  // its per-thread arenas and the allocation pattern of a soak is random, so some growth is not
  // a leak; a leak of a KV pool, an adapter version (100-300 KiB each here) per request or a
  // reactor per call would exceed this over minutes. Sanitizer runs raise it (quarantine, shadow).
  double rss_slack_frac = 0.25;
  int64_t rss_slack_mib = 64;
  // Threads: gRPC grows and shrinks its callback pool with load, the registry has up to 4 loader
  // threads and commits run on short-lived threads; a thread per call (or per upload) would not.
  int thread_slack = 8;
  // fds: gRPC keeps a few per connection (a client of ours may still be closing); a leaked staging
  // file or socket per request would exceed this.
  int fd_slack = 16;
  std::string violations_file;  // every violation, one a line (the report shows the first 8)
  bool disconnect_child = false;
};

// Fills `o` from argv ("--flag value" or "--flag=value"; --disconnect-child takes no value).
// False on an unknown flag, a missing value or no --server. A bad number throws (std::stoi...).
bool ParseArgs(int argc, char** argv, Options* o);

}  // namespace loraplex::soak
