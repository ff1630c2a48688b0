// GGUF quantized weights in the kernels (kernels/quant.h):
// - DequantizeRow and QuantizeRow bit-exact against fixtures made by the gguf Python package
//   (tools/make_quant_fixtures.py, tests/fixtures/quant/);
// - the fast Gemm on every format and every ISA table this CPU has against ref::Gemm (W dequantized
//   to f32), with a per-output tolerance derived from the int8 rounding of the activations, and
//   against the exact dot product of W with the int8-rounded activations, which it must match to
//   float rounding (so the int8 rounding is the whole of the difference);
// - Embed on quantized tables, fast and reference;
// - and, when models/SmolLM2-135M-Instruct.Q4_1.gguf is present, DequantizeRow against the
//   repository's GGUF reader (formats/) on the file's Q4_1 and Q8_0 tensors.
#include "kernels/quant.h"

#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "common/half.h"
#include "formats/dequantize.h"
#include "formats/gguf.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/quant_ops.h"
#include "kernels/kernels.h"
#include "nlohmann/json.hpp"
#include "tests/kernels/kernel_test_util.h"
#include "tests/testing/testing.h"

namespace loraplex::kernels {
namespace {

using ::loraplex::kernels::testing::AllChoices;
using ::loraplex::kernels::testing::IsaTest;
using ::loraplex::kernels::testing::RandomVector;

constexpr DType kQuantTypes[] = {DType::kQ8_0, DType::kQ4_0, DType::kQ4_1,
                                 DType::kQ4_K, DType::kQ5_K, DType::kQ6_K};

std::vector<uint8_t> ReadBytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  EXPECT_TRUE(f.good()) << "cannot read " << path;
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), {});
}

std::vector<float> ReadFloats(const std::string& path) {
  const std::vector<uint8_t> bytes = ReadBytes(path);
  std::vector<float> out(bytes.size() / sizeof(float));
  std::memcpy(out.data(), bytes.data(), out.size() * sizeof(float));
  return out;
}

DType TypeNamed(const std::string& name) {
  for (DType t : kQuantTypes) {
    if (name == DTypeName(t)) return t;
  }
  ADD_FAILURE() << "unknown type " << name;
  return DType::kF32;
}

// Index of the first element whose bits differ, or -1.
int64_t FirstBitDifference(const float* a, const float* b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (std::memcmp(a + i, b + i, sizeof(float)) != 0) return i;
  }
  return -1;
}

// ---- geometry

TEST(QuantGeometryTest, MatchesGgml) {
  struct Row {
    DType t;
    const char* name;
    int64_t block, bytes;
  };
  const Row rows[] = {{DType::kF32, "f32", 1, 4},       {DType::kBF16, "bf16", 1, 2},
                      {DType::kQ8_0, "q8_0", 32, 34},   {DType::kQ4_0, "q4_0", 32, 18},
                      {DType::kQ4_1, "q4_1", 32, 20},   {DType::kQ4_K, "q4_K", 256, 144},
                      {DType::kQ5_K, "q5_K", 256, 176}, {DType::kQ6_K, "q6_K", 256, 210}};
  for (const Row& r : rows) {
    SCOPED_TRACE(r.name);
    EXPECT_STREQ(DTypeName(r.t), r.name);
    EXPECT_EQ(BlockSize(r.t), r.block);
    EXPECT_EQ(BytesPerBlock(r.t), r.bytes);
    EXPECT_EQ(RowBytes(r.t, 3 * r.block), 3 * r.bytes);
    EXPECT_EQ(IsQuantized(r.t), r.block > 1);
  }
}

// ---- fixtures from the gguf package

struct Fixture {
  DType type;
  int64_t rows, cols;
  std::vector<uint8_t> blocks;
  std::vector<float> dequantized;
  std::vector<float> source;  // empty when the blocks were not quantized from floats
};

