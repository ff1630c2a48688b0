// CUDA SGMV/BGMV shrink and expand against the readable LoRA reference (kernels::ref:: of
// kernels/lora.h) on the grid of STYLE.md: ranks 1..64 (mixed within a batch, 0 for an untargeted
// fused slice), 1..64 adapters, index -1, prefill (SGMV, with empty and adapter-less segments) and
// decode (BGMV), odd sizes (577, 1537), 1..3 fused slices, f32/bf16 weights and activations;
// and DoRA's row scale (CudaLoraScaleRows). Skips without a device (see cuda_test_util.h).
#include "kernels/cuda/cuda_lora.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <string>
#include <vector>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/kernels.h"
#include "kernels/lora.h"
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

constexpr float kUntouched = 12345.0f;  // v and y rows of adapter-less tokens must keep it

// One layer's adapters, on the host (f32 values already rounded to the weight dtype) and on the
// device (in the weight dtype), with the descriptor array the CUDA ops read.
struct Adapters {
  int64_t num_adapters = 0, num_slices = 0, in = 0, max_rank = 0, v_stride = 0;
  std::vector<int64_t> out;
  std::vector<std::vector<float>> a_host, b_host;  // [j * num_slices + s]
  std::vector<WeightView> a_views, b_views;        // host views for the reference
  std::vector<CudaBuffer> device;                  // owns every A and B on the device
  CudaBuffer d_slices;
  CudaLoraWeights cuda;
  LoraSliceWeights Ref() const {
    return LoraSliceWeights{num_adapters, num_slices, a_views.data(), b_views.data()};
  }
};

// ranks[j * num_slices + s]; 0 = slice not targeted.
absl::Status MakeAdapters(Adapters& ad, DType wdt, int64_t in, const std::vector<int64_t>& out,
                          const std::vector<int64_t>& ranks, uint32_t seed) {
  ad.num_slices = static_cast<int64_t>(out.size());
  ad.num_adapters = static_cast<int64_t>(ranks.size()) / ad.num_slices;
  ad.in = in;
  ad.out = out;
  const size_t n = ranks.size();
  ad.a_host.resize(n);
  ad.b_host.resize(n);
  ad.a_views.resize(n);
  ad.b_views.resize(n);
  std::vector<CudaLoraSlice> slices(n);
  for (int64_t j = 0; j < ad.num_adapters; ++j) {
    int64_t offset = 0;
    for (int64_t s = 0; s < ad.num_slices; ++s) {
      const size_t i = j * ad.num_slices + s;
      const int64_t r = ranks[i];
      ad.max_rank = std::max(ad.max_rank, r);
      ad.a_host[i] = RoundTo(RandomVector(r * in, seed++, -0.5f, 0.5f), wdt);
      ad.b_host[i] = RoundTo(RandomVector(out[s] * r, seed++, -0.5f, 0.5f), wdt);
      ad.a_views[i] = WeightView{DType::kF32, ad.a_host[i].data(), r, r > 0 ? in : 0};
      ad.b_views[i] = WeightView{DType::kF32, ad.b_host[i].data(), r > 0 ? out[s] : 0, r};
      absl::StatusOr<CudaBuffer> a = Upload(ad.a_host[i], wdt);
      if (!a.ok()) return a.status();
      absl::StatusOr<CudaBuffer> b = Upload(ad.b_host[i], wdt);
      if (!b.ok()) return b.status();
      slices[i] = CudaLoraSlice{a->data(), b->data(), static_cast<int32_t>(r),
                                static_cast<int32_t>(offset)};
      ad.device.push_back(*std::move(a));
      ad.device.push_back(*std::move(b));
      offset += r;
    }
    ad.v_stride = std::max(ad.v_stride, offset);
  }
  ad.v_stride += 3;  // a padded stride: packing must follow v_offset, not the row length
  absl::StatusOr<CudaBuffer> d_slices = UploadRaw(slices);
  if (!d_slices.ok()) return d_slices.status();
  ad.d_slices = *std::move(d_slices);
  ad.cuda = CudaLoraWeights{.num_adapters = ad.num_adapters,
                            .num_slices = ad.num_slices,
                            .dtype = wdt,
                            .in_features = in,
                            .max_rank = std::max<int64_t>(ad.max_rank, 1),
                            .d_slices = ad.d_slices.as<CudaLoraSlice>()};
  for (int64_t s = 0; s < ad.num_slices; ++s) ad.cuda.out_features[s] = out[s];
  return absl::OkStatus();
}

