// CudaWriteKv + CudaPagedAttention against ref::WriteKv + ref::PagedAttention: scattered block
// tables, block sizes that do not divide the lengths, GQA, head_dim from 8 (stories260K) to 256,
// prefill (every position queried), decode (the last one) and a chunked-prefill mix, with and
// without a sliding window; f32 and bf16 activations and cache. Skips without a device (see
// cuda_test_util.h).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/kernels.h"
#include "tests/kernels/cuda_test_util.h"
#include "tests/kernels/kernel_test_util.h"
#include "tests/testing/testing.h"

namespace loraplex::kernels::cuda {
namespace {

using ::loraplex::kernels::cuda::testing::CudaTest;
using ::loraplex::kernels::cuda::testing::Download;
using ::loraplex::kernels::cuda::testing::DTypeName;
using ::loraplex::kernels::cuda::testing::RoundTo;
using ::loraplex::kernels::cuda::testing::Upload;
using ::loraplex::kernels::cuda::testing::UploadRaw;
using ::loraplex::kernels::testing::RandomVector;
using ::loraplex::testing::AllClose;
using ::loraplex::testing::StatusIs;

enum class Mode { kPrefill, kDecode, kMixed };

struct Case {
  int64_t n_heads, n_kv_heads, head_dim, block_size;
  std::vector<int64_t> seq_lens;
  Mode mode;
  int64_t window = 0;  // sliding window; 0 = none
};

std::string Describe(const Case& c) {
  std::string s = "heads=" + std::to_string(c.n_heads) + "/" + std::to_string(c.n_kv_heads) +
                  " hd=" + std::to_string(c.head_dim) + " bs=" + std::to_string(c.block_size) +
                  " mode=" + std::to_string(static_cast<int>(c.mode)) +
                  " window=" + std::to_string(c.window) + " lens=";
  for (int64_t l : c.seq_lens) s += std::to_string(l) + ",";
  return s;
}

// Token lists of one batch: (sequence, position) per token.
struct Tokens {
  std::vector<int32_t> seq, pos;
  void Add(int64_t s, int64_t p) {
    seq.push_back(static_cast<int32_t>(s));
    pos.push_back(static_cast<int32_t>(p));
  }
};

void RunCase(const Case& c, DType act_dt, DType cache_dt, uint32_t seed) {
  SCOPED_TRACE(::testing::Message()
               << Describe(c) << " act=" << DTypeName(act_dt) << " cache=" << DTypeName(cache_dt));
  const int64_t num_seqs = static_cast<int64_t>(c.seq_lens.size());
  KvLayout layout{.block_size = c.block_size, .n_kv_heads = c.n_kv_heads, .head_dim = c.head_dim};
  for (int64_t len : c.seq_lens) {
    layout.max_blocks_per_seq =
        std::max(layout.max_blocks_per_seq, (len + c.block_size - 1) / c.block_size);
  }
  // Blocks handed out in a shuffled order, with two spare blocks, so that a wrong table lookup
  // reads someone else's keys.
  int64_t num_blocks = 2;
  for (int64_t len : c.seq_lens) num_blocks += (len + c.block_size - 1) / c.block_size;
  std::vector<int32_t> free_blocks(num_blocks);
  std::iota(free_blocks.begin(), free_blocks.end(), 0);
  std::shuffle(free_blocks.begin(), free_blocks.end(), std::mt19937(seed));
  std::vector<int32_t> tables(num_seqs * layout.max_blocks_per_seq, 0);
  size_t next = 0;
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t b = 0; b < (c.seq_lens[s] + c.block_size - 1) / c.block_size; ++b) {
      tables[s * layout.max_blocks_per_seq + b] = free_blocks[next++];
    }
  }

  // History: every position of every sequence, written to the cache in one batch.
  Tokens history;
  for (int64_t s = 0; s < num_seqs; ++s) {
    for (int64_t p = 0; p < c.seq_lens[s]; ++p) history.Add(s, p);
  }
  const int64_t kv_row = c.n_kv_heads * c.head_dim;
  const int64_t nh = static_cast<int64_t>(history.seq.size());
  std::vector<float> k = RoundTo(RandomVector(nh * kv_row, seed + 1, -2.0f, 2.0f), act_dt);
  std::vector<float> v = RoundTo(RandomVector(nh * kv_row, seed + 2), act_dt);