std::vector<Fixture> LoadFixtures() {
  const std::string dir = ::loraplex::testing::FixturesDir() + "/quant/";
  std::ifstream f(dir + "manifest.json");
  EXPECT_TRUE(f.good()) << "no " << dir << "manifest.json (tools/make_quant_fixtures.py)";
  if (!f.good()) return {};
  const nlohmann::json manifest = nlohmann::json::parse(f);
  std::vector<Fixture> out;
  for (const auto& t : manifest["tensors"]) {
    Fixture fx;
    fx.type = TypeNamed(t["type"].get<std::string>());
    fx.rows = t["rows"].get<int64_t>();
    fx.cols = t["cols"].get<int64_t>();
    fx.blocks = ReadBytes(dir + t["blocks"].get<std::string>());
    fx.dequantized = ReadFloats(dir + t["dequantized"].get<std::string>());
    if (t.contains("source")) fx.source = ReadFloats(dir + t["source"].get<std::string>());
    EXPECT_EQ(static_cast<int64_t>(fx.blocks.size()), fx.rows * RowBytes(fx.type, fx.cols));
    EXPECT_EQ(static_cast<int64_t>(fx.dequantized.size()), fx.rows * fx.cols);
    out.push_back(std::move(fx));
  }
  return out;
}

TEST(QuantFixtureTest, CoversEveryType) {
  const std::vector<Fixture> fixtures = LoadFixtures();
  for (DType t : kQuantTypes) {
    EXPECT_TRUE(std::any_of(fixtures.begin(), fixtures.end(), [&](const Fixture& f) {
      return f.type == t;
    })) << DTypeName(t);
  }
}

TEST(QuantFixtureTest, DequantizeRowIsBitExactWithGguf) {
  for (const Fixture& fx : LoadFixtures()) {
    SCOPED_TRACE(DTypeName(fx.type));
    const int64_t rb = RowBytes(fx.type, fx.cols);
    for (int64_t r = 0; r < fx.rows; ++r) {
      std::vector<float> out(fx.cols, -1.0f);
      DequantizeRow(fx.type, fx.blocks.data() + r * rb, out.data(), fx.cols);
      const float* want = fx.dequantized.data() + r * fx.cols;
      const int64_t bad = FirstBitDifference(out.data(), want, fx.cols);
      EXPECT_EQ(bad, -1) << "row " << r << " element " << bad << ": " << out[bad] << " vs gguf "
                         << want[bad];
    }
  }
}

TEST(QuantFixtureTest, QuantizeRowIsBitExactWithGguf) {
  int checked = 0;
  for (const Fixture& fx : LoadFixtures()) {
    if (fx.type != DType::kQ8_0 && fx.type != DType::kQ4_0) continue;
    SCOPED_TRACE(DTypeName(fx.type));
    ASSERT_EQ(static_cast<int64_t>(fx.source.size()), fx.rows * fx.cols);
    const int64_t rb = RowBytes(fx.type, fx.cols);
    for (int64_t r = 0; r < fx.rows; ++r) {
      std::vector<uint8_t> out(rb, 0xAA);
      QuantizeRow(fx.type, fx.source.data() + r * fx.cols, out.data(), fx.cols);
      const uint8_t* want = fx.blocks.data() + r * rb;
      for (int64_t i = 0; i < rb; ++i) {
        ASSERT_EQ(out[i], want[i])
            << "row " << r << " byte " << i << " (block " << i / BytesPerBlock(fx.type) << ")";
      }
    }
    ++checked;
  }
  EXPECT_EQ(checked, 2);
}

TEST(QuantFixtureTest, EmbedDequantizesRows) {
  for (const Fixture& fx : LoadFixtures()) {
    SCOPED_TRACE(DTypeName(fx.type));
    const WeightView table{fx.type, fx.blocks.data(), fx.rows, fx.cols};
    const std::vector<int32_t> ids = {2, 0, 2, 1};
    std::vector<float> fast(ids.size() * fx.cols), slow(ids.size() * fx.cols);
    Embed(fast.data(), ids.data(), static_cast<int64_t>(ids.size()), table);
    ref::Embed(slow.data(), ids.data(), static_cast<int64_t>(ids.size()), table);
    for (size_t t = 0; t < ids.size(); ++t) {
      const float* want = fx.dequantized.data() + ids[t] * fx.cols;
      EXPECT_EQ(FirstBitDifference(fast.data() + t * fx.cols, want, fx.cols), -1) << "token " << t;
      EXPECT_EQ(FirstBitDifference(slow.data() + t * fx.cols, want, fx.cols), -1) << "token " << t;
    }
  }
}

