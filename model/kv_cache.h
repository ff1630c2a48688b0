// The paged KV cache: per layer, K and V pools of fixed-size blocks (see kernels::KvLayout), and a
// free list of block ids shared by all layers (block b of every layer belongs to the same
// sequence). Not thread-safe: owned by the engine thread.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/kernels.h"
#include "model/llama_config.h"

namespace loraplex::model {

class KvCache {
 public:
  // num_blocks * block_size token slots per layer. RESOURCE_EXHAUSTED when the memory cannot be
  // had.
  static absl::StatusOr<KvCache> Create(const LlamaConfig& config, int64_t num_blocks,
                                        int64_t block_size);
  // Bytes one token slot takes across all layers (K and V).
  static int64_t BytesPerToken(const LlamaConfig& config);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_used_blocks() const { return num_blocks_ - num_free_blocks(); }

  // RESOURCE_EXHAUSTED when no block is free.
  absl::StatusOr<int32_t> AllocateBlock();
  // Returns a block to the free list. Freeing a block twice is a programmer error (LP_CHECK).
  void FreeBlock(int32_t block);

  float* k(int64_t layer) { return k_.get() + layer * layer_stride_; }
  float* v(int64_t layer) { return v_.get() + layer * layer_stride_; }
  bool block_in_use(int32_t block) const {
    return block >= 0 && block < num_blocks_ && in_use_[block];
  }
  kernels::KvLayout layout(int64_t max_blocks_per_seq) const {
    return {block_size_, n_kv_heads_, head_dim_, max_blocks_per_seq};
  }

 private:
  KvCache() = default;
  int64_t num_blocks_ = 0, block_size_ = 0, n_kv_heads_ = 0, head_dim_ = 0, layer_stride_ = 0;
  std::unique_ptr<float[]> k_, v_;
  std::vector<int32_t> free_;
  std::vector<bool> in_use_;
};

}  // namespace loraplex::model
