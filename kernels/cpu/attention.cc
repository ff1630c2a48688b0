// The fast paged KV cache ops. PagedAttention is a two-pass softmax per (token, query head): one
// pass over the keys writes scaled scores into a thread-local buffer, then exp/sum, then one pass
// over the values. The inner products, exp and axpy run on the active ISA table.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/logging.h"
#include "common/thread_pool.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/kernels.h"

namespace loraplex::kernels {
namespace {

// Offset of (position, kv_head, 0) of one sequence in a pool [blocks, block_size, kv_heads, hd].
inline int64_t CacheOffset(const int32_t* block_table, int64_t pos, int64_t kv_head,
                           const KvLayout& layout) {
  const int64_t block = block_table[pos / layout.block_size];
  const int64_t slot = pos % layout.block_size;
  return ((block * layout.block_size + slot) * layout.n_kv_heads + kv_head) * layout.head_dim;
}

void CheckLayout(const KvLayout& layout) {
  LP_CHECK(layout.block_size > 0 && layout.n_kv_heads > 0 && layout.head_dim > 0 &&
           layout.max_blocks_per_seq > 0)
      << "KvLayout block_size=" << layout.block_size << " n_kv_heads=" << layout.n_kv_heads
      << " head_dim=" << layout.head_dim << " max_blocks_per_seq=" << layout.max_blocks_per_seq;
}

}  // namespace

void WriteKv(float* k_cache, float* v_cache, const float* k, const float* v,
             const AttentionBatch& batch, const KvLayout& layout) {
  CheckLayout(layout);
  const int64_t row = layout.n_kv_heads * layout.head_dim;  // one token's heads are contiguous
  for (int64_t t = 0; t < batch.num_tokens; ++t) {
    const int32_t* table = batch.block_tables + batch.token_seq[t] * layout.max_blocks_per_seq;
    const int64_t pos = batch.token_pos[t];
    LP_CHECK(pos >= 0 && pos < layout.max_blocks_per_seq * layout.block_size) << "position " << pos;
    const int64_t dst = CacheOffset(table, pos, 0, layout);
    std::memcpy(k_cache + dst, k + t * row, row * sizeof(float));
    std::memcpy(v_cache + dst, v + t * row, row * sizeof(float));
  }
}

void PagedAttention(float* out, const float* q, const float* k_cache, const float* v_cache,
                    const AttentionBatch& batch, const KvLayout& layout, int64_t n_heads,
                    float scale) {
  CheckLayout(layout);
  LP_CHECK(n_heads > 0 && n_heads % layout.n_kv_heads == 0)
      << "n_heads " << n_heads << " is not a multiple of n_kv_heads " << layout.n_kv_heads;
  const int64_t tokens = batch.num_tokens;
  if (tokens <= 0) return;
  const int64_t hd = layout.head_dim;
  const int64_t group = n_heads / layout.n_kv_heads;
  int64_t max_len = 0;
  for (int64_t t = 0; t < tokens; ++t) {
    LP_CHECK(batch.token_pos[t] >= 0 &&
             batch.token_pos[t] < layout.max_blocks_per_seq * layout.block_size)
        << "position " << batch.token_pos[t];
    max_len = std::max<int64_t>(max_len, batch.token_pos[t] + 1);
  }
  const cpu::CpuOps& ops = cpu::ActiveCpuOps();
  const int64_t items = tokens * n_heads;  // one (token, query head) each

  auto run_item = [&](int64_t item, std::vector<float>& scores) {
    const int64_t t = item / n_heads;
    const int64_t h = item % n_heads;
    const int64_t kvh = h / group;
    const int32_t* table = batch.block_tables + batch.token_seq[t] * layout.max_blocks_per_seq;
    const int64_t len = batch.token_pos[t] + 1;
    const float* qh = q + item * hd;
    float* oh = out + item * hd;
    float max_score = -INFINITY;
    for (int64_t p = 0; p < len; ++p) {
      const float s = ops.dot(qh, k_cache + CacheOffset(table, p, kvh, layout), hd) * scale;
      scores[p] = s;
      max_score = std::max(max_score, s);
    }
    const float denom = ops.exp_shift_sum(scores.data(), max_score, len);
    std::fill(oh, oh + hd, 0.0f);
    for (int64_t p = 0; p < len; ++p) {
      ops.axpy(oh, scores[p], v_cache + CacheOffset(table, p, kvh, layout), hd);
    }
    ops.scale(oh, 1.0f / denom, hd);
  };

  // Prefill tokens have growing lengths, so contiguous ranges would give the last thread most of
  // the work: each lane takes every lanes-th item instead.
  const int64_t total_work = items * max_len * hd;
  const int64_t lanes = std::max<int64_t>(
      1, std::min<int64_t>({ThreadPool::Default().num_threads(), items, total_work / (1 << 15)}));
  ThreadPool::Default().ParallelFor(lanes, [&](int64_t l0, int64_t l1) {
    thread_local std::vector<float> scores;
    if (static_cast<int64_t>(scores.size()) < max_len) scores.resize(max_len);
    for (int64_t lane = l0; lane < l1; ++lane) {
      for (int64_t item = lane; item < items; item += lanes) run_item(item, scores);
    }
  });
}

}  // namespace loraplex::kernels
