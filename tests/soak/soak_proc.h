// What the resource checks read of the server process from /proc: whether it has exited, and its
// resident memory, threads and open fds. Stateless: safe from any thread.
#pragma once

#include <cstdint>

namespace loraplex::soak {

// Resident memory, threads and open fds of a process (-1 where unreadable).
struct ProcSample {
  int64_t rss_kib = -1;
  int threads = -1;
  int fds = -1;
};

// The process has exited (gone, or a zombie its parent, scripts/soak.sh, has not reaped yet).
bool ProcessGone(int pid);

ProcSample SampleProc(int pid);

}  // namespace loraplex::soak
