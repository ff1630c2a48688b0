#include "model/kv_cache.h"

#include <new>

#include "absl/strings/str_cat.h"
#include "common/logging.h"

namespace loraplex::model {

const char* KvDTypeName(KvDType t) { return t == KvDType::kF16 ? "f16" : "f32"; }

int64_t KvCache::BytesPerToken(const LlamaConfig& config, KvDType dtype) {
  return 2 * config.num_layers * config.num_kv_heads * config.head_dim *
         (dtype == KvDType::kF32 ? 4 : 2);
}

absl::StatusOr<KvCache> KvCache::Create(const LlamaConfig& config, int64_t num_blocks,
                                        int64_t block_size, bool host_storage, KvDType dtype) {
  if (num_blocks <= 0 || block_size <= 0) {
    return absl::InvalidArgumentError(absl::StrCat("KV cache: num_blocks (", num_blocks,
                                                   ") and block_size (", block_size,
                                                   ") must be positive"));
  }
  KvCache c;
  c.num_blocks_ = num_blocks;
  c.block_size_ = block_size;
  c.n_kv_heads_ = config.num_kv_heads;
  c.head_dim_ = config.head_dim;
  c.num_layers_ = config.num_layers;
  c.dtype_ = dtype;
  c.layer_stride_ = num_blocks * block_size * config.num_kv_heads * config.head_dim;
  const int64_t total = c.layer_stride_ * config.num_layers;
  if (host_storage) {
    // Default-initialised storage: pages are only touched (and committed) when a block is written.
    bool ok;
    if (dtype == KvDType::kF32) {
      c.k_.reset(new (std::nothrow) float[total]);
      c.v_.reset(new (std::nothrow) float[total]);
      ok = c.k_ && c.v_;
    } else {
      c.k16_.reset(new (std::nothrow) uint16_t[total]);
      c.v16_.reset(new (std::nothrow) uint16_t[total]);
      ok = c.k16_ && c.v16_;
    }
    if (!ok) {
      return absl::ResourceExhaustedError(
          absl::StrCat("KV cache: cannot allocate ", c.pool_bytes() / (1 << 20), " MiB"));
    }
  }
  c.free_.reserve(num_blocks);
  // Hand out low block ids first (LIFO free list, so push the highest first).
  for (int64_t b = num_blocks - 1; b >= 0; --b) c.free_.push_back(static_cast<int32_t>(b));
  c.in_use_.assign(num_blocks, false);
  return c;
}

absl::StatusOr<int32_t> KvCache::AllocateBlock() {
  if (free_.empty()) return absl::ResourceExhaustedError("KV cache: no free block");
  int32_t b = free_.back();
  free_.pop_back();
  in_use_[b] = true;
  return b;
}

void KvCache::FreeBlock(int32_t block) {
  LP_CHECK(block >= 0 && block < num_blocks_) << "block " << block;
  LP_CHECK(in_use_[block]) << "block " << block << " freed twice";
  in_use_[block] = false;
  free_.push_back(block);
}

}  // namespace loraplex::model
