// Gemm on quantized weights: quantizes the activations once per call (in parallel over tokens when
// there are many), then splits the output features across ThreadPool::Default() as gemm.cc does,
// so that each thread streams a disjoint slice of the weight blocks and decode (m = 1) reads every
// weight byte once. Also the runtime choice of the QuantOps table (quant_ops.h).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "common/logging.h"
#include "common/thread_pool.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/quant_ops.h"
#include "kernels/kernels.h"
#include "kernels/quant.h"

namespace loraplex::kernels::cpu {
namespace {

// Output features per scheduling unit: a multiple of every tile height of the tables (1, 2, 4).
constexpr int64_t kBlock = 16;
// Multiply-adds below which a share is not worth waking another thread for (as gemm.cc).
constexpr int64_t kMinMacsPerShare = 1 << 17;
// Activation values below which quantization stays on the calling thread.
constexpr int64_t kMinQuantizePerShare = 1 << 15;

// One cache line: a vector of these is 64-byte aligned, as the SIMD tables' activation loads
// expect.
struct alignas(64) Line {
  uint8_t bytes[64];
};

}  // namespace

bool Avx512VnniSupported() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool supported = [] {
    __builtin_cpu_init();
    return Avx512Supported() && __builtin_cpu_supports("avx512vnni");
  }();
  return supported;
#else
  return false;
#endif
}