// ---- Gemm against the reference

// Random blocks with every code pattern possible and f16 scales like a real model's (|w| up to
// ~0.1); Q8_0 and Q4_0 rows also come from QuantizeRow, whose codes stop at +-127 and 0..15.
std::vector<uint8_t> RandomBlocks(DType t, int64_t rows, int64_t cols, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<uint8_t> out(rows * RowBytes(t, cols));
  for (uint8_t& b : out) b = static_cast<uint8_t>(rng() & 0xFF);
  std::uniform_real_distribution<float> unit(0.5f, 1.0f);
  auto put = [](uint8_t* p, float v) {
    const uint16_t h = F32ToF16(v);
    std::memcpy(p, &h, 2);
  };
  const int64_t bytes = BytesPerBlock(t);
  for (int64_t b = 0; b < static_cast<int64_t>(out.size()) / bytes; ++b) {
    uint8_t* p = out.data() + b * bytes;
    const float sign = (rng() & 1) ? 1.0f : -1.0f;
    switch (t) {
      case DType::kQ8_0:
        put(p, sign * 8e-4f * unit(rng));
        break;
      case DType::kQ4_0:
        put(p, sign * 1e-2f * unit(rng));
        break;
      case DType::kQ4_1:
        put(p, 1e-2f * unit(rng));
        put(p + 2, -8e-2f * unit(rng));
        break;
      case DType::kQ4_K:
      case DType::kQ5_K:
        put(p, 2e-4f * unit(rng));
        put(p + 2, 5e-4f * unit(rng));
        break;
      case DType::kQ6_K:
        put(p + 208, sign * 2e-5f * unit(rng));
        break;
      default:
        break;
    }
  }
  if (t == DType::kQ8_0 || t == DType::kQ4_0) {  // the first row from the quantizer
    const std::vector<float> v = RandomVector(cols, seed + 1, -0.1f, 0.1f);
    QuantizeRow(t, v.data(), out.data(), cols);
  }
  return out;
}

// Activations with an outlier every 37 values (real hidden states have a few large channels),
// which makes the int8 rounding of the other values in its block coarse.
std::vector<float> RandomActivations(int64_t m, int64_t k, uint32_t seed) {
  std::vector<float> x = RandomVector(m * k, seed);
  for (size_t i = 0; i < x.size(); i += 37) x[i] *= 20.0f;
  return x;
}

// The activation rounding every fast table applies (quant_ops.h), written out independently: per
// block of `block` values, d = max|x| / 127 and q = round-to-nearest-even(x * 127 / max|x|).
std::vector<double> RoundActivations(const std::vector<float>& x, int64_t block) {
  std::vector<double> out(x.size());
  for (size_t b = 0; b < x.size(); b += block) {
    float amax = 0.0f;
    for (int64_t i = 0; i < block; ++i) amax = std::max(amax, std::fabs(x[b + i]));
    float d = amax / 127.0f;
    float inv = 127.0f / amax;
    if (amax == 0.0f || std::isinf(inv)) d = inv = 0.0f;  // zeros, or too small to scale
    for (int64_t i = 0; i < block; ++i) {
      out[b + i] = static_cast<double>(std::nearbyint(x[b + i] * inv)) * d;
    }
  }
  return out;
}

// Activation block of the fast path: 32 values for Q8_0 / Q4_0 / Q4_1, 256 for the K-quants.
int64_t ActivationBlock(DType t) { return BlockSize(t); }

struct Worst {
  double ratio_to_int8_bound = 0;  // max |fast - ref| / bound
  double ratio_to_fp_bound = 0;    // max |fast - exact with int8 x| / float bound
};