struct Case {
  std::string name;
  int64_t in;
  std::vector<int64_t> out;  // one per slice
  int64_t num_adapters;
  std::vector<int64_t> rank_choices;  // cycled over (adapter, slice)
  int64_t num_tokens;
  bool sgmv;
  // Elements between rows of x past `in`: odd pads misalign the rows (the kernels' one-element
  // loads); 0 with `in` a multiple of 8 takes their 16-byte vector loads.
  int64_t x_pad = 5;
};

// Per-token adapters with -1s; for SGMV also the segments that produce them.
struct Assignment {
  std::vector<int32_t> token_adapter;  // what the reference sees
  std::vector<int64_t> starts;         // SGMV
  std::vector<int32_t> seg_adapter;
};

Assignment Assign(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  Assignment as;
  as.token_adapter.assign(c.num_tokens, -1);
  if (!c.sgmv) {
    // Decode: mostly random (distinct neighbours), with a sorted stretch so that runs that share
    // an adapter inside a chunk are exercised too.
    for (int64_t t = 0; t < c.num_tokens; ++t) {
      const int64_t r = rng() % (c.num_adapters + 1);
      as.token_adapter[t] = r == c.num_adapters ? -1 : static_cast<int32_t>(r);
    }
    std::sort(as.token_adapter.begin(), as.token_adapter.begin() + c.num_tokens / 3);
    return as;
  }
  // Prefill: segments of random lengths (some empty, some without adapter), starting at token 2
  // so that the first tokens belong to no segment at all.
  int64_t t = std::min<int64_t>(2, c.num_tokens);
  as.starts.push_back(t);
  while (t < c.num_tokens) {
    const int64_t len = std::min<int64_t>(c.num_tokens - t, rng() % 3 == 0 ? 0 : 1 + rng() % 97);
    const int64_t r = rng() % (c.num_adapters + 1);
    const int32_t j = r == c.num_adapters ? -1 : static_cast<int32_t>(r);
    for (int64_t u = t; u < t + len; ++u) as.token_adapter[u] = j;
    t += len;
    as.starts.push_back(t);
    as.seg_adapter.push_back(j);
  }
  return as;
}

