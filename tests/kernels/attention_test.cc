// WriteKv and PagedAttention: fast vs reference on batches that mix prefill, chunked prefill and
// decode, GQA, odd block sizes and shuffled (non-contiguous) block tables; and PagedAttention vs a
// dense causal attention written here, in double, over contiguous Q/K/V. Both with and without a
// sliding window (Mistral): a window that starts mid-block, one of a single key, one equal to the
// block size, and one longer than every sequence (which must equal no window).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include "common/half.h"
#include "kernels/kernels.h"
#include "tests/kernels/kernel_test_util.h"
#include "tests/testing/testing.h"

namespace loraplex::kernels {
namespace {

using ::loraplex::kernels::testing::AllIsas;
using ::loraplex::kernels::testing::IsaTest;
using ::loraplex::kernels::testing::RandomVector;
using ::loraplex::testing::AllClose;
using ::loraplex::testing::kF32KernelVsReference;

struct Shape {
  int64_t n_heads, n_kv_heads, head_dim, block_size;
};

// Sequences of a batch: `past` positions already cached, `fresh` new tokens in this step.
struct Seq {
  int64_t past, fresh;
};

// A paged cache with shuffled block tables. Unwritten slots hold NaN, so reading a position that
// was never written (a wrong block or slot) poisons the output instead of passing unnoticed.
struct PagedCache {
  KvLayout layout;
  int64_t num_blocks = 0;
  std::vector<int32_t> tables;  // [num_seqs, max_blocks_per_seq], -1 where unused
  std::vector<float> k, v;