bool AmxSupported() {
#if defined(__x86_64__)
  static const bool supported = [] {
    if (!Avx512VnniSupported() || AmxQuantOps() == nullptr) return false;
    unsigned eax, ebx, ecx, edx;
    // CPUID.(7,0):EDX bit 24 AMX-TILE, bit 25 AMX-INT8.
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if ((edx & (1u << 24)) == 0 || (edx & (1u << 25)) == 0) return false;
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS saves the tile state (Avx512Supported
    // already checked OSXSAVE).
    uint32_t xcr0_lo, xcr0_hi;
    __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
    if ((xcr0_lo & (3u << 17)) != (3u << 17)) return false;
    // Linux (5.16+) lets a process use the 8 KiB tile data only once it asked: without this the
    // first tile instruction faults. Refused on older kernels and where a thread's sigaltstack is
    // too small for the larger signal frame; then the VNNI loops serve.
    constexpr long kArchReqXcompPerm = 0x1023;
    constexpr long kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
  }();
  return supported;
#else
  return false;
#endif
}

int64_t AmxMinTokens() { return 8; }

bool AmxFormat(DType t) { return BlockSize(t) == 32 || t == DType::kQ4_K || t == DType::kQ5_K; }

const QuantOps& QuantOpsFor(DType t, int64_t m) {
  if (AmxEnabled() && AmxFormat(t) && m >= AmxMinTokens()) return *AmxQuantOps();
  return ActiveQuantOps();
}

const QuantOps& ActiveQuantOps() {
  const CpuOps& ops = ActiveCpuOps();
  if (&ops == Avx512Ops()) {
    if (Avx512VnniQuantOps() != nullptr && Avx512VnniSupported()) return *Avx512VnniQuantOps();
    if (Avx2QuantOps() != nullptr) return *Avx2QuantOps();  // AVX-512 implies AVX2, FMA, F16C
  }
  if (&ops == Avx2Ops() && Avx2QuantOps() != nullptr) return *Avx2QuantOps();
  return ScalarQuantOps();
}

void QuantGemm(float* y, const float* x, int64_t m, const WeightView& w, bool accumulate) {
  const GemmOutput one{y, w};
  QuantGemmShared(x, m, &one, 1, accumulate);
}

void QuantGemmShared(const float* x, int64_t m, const GemmOutput* outputs, int count,
                     bool accumulate) {
  LP_CHECK(count > 0);
  const DType t = outputs[0].w.dtype;
  const int64_t k = outputs[0].w.cols;
  int64_t blocks = 0;  // of all the outputs' rows, each output's starting on a block
  for (int i = 0; i < count; ++i) {
    const WeightView& w = outputs[i].w;
    LP_CHECK(IsQuantized(w.dtype) && w.dtype == t && w.cols == k && m >= 0 && w.rows >= 0 &&
             k >= 0 && k % BlockSize(t) == 0)
        << "Gemm on " << DTypeName(w.dtype) << " weights: m=" << m << " w=" << w.rows << "x"
        << w.cols << " (columns must be a multiple of " << BlockSize(w.dtype)
        << "; shared inputs need one dtype and column count)";
    blocks += (w.rows + kBlock - 1) / kBlock;
  }
  if (m == 0 || blocks == 0) return;
  if (k == 0) {
    if (!accumulate) {
      for (int i = 0; i < count; ++i) {
        std::memset(outputs[i].y, 0, static_cast<size_t>(m * outputs[i].w.rows) * sizeof(float));
      }
    }
    return;
  }
  LP_CHECK(x != nullptr);
  for (int i = 0; i < count; ++i) {
    LP_CHECK(outputs[i].w.rows == 0 || (outputs[i].y != nullptr && outputs[i].w.data != nullptr));
  }
  // Batch invariance: the one-token loops for every token (never the tiles of AMX).
  const bool per_token = m > 1 && BatchInvariant();
  const QuantOps& ops = per_token ? ActiveQuantOps() : QuantOpsFor(t, m);

  // The activations, quantized once for every output: small (about k bytes per token), kept per
  // calling thread; rows up to a multiple of 16 (QuantOpsFor).
  const int64_t row_bytes = ops.act_row_bytes(t, k);
  thread_local std::vector<Line> xq_buffer;
  xq_buffer.resize(static_cast<size_t>(((m + 15) / 16 * 16 * row_bytes + 63) / 64));
  uint8_t* xq = xq_buffer.data()->bytes;
  ThreadPool::Default().ParallelFor(
      m, [&](int64_t i0, int64_t i1) { ops.quantize_act(t, x, k, i0, i1, xq); },
      std::max<int64_t>(1, kMinQuantizePerShare / k));

  // One split of the blocks of all outputs, in order: a share may span the end of one output and
  // the start of the next.
  const int64_t panel = InvariantPanelRows(RowBytes(t, k), kBlock);
  const int64_t macs_per_block = std::max<int64_t>(1, m * k * kBlock);
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerShare / macs_per_block);
  ThreadPool::Default().ParallelFor(
      blocks,
      [&](int64_t b0, int64_t b1) {
        int64_t first = 0;  // global block index of output i's first block
        for (int i = 0; i < count && first < b1; ++i) {
          const WeightView& w = outputs[i].w;
          const int64_t n = w.rows;
          const int64_t own = (n + kBlock - 1) / kBlock;
          const int64_t lo = std::max(b0, first), hi = std::min(b1, first + own);
          const int64_t j0 = (lo - first) * kBlock, j1 = std::min(n, (hi - first) * kBlock);
          const auto* wd = static_cast<const uint8_t*>(w.data);
          if (lo < hi && !per_token) {
            ops.gemm(t, outputs[i].y, xq, m, wd, n, k, j0, j1, accumulate);
          } else if (lo < hi) {
            for (int64_t jp = j0; jp < j1; jp += panel) {
              for (int64_t r = 0; r < m; ++r) {
                ops.gemm(t, outputs[i].y + r * n, xq + r * row_bytes, 1, wd, n, k, jp,
                         std::min(j1, jp + panel), accumulate);
              }
            }
          }
          first += own;
        }
      },
      grain);
}

}  // namespace loraplex::kernels::cpu

namespace loraplex::kernels {

const char* QuantKernelIsa() {
  return cpu::AmxEnabled() && !BatchInvariant() ? cpu::AmxQuantOps()->name
                                                : cpu::ActiveQuantOps().name;
}

}  // namespace loraplex::kernels