  // Queries.
  Tokens queries;
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len = c.seq_lens[s];
    const bool chunk = c.mode == Mode::kPrefill || (c.mode == Mode::kMixed && s == 0);
    for (int64_t p = chunk ? (c.mode == Mode::kMixed ? len / 2 : 0) : len - 1; p < len; ++p) {
      queries.Add(s, p);
    }
  }
  const int64_t nq = static_cast<int64_t>(queries.seq.size());
  std::vector<float> q =
      RoundTo(RandomVector(nq * c.n_heads * c.head_dim, seed + 3, -2.0f, 2.0f), act_dt);
  const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));

  // Reference: f32 cache holding what the device cache holds (values rounded to cache_dt).
  const size_t cache_elems = static_cast<size_t>(num_blocks * c.block_size * kv_row);
  std::vector<float> ref_k(cache_elems, 0.0f), ref_v(cache_elems, 0.0f);
  std::vector<float> k_c = RoundTo(k, cache_dt), v_c = RoundTo(v, cache_dt);
  AttentionBatch ref_hist{nh, history.seq.data(), history.pos.data(), tables.data()};
  ref::WriteKv(ref_k.data(), ref_v.data(), k_c.data(), v_c.data(), ref_hist, layout);
  std::vector<float> expected(nq * c.n_heads * c.head_dim);
  AttentionBatch ref_q{nq, queries.seq.data(), queries.pos.data(), tables.data()};
  ref::PagedAttention(expected.data(), q.data(), ref_k.data(), ref_v.data(), ref_q, layout,
                      c.n_heads, scale, c.window);

  ASSERT_OK_AND_ASSIGN(CudaBuffer d_k_cache, Upload(std::vector<float>(cache_elems), cache_dt));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_v_cache, Upload(std::vector<float>(cache_elems), cache_dt));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_k, Upload(k, act_dt));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_v, Upload(v, act_dt));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_tables, UploadRaw(tables));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_hist_seq, UploadRaw(history.seq));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_hist_pos, UploadRaw(history.pos));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_q_seq, UploadRaw(queries.seq));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_q_pos, UploadRaw(queries.pos));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_q, Upload(q, act_dt));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_out, Upload(std::vector<float>(expected.size()), act_dt));
  AttentionBatch hist{nh, d_hist_seq.as<int32_t>(), d_hist_pos.as<int32_t>(),
                      d_tables.as<int32_t>()};
  ASSERT_OK(CudaWriteKv(d_k_cache.data(), d_v_cache.data(), cache_dt, d_k.data(), d_v.data(),
                        act_dt, hist, layout));
  AttentionBatch batch{nq, d_q_seq.as<int32_t>(), d_q_pos.as<int32_t>(), d_tables.as<int32_t>()};
  ASSERT_OK(CudaPagedAttention(d_out.data(), d_q.data(), act_dt, d_k_cache.data(), d_v_cache.data(),
                               cache_dt, batch, layout, c.n_heads, scale, c.window));

  // The cache write is a scatter plus at most one rounding, which the reference applied too.
  ASSERT_OK_AND_ASSIGN(std::vector<float> got_k, Download(d_k_cache, cache_dt, cache_elems));
  ASSERT_OK_AND_ASSIGN(std::vector<float> got_v, Download(d_v_cache, cache_dt, cache_elems));
  EXPECT_TRUE(AllClose(got_k, ref_k, ::loraplex::testing::kExact));
  EXPECT_TRUE(AllClose(got_v, ref_v, ::loraplex::testing::kExact));
  ASSERT_OK_AND_ASSIGN(std::vector<float> got, Download(d_out, act_dt, expected.size()));
  // Inputs on both sides are the same rounded values, so an f32 output differs only by summation
  // order; a bf16 output adds its own rounding.
  EXPECT_TRUE(AllClose(
      got, expected,
      act_dt == DType::kF32 ? ::loraplex::testing::kCudaF32Op : ::loraplex::testing::kCudaBf16Op));
}

class CudaAttentionTest : public CudaTest {};