// Checks fast Gemm (the active table) against ref::Gemm and against exact sums, for y[m, n] =
// x[m, k] W^T with W of type t.
//
// Bounds, per output (i, j), with w the dequantized weights, x the f32 activations and xq the
// int8-rounded ones (xq = q * d, d = max|x_block| / 127):
// - int8 rounding: |x - xq| <= d / 2 per value (plus ~1e-7 relative from the f32 products that
//   compute q and d), so |sum w (x - xq)| <= B = sum_blocks max|x_block| / 254 * sum |w_block|,
//   taken with a 1e-4 relative margin.
// - float rounding of the fast sums (f32 products of block scales with exact int32 dot products,
//   summed over blocks, and the format's offset terms: -8 d, + m, -dmin mn, -32 d sc, the flipped
//   sign bit of Q8_0, whose size is at most a few times the largest |w| of the row):
//   F = 4e-6 * (sum |w| |xq| + 4 * max|w_row| * sum |xq|).
// - ref::Gemm sums k f32 products in order: R = k * 2^-24 * sum |w| |x| (a worst case).
// The test asserts |fast - exact(w . xq)| <= F, which shows the int8 rounding is all of the
// difference, and |fast - ref| <= B + F + R.
Worst CheckQuantGemm(DType t, int64_t m, int64_t n, int64_t k, bool accumulate, uint32_t seed) {
  SCOPED_TRACE(::testing::Message() << DTypeName(t) << " m=" << m << " n=" << n << " k=" << k
                                    << " accumulate=" << accumulate);
  const std::vector<uint8_t> blocks = RandomBlocks(t, n, k, seed);
  const WeightView w{t, blocks.data(), n, k};
  const std::vector<float> x = RandomActivations(m, k, seed + 7);
  const std::vector<float> y0 = RandomVector(m * n, seed + 9);
  std::vector<float> fast = y0, slow = y0;
  Gemm(fast.data(), x.data(), m, w, accumulate);
  ref::Gemm(slow.data(), x.data(), m, w, accumulate);

  std::vector<float> wf(n * k);
  for (int64_t j = 0; j < n; ++j) {
    DequantizeRow(t, blocks.data() + j * RowBytes(t, k), wf.data() + j * k, k);
  }
  const std::vector<double> xq = RoundActivations(x, ActivationBlock(t));
  const int64_t block = ActivationBlock(t);
  Worst worst;
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < n; ++j) {
      const float* wj = wf.data() + j * k;
      const float* xi = x.data() + i * k;
      const double* qi = xq.data() + i * k;
      double exact_q = 0, bound = 0, abs_wxq = 0, abs_wx = 0, abs_xq = 0, max_w = 0;
      for (int64_t b = 0; b < k; b += block) {
        double amax = 0, abs_w = 0;
        for (int64_t c = b; c < b + block; ++c) {
          amax = std::max(amax, std::fabs(static_cast<double>(xi[c])));
          abs_w += std::fabs(wj[c]);
        }
        bound += amax / 254.0 * abs_w;
      }
      for (int64_t c = 0; c < k; ++c) {
        exact_q += static_cast<double>(wj[c]) * qi[c];
        abs_wxq += std::fabs(wj[c] * qi[c]);
        abs_wx += std::fabs(static_cast<double>(wj[c]) * xi[c]);
        abs_xq += std::fabs(qi[c]);
        max_w = std::max(max_w, std::fabs(static_cast<double>(wj[c])));
      }
      const double base = accumulate ? y0[i * n + j] : 0.0;
      const double f_bound = 4e-6 * (abs_wxq + 4.0 * max_w * abs_xq) + 1e-6 * std::fabs(base);
      const double b_bound = bound * (1.0 + 1e-4);
      const double r_bound = static_cast<double>(k) * 0x1p-24 * abs_wx + 1e-6 * std::fabs(base);
      const double got = fast[i * n + j];
      const double err_fp = std::fabs(got - (base + exact_q));
      const double err_ref = std::fabs(got - slow[i * n + j]);
      EXPECT_LE(err_fp, f_bound) << "token " << i << " row " << j << ": fast " << got
                                 << ", exact with int8 activations " << base + exact_q;
      EXPECT_LE(err_ref, b_bound + f_bound + r_bound)
          << "token " << i << " row " << j << ": fast " << got << ", ref " << slow[i * n + j]
          << ", int8 bound " << b_bound;
      if (::testing::Test::HasFailure()) return worst;
      worst.ratio_to_int8_bound = std::max(worst.ratio_to_int8_bound, err_ref / b_bound);
      worst.ratio_to_fp_bound = std::max(worst.ratio_to_fp_bound, err_fp / f_bound);
    }
  }
  return worst;
}

