// The fast paged KV cache ops, on f32 or f16 pools. PagedAttention is a two-pass softmax per
// (token, query head): one pass over the keys writes scaled scores into a thread-local buffer, then
// exp/sum, then one pass over the values. Both passes go block by block (a block's slots are
// equally strided), and the inner loops run on the active ISA table. With a sliding window the
// passes start at the first visible position (possibly mid-block), so blocks wholly before the
// window are skipped, not read.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/half.h"
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

// The pools' element types: f32 copied, f16 rounded on the way in.
void StoreRow(float* dst, const float* src, int64_t n) { std::memcpy(dst, src, n * sizeof(float)); }
void StoreRow(uint16_t* dst, const float* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = F32ToF16(src[i]);
}

// The ops of the active table for a pool of T.
struct KvOps {
  const cpu::CpuOps& ops;
  void Scores(float* s, const float* q, const float* k, int64_t stride, int64_t count, int64_t dim,
              float scale) const {
    ops.attn_scores(s, q, k, stride, count, dim, scale);
  }
  void Scores(float* s, const float* q, const uint16_t* k, int64_t stride, int64_t count,
              int64_t dim, float scale) const {
    ops.attn_scores_f16(s, q, k, stride, count, dim, scale);
  }
  void Accumulate(float* out, const float* p, const float* v, int64_t stride, int64_t count,
                  int64_t dim) const {
    ops.attn_accumulate(out, p, v, stride, count, dim);
  }
  void Accumulate(float* out, const float* p, const uint16_t* v, int64_t stride, int64_t count,
                  int64_t dim) const {
    ops.attn_accumulate_f16(out, p, v, stride, count, dim);
  }
};

template <typename T>
void WriteKvT(T* k_cache, T* v_cache, const float* k, const float* v, const AttentionBatch& batch,
              const KvLayout& layout) {
  CheckLayout(layout);
  const int64_t row = layout.n_kv_heads * layout.head_dim;  // one token's heads are contiguous
  for (int64_t t = 0; t < batch.num_tokens; ++t) {
    const int32_t* table = batch.block_tables + batch.token_seq[t] * layout.max_blocks_per_seq;
    const int64_t pos = batch.token_pos[t];
    LP_CHECK(pos >= 0 && pos < layout.max_blocks_per_seq * layout.block_size) << "position " << pos;
    const int64_t dst = CacheOffset(table, pos, 0, layout);
    StoreRow(k_cache + dst, k + t * row, row);
    StoreRow(v_cache + dst, v + t * row, row);
  }
}

