#include "formats/dequantize.h"

#include <algorithm>
#include <cstring>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/half.h"
#include "common/status.h"
#include "common/thread_pool.h"
#include "formats/gguf.h"

namespace loraplex::formats {
namespace {

// Block geometry of the GGML types (ggml-common.h / gguf GGML_QUANT_SIZES).
constexpr int64_t kQK = 32;    // elements per Q8_0 / Q4_0 / Q4_1 block
constexpr int64_t kQKK = 256;  // elements per K-quant super-block

// F16ToF32 branches on subnormals and specials; a table of all 65536 values (256 KiB, built once)
// gives the same bits at a load per element.
const float* F16Table() {
  static const float* const table = [] {
    float* t = new float[65536];
    for (uint32_t h = 0; h < 65536; ++h) t[h] = F16ToF32(static_cast<uint16_t>(h));
    return t;
  }();
  return table;
}

inline float LoadF16(const float* table, const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof(h));
  return table[h];
}

// Each Dequantize* converts `n` consecutive blocks from `src` into n * block_elems floats at `dst`.
// The comments give the block layout; the arithmetic order follows gguf/quants.py exactly.

void DequantizeF32(const uint8_t* src, int64_t n, float* dst) {
  std::memcpy(dst, src, static_cast<size_t>(n) * sizeof(float));  // src may be unaligned
}

void DequantizeF16(const uint8_t* src, int64_t n, float* dst) {
  const float* table = F16Table();
  for (int64_t i = 0; i < n; ++i) dst[i] = LoadF16(table, src + 2 * i);
}

void DequantizeBF16(const uint8_t* src, int64_t n, float* dst) {
  for (int64_t i = 0; i < n; ++i) {
    uint16_t h;
    std::memcpy(&h, src + 2 * i, sizeof(h));
    dst[i] = Bf16ToF32(h);
  }
}

// Q8_0, 34 bytes: f16 d | int8 q[32]. x = q * d.
void DequantizeQ8_0(const uint8_t* src, int64_t n, float* dst) {
  const float* table = F16Table();
  for (int64_t b = 0; b < n; ++b, src += 34, dst += kQK) {
    const float d = LoadF16(table, src);
    const int8_t* q = reinterpret_cast<const int8_t*>(src + 2);
    for (int i = 0; i < kQK; ++i) dst[i] = static_cast<float>(q[i]) * d;
  }
}

// Q4_0, 18 bytes: f16 d | uint8 qs[16]; element j is the low nibble of qs[j], element 16 + j the
// high nibble. x = d * (nibble - 8).
void DequantizeQ4_0(const uint8_t* src, int64_t n, float* dst) {
  const float* table = F16Table();
  for (int64_t b = 0; b < n; ++b, src += 18, dst += kQK) {
    const float d = LoadF16(table, src);
    const uint8_t* qs = src + 2;
    for (int j = 0; j < kQK / 2; ++j) {
      dst[j] = d * static_cast<float>((qs[j] & 0x0F) - 8);
      dst[j + kQK / 2] = d * static_cast<float>((qs[j] >> 4) - 8);
    }
  }
}

// Q4_1, 20 bytes: f16 d | f16 m | uint8 qs[16], nibbles as Q4_0. x = (d * nibble) + m, two
// roundings (numpy evaluates the product and the sum as separate f32 operations).
void DequantizeQ4_1(const uint8_t* src, int64_t n, float* dst) {
  const float* table = F16Table();
  for (int64_t b = 0; b < n; ++b, src += 20, dst += kQK) {
    const float d = LoadF16(table, src);
    const float m = LoadF16(table, src + 2);
    const uint8_t* qs = src + 4;
    for (int j = 0; j < kQK / 2; ++j) {
      const float lo = d * static_cast<float>(qs[j] & 0x0F);
      const float hi = d * static_cast<float>(qs[j] >> 4);
      dst[j] = lo + m;
      dst[j + kQK / 2] = hi + m;
    }
  }
}

// Q4_K, 144 bytes: f16 d | f16 dmin | scales[12] | qs[128]. Eight sub-blocks of 32 elements, each
// with a 6-bit scale sc[s] and 6-bit min mn[s] packed into `scales` as
//   bytes 0..3:  sc[0..3] in bits 0-5, bits 6-7 are bits 4-5 of sc[4..7]
//   bytes 4..7:  mn[0..3] in bits 0-5, bits 6-7 are bits 4-5 of mn[4..7]
//   bytes 8..11: low nibble = bits 0-3 of sc[4..7], high nibble = bits 0-3 of mn[4..7].
// Sub-block 2i holds the low nibbles of qs[32i .. 32i+31], sub-block 2i+1 their high nibbles.
// x = (d * sc) * q - (dmin * mn).
// Q5_K, 176 bytes: f16 d | f16 dmin | scales[12] | qh[32] | qs[128]: Q4_K plus a fifth bit, bit s
// of qh[l] for element l of sub-block s (q = nibble | bit << 4).
void DequantizeK4or5(const uint8_t* src, const uint8_t* qh, const uint8_t* qs, const float* table,
                     float* dst) {
  const float d = LoadF16(table, src);
  const float dmin = LoadF16(table, src + 2);
  const uint8_t* sc_bytes = src + 4;
  uint8_t sc[8], mn[8];
  for (int j = 0; j < 4; ++j) {
    sc[j] = sc_bytes[j] & 0x3F;
    mn[j] = sc_bytes[4 + j] & 0x3F;
    sc[4 + j] = (sc_bytes[8 + j] & 0x0F) | ((sc_bytes[j] >> 2) & 0x30);
    mn[4 + j] = (sc_bytes[8 + j] >> 4) | ((sc_bytes[4 + j] >> 2) & 0x30);
  }
  for (int s = 0; s < 8; ++s) {
    const float ds = d * static_cast<float>(sc[s]);
    const float ms = dmin * static_cast<float>(mn[s]);
    const uint8_t* q = qs + 32 * (s / 2);
    const int shift = 4 * (s % 2);
    float* o = dst + 32 * s;
    for (int i = 0; i < 32; ++i) {
      int v = (q[i] >> shift) & 0x0F;
      if (qh != nullptr) v |= ((qh[i] >> s) & 1) << 4;
      const float p = ds * static_cast<float>(v);
      o[i] = p - ms;
    }
  }
}

void DequantizeQ4_K(const uint8_t* src, int64_t n, float* dst) {
  const float* table = F16Table();
  for (int64_t b = 0; b < n; ++b, src += 144, dst += kQKK) {
    DequantizeK4or5(src, nullptr, src + 16, table, dst);
  }
}

void DequantizeQ5_K(const uint8_t* src, int64_t n, float* dst) {
  const float* table = F16Table();
  for (int64_t b = 0; b < n; ++b, src += 176, dst += kQKK) {
    DequantizeK4or5(src, src + 16, src + 48, table, dst);
  }
}

// Q6_K, 210 bytes: ql[128] | qh[64] | int8 scales[16] | f16 d. Element e (0..255) with
// h = e / 128, r = e % 128 takes its low 4 bits from ql[64h + r % 64] (low nibble when r < 64,
// else high nibble) and its high 2 bits from qh[32h + r % 32] at bit 2 * (r / 32);
// q = (low | high << 4) - 32 and x = (d * scales[e / 16]) * q.
// The loop walks l = r % 32 so that one ql/qh load serves the four elements r = l + 32k.
void DequantizeQ6_K(const uint8_t* src, int64_t n, float* dst) {
  const float* table = F16Table();
  for (int64_t b = 0; b < n; ++b, src += 210, dst += kQKK) {
    const int8_t* scales = reinterpret_cast<const int8_t*>(src + 192);
    const float d = LoadF16(table, src + 208);
    float ds[16];
    for (int s = 0; s < 16; ++s) ds[s] = d * static_cast<float>(scales[s]);
    for (int h = 0; h < 2; ++h) {
      const uint8_t* ql = src + 64 * h;
      const uint8_t* qh = src + 128 + 32 * h;
      const float* dsh = ds + 8 * h;
      float* o = dst + 128 * h;
      for (int l = 0; l < 32; ++l) {
        const int q0 = ((ql[l] & 0x0F) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q1 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        const int sub = l / 16;  // 16-element sub-block within each group of 32
        o[l] = dsh[sub] * static_cast<float>(q0);
        o[l + 32] = dsh[2 + sub] * static_cast<float>(q1);
        o[l + 64] = dsh[4 + sub] * static_cast<float>(q2);
        o[l + 96] = dsh[6 + sub] * static_cast<float>(q3);
      }
    }
  }
}

using BlockFn = void (*)(const uint8_t*, int64_t, float*);

BlockFn BlockFnOf(StoredType t) {
  switch (t) {
    case StoredType::kF32:
      return DequantizeF32;
    case StoredType::kF16:
      return DequantizeF16;
    case StoredType::kBF16:
      return DequantizeBF16;
    case StoredType::kQ8_0:
      return DequantizeQ8_0;
    case StoredType::kQ4_0:
      return DequantizeQ4_0;
    case StoredType::kQ4_1:
      return DequantizeQ4_1;
    case StoredType::kQ4_K:
      return DequantizeQ4_K;
    case StoredType::kQ5_K:
      return DequantizeQ5_K;
    case StoredType::kQ6_K:
      return DequantizeQ6_K;
  }
  return nullptr;
}

bool MulOverflows(int64_t a, int64_t b, int64_t* out) { return __builtin_mul_overflow(a, b, out); }

}  // namespace

void DequantizeBlocks(StoredType t, const uint8_t* src, int64_t num_blocks, float* dst) {
  BlockFnOf(t)(src, num_blocks, dst);
}

BlockLayout LayoutOf(StoredType t) {
  switch (t) {
    case StoredType::kF32:
      return {1, 4};
    case StoredType::kF16:
    case StoredType::kBF16:
      return {1, 2};
    case StoredType::kQ8_0:
      return {kQK, 34};
    case StoredType::kQ4_0:
      return {kQK, 18};
    case StoredType::kQ4_1:
      return {kQK, 20};
    case StoredType::kQ4_K:
      return {kQKK, 144};
    case StoredType::kQ5_K:
      return {kQKK, 176};
    case StoredType::kQ6_K:
      return {kQKK, 210};
  }
  return {1, 0};
}

absl::StatusOr<size_t> StoredByteSize(StoredType t, const int64_t* shape, size_t rank) {
  int64_t elems = 1;
  for (size_t i = 0; i < rank; ++i) {
    if (shape[i] < 0) return absl::InvalidArgumentError(absl::StrCat("negative dim ", shape[i]));
    if (MulOverflows(elems, shape[i], &elems)) {
      return absl::InvalidArgumentError("element count overflows int64");
    }
  }
  const BlockLayout layout = LayoutOf(t);
  const int64_t inner = rank == 0 ? 1 : shape[rank - 1];
  if (inner % layout.block_elems != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("innermost dim ", inner, " is not a multiple of the ",
                     StoredTypeName(t).data(), " block size ", layout.block_elems));
  }
  int64_t bytes;
  if (MulOverflows(elems / layout.block_elems, layout.block_bytes, &bytes)) {
    return absl::InvalidArgumentError("byte count overflows int64");
  }
  return static_cast<size_t>(bytes);
}