class QuantGemmTest : public IsaTest {};

TEST_P(QuantGemmTest, PicksTheQuantTableOfTheIsa) {
  const std::string isa = GetParam();
  if (isa == "avx512") {
    EXPECT_TRUE(std::string(QuantKernelIsa()) == "avx512vnni" ||
                std::string(QuantKernelIsa()) == "avx2");
  } else if (isa == "amx") {
    EXPECT_EQ(std::string(QuantKernelIsa()), "amx");
    EXPECT_EQ(&cpu::QuantOpsFor(DType::kQ4_1, cpu::AmxMinTokens()), cpu::AmxQuantOps());
    EXPECT_EQ(&cpu::QuantOpsFor(DType::kQ4_1, cpu::AmxMinTokens() - 1), cpu::Avx512VnniQuantOps());
    EXPECT_EQ(&cpu::QuantOpsFor(DType::kQ4_K, 64), cpu::AmxQuantOps());
    EXPECT_EQ(&cpu::QuantOpsFor(DType::kQ6_K, 64), cpu::Avx512VnniQuantOps());
  } else {
    EXPECT_EQ(std::string(QuantKernelIsa()), isa);
  }
}

TEST_P(QuantGemmTest, MatchesReferenceWithinInt8ActivationRounding) {
  uint32_t seed = 100;
  for (DType t : kQuantTypes) {
    const int64_t bs = BlockSize(t);
    // Column counts that reach every loop of the AVX-512 table, which takes 32-value blocks 4 at a
    // time and, for decode, 16 at a time: 1 block (a partial quad alone), 7 (a quad and a partial
    // one), 17 (16 and 1), 45 (2 x 16, 3 quads and 1).
    const std::vector<int64_t> ks = bs == 32 ? std::vector<int64_t>{32, 7 * 32, 17 * 32, 45 * 32}
                                             : std::vector<int64_t>{256, 768, 1536, 512};
    const int64_t ns[] = {1, 5, 19, 67};
    Worst worst;
    for (int64_t m : {1, 3, 17, 64}) {
      for (int c = 0; c < 4; ++c) {
        const Worst w = CheckQuantGemm(t, m, ns[c], ks[c], /*accumulate=*/false, seed++);
        if (HasFailure()) return;
        worst.ratio_to_int8_bound = std::max(worst.ratio_to_int8_bound, w.ratio_to_int8_bound);
        worst.ratio_to_fp_bound = std::max(worst.ratio_to_fp_bound, w.ratio_to_fp_bound);
      }
    }
    // The error is a real fraction of the int8 bound (the bound is not vacuous) and far inside it.
    RecordProperty(std::string(DTypeName(t)) + "_max_err_over_int8_bound",
                   std::to_string(worst.ratio_to_int8_bound));
    RecordProperty(std::string(DTypeName(t)) + "_max_err_over_float_bound",
                   std::to_string(worst.ratio_to_fp_bound));
    EXPECT_GT(worst.ratio_to_int8_bound, 0.01) << DTypeName(t);
  }
}

TEST_P(QuantGemmTest, AccumulateAddsToY) {
  uint32_t seed = 500;
  for (DType t : kQuantTypes) {
    const int64_t k = BlockSize(t) == 32 ? 17 * 32 : 768;
    for (int64_t m : {1, 5, 21}) {
      CheckQuantGemm(t, m, 21, k, /*accumulate=*/true, seed++);
      if (HasFailure()) return;
    }
  }
}

