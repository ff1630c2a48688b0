// The fast SGMV/BGMV ops (AVX2 and scalar micro-kernels) against the readable reference, on the
// grid of STYLE.md: ranks 1..64 and 256, 1..64 adapters, index -1, empty and duplicate segments,
// prefill and decode, odd sizes, f32 and bf16, fused q/k/v slices at column offsets.

#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "common/thread_pool.h"
#include "kernels/lora.h"
#include "tests/kernels/kernel_test_util.h"
#include "tests/testing/testing.h"

namespace loraplex::kernels {
namespace {

using ::loraplex::testing::AllClose;
using ::loraplex::testing::kBf16KernelVsReference;
using ::loraplex::testing::kExact;
using ::loraplex::testing::kF32KernelVsReference;

constexpr float kUntouched = 1234.5f;  // marks rows an op must not write

std::vector<float> Random(size_t n, std::mt19937& rng, float scale) {
  std::uniform_real_distribution<float> dist(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(rng);
  return v;
}

// Owns the random weights of num_adapters adapters x num_slices slices.
struct Adapters {
  std::vector<std::vector<float>> f32;
  std::vector<std::vector<uint16_t>> bf16;
  std::vector<WeightView> a, b;
  LoraSliceWeights weights;
  int64_t max_total_rank = 0;
  bool any_bf16 = false;

  Adapters(int64_t num_adapters, int64_t in, const std::vector<int64_t>& outs,
           const std::vector<int64_t>& ranks, std::mt19937& rng, bool allow_bf16) {
    const int64_t slices = static_cast<int64_t>(outs.size());
    std::uniform_int_distribution<size_t> pick_rank(0, ranks.size() - 1);
    // Reserve so views into the vectors stay valid.
    f32.reserve(num_adapters * slices * 2);
    bf16.reserve(num_adapters * slices * 2);
    for (int64_t j = 0; j < num_adapters; ++j) {
      const bool use_bf16 = allow_bf16 && (j % 2 == 1);
      any_bf16 |= use_bf16;
      int64_t total = 0;
      for (int64_t s = 0; s < slices; ++s) {
        int64_t r = ranks[pick_rank(rng)];
        if (slices > 1 && (j + s) % 4 == 3) r = 0;  // adapter does not target this slice
        total += r;
        a.push_back(Make(r, in, use_bf16, rng, 0.1f));
        b.push_back(Make(outs[s], r, use_bf16, rng, 0.1f));
      }
      max_total_rank = std::max(max_total_rank, total);
    }
    weights = {num_adapters, slices, a.data(), b.data()};
  }

  WeightView Make(int64_t rows, int64_t cols, bool use_bf16, std::mt19937& rng, float scale) {
    if (rows == 0 || cols == 0) return {use_bf16 ? DType::kBF16 : DType::kF32, nullptr, rows, cols};
    std::vector<float> v = Random(rows * cols, rng, scale);
    if (!use_bf16) {
      f32.push_back(std::move(v));
      return {DType::kF32, f32.back().data(), rows, cols};
    }
    std::vector<uint16_t> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = F32ToBf16(v[i]);
    bf16.push_back(std::move(h));
    return {DType::kBF16, bf16.back().data(), rows, cols};
  }
};

// One grid point.
struct Case {
  int64_t tokens;
  int64_t in;
  std::vector<int64_t> outs;  // one per slice
  std::vector<int64_t> ranks;
  int64_t num_adapters;
  bool bf16;
  bool decode;  // BGMV with random per-token indices; else SGMV over random segments
  uint32_t seed;
  // BGMV only: these per-token indices instead of random ones (size == tokens).
  std::vector<int32_t> fixed = {};
  // x, v and y rows packed (strides = widths; one slice), so that a long segment's rows are one
  // block the Gemm route reads and writes in place; else padded strides catch stride mix-ups.
  bool packed = false;
  // SGMV only: these segment lengths (one adapter each, in turn over 0..num_adapters-1 then -1).
  std::vector<int64_t> lengths = {};
};

std::string Describe(const Case& c) {
  std::string s = "tokens=" + std::to_string(c.tokens) + " in=" + std::to_string(c.in) +
                  " slices=" + std::to_string(c.outs.size()) +
                  " out0=" + std::to_string(c.outs[0]) + " ranks0=" + std::to_string(c.ranks[0]) +
                  " adapters=" + std::to_string(c.num_adapters) + (c.bf16 ? " bf16" : " f32") +
                  (c.decode ? " bgmv" : " sgmv");
  return s;
}

// Runs fast and reference shrink+expand on one case; the fast path is forced to `scalar` or not.
void RunCase(const Case& c, bool force_scalar) {
  SCOPED_TRACE(Describe(c) + (force_scalar ? " scalar" : " auto"));
  std::mt19937 rng(c.seed);
  Adapters ad(c.num_adapters, c.in, c.outs, c.ranks, rng, c.bf16);
  const int64_t slices = static_cast<int64_t>(c.outs.size());

  // x with a row stride wider than `in` to catch stride mix-ups (unless packed).
  const int64_t x_stride = c.packed ? c.in : c.in + 3;
  std::vector<float> x = Random(c.tokens * x_stride, rng, 1.0f);

  // Token -> adapter: -1 mixed in, duplicates, and (SGMV) segments incl. empty ones.
  std::uniform_int_distribution<int32_t> pick(-1, static_cast<int32_t>(c.num_adapters) - 1);
  std::vector<int32_t> per_token(c.tokens);
  std::vector<int64_t> starts{0};
  std::vector<int32_t> seg_adapter;
  if (c.decode && !c.fixed.empty()) {
    per_token = c.fixed;
  } else if (c.decode) {
    for (int32_t& j : per_token) j = pick(rng);
  } else if (!c.lengths.empty()) {
    for (size_t i = 0; i < c.lengths.size(); ++i) {
      const int64_t end = starts.back() + c.lengths[i];
      const auto j = static_cast<int32_t>(i % (c.num_adapters + 1));
      seg_adapter.push_back(j == c.num_adapters ? -1 : j);
      for (int64_t t = starts.back(); t < end; ++t) per_token[t] = seg_adapter.back();
      starts.push_back(end);
    }
    EXPECT_EQ(starts.back(), c.tokens);
  } else {
    std::uniform_int_distribution<int64_t> len(0, std::max<int64_t>(1, c.tokens / 3));
    while (starts.back() < c.tokens) {
      const int64_t end = std::min(c.tokens, starts.back() + len(rng));
      seg_adapter.push_back(pick(rng));
      for (int64_t t = starts.back(); t < end; ++t) per_token[t] = seg_adapter.back();
      starts.push_back(end);
    }
  }
  LoraSegments seg{static_cast<int64_t>(seg_adapter.size()), starts.data(), seg_adapter.data()};

  // Fused output: all slices side by side in one buffer with a padding column at each end
  // (packed: one slice, no padding).
  int64_t y_stride = c.packed ? 0 : 2;
  std::vector<int64_t> col(slices);
  for (int64_t s = 0; s < slices; ++s) {
    col[s] = (c.packed ? 0 : 1) + (s == 0 ? 0 : col[s - 1] + c.outs[s - 1] - 1);
    y_stride += c.outs[s];
  }
  std::vector<float> y0 = Random(c.tokens * y_stride, rng, 1.0f);
  std::vector<float> y_fast = y0, y_ref = y0;
  LoraOutput out_fast[kMaxLoraSlices], out_ref[kMaxLoraSlices];
  for (int64_t s = 0; s < slices; ++s) {
    out_fast[s] = {y_fast.data() + col[s], y_stride};
    out_ref[s] = {y_ref.data() + col[s], y_stride};
  }

  const int64_t v_stride = std::max<int64_t>(1, ad.max_total_rank);
  std::vector<float> v_fast(c.tokens * v_stride, kUntouched), v_ref = v_fast;

  SetLoraForceScalar(force_scalar);
  if (c.decode) {
    BgmvShrink(v_fast.data(), v_stride, x.data(), x_stride, per_token.data(), c.tokens, ad.weights);
    BgmvExpand(out_fast, v_fast.data(), v_stride, per_token.data(), c.tokens, ad.weights);
  } else {
    SgmvShrink(v_fast.data(), v_stride, x.data(), x_stride, seg, ad.weights);
    SgmvExpand(out_fast, v_fast.data(), v_stride, seg, ad.weights);
  }
  // Both in one call, added and subtracted: the same bits as the two ops (fused or not).
  std::vector<float> y_one = y0, y_neg = y0;
  LoraOutput out_one[kMaxLoraSlices], out_neg[kMaxLoraSlices];
  for (int64_t s = 0; s < slices; ++s) {
    out_one[s] = {y_one.data() + col[s], y_stride};
    out_neg[s] = {y_neg.data() + col[s], y_stride};
  }
  if (c.decode) {
    BgmvShrinkExpand(out_one, x.data(), x_stride, per_token.data(), c.tokens, ad.weights, false);
    BgmvShrinkExpand(out_neg, x.data(), x_stride, per_token.data(), c.tokens, ad.weights, true);
  } else {
    SgmvShrinkExpand(out_one, x.data(), x_stride, seg, ad.weights, false);
    SgmvShrinkExpand(out_neg, x.data(), x_stride, seg, ad.weights, true);
  }
  SetLoraForceScalar(false);
  // The same bits while every adapter has fewer than 16 tokens (lora.h); else the fused path may
  // run an adapter's GEMMs in another order.
  std::vector<int64_t> per_adapter(c.num_adapters, 0);
  for (int32_t j : per_token) {
    if (j >= 0) ++per_adapter[j];
  }
  const bool few = *std::max_element(per_adapter.begin(), per_adapter.end()) < 16;
  EXPECT_TRUE(AllClose(
      y_one, y_fast, few ? kExact : (ad.any_bf16 ? kBf16KernelVsReference : kF32KernelVsReference)))
      << "shrink+expand in one call";
  ref::BgmvShrink(v_ref.data(), v_stride, x.data(), x_stride, per_token.data(), c.tokens,
                  ad.weights);
  ref::BgmvExpand(out_ref, v_ref.data(), v_stride, per_token.data(), c.tokens, ad.weights);
  std::vector<float> y_ref_neg = y0;
  LoraOutput out_ref_neg[kMaxLoraSlices];
  for (int64_t s = 0; s < slices; ++s) out_ref_neg[s] = {y_ref_neg.data() + col[s], y_stride};
  ref::BgmvShrinkExpand(out_ref_neg, x.data(), x_stride, per_token.data(), c.tokens, ad.weights,
                        /*negate=*/true);

  const auto tol = ad.any_bf16 ? kBf16KernelVsReference : kF32KernelVsReference;
  EXPECT_TRUE(AllClose(v_fast, v_ref, tol)) << "shrink";
  EXPECT_TRUE(AllClose(y_fast, y_ref, tol)) << "expand";
  EXPECT_TRUE(AllClose(y_neg, y_ref_neg, tol)) << "shrink+expand, negated";
  // The negated delta is the delta negated: y0 - d against y0 + d in the reference.
  for (size_t i = 0; i < y0.size(); ++i) {
    ASSERT_NEAR(y_ref_neg[i] - y0[i], -(y_ref[i] - y0[i]), 1e-5f * (1.0f + std::abs(y_ref[i])));
  }
  // Rows of tokens without an adapter, and v past each adapter's total rank, stay untouched; the
  // reference agrees (checked above), so one check on the reference's buffers covers both.
  for (int64_t t = 0; t < c.tokens; ++t) {
    const int64_t used = per_token[t] < 0 ? 0 : LoraTotalRank(ad.weights, per_token[t]);
    for (int64_t r = used; r < v_stride; ++r) ASSERT_EQ(v_ref[t * v_stride + r], kUntouched);
    if (per_token[t] < 0) {
      for (int64_t k = 0; k < y_stride; ++k) {
        ASSERT_EQ(y_ref[t * y_stride + k], y0[t * y_stride + k]) << "token " << t;
      }
    }
    if (c.packed) continue;
    ASSERT_EQ(y_ref[t * y_stride], y0[t * y_stride]) << "left padding column";
    ASSERT_EQ(y_ref[t * y_stride + y_stride - 1], y0[t * y_stride + y_stride - 1]);
  }
}

class LoraGridTest : public ::testing::TestWithParam<bool> {};  // param: force scalar

TEST_P(LoraGridTest, RanksAdaptersSizesModes) {
  uint32_t seed = 1;
  for (bool decode : {true, false}) {
    for (bool bf16 : {false, true}) {
      // Ranks 1..64 (mixed within a batch), few and many adapters, odd sizes.
      RunCase(
          {decode ? 7 : 41, 577, {1537}, {1, 2, 3, 5, 8, 13, 16, 31, 64}, 5, bf16, decode, seed++},
          GetParam());
      RunCase({decode ? 64 : 97, 64, {172}, {1, 7, 16, 33, 64}, 64, bf16, decode, seed++},
              GetParam());
      RunCase({decode ? 3 : 9, 1537, {577}, {256}, 2, bf16, decode, seed++}, GetParam());
      RunCase({1, 577, {577}, {16}, 1, bf16, decode, seed++}, GetParam());
      // Fused q, k, v (GQA widths), some adapters missing some slices.
      RunCase({decode ? 13 : 50, 576, {576, 192, 192}, {4, 8, 16}, 6, bf16, decode, seed++},
              GetParam());
      RunCase({decode ? 5 : 23, 65, {65, 33, 17}, {1, 2, 9, 64}, 3, bf16, decode, seed++},
              GetParam());
    }
  }
}

// The fast ops group tokens by adapter and block them 2 at a time (4 rows x 2 tokens) or 1 at a
// time (8 rows for short weight rows, 2 for long ones), with tails in k (the input side: blocks of
// 16, then 8, then a zero-padded rest) and in rows. These cases walk each of those paths.
TEST_P(LoraGridTest, GroupingAndTails) {
  uint32_t seed = 100;
  std::vector<int32_t> idx;
  for (bool bf16 : {false, true}) {
    // Many tokens per adapter, interleaved, more than one token block (64) per adapter, with -1.
    idx.clear();
    for (int t = 0; t < 203; ++t) idx.push_back(t % 7 == 6 ? -1 : t % 3);
    RunCase({203, 577, {193}, {16, 64}, 3, bf16, true, seed++, idx}, GetParam());
    // One token per adapter (decode of scenario S2), indices permuted.
    idx.clear();
    for (int t = 0; t < 32; ++t) idx.push_back((t * 13) % 32);
    RunCase({32, 576, {576, 192, 192}, {64}, 32, bf16, true, seed++, idx}, GetParam());
    // All tokens on one adapter, odd count (a 2-token block then a 1-token one).
    RunCase({5, 100, {37}, {3}, 1, bf16, true, seed++, {0, 0, 0, 0, 0}}, GetParam());
    // Every k-tail shape on both sides: in = 1..40 (shrink), ranks 1..19 (expand), odd outputs.
    for (int64_t in : {1, 7, 8, 9, 15, 16, 17, 23, 24, 31, 33, 40}) {
      RunCase({6,
               in,
               {in + 2, 9},
               {1, 2, 5, 8, 9, 15, 16, 17, 19},
               3,
               bf16,
               true,
               seed++,
               {0, 1, 2, 0, 1, 0}},
              GetParam());
    }
  }
}

// An adapter with kGemmMinTokens (16) tokens or more in a call goes through the blocked Gemm
// (kernels/cpu/lora_fast.cc): rows read and written in place when its tokens are one packed
// segment, gathered and scattered otherwise (strided rows, interleaved tokens, fused slices), next
// to adapters with fewer tokens that stay on the tiles.
TEST_P(LoraGridTest, LongSegmentsGoThroughGemm) {
  uint32_t seed = 200;
  for (bool bf16 : {false, true}) {
    // Packed, one rank (so v's stride is every adapter's rank): 16, 15, 40, 64 tokens and a 23
    // token segment without adapter; the 15-token one stays on the tiles.
    RunCase({158, 577, {193}, {16}, 4, bf16, false, seed++, {}, true, {16, 15, 40, 64, 23}},
            GetParam());
    RunCase({137, 64, {576}, {64}, 2, bf16, false, seed++, {}, true, {17, 100, 20}}, GetParam());
    // The same lengths with padded strides and mixed ranks (gathered rows, scattered results).
    RunCase(
        {158, 577, {193}, {1, 16, 64, 5}, 4, bf16, false, seed++, {}, false, {16, 15, 40, 64, 23}},
        GetParam());
    // Fused q, k, v: every slice's output is strided.
    RunCase({120,
             576,
             {576, 192, 192},
             {8, 16, 64},
             3,
             bf16,
             false,
             seed++,
             {},
             false,
             {40, 16, 33, 7, 24}},
            GetParam());
    // BGMV: 2 adapters with 20+ interleaved tokens (gathered) and 6 with 1-3 (tiles), one call.
    std::vector<int32_t> idx;
    for (int t = 0; t < 60; ++t) idx.push_back(t % 3 == 2 ? 2 + (t / 3) % 6 : t % 3);
    RunCase({60, 300, {129, 65}, {16, 9}, 8, bf16, true, seed++, idx}, GetParam());
  }
}

// Each output element is one fixed sequence of operations (kernels/cpu/lora_internal.h): a token's
// result does not depend on which other tokens share its adapter or how the batch was blocked
// (while the adapter has fewer than 16 tokens in the call, as here: 8).
TEST_P(LoraGridTest, TokenResultIndependentOfBatch) {
  std::mt19937 rng(31);
  Adapters ad(2, 583, {200}, {64}, rng, /*allow_bf16=*/true);
  for (int j = 0; j < 2; ++j) {
    const int64_t tokens = 9;
    std::vector<float> x = Random(tokens * 583, rng, 1.0f);
    std::vector<int32_t> all(tokens, j);
    all[4] = -1;
    SetLoraForceScalar(GetParam());
    std::vector<float> v_all(tokens * 64, 0.0f), y_all(tokens * 200, 0.25f);
    LoraOutput o_all{y_all.data(), 200};
    BgmvShrink(v_all.data(), 64, x.data(), 583, all.data(), tokens, ad.weights);
    BgmvExpand(&o_all, v_all.data(), 64, all.data(), tokens, ad.weights);
    for (int64_t t = 0; t < tokens; ++t) {
      if (all[t] < 0) continue;
      std::vector<float> v(64, 0.0f), y(200, 0.25f);
      LoraOutput o{y.data(), 200};
      BgmvShrink(v.data(), 64, x.data() + t * 583, 583, &all[t], 1, ad.weights);
      BgmvExpand(&o, v.data(), 64, &all[t], 1, ad.weights);
      EXPECT_TRUE(AllClose(
          v, std::vector<float>(v_all.begin() + t * 64, v_all.begin() + t * 64 + 64), kExact))
          << "adapter " << j << " token " << t;
      EXPECT_TRUE(AllClose(
          y, std::vector<float>(y_all.begin() + t * 200, y_all.begin() + t * 200 + 200), kExact))
          << "adapter " << j << " token " << t;
    }
    SetLoraForceScalar(false);
  }
}

// BatchInvariant(): an adapter with many tokens in the call stays on the per-token tiles (no
// GEMM), so every token's delta is bit for bit the one it gets alone, through the fused op of
// SGMV segments (a 40-token prompt beside short ones) and of BGMV.
TEST_P(LoraGridTest, BatchInvariantTokensEqualTheirDeltaAlone) {
  ::loraplex::kernels::testing::BatchInvariantScope invariant;
  SetLoraForceScalar(GetParam());
  std::mt19937 rng(77);
  Adapters ad(3, 576, {576, 192, 192}, {8, 16}, rng, /*allow_bf16=*/true);
  const int64_t tokens = 49;
  std::vector<int32_t> per_token(tokens, 0);  // adapter 0: a prompt of 40 tokens
  for (int64_t t = 40; t < tokens; ++t) per_token[t] = static_cast<int32_t>(t % 3);
  per_token[44] = -1;
  const std::vector<float> x = Random(tokens * 576, rng, 1.0f);
  auto run = [&](const float* xs, const int32_t* adapters, int64_t n, bool segments) {
    std::vector<float> ys[3] = {std::vector<float>(n * 576, 0.5f),
                                std::vector<float>(n * 192, 0.5f),
                                std::vector<float>(n * 192, 0.5f)};
    LoraOutput out[3] = {{ys[0].data(), 576}, {ys[1].data(), 192}, {ys[2].data(), 192}};
    if (segments) {
      std::vector<int64_t> starts;
      std::vector<int32_t> seg;
      for (int64_t t = 0; t < n; ++t) {
        if (t == 0 || adapters[t] != adapters[t - 1]) {
          starts.push_back(t);
          seg.push_back(adapters[t]);
        }
      }
      starts.push_back(n);
      const LoraSegments s{static_cast<int64_t>(seg.size()), starts.data(), seg.data()};
      SgmvShrinkExpand(out, xs, 576, s, ad.weights, /*negate=*/false);
    } else {
      BgmvShrinkExpand(out, xs, 576, adapters, n, ad.weights, /*negate=*/false);
    }
    return std::vector<std::vector<float>>{ys[0], ys[1], ys[2]};
  };
  for (bool segments : {true, false}) {
    const auto all = run(x.data(), per_token.data(), tokens, segments);
    for (int64_t t = 0; t < tokens; ++t) {
      const auto one = run(x.data() + t * 576, &per_token[t], 1, segments);
      for (int sl = 0; sl < 3; ++sl) {
        const int64_t width = sl == 0 ? 576 : 192;
        EXPECT_TRUE(AllClose(
            one[sl],
            std::vector<float>(all[sl].begin() + t * width, all[sl].begin() + (t + 1) * width),
            kExact))
            << "token " << t << " slice " << sl << (segments ? " (SGMV)" : " (BGMV)");
      }
    }
  }
  SetLoraForceScalar(false);
}

// A decode step of many adapters takes the fused path of BgmvShrinkExpand (one task per adapter:
// its shrink, then its expand) and SGMV segments shorter than 16 tokens do too: the same bits as
// the shrink, the negation of v and the expand as separate ops, on q/k/v slices with GQA widths,
// adapters of one and two tokens, missing slices, f32 and bf16 adapters side by side and tokens
// without an adapter.
TEST_P(LoraGridTest, FusedShrinkExpandEqualsTheTwoOpsBitForBit) {
  const int64_t num_adapters = std::max<int64_t>(40, 2 * ThreadPool::Default().num_threads() + 8);
  std::mt19937 rng(99);
  Adapters ad(num_adapters, 576, {576, 192, 192}, {4, 8, 16, 33}, rng, /*allow_bf16=*/true);
  // Adapter j takes tokens 0, 1 or 2 (one in five has two, one in seven none); -1 between.
  std::vector<int32_t> per_token;
  for (int32_t j = 0; j < num_adapters; ++j) {
    const int n = j % 7 == 6 ? 0 : (j % 5 == 1 ? 2 : 1);
    for (int i = 0; i < n; ++i) per_token.push_back(j);
    if (j % 9 == 4) per_token.push_back(-1);
  }
  std::shuffle(per_token.begin(), per_token.end(), rng);
  const int64_t tokens = static_cast<int64_t>(per_token.size());
  // The same tokens as segments, for SGMV: runs of one adapter after sorting.
  std::vector<int32_t> sorted = per_token;
  std::sort(sorted.begin(), sorted.end());
  std::vector<int64_t> starts{0};
  std::vector<int32_t> seg_adapter;
  for (int64_t t = 0; t < tokens; ++t) {
    if (t > 0 && sorted[t] == sorted[t - 1]) continue;
    if (t > 0) starts.push_back(t);
    seg_adapter.push_back(sorted[t]);
  }
  starts.push_back(tokens);
  const LoraSegments seg{static_cast<int64_t>(seg_adapter.size()), starts.data(),
                         seg_adapter.data()};

  const int64_t x_stride = 579,
                y_stride = 962;  // q | k | v at 1, 577, 769, a padding column each end
  const int64_t v_stride = ad.max_total_rank;
  std::vector<float> x = Random(tokens * x_stride, rng, 1.0f);
  const std::vector<float> y0 = Random(tokens * y_stride, rng, 1.0f);
  auto outputs = [&](std::vector<float>& y) {
    return std::array<LoraOutput, 3>{LoraOutput{y.data() + 1, y_stride},
                                     LoraOutput{y.data() + 577, y_stride},
                                     LoraOutput{y.data() + 769, y_stride}};
  };
  SetLoraForceScalar(GetParam());
  for (bool negate : {false, true}) {
    SCOPED_TRACE(negate ? "negated" : "added");
    for (bool sgmv : {false, true}) {
      SCOPED_TRACE(sgmv ? "sgmv" : "bgmv");
      const int32_t* idx = sgmv ? sorted.data() : per_token.data();
      std::vector<float> y_two = y0, y_one = y0, v(tokens * v_stride, 0.0f);
      auto two = outputs(y_two), one = outputs(y_one);
      BgmvShrink(v.data(), v_stride, x.data(), x_stride, idx, tokens, ad.weights);
      if (negate) {
        for (float& e : v) e = -e;
      }
      BgmvExpand(two.data(), v.data(), v_stride, idx, tokens, ad.weights);
      const int64_t fused_before = LoraFusedCallsForTesting();
      if (sgmv) {
        SgmvShrinkExpand(one.data(), x.data(), x_stride, seg, ad.weights, negate);
      } else {
        BgmvShrinkExpand(one.data(), x.data(), x_stride, idx, tokens, ad.weights, negate);
      }
      EXPECT_EQ(LoraFusedCallsForTesting(), fused_before + 1) << "the fused path did not run";
      EXPECT_TRUE(AllClose(y_one, y_two, kExact));
      EXPECT_NE(y_one, y0);
    }
  }
  SetLoraForceScalar(false);
}

// Prompts in the fused path: adapters of 16 tokens or more are cut into blocks of 32 tokens, each
// two small GEMMs on one thread, next to adapters of a few tokens; rows read and written in place
// (packed strides, consecutive tokens) or gathered and scattered (padded strides, BGMV tokens
// spread over the batch). Against the reference, and against the two ops in turn.
TEST_P(LoraGridTest, FusedPromptsMatchTheReference) {
  const int64_t threads = ThreadPool::Default().num_threads();
  uint32_t seed = 200;
  for (bool packed : {true, false}) {
    for (bool bf16 : {false, true}) {
      for (bool negate : {false, true}) {
        SCOPED_TRACE(std::string(packed ? "packed" : "strided") + (bf16 ? " bf16" : " f32") +
                     (negate ? " negated" : ""));
        std::mt19937 rng(seed++);
        // Prompts of 100, 16, 47, 33 tokens (4 + 1 + 2 + 2 blocks) and one of 3, then enough
        // 1-token adapters that the call has >= max(8, 2 x threads) tasks.
        std::vector<int64_t> lengths = {100, 16, 47, 33, 3};
        lengths.resize(5 + std::max<int64_t>(0, 2 * threads - 10), 1);
        const auto num_adapters = static_cast<int64_t>(lengths.size());
        Adapters ad(num_adapters, 576, {packed ? 576 : 577}, {16, 8}, rng, bf16);
        std::vector<int32_t> per_token;
        for (size_t i = 0; i < lengths.size(); ++i) {
          per_token.insert(per_token.end(), lengths[i], static_cast<int32_t>(i));
        }
        per_token.push_back(-1);
        if (!packed) std::shuffle(per_token.begin(), per_token.end(), rng);
        const int64_t tokens = static_cast<int64_t>(per_token.size());
        const int64_t out = packed ? 576 : 577;
        const int64_t x_stride = packed ? 576 : 581, y_stride = packed ? out : out + 6;
        const std::vector<float> x = Random(tokens * x_stride, rng, 1.0f);
        const std::vector<float> y0 = Random(tokens * y_stride, rng, 1.0f);
        std::vector<float> y_one = y0, y_two = y0, y_ref = y0;
        LoraOutput o_one{y_one.data(), y_stride}, o_two{y_two.data(), y_stride},
            o_ref{y_ref.data(), y_stride};
        const int64_t v_stride = ad.max_total_rank;
        std::vector<float> v(tokens * v_stride, 0.0f);
        SetLoraForceScalar(GetParam());
        const int64_t fused_before = LoraFusedCallsForTesting();
        BgmvShrinkExpand(&o_one, x.data(), x_stride, per_token.data(), tokens, ad.weights, negate);
        EXPECT_EQ(LoraFusedCallsForTesting(), fused_before + 1) << "the fused path did not run";
        BgmvShrink(v.data(), v_stride, x.data(), x_stride, per_token.data(), tokens, ad.weights);
        if (negate) {
          for (float& e : v) e = -e;
        }
        BgmvExpand(&o_two, v.data(), v_stride, per_token.data(), tokens, ad.weights);
        SetLoraForceScalar(false);
        ref::BgmvShrinkExpand(&o_ref, x.data(), x_stride, per_token.data(), tokens, ad.weights,
                              negate);
        const auto tol = bf16 ? kBf16KernelVsReference : kF32KernelVsReference;
        EXPECT_TRUE(AllClose(y_one, y_ref, tol));
        EXPECT_TRUE(AllClose(y_one, y_two, tol));
        for (int64_t t = 0; t < tokens; ++t) {
          for (int64_t k = out; k < y_stride; ++k) {
            ASSERT_EQ(y_one[t * y_stride + k], y0[t * y_stride + k]) << "padding of token " << t;
          }
          if (per_token[t] >= 0) continue;
          for (int64_t k = 0; k < y_stride; ++k) {
            ASSERT_EQ(y_one[t * y_stride + k], y0[t * y_stride + k]) << "token " << t;
          }
        }
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Isa, LoraGridTest, ::testing::Bool(),
                         [](const ::testing::TestParamInfo<bool>& p) {
                           return std::string(p.param ? "Scalar" : "Auto");
                         });

// The reference itself, on numbers small enough to check by hand.
TEST(LoraReferenceTest, HandComputed) {
  // Adapter 0: A = [[1, 2]] (r=1, in=2), B = [[3], [-1]] (out=2).
  const float a[] = {1, 2}, b[] = {3, -1};
  WeightView av{DType::kF32, a, 1, 2}, bv{DType::kF32, b, 2, 1};
  LoraSliceWeights w{1, 1, &av, &bv};
  const float x[] = {1, 1, 0.5f, -1};  // two tokens
  const int32_t idx[] = {0, -1};
  float v[2] = {kUntouched, kUntouched};
  ref::BgmvShrink(v, 1, x, 2, idx, 2, w);
  EXPECT_EQ(v[0], 3.0f);  // 1*1 + 2*1
  EXPECT_EQ(v[1], kUntouched);
  float y[4] = {10, 20, 30, 40};
  LoraOutput out{y, 2};
  ref::BgmvExpand(&out, v, 1, idx, 2, w);
  EXPECT_EQ(y[0], 19.0f);  // 10 + 3*3
  EXPECT_EQ(y[1], 17.0f);  // 20 - 3
  EXPECT_EQ(y[2], 30.0f);
  EXPECT_EQ(y[3], 40.0f);
}

// SGMV and BGMV are two spellings of one op: same tokens, same adapters -> same bits, because each
// output element is the same dot product whichever way the tokens were grouped (below 16 tokens
// per adapter; from there both hand the adapter to the same Gemm).
TEST(LoraKernelsTest, SgmvEqualsBgmvBitForBit) {
  std::mt19937 rng(77);
  Adapters ad(4, 300, {129}, {16}, rng, true);
  const int64_t tokens = 37;
  std::vector<float> x = Random(tokens * 300, rng, 1.0f);
  std::vector<int64_t> starts{0, 10, 10, 20, 30, 37};
  std::vector<int32_t> seg_adapter{2, 0, -1, 2, 3};
  std::vector<int32_t> per_token(tokens);
  for (size_t i = 0; i + 1 < starts.size(); ++i) {
    for (int64_t t = starts[i]; t < starts[i + 1]; ++t) per_token[t] = seg_adapter[i];
  }
  LoraSegments seg{5, starts.data(), seg_adapter.data()};
  std::vector<float> v1(tokens * 16, 0.0f), v2 = v1;
  std::vector<float> y1(tokens * 129, 0.5f), y2 = y1;
  SgmvShrink(v1.data(), 16, x.data(), 300, seg, ad.weights);
  BgmvShrink(v2.data(), 16, x.data(), 300, per_token.data(), tokens, ad.weights);
  LoraOutput o1{y1.data(), 129}, o2{y2.data(), 129};
  SgmvExpand(&o1, v1.data(), 16, seg, ad.weights);
  BgmvExpand(&o2, v2.data(), 16, per_token.data(), tokens, ad.weights);
  EXPECT_TRUE(AllClose(v1, v2, kExact));
  EXPECT_TRUE(AllClose(y1, y2, kExact));
}

TEST(LoraKernelsTest, EmptyBatchAndAllBaseTouchNothing) {
  std::mt19937 rng(5);
  Adapters ad(3, 64, {64}, {8}, rng, false);
  std::vector<float> x = Random(4 * 64, rng, 1.0f);
  std::vector<float> v(4 * 8, kUntouched), y(4 * 64, 1.0f);
  const std::vector<float> v0 = v, y0 = y;
  const int32_t none[] = {-1, -1, -1, -1};
  LoraOutput out{y.data(), 64};
  BgmvShrink(v.data(), 8, x.data(), 64, none, 4, ad.weights);
  BgmvExpand(&out, v.data(), 8, none, 4, ad.weights);
  LoraSegments empty{0, nullptr, nullptr};
  SgmvShrink(v.data(), 8, x.data(), 64, empty, ad.weights);
  SgmvExpand(&out, v.data(), 8, empty, ad.weights);
  EXPECT_EQ(v, v0);
  EXPECT_EQ(y, y0);
}

TEST(LoraKernelsTest, ReportsIsa) {
  const std::string isa = LoraKernelIsa();
  EXPECT_TRUE(isa == "avx2" || isa == "scalar") << isa;
  SetLoraForceScalar(true);
  EXPECT_EQ(std::string(LoraKernelIsa()), "scalar");
  SetLoraForceScalar(false);
}

}  // namespace
}  // namespace loraplex::kernels