absl::Status DequantizeRowsToF32(const TensorInfo& t, int64_t first_row, int64_t num_rows,
                                 float* out) {
  const std::string where = absl::StrCat("tensor '", t.name, "'");
  auto expected = StoredByteSize(t.type, t.shape.data(), t.shape.size());
  if (!expected.ok()) return Annotate(expected.status(), where);
  if (*expected != t.nbytes) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": holds ", t.nbytes, " bytes but its ",
                                                   StoredTypeName(t.type).data(), " shape needs ",
                                                   *expected));
  }
  const int64_t cols = t.shape.empty() ? 1 : t.shape.back();
  int64_t rows = 1;
  for (size_t i = 0; i + 1 < t.shape.size(); ++i) {
    if (MulOverflows(rows, t.shape[i], &rows)) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": row count overflows int64"));
    }
  }
  if (first_row < 0 || num_rows < 0 || first_row > rows || num_rows > rows - first_row) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": rows [", first_row, ", +", num_rows,
                                                   ") outside its ", rows, " rows"));
  }
  if (num_rows == 0 || cols == 0) return absl::OkStatus();
  if (t.data == nullptr) return absl::InvalidArgumentError(absl::StrCat(where, ": no data"));
  if (out == nullptr) return absl::InvalidArgumentError(absl::StrCat(where, ": null output"));

  const BlockLayout layout = LayoutOf(t.type);
  const BlockFn fn = BlockFnOf(t.type);
  const int64_t blocks_per_row = cols / layout.block_elems;
  const int64_t first_block = first_row * blocks_per_row;
  const int64_t n_blocks = num_rows * blocks_per_row;
  const uint8_t* src = t.data + first_block * layout.block_bytes;
  // About 64K elements per task: big enough that the pool's hand-off cost vanishes, small enough
  // that a 576 x 49152 embedding still spreads over every core.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / layout.block_elems);
  if (n_blocks <= grain) {
    fn(src, n_blocks, out);
    return absl::OkStatus();
  }
  ThreadPool::Default().ParallelFor(
      n_blocks,
      [&](int64_t begin, int64_t end) {
        fn(src + begin * layout.block_bytes, end - begin, out + begin * layout.block_elems);
      },
      grain);
  return absl::OkStatus();
}