TEST_P(QuantGemmTest, SmolLm2Shapes) {
  // The projections of SmolLM2-135M on a chunk of prefill and on decode (Q8_0 for the tied
  // embedding's 576 columns).
  uint32_t seed = 900;
  for (DType t : {DType::kQ4_1, DType::kQ8_0, DType::kQ4_0}) {
    CheckQuantGemm(t, 1, 1536, 576, false, seed++);
    CheckQuantGemm(t, 5, 576, 1536, false, seed++);
    CheckQuantGemm(t, 32, 192, 576, false, seed++);  // a batched decode step (AMX tiles)
    if (HasFailure()) return;
  }
  CheckQuantGemm(DType::kQ4_K, 1, 576, 1536, false, seed++);
  CheckQuantGemm(DType::kQ6_K, 3, 192, 768, false, seed++);
}

TEST_P(QuantGemmTest, EmptyShapes) {
  const std::vector<uint8_t> blocks = RandomBlocks(DType::kQ4_1, 4, 64, 1);
  std::vector<float> x(3 * 64, 1.0f), y(3 * 4, 5.0f);
  Gemm(y.data(), x.data(), 0, WeightView{DType::kQ4_1, blocks.data(), 4, 64});
  EXPECT_EQ(y[0], 5.0f);  // m = 0: nothing written
  Gemm(y.data(), x.data(), 3, WeightView{DType::kQ4_1, blocks.data(), 4, 0}, true);
  EXPECT_EQ(y[0], 5.0f);  // k = 0, accumulate: unchanged
  Gemm(y.data(), x.data(), 3, WeightView{DType::kQ4_1, blocks.data(), 4, 0});
  for (float v : y) EXPECT_EQ(v, 0.0f);  // k = 0: zeros
}

// GemmShared is a Gemm per output, bit for bit, whatever the outputs' row counts (not multiples
// of the scheduling block, so thread shares span the end of one output and the start of the next)
// and whether the formats are one quantized dtype (x quantized once) or mixed (a Gemm each).
TEST_P(QuantGemmTest, SharedInputEqualsAGemmPerOutput) {
  const int64_t k = 256;
  for (const std::vector<DType>& formats :
       {std::vector<DType>{DType::kQ4_1, DType::kQ4_1, DType::kQ4_1},
        std::vector<DType>{DType::kQ8_0, DType::kQ8_0},
        std::vector<DType>{DType::kQ6_K, DType::kQ6_K},
        std::vector<DType>{DType::kQ4_1, DType::kQ8_0, DType::kQ4_1}}) {
    for (int64_t m : {1, 7, 33}) {
      SCOPED_TRACE(::testing::Message()
                   << DTypeName(formats[0]) << " x" << formats.size() << " m=" << m);
      const int64_t rows[3] = {37, 5, 211};
      std::vector<std::vector<uint8_t>> blocks;
      std::vector<std::vector<float>> shared, single;
      std::vector<GemmOutput> outputs;
      const std::vector<float> x = RandomActivations(m, k, 11);
      for (size_t i = 0; i < formats.size(); ++i) {
        blocks.push_back(RandomBlocks(formats[i], rows[i], k, 20 + static_cast<uint32_t>(i)));
        shared.emplace_back(m * rows[i], -1.0f);
        single.emplace_back(m * rows[i]);
      }
      for (size_t i = 0; i < formats.size(); ++i) {
        const WeightView w{formats[i], blocks[i].data(), rows[i], k};
        outputs.push_back({shared[i].data(), w});
        Gemm(single[i].data(), x.data(), m, w);
      }
      if (outputs.size() == 2) {
        GemmShared(x.data(), m, {outputs[0], outputs[1]});
      } else {
        GemmShared(x.data(), m, {outputs[0], outputs[1], outputs[2]});
      }
      for (size_t i = 0; i < formats.size(); ++i) {
        EXPECT_EQ(FirstBitDifference(shared[i].data(), single[i].data(), m * rows[i]), -1)
            << "output " << i;
      }
    }
  }
}