void RunCase(const Case& c, DType wdt, DType adt, uint32_t seed) {
  SCOPED_TRACE(::testing::Message()
               << c.name << " weights=" << DTypeName(wdt) << " activations=" << DTypeName(adt));
  std::vector<int64_t> ranks(c.num_adapters * c.out.size());
  for (size_t i = 0; i < ranks.size(); ++i) ranks[i] = c.rank_choices[i % c.rank_choices.size()];
  Adapters ad;
  ASSERT_OK(MakeAdapters(ad, wdt, c.in, c.out, ranks, seed));
  const Assignment as = Assign(c, seed + 7);
  const int64_t T = c.num_tokens;
  const int64_t x_stride = c.in + c.x_pad;
  std::vector<float> x = RoundTo(RandomVector(T * x_stride, seed + 1), adt);

  // Shrink.
  std::vector<float> v_ref(T * ad.v_stride, kUntouched);
  LoraSegments ref_seg{static_cast<int64_t>(as.seg_adapter.size()), as.starts.data(),
                       as.seg_adapter.data()};
  if (c.sgmv) {
    ref::SgmvShrink(v_ref.data(), ad.v_stride, x.data(), x_stride, ref_seg, ad.Ref());
  } else {
    ref::BgmvShrink(v_ref.data(), ad.v_stride, x.data(), x_stride, as.token_adapter.data(), T,
                    ad.Ref());
  }
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_x, Upload(x, adt));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_v,
                       Upload(std::vector<float>(T * ad.v_stride, kUntouched), DType::kF32));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_tok, UploadRaw(as.token_adapter));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_starts, UploadRaw(as.starts));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_seg_adapter, UploadRaw(as.seg_adapter));
  CudaLoraSegments seg{static_cast<int64_t>(as.seg_adapter.size()), d_starts.as<int64_t>(),
                       d_seg_adapter.as<int32_t>()};
  if (c.sgmv) {
    ASSERT_OK(
        CudaSgmvShrink(d_v.as<float>(), ad.v_stride, d_x.data(), adt, x_stride, T, seg, ad.cuda));
  } else {
    ASSERT_OK(CudaBgmvShrink(d_v.as<float>(), ad.v_stride, d_x.data(), adt, x_stride,
                             d_tok.as<int32_t>(), T, ad.cuda));
  }
  ASSERT_OK_AND_ASSIGN(std::vector<float> v_got, Download(d_v, DType::kF32, v_ref.size()));
  // v is f32 on both sides and the inputs are the same rounded values: summation order only.
  EXPECT_TRUE(AllClose(v_got, v_ref, ::loraplex::testing::kCudaF32Op)) << "shrink";

  // Expand, from the reference v (so that shrink errors do not carry over), into per-slice outputs
  // that live at column offsets of one fused, padded buffer as q/k/v do.
  int64_t y_stride = 1;
  std::vector<int64_t> col(c.out.size());
  for (size_t s = 0; s < c.out.size(); ++s) {
    col[s] = y_stride - 1;
    y_stride += c.out[s];
  }
  std::vector<float> y0 = RoundTo(RandomVector(T * y_stride, seed + 2), adt);
  for (int64_t t = 0; t < T; ++t) y0[t * y_stride + y_stride - 1] = kUntouched;  // the pad column
  std::vector<float> y_ref = y0;
  std::vector<LoraOutput> ref_out(c.out.size());
  for (size_t s = 0; s < c.out.size(); ++s) ref_out[s] = {y_ref.data() + col[s], y_stride};
  if (c.sgmv) {
    ref::SgmvExpand(ref_out.data(), v_ref.data(), ad.v_stride, ref_seg, ad.Ref());
  } else {
    ref::BgmvExpand(ref_out.data(), v_ref.data(), ad.v_stride, as.token_adapter.data(), T,
                    ad.Ref());
  }
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_y, Upload(y0, adt));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_vr, Upload(v_ref, DType::kF32));
  std::vector<CudaLoraOutput> out(c.out.size());
  for (size_t s = 0; s < c.out.size(); ++s) {
    out[s] = {static_cast<char*>(d_y.data()) + col[s] * (adt == DType::kF32 ? 4 : 2), y_stride};
  }
  if (c.sgmv) {
    ASSERT_OK(CudaSgmvExpand(out.data(), adt, d_vr.as<float>(), ad.v_stride, T, seg, ad.cuda));
  } else {
    ASSERT_OK(CudaBgmvExpand(out.data(), adt, d_vr.as<float>(), ad.v_stride, d_tok.as<int32_t>(), T,
                             ad.cuda));
  }
  ASSERT_OK_AND_ASSIGN(std::vector<float> y_got, Download(d_y, adt, y_ref.size()));
  EXPECT_TRUE(AllClose(
      y_got, RoundTo(y_ref, adt),
      adt == DType::kF32 ? ::loraplex::testing::kCudaF32Op : ::loraplex::testing::kCudaBf16Op))
      << "expand";
}

const Case kCases[] = {
    {"decode rank 1, one adapter", 577, {577}, 1, {1}, 5, false},
    {"decode 64 adapters ranks 1..64", 577, {1537}, 64, {1, 2, 7, 8, 16, 33, 64}, 96, false},
    {"decode fused qkv, untargeted k", 577, {577, 193, 193}, 5, {16, 0, 8, 64, 4}, 33, false},
    {"decode 1537 in, rank 64", 1537, {577}, 3, {64, 63}, 17, false},
    {"prefill one adapter", 577, {577}, 1, {16}, 301, true},
    {"prefill 64 adapters", 1537, {577}, 64, {8, 16, 3, 64}, 611, true},
    {"prefill fused qkv", 577, {577, 193, 193}, 7, {16, 16, 0, 33, 1}, 257, true},
    {"prefill tiny", 8, {8}, 2, {1, 2}, 3, true},
    {"decode aligned fused qkv", 576, {576, 192, 192}, 33, {16, 8, 64, 0, 24}, 45, false, 0},
    {"decode aligned, misaligned rank", 1536, {576}, 4, {16, 3, 64}, 9, false, 0},
    {"prefill aligned 64 adapters", 576, {1536}, 64, {8, 16, 5, 64}, 263, true, 0},
    {"prefill aligned x, padded 8", 64, {64, 32}, 3, {4, 8, 16}, 21, true, 8},
};

class CudaLoraTest : public CudaTest {};