absl::Status DequantizeToF32(const TensorInfo& t, float* out) {
  int64_t rows = 1;  // all dims but the innermost; a hostile shape must not overflow here
  for (size_t i = 0; i + 1 < t.shape.size(); ++i) {
    if (MulOverflows(rows, t.shape[i], &rows)) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor '", t.name, "': row count overflows int64"));
    }
  }
  return DequantizeRowsToF32(t, 0, rows, out);
}

absl::StatusOr<std::vector<float>> DequantizeToF32(const TensorInfo& t) {
  // Check the shape against the stored bytes before allocating, so that a corrupt shape cannot
  // request more floats than the data could ever describe.
  auto bytes = StoredByteSize(t.type, t.shape.data(), t.shape.size());
  if (!bytes.ok()) return Annotate(bytes.status(), absl::StrCat("tensor '", t.name, "'"));
  if (*bytes != t.nbytes) {
    return absl::InvalidArgumentError(absl::StrCat("tensor '", t.name, "': holds ", t.nbytes,
                                                   " bytes but its shape needs ", *bytes));
  }
  std::vector<float> out(static_cast<size_t>(t.NumElements()));
  LP_RETURN_IF_ERROR(DequantizeToF32(t, out.data()));
  return out;
}

}  // namespace loraplex::formats