// BatchInvariant(): every token's row of a call, through Gemm and GemmShared, is bit for bit the
// row of a call with that token alone, for every format, whatever the number of tokens (token
// tiles from 2, AMX tiles from 8 on `amx`) and the threads' split of the rows.
TEST_P(QuantGemmTest, BatchInvariantRowsEqualOneTokenCalls) {
  ::loraplex::kernels::testing::BatchInvariantScope invariant;
  const int64_t k = 512;
  for (DType t :
       {DType::kQ8_0, DType::kQ4_0, DType::kQ4_1, DType::kQ4_K, DType::kQ5_K, DType::kQ6_K}) {
    for (int64_t m : {2, 9, 33, 70}) {
      SCOPED_TRACE(::testing::Message() << DTypeName(t) << " m=" << m);
      const int64_t rows[2] = {577, 37};
      const std::vector<uint8_t> b0 = RandomBlocks(t, rows[0], k, 40);
      const std::vector<uint8_t> b1 = RandomBlocks(t, rows[1], k, 41);
      const WeightView w0{t, b0.data(), rows[0], k}, w1{t, b1.data(), rows[1], k};
      const std::vector<float> x = RandomActivations(m, k, 42);
      std::vector<float> all(m * rows[0]), shared0(m * rows[0]), shared1(m * rows[1]);
      Gemm(all.data(), x.data(), m, w0);
      GemmShared(x.data(), m, {{shared0.data(), w0}, {shared1.data(), w1}});
      for (int64_t i = 0; i < m; ++i) {
        std::vector<float> one0(rows[0]), one1(rows[1]);
        Gemm(one0.data(), x.data() + i * k, 1, w0);
        Gemm(one1.data(), x.data() + i * k, 1, w1);
        ASSERT_EQ(FirstBitDifference(all.data() + i * rows[0], one0.data(), rows[0]), -1)
            << "token " << i;
        ASSERT_EQ(FirstBitDifference(shared0.data() + i * rows[0], one0.data(), rows[0]), -1)
            << "token " << i;
        ASSERT_EQ(FirstBitDifference(shared1.data() + i * rows[1], one1.data(), rows[1]), -1)
            << "token " << i;
      }
    }
  }
}

// Activation blocks too small to scale (max|x| below ~4e-37, where 127 / max|x| overflows) are
// taken as zeros by every table, not as garbage codes.
TEST_P(QuantGemmTest, TinyActivationsGiveZeros) {
  for (DType t : kQuantTypes) {
    SCOPED_TRACE(DTypeName(t));
    const int64_t k = 2 * BlockSize(t);
    const std::vector<uint8_t> blocks = RandomBlocks(t, 5, k, 4);
    std::vector<float> x = RandomVector(3 * k, 6, -1e-38f, 1e-38f);
    std::vector<float> y(3 * 5, 1.0f);
    Gemm(y.data(), x.data(), 3, WeightView{t, blocks.data(), 5, k});
    for (float v : y) EXPECT_EQ(v, 0.0f);
  }
}