TEST_F(CudaLoraTest, F32MatchesReference) {
  uint32_t seed = 1;
  for (const Case& c : kCases) RunCase(c, DType::kF32, DType::kF32, seed += 100);
}

TEST_F(CudaLoraTest, Bf16WeightsF32ActivationsMatchReference) {
  uint32_t seed = 10000;
  for (const Case& c : kCases) RunCase(c, DType::kBF16, DType::kF32, seed += 100);
}

TEST_F(CudaLoraTest, Bf16MatchesReference) {
  uint32_t seed = 20000;
  for (const Case& c : kCases) RunCase(c, DType::kBF16, DType::kBF16, seed += 100);
}

TEST_F(CudaLoraTest, OutOfRangeAdapterIndexIsTreatedAsNone) {
  Adapters ad;
  ASSERT_OK(MakeAdapters(ad, DType::kF32, 64, {32}, {4, 4}, 5));
  const int64_t T = 4;
  std::vector<float> x = RandomVector(T * 64, 6);
  std::vector<int32_t> bad = {0, 2, -7, 1};       // 2 and -7 are outside [-1, 2)
  std::vector<int32_t> as_none = {0, -1, -1, 1};  // what the reference must see instead
  std::vector<float> v_ref(T * ad.v_stride, kUntouched);
  ref::BgmvShrink(v_ref.data(), ad.v_stride, x.data(), 64, as_none.data(), T, ad.Ref());
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_x, Upload(x, DType::kF32));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_v,
                       Upload(std::vector<float>(v_ref.size(), kUntouched), DType::kF32));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_tok, UploadRaw(bad));
  ASSERT_OK(CudaBgmvShrink(d_v.as<float>(), ad.v_stride, d_x.data(), DType::kF32, 64,
                           d_tok.as<int32_t>(), T, ad.cuda));
  ASSERT_OK_AND_ASSIGN(std::vector<float> v_got, Download(d_v, DType::kF32, v_ref.size()));
  EXPECT_TRUE(AllClose(v_got, v_ref, ::loraplex::testing::kCudaF32Op));
}

// DoRA's row scale: y[s][t, c] *= g_j[c] for token t's adapter j, one f32 product rounded once, so
// exactly the host's products. Three fused slices of odd widths in padded rows, an adapter without
// scales for a slice (null), one with none at all, index -1 and indices out of range.
TEST_F(CudaLoraTest, ScaleRowsMultiplyEachTokensRowsByItsAdaptersScales) {
  const std::vector<int64_t> out = {577, 64, 1537};
  const std::vector<int64_t> stride = {580, 64, 1540};
  const int64_t num_adapters = 3, num_slices = 3;
  const std::vector<int32_t> tokens = {0, -1, 2, 1, 5, 2, 0, -9};
  const int64_t T = static_cast<int64_t>(tokens.size());
  // Adapter 0 scales slices 0 and 2, adapter 1 none, adapter 2 all three.
  const bool has[3][3] = {{true, false, true}, {false, false, false}, {true, true, true}};
  std::vector<CudaBuffer> d_g;
  std::vector<std::vector<float>> g(num_adapters * num_slices);
  std::vector<const float*> table(num_adapters * num_slices, nullptr);
  uint32_t seed = 77;
  for (int64_t j = 0; j < num_adapters; ++j) {
    for (int64_t s = 0; s < num_slices; ++s) {
      if (!has[j][s]) continue;
      g[j * num_slices + s] = RandomVector(out[s], ++seed);
      for (float& v : g[j * num_slices + s]) v = 1.0f + 0.5f * v;
      ASSERT_OK_AND_ASSIGN(CudaBuffer b, Upload(g[j * num_slices + s], DType::kF32));
      table[j * num_slices + s] = b.as<const float>();
      d_g.push_back(std::move(b));
    }
  }
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_table, UploadRaw(table));
  ASSERT_OK_AND_ASSIGN(CudaBuffer d_tok, UploadRaw(tokens));
  CudaLoraRowScales scales;
  scales.num_adapters = num_adapters;
  scales.num_slices = num_slices;
  for (int64_t s = 0; s < num_slices; ++s) scales.out_features[s] = out[s];
  scales.d_scales = d_table.as<const float* const>();
  for (DType act : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(act));
    std::vector<std::vector<float>> y(num_slices), want(num_slices);
    std::vector<CudaBuffer> d_y;
    CudaLoraOutput outs[3];
    for (int64_t s = 0; s < num_slices; ++s) {
      y[s] = RoundTo(RandomVector(T * stride[s], ++seed), act);
      want[s] = y[s];
      for (int64_t t = 0; t < T; ++t) {
        const int32_t j = tokens[t];
        if (j < 0 || j >= num_adapters || !has[j][s]) continue;
        for (int64_t c = 0; c < out[s]; ++c) {
          float& w = want[s][t * stride[s] + c];
          w = RoundTo({w * g[j * num_slices + s][c]}, act)[0];
        }
      }
      ASSERT_OK_AND_ASSIGN(CudaBuffer b, Upload(y[s], act));
      d_y.push_back(std::move(b));
      outs[s] = {d_y.back().data(), stride[s]};
    }
    ASSERT_OK(CudaLoraScaleRows(outs, act, d_tok.as<int32_t>(), T, scales));
    for (int64_t s = 0; s < num_slices; ++s) {
      ASSERT_OK_AND_ASSIGN(std::vector<float> got, Download(d_y[s], act, y[s].size()));
      EXPECT_EQ(got, want[s]) << "slice " << s;
    }
  }
}