const Case kCases[] = {
    // stories260K's shape: 8 query heads over 4 kv heads of 8.
    {8, 4, 8, 16, {1, 37, 60}, Mode::kPrefill},
    {8, 4, 8, 16, {1, 37, 60}, Mode::kDecode},
    // SmolLM2-135M: 9 heads over 3 kv heads of 64.
    {9, 3, 64, 16, {577, 5}, Mode::kPrefill},
    {9, 3, 64, 16, {1537, 2, 700}, Mode::kDecode},
    {9, 3, 64, 7, {301, 33, 1, 90}, Mode::kMixed},
    // Odd head sizes and MHA / MQA.
    {4, 4, 80, 5, {129, 3}, Mode::kMixed},
    {8, 1, 128, 16, {1537}, Mode::kDecode},
    {2, 2, 256, 3, {65, 1}, Mode::kPrefill},
    {3, 1, 33, 1, {40, 9}, Mode::kMixed},
    // Sliding windows (Mistral): smaller than a block, not a multiple of it, longer than some
    // sequences, of one position, and past a long decode.
    {8, 4, 8, 16, {1, 37, 60}, Mode::kPrefill, 8},
    {9, 3, 64, 7, {301, 33, 1, 90}, Mode::kMixed, 40},
    {8, 1, 128, 16, {1537, 5}, Mode::kDecode, 1000},
    {3, 1, 33, 5, {40, 9}, Mode::kPrefill, 1},
};

TEST_F(CudaAttentionTest, MatchesReferenceF32) {
  uint32_t seed = 1;
  for (const Case& c : kCases) RunCase(c, DType::kF32, DType::kF32, seed += 10);
}

TEST_F(CudaAttentionTest, MatchesReferenceBf16Cache) {
  uint32_t seed = 1000;
  for (const Case& c : kCases) RunCase(c, DType::kF32, DType::kBF16, seed += 10);
}

TEST_F(CudaAttentionTest, MatchesReferenceBf16ActivationsAndCache) {
  uint32_t seed = 2000;
  for (const Case& c : kCases) RunCase(c, DType::kBF16, DType::kBF16, seed += 10);
}

TEST_F(CudaAttentionTest, MatchesReferenceBf16ActivationsF32Cache) {
  uint32_t seed = 3000;
  for (const Case& c : kCases) RunCase(c, DType::kBF16, DType::kF32, seed += 10);
}

// Host-side checks only (nothing is launched), so this runs without a device too.
TEST(CudaAttentionTestArgs, RejectsBadArguments) {
  KvLayout layout{.block_size = 16, .n_kv_heads = 2, .head_dim = 64, .max_blocks_per_seq = 4};
  AttentionBatch empty{};
  EXPECT_THAT(CudaPagedAttention(nullptr, nullptr, DType::kF32, nullptr, nullptr, DType::kF32,
                                 empty, layout, 3, 1.0f),
              StatusIs(absl::StatusCode::kInvalidArgument, "n_heads=3"));
  KvLayout big = layout;
  big.head_dim = 320;
  EXPECT_THAT(CudaPagedAttention(nullptr, nullptr, DType::kF32, nullptr, nullptr, DType::kF32,
                                 empty, big, 2, 1.0f),
              StatusIs(absl::StatusCode::kInvalidArgument, "layout.head_dim=320"));
  EXPECT_THAT(CudaPagedAttention(nullptr, nullptr, DType::kF32, nullptr, nullptr, DType::kF32,
                                 empty, layout, 2, 1.0f, -1),
              StatusIs(absl::StatusCode::kInvalidArgument, "sliding_window=-1"));
  AttentionBatch one{1, nullptr, nullptr, nullptr};
  EXPECT_THAT(
      CudaWriteKv(nullptr, nullptr, DType::kF32, nullptr, nullptr, DType::kF32, one, layout),
      StatusIs(absl::StatusCode::kInvalidArgument, "batch.token_seq"));
  KvLayout zero_block = layout;
  zero_block.block_size = 0;
  EXPECT_THAT(
      CudaWriteKv(nullptr, nullptr, DType::kF32, nullptr, nullptr, DType::kF32, empty, zero_block),
      StatusIs(absl::StatusCode::kInvalidArgument, "layout.block_size=0"));
}

}  // namespace
}  // namespace loraplex::kernels::cuda