// The SIMD tables load whole vectors; none may read past the last weight block (a model's tensor
// can end at the end of a mapping). The weights here end at a page followed by an inaccessible one.
TEST_P(QuantGemmTest, ReadsNothingPastTheLastBlock) {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  for (DType t : kQuantTypes) {
    SCOPED_TRACE(DTypeName(t));
    for (int64_t k : {BlockSize(t), 7 * BlockSize(t)}) {
      const int64_t n = 3;
      const std::vector<uint8_t> blocks = RandomBlocks(t, n, k, 77);
      const size_t bytes = blocks.size();
      const size_t span = (bytes + page - 1) / page * page;
      void* region =
          mmap(nullptr, span + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      ASSERT_NE(region, MAP_FAILED);
      uint8_t* base = static_cast<uint8_t*>(region);
      ASSERT_EQ(mprotect(base + span, page, PROT_NONE), 0);
      uint8_t* end_aligned = base + span - bytes;  // the blocks end where the guard page starts
      std::memcpy(end_aligned, blocks.data(), bytes);
      const WeightView w{t, end_aligned, n, k};
      for (int64_t m : {1, 5, 17}) {
        const std::vector<float> x = RandomActivations(m, k, 3);
        std::vector<float> guarded(m * n), elsewhere(m * n);
        Gemm(guarded.data(), x.data(), m, w);  // a read past the end faults here
        Gemm(elsewhere.data(), x.data(), m, WeightView{t, blocks.data(), n, k});
        EXPECT_EQ(FirstBitDifference(guarded.data(), elsewhere.data(), m * n), -1) << "m=" << m;
      }
      munmap(region, span + page);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(AllIsas, QuantGemmTest, ::testing::ValuesIn(AllChoices()));

// ---- the real model file (an extra check; the fixtures above are the CI test)

DType DTypeOf(formats::StoredType t) {
  switch (t) {
    case formats::StoredType::kQ8_0:
      return DType::kQ8_0;
    case formats::StoredType::kQ4_0:
      return DType::kQ4_0;
    case formats::StoredType::kQ4_1:
      return DType::kQ4_1;
    case formats::StoredType::kQ4_K:
      return DType::kQ4_K;
    case formats::StoredType::kQ6_K:
      return DType::kQ6_K;
    default:
      return DType::kF32;
  }
}

TEST(QuantModelFileTest, DequantizeRowMatchesTheGgufReader) {
  const std::string path = ::loraplex::testing::kSmolLm2Gguf;
  if (!::loraplex::testing::PathExists(path)) {
    GTEST_SKIP() << path
                 << " absent (scripts/fetch-model.sh): an extra check only; the fixtures "
                    "in tests/fixtures/quant are the CI test";
  }
  auto file = formats::GgufFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const char* names[] = {"token_embd.weight", "blk.0.attn_q.weight", "blk.0.attn_k.weight",
                         "blk.0.ffn_down.weight", "blk.29.ffn_gate.weight"};
  for (const char* name : names) {
    SCOPED_TRACE(name);
    const formats::TensorInfo* info = (*file)->Find(name);
    ASSERT_NE(info, nullptr);
    const DType t = DTypeOf(info->type);
    ASSERT_TRUE(IsQuantized(t)) << formats::StoredTypeName(info->type);
    ASSERT_EQ(info->shape.size(), 2u);
    const int64_t rows = info->shape[0], cols = info->shape[1];
    ASSERT_EQ(static_cast<int64_t>(info->nbytes), rows * RowBytes(t, cols));
    for (int64_t r : {int64_t{0}, rows / 3, rows - 1}) {
      std::vector<float> ours(cols), theirs(cols);
      DequantizeRow(t, info->data + r * RowBytes(t, cols), ours.data(), cols);
      ASSERT_TRUE(formats::DequantizeRowsToF32(*info, r, 1, theirs.data()).ok());
      EXPECT_EQ(FirstBitDifference(ours.data(), theirs.data(), cols), -1) << "row " << r;
    }
    // The file's weights through the fast Gemm: the same bounds as on random blocks.
    if (t == DType::kQ4_1 && rows <= 1536) {
      const WeightView w{t, info->data, rows, cols};
      const std::vector<float> x = RandomActivations(3, cols, 5);
      std::vector<float> fast(3 * rows), slow(3 * rows), wf(cols);
      Gemm(fast.data(), x.data(), 3, w);
      ref::Gemm(slow.data(), x.data(), 3, w);
      for (int64_t j = 0; j < rows; ++j) {
        DequantizeRow(t, info->data + j * RowBytes(t, cols), wf.data(), cols);
        for (int64_t i = 0; i < 3; ++i) {
          double bound = 0, abs_wx = 0;
          for (int64_t b = 0; b < cols; b += 32) {
            double amax = 0, abs_w = 0;
            for (int64_t c = b; c < b + 32; ++c) {
              amax = std::max(amax, std::fabs(static_cast<double>(x[i * cols + c])));
              abs_w += std::fabs(wf[c]);
              abs_wx += std::fabs(static_cast<double>(wf[c]) * x[i * cols + c]);
            }
            bound += amax / 254.0 * abs_w;
          }
          ASSERT_LE(std::fabs(fast[i * rows + j] - slow[i * rows + j]), bound + 1e-5 * abs_wx)
              << "token " << i << " row " << j;
        }
      }
    }
  }
}

}  // namespace
}  // namespace loraplex::kernels
