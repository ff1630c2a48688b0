// The engine's state of one request. Owned by the engine thread (never shared): the scheduler and
// the engine loop read and write it without locks.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/time.h"
#include "engine/request.h"
#include "engine/stop_matcher.h"
#include "model/sampler.h"
#include "model/tokenizer.h"

namespace loraplex::engine {

struct Sequence {
  Sequence(RequestId id_in, GenerationRequest request_in, OutputSink sink_in,
           const model::Tokenizer* tokenizer)
      : id(id_in),
        request(std::move(request_in)),
        sink(std::move(sink_in)),
        tokens(request.prompt_ids),
        num_prompt_tokens(static_cast<int64_t>(request.prompt_ids.size())),
        tenant(request.mix != nullptr       ? "@mix"
               : request.adapter != nullptr ? request.adapter->name()
                                            : std::string()),
        prefix_identity(request.mix != nullptr ? request.mix_identity
                        : request.adapter != nullptr
                            ? request.adapter->name() + "@" +
                                  std::to_string(request.adapter->version())
                            : std::string("@base")),
        sampler(request.sampling),
        decoder(tokenizer),
        stop(request.stop) {}

  int64_t length() const { return static_cast<int64_t>(tokens.size()); }
  int64_t num_generated() const { return length() - num_prompt_tokens; }
  // Tokens whose K/V are not in the cache yet. 1 while decoding: the last sampled token.
  int64_t num_pending() const { return length() - num_computed; }

  const RequestId id;
  const GenerationRequest request;
  const OutputSink sink;

  // Prompt followed by the generated tokens.
  std::vector<int32_t> tokens;
  const int64_t num_prompt_tokens;
  // Whose share of the server this request uses (the scheduler's fairness): the adapter's name,
  // "" for the base model, "@mix" for every weighted mix (adapter names have no "@"). Fixed once
  // the sequence is handed to the scheduler.
  std::string tenant;
  // The scheduler charged its prompt to the tenant (once, not again after a preemption).
  bool prompt_charged = false;
  // tokens[0, num_computed) have their K/V in the blocks below. Reset to 0 on preemption: the
  // sequence is then recomputed from its tokens, which gives the same K/V.
  int64_t num_computed = 0;
  std::vector<int32_t> blocks;  // KV block table, block i holds positions [i*bs, (i+1)*bs)
  // The prefix cache (engine/block_pool.h). What computes this sequence's K/V: "name@version",
  // "@base", a mix's GenerationRequest::mix_identity, or "" (never shared).
  std::string prefix_identity;
  // Set at admission: the merge state its K/V are computed under, and the chain's hash after its
  // first num_hashed blocks (entered in the cache or matched there). prefix_open turns false when
  // the merge state changes under it: its later blocks are then never entered.
  uint64_t prefix_merged = 0;
  uint64_t prefix_hash = 0;
  int64_t num_hashed = 0;
  bool prefix_open = false;
  // Counted against EngineOptions::max_queue until the scheduler first runs it.
  bool queued = true;

  model::Sampler sampler;
  model::StreamDecoder decoder;
  StopMatcher stop;
  absl::Time submit_time;
};

}  // namespace loraplex::engine
