// The paged KV cache: per layer, K and V pools of fixed-size blocks (see kernels::KvLayout), and a
// free list of block ids shared by all layers (block b of every layer belongs to the same
// sequence). Not thread-safe: owned by the engine thread.
#pragma once

#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "kernels/kernels.h"
#include "model/llama_config.h"

namespace loraplex::model {

// The element type of the K and V pools: f32, or f16 (half the memory and the bytes each decode
// step reads; values rounded to f16 when written, attention computed in f32).
enum class KvDType { kF32, kF16 };
const char* KvDTypeName(KvDType t);  // "f32", "f16"

class KvCache {
 public:
  // num_blocks * block_size token slots per layer. RESOURCE_EXHAUSTED when the memory cannot be
  // had. With host_storage false only the block bookkeeping lives here (k()/v() are null): a model
  // on a device attaches its own pools (see DeviceStorage).
  static absl::StatusOr<KvCache> Create(const LlamaConfig& config, int64_t num_blocks,
                                        int64_t block_size, bool host_storage = true,
                                        KvDType dtype = KvDType::kF32);
  // Bytes one token slot takes across all layers (K and V).
  static int64_t BytesPerToken(const LlamaConfig& config, KvDType dtype = KvDType::kF32);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_used_blocks() const { return num_blocks_ - num_free_blocks(); }
  // Bytes of the K and V pools of all layers (num_blocks * block_size * BytesPerToken), wherever
  // they live (host, or the device for a cache without host storage). Host pools are committed
  // page by page as blocks are first written, so resident memory reaches this only once every
  // block has been used.
  int64_t pool_bytes() const {
    return 2 * layer_stride_ * num_layers_ * (dtype_ == KvDType::kF32 ? 4 : 2);
  }
  KvDType dtype() const { return dtype_; }

  // RESOURCE_EXHAUSTED when no block is free.
  absl::StatusOr<int32_t> AllocateBlock();
  // Returns a block to the free list. Freeing a block twice is a programmer error (LP_CHECK).
  void FreeBlock(int32_t block);

  // Host K/V pools of one layer: f32 ones (null unless dtype() is kF32 with host storage) or
  // f16 ones (null unless dtype() is kF16 with host storage).
  float* k(int64_t layer) { return k_ ? k_.get() + layer * layer_stride_ : nullptr; }
  float* v(int64_t layer) { return v_ ? v_.get() + layer * layer_stride_ : nullptr; }
  uint16_t* k16(int64_t layer) { return k16_ ? k16_.get() + layer * layer_stride_ : nullptr; }
  uint16_t* v16(int64_t layer) { return v16_ ? v16_.get() + layer * layer_stride_ : nullptr; }
  bool has_host_storage() const { return k_ != nullptr || k16_ != nullptr; }

  // K/V pools a backend keeps elsewhere (the CUDA model's device memory), owned by this cache so
  // they live exactly as long as its block bookkeeping. The backend defines the subclass.
  struct DeviceStorage {
    virtual ~DeviceStorage() = default;
  };
  DeviceStorage* device_storage() const { return device_storage_.get(); }
  void set_device_storage(std::unique_ptr<DeviceStorage> storage) {
    device_storage_ = std::move(storage);
  }
  bool block_in_use(int32_t block) const {
    return block >= 0 && block < num_blocks_ && in_use_[block];
  }
  kernels::KvLayout layout(int64_t max_blocks_per_seq) const {
    return {block_size_, n_kv_heads_, head_dim_, max_blocks_per_seq};
  }

 private:
  KvCache() = default;
  int64_t num_blocks_ = 0, block_size_ = 0, n_kv_heads_ = 0, head_dim_ = 0, layer_stride_ = 0;
  int64_t num_layers_ = 0;
  KvDType dtype_ = KvDType::kF32;
  std::unique_ptr<float[]> k_, v_;
  std::unique_ptr<uint16_t[]> k16_, v16_;
  std::vector<int32_t> free_;
  std::vector<bool> in_use_;
  std::unique_ptr<DeviceStorage> device_storage_;
};

}  // namespace loraplex::model
