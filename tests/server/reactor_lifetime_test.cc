// The Generate reactor's lifetime under the interleaving that once freed it under the engine
// thread (a heap-use-after-free that TSan caught about one run in eight): the engine thread has
// queued the final output and is on its way to Pump it, while a gRPC thread's OnWriteDone writes
// that output, finishes the call and gets OnDone. The test hooks (server/test_hooks.h) force that
// order every time: the first OnWriteDone waits until the final output is queued, and the engine
// thread then waits until OnDone has come. The reactor must outlive the engine thread's call.
// In-process server on stories260K, a real gRPC client on loopback. Also: a weighted mix's part
// copied on a registry loader thread after its call ended and the engine was destroyed.
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "loraplex/v1/inference.grpc.pb.h"
#include "model/llama_model.h"
#include "server/reactors.h"
#include "server/server.h"
#include "server/test_hooks.h"
#include "tests/testing/testing.h"

namespace loraplex::server {
namespace {

// What the hooks saw, shared between the engine thread, gRPC threads and the test.
struct Observed {
  absl::Mutex mu;
  bool final_queued ABSL_GUARDED_BY(mu) = false;
  bool done ABSL_GUARDED_BY(mu) = false;
  bool in_final_hook ABSL_GUARDED_BY(mu) = false;
  bool done_during_final_hook ABSL_GUARDED_BY(mu) = false;
  bool destroyed_during_final_hook ABSL_GUARDED_BY(mu) = false;
  int write_dones ABSL_GUARDED_BY(mu) = 0;
  int destroyed ABSL_GUARDED_BY(mu) = 0;
};

constexpr absl::Duration kHookWait = absl::Seconds(10);

TEST(ReactorLifetimeTest, OnDoneWhileTheEngineThreadPumpsTheFinalOutput) {
  auto model = model::LlamaModel::Load(loraplex::testing::Stories260KDir() + "/stories260K.gguf");
  ASSERT_TRUE(model.ok()) << model.status();
  Observed seen;
  TestHooks& hooks = GetTestHooks();
  hooks.generate_write_done = [&seen] {
    absl::MutexLock lock(&seen.mu);
    if (++seen.write_dones == 1) {
      // Hold the first write's completion until the engine has queued the final output, so
      // that a write is in flight when it does.
      seen.mu.AwaitWithTimeout(absl::Condition(&seen.final_queued), kHookWait);
    }
  };
  hooks.generate_final_output_queued = [&seen] {
    absl::MutexLock lock(&seen.mu);
    seen.final_queued = true;
    seen.in_final_hook = true;
    // gRPC now writes the final output, finishes the call and calls OnDone meanwhile.
    seen.done_during_final_hook = seen.mu.AwaitWithTimeout(absl::Condition(&seen.done), kHookWait);
    seen.in_final_hook = false;
  };
  hooks.generation_done = [&seen] {
    absl::MutexLock lock(&seen.mu);
    seen.done = true;
  };
  hooks.generation_destroyed = [&seen] {
    absl::MutexLock lock(&seen.mu);
    if (seen.in_final_hook) seen.destroyed_during_final_hook = true;
    ++seen.destroyed;
  };

  ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.engine.kv_blocks = 16;
  absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(*std::move(model), options);
  ASSERT_TRUE(server.ok()) << server.status();

  // The client half of gRPC runs in this process too, uninstrumented: under TSan its handoffs
  // are invisible (as they are to the e2e tests' client processes, whose reports are off), so the
  // client calls run ignored. The server's code stays checked (server/reactors.h).
  IgnoreGrpc client_calls;
  auto stub = v1::Inference::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string((*server)->port()), grpc::InsecureChannelCredentials()));
  v1::GenerateRequest req;
  req.add_prompt_token_ids(1);
  req.set_max_tokens(8);
  req.set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub->Generate(&ctx, req);
  v1::GenerateResponse resp;
  std::vector<int32_t> ids;
  while (reader->Read(&resp))
    ids.insert(ids.end(), resp.token_ids().begin(), resp.token_ids().end());
  grpc::Status status = reader->Finish();
  EXPECT_TRUE(status.ok()) << status.error_message();
  EXPECT_EQ(ids.size(), 8u);