// Host-side checks only (nothing is launched), so this runs without a device too.
TEST(CudaLoraTestArgs, RejectsBadArguments) {
  CudaLoraWeights w{.num_adapters = 1, .num_slices = 4, .in_features = 8, .max_rank = 4};
  EXPECT_THAT(CudaBgmvShrink(nullptr, 4, nullptr, DType::kF32, 8, nullptr, 1, w),
              StatusIs(absl::StatusCode::kInvalidArgument, "w.num_slices=4"));
  w.num_slices = 1;
  w.max_rank = 0;
  EXPECT_THAT(CudaBgmvShrink(nullptr, 4, nullptr, DType::kF32, 8, nullptr, 1, w),
              StatusIs(absl::StatusCode::kInvalidArgument, "w.max_rank=0"));
  w.max_rank = 4;
  EXPECT_THAT(CudaBgmvShrink(nullptr, 4, nullptr, DType::kF32, 8, nullptr, 1, w),
              StatusIs(absl::StatusCode::kInvalidArgument, "w.d_slices"));
  int dummy = 0;
  w.d_slices =
      reinterpret_cast<const CudaLoraSlice*>(&dummy);  // never dereferenced: checks fail first
  w.out_features[0] = 16;
  float* fake_v = reinterpret_cast<float*>(&dummy);
  EXPECT_THAT(CudaBgmvShrink(fake_v, 4, &dummy, DType::kF32, 7, &dummy, 1, w),
              StatusIs(absl::StatusCode::kInvalidArgument, "x_stride=7"));
  CudaLoraOutput y{&dummy, 15};
  EXPECT_THAT(CudaBgmvExpand(&y, DType::kF32, fake_v, 4, &dummy, 1, w),
              StatusIs(absl::StatusCode::kInvalidArgument, "y[0].stride=15"));
  EXPECT_THAT(CudaSgmvShrink(fake_v, 4, &dummy, DType::kF32, 8, -1, CudaLoraSegments{}, w),
              StatusIs(absl::StatusCode::kInvalidArgument, "num_tokens=-1"));
  // No tokens or no adapters: nothing to do, nothing dereferenced.
  EXPECT_OK(CudaBgmvShrink(nullptr, 4, nullptr, DType::kF32, 8, nullptr, 0, w));
  CudaLoraRowScales scales{.num_adapters = 1, .num_slices = 0};
  EXPECT_THAT(CudaLoraScaleRows(&y, DType::kF32, &dummy, 1, scales),
              StatusIs(absl::StatusCode::kInvalidArgument, "scales.num_slices=0"));
  scales.num_slices = 1;
  scales.out_features[0] = 16;
  EXPECT_THAT(CudaLoraScaleRows(&y, DType::kF32, &dummy, 1, scales),
              StatusIs(absl::StatusCode::kInvalidArgument, "scales.d_scales"));
  scales.d_scales = reinterpret_cast<const float* const*>(&dummy);
  EXPECT_THAT(CudaLoraScaleRows(&y, DType::kF32, &dummy, 1, scales),
              StatusIs(absl::StatusCode::kInvalidArgument, "y[0].stride=15"));
  EXPECT_OK(CudaLoraScaleRows(nullptr, DType::kF32, nullptr, 0, scales));
}

}  // namespace
}  // namespace loraplex::kernels::cuda
