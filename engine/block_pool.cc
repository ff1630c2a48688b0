#include "engine/block_pool.h"

#include <algorithm>

#include "absl/hash/hash.h"
#include "common/logging.h"
#include "common/status.h"

namespace loraplex::engine {

BlockPool::BlockPool(model::KvCache* cache, bool prefix_cache)
    : cache_(cache), prefix_cache_(prefix_cache), meta_(cache->num_blocks()) {}

uint64_t BlockPool::Root(std::string_view identity, uint64_t merged) {
  return absl::HashOf(identity, merged);
}

uint64_t BlockPool::Chain(uint64_t parent, absl::Span<const int32_t> tokens) {
  return absl::HashOf(parent, tokens);
}

absl::StatusOr<int32_t> BlockPool::Allocate() {
  int32_t block;
  if (cache_->num_free_blocks() > 0) {
    LP_ASSIGN_OR_RETURN(block, cache_->AllocateBlock());
  } else if (!idle_.empty()) {
    block = idle_.front();
    Evict(block);
  } else {
    return absl::ResourceExhaustedError("KV cache: no free block");
  }
  LP_CHECK(meta_[block].refs == 0) << "block " << block << " handed out while held";
  meta_[block].refs = 1;
  return block;
}

void BlockPool::Evict(int32_t block) {
  Meta& m = meta_[block];
  LP_CHECK(m.cached && m.refs == 0) << "block " << block << " evicted while held";
  idle_.erase(m.lru);
  table_.erase(m.hash);
  m.cached = false;
  m.tokens.clear();
  ++evicted_;
}

void BlockPool::Release(int32_t block) {
  Meta& m = meta_[block];
  LP_CHECK(m.refs > 0) << "block " << block << " released more often than held";
  if (--m.refs > 0) return;
  if (m.cached) {
    m.lru = idle_.insert(idle_.end(), block);
  } else {
    cache_->FreeBlock(block);
  }
}

BlockPool::Match BlockPool::Lookup(uint64_t root, absl::Span<const int32_t> tokens,
                                   int64_t max_blocks) const {
  Match match;
  match.hash = root;
  if (!prefix_cache_) return match;
  const int64_t bs = block_size();
  max_blocks = std::min<int64_t>(max_blocks, static_cast<int64_t>(tokens.size()) / bs);
  for (int64_t i = 0; i < max_blocks; ++i) {
    const absl::Span<const int32_t> part = tokens.subspan(i * bs, bs);
    const uint64_t hash = Chain(match.hash, part);
    auto it = table_.find(hash);
    if (it == table_.end()) break;
    const Meta& m = meta_[it->second];
    // The hash names the whole prefix; the check guards against a collision of two chains.
    if (m.parent != match.hash || !std::equal(part.begin(), part.end(), m.tokens.begin())) break;
    match.blocks.push_back(it->second);
    match.idle += m.refs == 0 ? 1 : 0;
    match.hash = hash;
  }
  return match;
}

void BlockPool::Retain(absl::Span<const int32_t> blocks) {
  for (int32_t b : blocks) {
    Meta& m = meta_[b];
    if (m.refs == 0) {
      LP_CHECK(m.cached) << "block " << b << " retained while free";
      idle_.erase(m.lru);
    }
    ++m.refs;
  }
}

void BlockPool::Insert(int32_t block, uint64_t parent, uint64_t hash,
                       absl::Span<const int32_t> tokens) {
  if (!prefix_cache_) return;
  Meta& m = meta_[block];
  LP_CHECK(m.refs > 0) << "block " << block << " entered in the prefix cache without a holder";
  LP_CHECK(static_cast<int64_t>(tokens.size()) == block_size()) << tokens.size();
  if (m.cached || !table_.emplace(hash, block).second) return;
  m.cached = true;
  m.hash = hash;
  m.parent = parent;
  m.tokens.assign(tokens.begin(), tokens.end());
}

}  // namespace loraplex::engine
