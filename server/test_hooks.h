// Points where a test can hold a server thread, to force an interleaving that otherwise happens
// only by chance (tests/server/reactor_lifetime_test.cc). Each hook is empty in production and is
// set by a test before the server starts taking calls and cleared after it stopped; the server
// only reads them.
#pragma once

#include <functional>

#include "absl/status/status.h"

namespace loraplex::server {

struct TestHooks {
  // Engine thread, in a Generate reactor: the final output has been queued for writing and the
  // thread is about to start the next write or finish the call.
  std::function<void()> generate_final_output_queued;
  // gRPC thread: a Generate reactor's OnWriteDone, before it looks at its write state.
  std::function<void()> generate_write_done;
  // gRPC thread: a generation reactor (Generate or Complete) got OnDone.
  std::function<void()> generation_done;
  // A generation reactor is being destroyed (any thread).
  std::function<void()> generation_destroyed;
  // Registry loader thread (or the calling one): a weighted mix's part arrived (or failed to,
  // `status`) for a call that had not ended, and is about to be copied.
  std::function<void(const absl::Status& status)> mix_part_acquired;
  // ~Server: its engine has just been destroyed; the adapter registry (and its loader threads) and
  // the model are still there.
  std::function<void()> server_engine_destroyed;
};

// The process's hooks.
TestHooks& GetTestHooks();

}  // namespace loraplex::server