  {
    absl::MutexLock lock(&seen.mu);
    EXPECT_TRUE(seen.mu.AwaitWithTimeout(absl::Condition(
                                             +[](int* n) { return *n == 1; }, &seen.destroyed),
                                         kHookWait))
        << "the reactor was never deleted";
    // The interleaving happened: OnDone came while the engine thread was between queueing the
    // final output and pumping it...
    EXPECT_TRUE(seen.done_during_final_hook);
    // ...and did not free the reactor under it.
    EXPECT_FALSE(seen.destroyed_during_final_hook);
  }
  (*server)->Shutdown(absl::Seconds(5));
  server->reset();
  hooks = TestHooks();
}

// A weighted mix's part is copied on a registry loader thread while its call can end: a cancel
// ends a call that waits for its adapters at once, the server's shutdown then finds no call in
// flight and destroys its engine, and the registry joins its loader threads only after that. The
// hooks hold the loader thread between its last look at the call and the copy until the engine is
// gone; the copy must use nothing of the engine's (ASan sees a use after free if it does).
TEST(ReactorLifetimeTest, MixPartCopiedAfterTheCallEndedAndTheEngineWentAway) {
  auto model = model::LlamaModel::Load(loraplex::testing::Stories260KDir() + "/stories260K.gguf");
  ASSERT_TRUE(model.ok()) << model.status();
  struct Seen {
    absl::Mutex mu;
    absl::Status part_status ABSL_GUARDED_BY(mu);
    bool in_copy ABSL_GUARDED_BY(mu) = false;
    bool done ABSL_GUARDED_BY(mu) = false;
    bool engine_gone ABSL_GUARDED_BY(mu) = false;
    bool engine_gone_in_copy ABSL_GUARDED_BY(mu) = false;
  } seen;
  TestHooks& hooks = GetTestHooks();
  hooks.mix_part_acquired = [&seen](const absl::Status& status) {
    absl::MutexLock lock(&seen.mu);
    seen.part_status = status;
    seen.in_copy = true;
    seen.engine_gone_in_copy =
        seen.mu.AwaitWithTimeout(absl::Condition(&seen.engine_gone), kHookWait);
  };
  hooks.generation_done = [&seen] {
    absl::MutexLock lock(&seen.mu);
    seen.done = true;
  };
  hooks.server_engine_destroyed = [&seen] {
    absl::MutexLock lock(&seen.mu);
    seen.engine_gone = true;
  };

  // The mix's adapter is registered on demand from its folder: file work, on a loader thread.
  ServerOptions options;
  options.listen = "127.0.0.1:0";
  options.engine.kv_blocks = 16;
  options.admin.adapter_dir = "tests/fixtures/peft/stories260k";
  options.admin.load_on_demand = true;
  options.info.max_lora_rank = 64;  // the flag's default
  absl::StatusOr<std::unique_ptr<Server>> server = Server::Start(*std::move(model), options);
  ASSERT_TRUE(server.ok()) << server.status();

  IgnoreGrpc client_calls;  // as above
  auto stub = v1::Inference::NewStub(grpc::CreateChannel(
      "127.0.0.1:" + std::to_string((*server)->port()), grpc::InsecureChannelCredentials()));
  v1::GenerateRequest req;
  req.add_prompt_token_ids(1);
  req.set_max_tokens(8);
  v1::WeightedAdapter* part = req.add_adapters();
  part->set_name("qv");
  part->set_weight(0.5f);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto reader = stub->Generate(&ctx, req);
  {
    absl::MutexLock lock(&seen.mu);
    ASSERT_TRUE(seen.mu.AwaitWithTimeout(absl::Condition(&seen.in_copy), kHookWait))
        << "the mix's part never reached the copy";
    EXPECT_TRUE(seen.part_status.ok()) << seen.part_status;  // so there is a copy to make
  }
  ctx.TryCancel();
  {
    absl::MutexLock lock(&seen.mu);
    ASSERT_TRUE(seen.mu.AwaitWithTimeout(absl::Condition(&seen.done), kHookWait))
        << "the cancel did not end the call";
  }
  v1::GenerateResponse resp;
  EXPECT_FALSE(reader->Read(&resp));
  EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::CANCELLED);
  // Nothing is in flight: shutdown destroys the engine while the loader thread still copies.
  server->reset();
  {
    absl::MutexLock lock(&seen.mu);
    EXPECT_TRUE(seen.engine_gone_in_copy) << "the copy went on before the engine was destroyed";
  }
  hooks = TestHooks();
}

}  // namespace
}  // namespace loraplex::server
