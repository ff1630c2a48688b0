// The KV blocks the scheduler hands to sequences: allocation with reference counts, and the
// prefix cache (automatic prefix caching, as vLLM and SGLang do it, keyed per adapter).
//
// A full block (block_size token slots whose K/V are computed) can be entered into the cache under
// a hash chain: the hash of block i is Chain(hash of block i-1, its tokens), and block 0's parent
// is Root(identity, merged), where identity names what computed the K/V (the adapter's name and
// version, the base model, or a weighted mix's parts with their versions and exact weights) and
// merged the adapter merged into the base weights then (its view id; 0 for none). So a block is
// only ever matched by a sequence that would compute the very same K/V: same adapter version,
// same weights state, same tokens in every position up to it. Versions are never reused within a
// process (adapters/registry.h), so a replaced or unloaded adapter's blocks can never serve its
// next version; they age out.
//
// Sequences share matched blocks (read-only: a sequence writes only positions past its matched
// prefix, which lie in blocks of its own). A block whose last holder lets go stays in the cache,
// idle, until a block is needed and the free list is empty: then the least recently released
// idle block is evicted (its hash forgotten). Idle blocks count as available for admission.
//
// Not thread-safe: owned by the scheduler, on the engine thread.
#pragma once

#include <cstdint>
#include <list>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "model/kv_cache.h"

namespace loraplex::engine {

class BlockPool {
 public:
  // `cache` must outlive the pool. With prefix_cache false, Insert does nothing and Lookup never
  // finds anything: blocks go back to the free list as soon as their last holder lets go.
  BlockPool(model::KvCache* cache, bool prefix_cache);

  bool prefix_cache() const { return prefix_cache_; }
  int64_t block_size() const { return cache_->block_size(); }
  // Blocks a sequence could get now: free ones plus idle cached ones.
  int64_t num_available() const {
    return cache_->num_free_blocks() + static_cast<int64_t>(idle_.size());
  }
  // Blocks entered in the prefix cache, held by sequences or idle.
  int64_t num_cached() const { return static_cast<int64_t>(table_.size()); }
  // Idle cached blocks (no holder; evicted first when memory is short).
  int64_t num_idle() const { return static_cast<int64_t>(idle_.size()); }
  int64_t num_evicted() const { return evicted_; }
  // Holders of a block (0 for a free or idle one).
  int32_t refs(int32_t block) const { return meta_[block].refs; }

  // A block with one holder: a free one, else the least recently released idle one (evicted
  // from the cache). RESOURCE_EXHAUSTED when neither exists.
  absl::StatusOr<int32_t> Allocate();
  // Drops one holder; a block without holders goes idle (cached) or back to the free list.
  void Release(int32_t block);

  // The hash chain. Root: of a sequence's first block's parent; Chain: of a block holding
  // `tokens` (block_size of them) after the block whose hash is `parent`.
  static uint64_t Root(std::string_view identity, uint64_t merged);
  static uint64_t Chain(uint64_t parent, absl::Span<const int32_t> tokens);

  struct Match {
    std::vector<int32_t> blocks;  // cached blocks holding tokens[0, blocks.size() * block_size)
    uint64_t hash = 0;            // the chain's hash after them (root when none matched)
    int64_t idle = 0;             // how many of them are idle now
  };
  // The longest run of cached blocks holding the first tokens under `root`, at most max_blocks of
  // them. Takes nothing: Retain the ones to keep.
  Match Lookup(uint64_t root, absl::Span<const int32_t> tokens, int64_t max_blocks) const;
  // One more holder for each block (idle ones leave the eviction order).
  void Retain(absl::Span<const int32_t> blocks);
  // Enters a full block the caller holds under Chain(parent, tokens) (== hash). Nothing happens
  // when that hash is cached already (another block with the same contents) or the block is.
  void Insert(int32_t block, uint64_t parent, uint64_t hash, absl::Span<const int32_t> tokens);

 private:
  struct Meta {
    int32_t refs = 0;
    bool cached = false;
    uint64_t hash = 0, parent = 0;
    std::vector<int32_t> tokens;       // what the block holds (checked on every match)
    std::list<int32_t>::iterator lru;  // in idle_ while cached with no holder
  };
  void Evict(int32_t block);

  model::KvCache* cache_;
  bool prefix_cache_;
  std::vector<Meta> meta_;
  std::unordered_map<uint64_t, int32_t> table_;  // hash -> block
  std::list<int32_t> idle_;                      // least recently released first
  int64_t evicted_ = 0;
};

}  // namespace loraplex::engine