  PagedCache(const Shape& s, const std::vector<int64_t>& seq_lens, uint32_t seed) {
    layout = {s.block_size, s.n_kv_heads, s.head_dim, 0};
    int64_t needed = 0;
    for (int64_t len : seq_lens) {
      const int64_t blocks = (len + s.block_size - 1) / s.block_size;
      layout.max_blocks_per_seq = std::max(layout.max_blocks_per_seq, blocks);
      needed += blocks;
    }
    num_blocks = needed + 3;  // spare blocks no sequence owns
    std::vector<int32_t> ids(num_blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), std::mt19937(seed));
    tables.assign(seq_lens.size() * layout.max_blocks_per_seq, -1);
    size_t next = 0;
    for (size_t q = 0; q < seq_lens.size(); ++q) {
      const int64_t blocks = (seq_lens[q] + s.block_size - 1) / s.block_size;
      for (int64_t b = 0; b < blocks; ++b) tables[q * layout.max_blocks_per_seq + b] = ids[next++];
    }
    const size_t pool = num_blocks * s.block_size * s.n_kv_heads * s.head_dim;
    k.assign(pool, std::numeric_limits<float>::quiet_NaN());
    v.assign(pool, std::numeric_limits<float>::quiet_NaN());
  }
};

struct Tokens {
  std::vector<int32_t> seq, pos;
};

// Tokens of positions [from_past ? 0 : past, past + fresh) for each sequence, interleaved across
// sequences (not sorted by sequence) so the kernels cannot assume grouping.
Tokens MakeTokens(const std::vector<Seq>& seqs, bool past_part) {
  Tokens t;
  for (int64_t round = 0;; ++round) {
    bool any = false;
    for (size_t q = 0; q < seqs.size(); ++q) {
      const int64_t begin = past_part ? 0 : seqs[q].past;
      const int64_t end = past_part ? seqs[q].past : seqs[q].past + seqs[q].fresh;
      if (begin + round < end) {
        t.seq.push_back(static_cast<int32_t>(q));
        t.pos.push_back(static_cast<int32_t>(begin + round));
        any = true;
      }
    }
    if (!any) return t;
  }
}

class PagedAttentionTest : public IsaTest {};

// Sliding windows tried by every test: none, a single key (only the token itself), one that
// starts mid-block for most shapes, exactly 16 (a block edge for block_size 16), and one longer
// than any sequence here (must equal no window).
constexpr int64_t kWindows[] = {0, 1, 5, 16, 1000};

TEST_P(PagedAttentionTest, MixedBatchMatchesReference) {
  const Shape shapes[] = {{9, 3, 64, 16}, {9, 3, 8, 16}, {9, 3, 64, 7},
                          {9, 3, 8, 1},   {4, 4, 33, 5}, {6, 1, 8, 3}};
  const std::vector<Seq> seqs = {{37, 1}, {0, 13}, {20, 6}, {0, 1}, {100, 1}, {15, 2}};
  std::vector<int64_t> lens;
  for (const Seq& s : seqs) lens.push_back(s.past + s.fresh);
  uint32_t seed = 100;
  for (const Shape& s : shapes) {
    SCOPED_TRACE(::testing::Message()
                 << "n_heads=" << s.n_heads << " n_kv_heads=" << s.n_kv_heads
                 << " head_dim=" << s.head_dim << " block_size=" << s.block_size);
    PagedCache fast(s, lens, seed++);
    PagedCache expected = fast;
    const int64_t kv_row = s.n_kv_heads * s.head_dim;
    for (bool past_part : {true, false}) {
      Tokens tok = MakeTokens(seqs, past_part);
      AttentionBatch batch{static_cast<int64_t>(tok.seq.size()), tok.seq.data(), tok.pos.data(),
                           fast.tables.data()};
      std::vector<float> k = RandomVector(batch.num_tokens * kv_row, seed++);
      std::vector<float> v = RandomVector(batch.num_tokens * kv_row, seed++);
      WriteKv(fast.k.data(), fast.v.data(), k.data(), v.data(), batch, fast.layout);
      ref::WriteKv(expected.k.data(), expected.v.data(), k.data(), v.data(), batch,
                   expected.layout);
      // Bitwise, NaNs of unused slots included.
      ASSERT_EQ(0, std::memcmp(fast.k.data(), expected.k.data(), fast.k.size() * sizeof(float)));
      ASSERT_EQ(0, std::memcmp(fast.v.data(), expected.v.data(), fast.v.size() * sizeof(float)));
      if (past_part) continue;

      const int64_t q_row = s.n_heads * s.head_dim;
      std::vector<float> q = RandomVector(batch.num_tokens * q_row, seed++, -2.0f, 2.0f);
      std::vector<float> out_fast(batch.num_tokens * q_row), out_ref(out_fast.size());
      const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
      for (int64_t window : kWindows) {
        SCOPED_TRACE(::testing::Message() << "sliding_window=" << window);
        PagedAttention(out_fast.data(), q.data(), fast.k.data(), fast.v.data(), batch, fast.layout,
                       s.n_heads, scale, window);
        ref::PagedAttention(out_ref.data(), q.data(), expected.k.data(), expected.v.data(), batch,
                            expected.layout, s.n_heads, scale, window);
        ASSERT_TRUE(AllClose(out_fast, out_ref, kF32KernelVsReference));
      }
    }
  }
}

// f16 pools: WriteKv stores each new key and value rounded to f16 (unwritten slots untouched),
// and PagedAttention on them equals the reference on f32 pools that hold the same rounded values.
TEST_P(PagedAttentionTest, F16PoolsEqualF32PoolsOfTheRoundedValues) {
  const Shape shapes[] = {{9, 3, 64, 16}, {9, 3, 8, 16}, {4, 4, 33, 5}, {6, 1, 8, 3}};
  const std::vector<Seq> seqs = {{37, 1}, {0, 13}, {20, 6}, {0, 1}, {100, 1}, {15, 2}};
  std::vector<int64_t> lens;
  for (const Seq& s : seqs) lens.push_back(s.past + s.fresh);
  constexpr uint16_t kUnwritten = 0x7E00;  // an f16 NaN
  uint32_t seed = 300;
  for (const Shape& s : shapes) {
    SCOPED_TRACE(::testing::Message()
                 << "n_heads=" << s.n_heads << " n_kv_heads=" << s.n_kv_heads
                 << " head_dim=" << s.head_dim << " block_size=" << s.block_size);
    PagedCache expected(s, lens, seed++);
    std::vector<uint16_t> k16(expected.k.size(), kUnwritten), v16(expected.v.size(), kUnwritten);
    const int64_t kv_row = s.n_kv_heads * s.head_dim;
    for (bool past_part : {true, false}) {
      Tokens tok = MakeTokens(seqs, past_part);
      AttentionBatch batch{static_cast<int64_t>(tok.seq.size()), tok.seq.data(), tok.pos.data(),
                           expected.tables.data()};
      std::vector<float> k = RandomVector(batch.num_tokens * kv_row, seed++, -4.0f, 4.0f);
      std::vector<float> v = RandomVector(batch.num_tokens * kv_row, seed++, -4.0f, 4.0f);
      WriteKv(k16.data(), v16.data(), k.data(), v.data(), batch, expected.layout);
      for (float& x : k) x = F16ToF32(F32ToF16(x));
      for (float& x : v) x = F16ToF32(F32ToF16(x));
      ref::WriteKv(expected.k.data(), expected.v.data(), k.data(), v.data(), batch,
                   expected.layout);
      for (size_t i = 0; i < k16.size(); ++i) {
        if (std::isnan(expected.k[i])) {
          ASSERT_EQ(k16[i], kUnwritten) << "slot value " << i << " written";
          ASSERT_EQ(v16[i], kUnwritten) << "slot value " << i << " written";
        } else {
          ASSERT_EQ(F16ToF32(k16[i]), expected.k[i]) << i;
          ASSERT_EQ(F16ToF32(v16[i]), expected.v[i]) << i;
        }
      }
      if (past_part) continue;

      const int64_t q_row = s.n_heads * s.head_dim;
      std::vector<float> q = RandomVector(batch.num_tokens * q_row, seed++, -2.0f, 2.0f);
      std::vector<float> out_fast(batch.num_tokens * q_row), out_ref(out_fast.size());
      const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
      for (int64_t window : kWindows) {
        SCOPED_TRACE(::testing::Message() << "sliding_window=" << window);
        PagedAttention(out_fast.data(), q.data(), k16.data(), v16.data(), batch, expected.layout,
                       s.n_heads, scale, window);
        ref::PagedAttention(out_ref.data(), q.data(), expected.k.data(), expected.v.data(), batch,
                            expected.layout, s.n_heads, scale, window);
        ASSERT_TRUE(AllClose(out_fast, out_ref, kF32KernelVsReference));
      }
    }
  }
}

// out[t, h] = softmax_{lo(t) <= p <= t}(scale * q[t,h] . k[p, h/group]) v[p, h/group], in double,
// over one sequence's contiguous q [len, n_heads, hd] and k, v [len, n_kv_heads, hd]. lo(t) = 0,
// or with a window W > 0, the mask of transformers' sliding_window_overlay written out: p is
// visible when p > t - W.
std::vector<float> DenseCausalAttention(const std::vector<float>& q, const std::vector<float>& k,
                                        const std::vector<float>& v, int64_t len, const Shape& s,
                                        double scale, int64_t window = 0) {
  const int64_t hd = s.head_dim, group = s.n_heads / s.n_kv_heads;
  std::vector<float> out(len * s.n_heads * hd);
  for (int64_t t = 0; t < len; ++t) {
    for (int64_t h = 0; h < s.n_heads; ++h) {
      const int64_t kvh = h / group;
      // Masked positions get -inf logits, i.e. weight exactly 0.
      std::vector<double> logits(t + 1, -INFINITY);
      for (int64_t p = 0; p <= t; ++p) {
        if (window > 0 && !(p > t - window)) continue;
        double dot = 0;
        for (int64_t i = 0; i < hd; ++i) {
          dot += double{q[(t * s.n_heads + h) * hd + i]} * k[(p * s.n_kv_heads + kvh) * hd + i];
        }
        logits[p] = dot * scale;
      }
      const double mx = *std::max_element(logits.begin(), logits.end());
      double denom = 0;
      for (double& l : logits) denom += (l = std::exp(l - mx));
      for (int64_t i = 0; i < hd; ++i) {
        double acc = 0;
        for (int64_t p = 0; p <= t; ++p) acc += logits[p] * v[(p * s.n_kv_heads + kvh) * hd + i];
        out[(t * s.n_heads + h) * hd + i] = static_cast<float>(acc / denom);
      }
    }
  }
  return out;
}

TEST_P(PagedAttentionTest, EqualsDenseCausalAttention) {
  const Shape shapes[] = {{9, 3, 64, 16}, {9, 3, 8, 5}, {2, 2, 17, 3}};
  const std::vector<int64_t> lens = {29, 1, 64, 7};
  uint32_t seed = 500;
  for (const Shape& s : shapes) {
    SCOPED_TRACE(::testing::Message()
                 << "n_heads=" << s.n_heads << " n_kv_heads=" << s.n_kv_heads
                 << " head_dim=" << s.head_dim << " block_size=" << s.block_size);
    PagedCache cache(s, lens, seed++);
    const int64_t q_row = s.n_heads * s.head_dim, kv_row = s.n_kv_heads * s.head_dim;
    const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
    // Dense per-sequence tensors, and the same tokens as one flat prefill batch.
    std::vector<std::vector<float>> q(lens.size()), k(lens.size()), v(lens.size());
    std::vector<float> flat_q, flat_k, flat_v;
    Tokens tok;
    for (size_t i = 0; i < lens.size(); ++i) {
      q[i] = RandomVector(lens[i] * q_row, seed++, -2.0f, 2.0f);
      k[i] = RandomVector(lens[i] * kv_row, seed++, -2.0f, 2.0f);
      v[i] = RandomVector(lens[i] * kv_row, seed++);
      flat_q.insert(flat_q.end(), q[i].begin(), q[i].end());
      flat_k.insert(flat_k.end(), k[i].begin(), k[i].end());
      flat_v.insert(flat_v.end(), v[i].begin(), v[i].end());
      for (int64_t p = 0; p < lens[i]; ++p) {
        tok.seq.push_back(static_cast<int32_t>(i));
        tok.pos.push_back(static_cast<int32_t>(p));
      }
    }
    AttentionBatch batch{static_cast<int64_t>(tok.seq.size()), tok.seq.data(), tok.pos.data(),
                         cache.tables.data()};
    WriteKv(cache.k.data(), cache.v.data(), flat_k.data(), flat_v.data(), batch, cache.layout);
    for (int64_t window : kWindows) {
      SCOPED_TRACE(::testing::Message() << "sliding_window=" << window);
      std::vector<float> out(batch.num_tokens * q_row);
      PagedAttention(out.data(), flat_q.data(), cache.k.data(), cache.v.data(), batch, cache.layout,
                     s.n_heads, scale, window);
      int64_t offset = 0;
      for (size_t i = 0; i < lens.size(); ++i) {
        SCOPED_TRACE(::testing::Message() << "sequence " << i << " of length " << lens[i]);
        std::vector<float> dense =
            DenseCausalAttention(q[i], k[i], v[i], lens[i], s, scale, window);
        std::vector<float> paged(out.begin() + offset, out.begin() + offset + lens[i] * q_row);
        ASSERT_TRUE(AllClose(paged, dense, kF32KernelVsReference));
        offset += lens[i] * q_row;
      }

      // Decode: the last token of each sequence alone, reading the cache the prefill wrote.
      Tokens last;
      std::vector<float> last_q;
      for (size_t i = 0; i < lens.size(); ++i) {
        last.seq.push_back(static_cast<int32_t>(i));
        last.pos.push_back(static_cast<int32_t>(lens[i] - 1));
        last_q.insert(last_q.end(), q[i].end() - q_row, q[i].end());
      }
      AttentionBatch decode{static_cast<int64_t>(lens.size()), last.seq.data(), last.pos.data(),
                            cache.tables.data()};
      std::vector<float> decode_out(lens.size() * q_row);
      PagedAttention(decode_out.data(), last_q.data(), cache.k.data(), cache.v.data(), decode,
                     cache.layout, s.n_heads, scale, window);
      for (size_t i = 0; i < lens.size(); ++i) {
        std::vector<float> dense =
            DenseCausalAttention(q[i], k[i], v[i], lens[i], s, scale, window);
        std::vector<float> want(dense.end() - q_row, dense.end());
        std::vector<float> got(decode_out.begin() + i * q_row,
                               decode_out.begin() + (i + 1) * q_row);
        ASSERT_TRUE(AllClose(got, want, kF32KernelVsReference)) << "decode of sequence " << i;
      }
    }  // window
  }
}

// The window really drops keys: with one key far larger than the rest, a token whose window
// excludes that key must not see it (a kernel that ignored the window would, and the comparisons
// above would then only catch it against the dense reference).
TEST_P(PagedAttentionTest, KeysOutsideTheWindowAreNeverRead) {
  const Shape s{4, 2, 8, 4};
  const int64_t len = 23, window = 6;
  PagedCache cache(s, {len}, 9);
  const int64_t q_row = s.n_heads * s.head_dim, kv_row = s.n_kv_heads * s.head_dim;
  std::vector<float> k = RandomVector(len * kv_row, 1), v = RandomVector(len * kv_row, 2);
  std::vector<float> q = RandomVector(len * q_row, 3);
  Tokens tok;
  for (int64_t p = 0; p < len; ++p) {
    tok.seq.push_back(0);
    tok.pos.push_back(static_cast<int32_t>(p));
  }
  AttentionBatch batch{len, tok.seq.data(), tok.pos.data(), cache.tables.data()};
  WriteKv(cache.k.data(), cache.v.data(), k.data(), v.data(), batch, cache.layout);
  // Poison every position that the last token's window excludes: reading any of them gives NaN.
  const int32_t* table = cache.tables.data();
  for (int64_t p = 0; p < len - window; ++p) {
    const int64_t at = (table[p / s.block_size] * s.block_size + p % s.block_size) * kv_row;
    std::fill(cache.k.begin() + at, cache.k.begin() + at + kv_row, NAN);
    std::fill(cache.v.begin() + at, cache.v.begin() + at + kv_row, NAN);
  }
  const int32_t last_pos = len - 1, seq0 = 0;
  AttentionBatch decode{1, &seq0, &last_pos, cache.tables.data()};
  std::vector<float> out(q_row), out_ref(q_row);
  const float scale = 1.0f / std::sqrt(static_cast<float>(s.head_dim));
  const float* last_q = q.data() + (len - 1) * q_row;
  PagedAttention(out.data(), last_q, cache.k.data(), cache.v.data(), decode, cache.layout,
                 s.n_heads, scale, window);
  ref::PagedAttention(out_ref.data(), last_q, cache.k.data(), cache.v.data(), decode, cache.layout,
                      s.n_heads, scale, window);
  for (float x : out) ASSERT_TRUE(std::isfinite(x)) << "read a key outside the window";
  ASSERT_TRUE(AllClose(out, out_ref, kF32KernelVsReference));
  // And one more key of window makes the poisoned position visible: NaN must show.
  PagedAttention(out.data(), last_q, cache.k.data(), cache.v.data(), decode, cache.layout,
                 s.n_heads, scale, window + 1);
  EXPECT_TRUE(std::isnan(out[0])) << "a window of " << window + 1 << " must read position "
                                  << len - window - 1;
}

INSTANTIATE_TEST_SUITE_P(Isa, PagedAttentionTest, ::testing::ValuesIn(AllIsas()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace loraplex::kernels