template <typename T>
void PagedAttentionT(float* out, const float* q, const T* k_cache, const T* v_cache,
                     const AttentionBatch& batch, const KvLayout& layout, int64_t n_heads,
                     float scale, int64_t sliding_window) {
  CheckLayout(layout);
  LP_CHECK(n_heads > 0 && n_heads % layout.n_kv_heads == 0)
      << "n_heads " << n_heads << " is not a multiple of n_kv_heads " << layout.n_kv_heads;
  const int64_t tokens = batch.num_tokens;
  if (tokens <= 0) return;
  const int64_t hd = layout.head_dim;
  const int64_t group = n_heads / layout.n_kv_heads;
  // Visible positions of token t: [First(t), token_pos[t]]; see kernels.h for the convention.
  auto first_visible = [&](int64_t t) -> int64_t {
    return sliding_window > 0 ? std::max<int64_t>(0, batch.token_pos[t] + 1 - sliding_window) : 0;
  };
  int64_t max_len = 0;  // the most positions any token attends to
  for (int64_t t = 0; t < tokens; ++t) {
    LP_CHECK(batch.token_pos[t] >= 0 &&
             batch.token_pos[t] < layout.max_blocks_per_seq * layout.block_size)
        << "position " << batch.token_pos[t];
    max_len = std::max<int64_t>(max_len, batch.token_pos[t] + 1 - first_visible(t));
  }
  const KvOps ops{cpu::ActiveCpuOps()};
  // One work item is a (token, kv head) pair with all `group` query heads that share that kv head:
  // each K and V block is then read from memory once and reused from L1 by the group, instead of
  // once per query head (3x less cache traffic for SmolLM2's 9/3 heads).
  const int64_t items = tokens * layout.n_kv_heads;
  const int64_t stride = layout.n_kv_heads * hd;  // floats between consecutive slots of a block

  auto run_item = [&](int64_t item, std::vector<float>& scores) {
    const int64_t t = item / layout.n_kv_heads;
    const int64_t kvh = item % layout.n_kv_heads;
    const int32_t* table = batch.block_tables + batch.token_seq[t] * layout.max_blocks_per_seq;
    const int64_t end = batch.token_pos[t] + 1;  // one past the last visible position
    const int64_t first = first_visible(t);
    const int64_t len = end - first;                // visible positions; scores[i] is first + i
    const int64_t h0 = kvh * group;                 // first query head of the group
    const float* qg = q + (t * n_heads + h0) * hd;  // [group, hd]
    float* og = out + (t * n_heads + h0) * hd;      // [group, hd]
    float* sg = scores.data();                      // [group, max_len]
    // Runs of consecutive slots within one block: [p0, p0 + count) never crosses a block edge.
    auto run_length = [&](int64_t p0) {
      return std::min(layout.block_size - p0 % layout.block_size, end - p0);
    };
    for (int64_t p0 = first; p0 < end; p0 += run_length(p0)) {
      const int64_t count = run_length(p0);
      const T* kb = k_cache + CacheOffset(table, p0, kvh, layout);
      for (int64_t g = 0; g < group; ++g) {
        ops.Scores(sg + g * max_len + (p0 - first), qg + g * hd, kb, stride, count, hd, scale);
      }
    }
    std::fill(og, og + group * hd, 0.0f);
    std::vector<float> denom(group);  // small: group is n_heads / n_kv_heads
    for (int64_t g = 0; g < group; ++g) {
      float* sh = sg + g * max_len;
      denom[g] = ops.ops.exp_shift_sum(sh, *std::max_element(sh, sh + len), len);
    }
    for (int64_t p0 = first; p0 < end; p0 += run_length(p0)) {
      const int64_t count = run_length(p0);
      const T* vb = v_cache + CacheOffset(table, p0, kvh, layout);
      for (int64_t g = 0; g < group; ++g) {
        ops.Accumulate(og + g * hd, sg + g * max_len + (p0 - first), vb, stride, count, hd);
      }
    }
    for (int64_t g = 0; g < group; ++g) ops.ops.scale(og + g * hd, 1.0f / denom[g], hd);
  };

  // Prefill tokens have growing lengths, so contiguous ranges would give the last thread most of
  // the work: each lane takes every lanes-th item instead.
  const int64_t total_work = items * group * max_len * hd;
  const int64_t lanes = std::max<int64_t>(
      1, std::min<int64_t>({ThreadPool::Default().num_threads(), items, total_work / (1 << 15)}));
  ThreadPool::Default().ParallelFor(lanes, [&](int64_t l0, int64_t l1) {
    thread_local std::vector<float> scores;
    if (static_cast<int64_t>(scores.size()) < group * max_len) scores.resize(group * max_len);
    for (int64_t lane = l0; lane < l1; ++lane) {
      for (int64_t item = lane; item < items; item += lanes) run_item(item, scores);
    }
  });
}

}  // namespace

void WriteKv(float* k_cache, float* v_cache, const float* k, const float* v,
             const AttentionBatch& batch, const KvLayout& layout) {
  WriteKvT(k_cache, v_cache, k, v, batch, layout);
}

void WriteKv(uint16_t* k_cache, uint16_t* v_cache, const float* k, const float* v,
             const AttentionBatch& batch, const KvLayout& layout) {
  WriteKvT(k_cache, v_cache, k, v, batch, layout);
}

void PagedAttention(float* out, const float* q, const float* k_cache, const float* v_cache,
                    const AttentionBatch& batch, const KvLayout& layout, int64_t n_heads,
                    float scale, int64_t sliding_window) {
  PagedAttentionT(out, q, k_cache, v_cache, batch, layout, n_heads, scale, sliding_window);
}

void PagedAttention(float* out, const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                    const AttentionBatch& batch, const KvLayout& layout, int64_t n_heads,
                    float scale, int64_t sliding_window) {
  PagedAttentionT(out, q, k_cache, v_cache, batch, layout, n_heads, scale, sliding_window);
}

}  // namespace loraplex::kernels
