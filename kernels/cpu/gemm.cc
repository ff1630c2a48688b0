// The fast Gemm: splits the output features across ThreadPool::Default() and runs the active ISA's
// tile loops (cpu_ops_*.cc) on each share. Output features, not tokens, are split so that each
// thread streams a disjoint slice of the weight: decode (m = 1) is a weight-bandwidth-bound GEMV
// and must read every weight byte exactly once per call.
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "common/logging.h"
#include "common/thread_pool.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/quant_ops.h"
#include "kernels/kernels.h"
#include "kernels/quant.h"

namespace loraplex::kernels {
namespace {

// Output features per scheduling unit: a multiple of every tile width (AVX2: 3 and 4; AVX-512: 6
// and 12).
constexpr int64_t kBlock = 12;
// Multiply-adds below which a share is not worth waking another thread for (~a few microseconds).
constexpr int64_t kMinMacsPerShare = 1 << 17;

std::atomic<bool> g_batch_invariant{false};

}  // namespace

void SetBatchInvariant(bool on) { g_batch_invariant.store(on, std::memory_order_relaxed); }
bool BatchInvariant() { return g_batch_invariant.load(std::memory_order_relaxed); }

namespace cpu {

int64_t InvariantPanelRows(int64_t row_bytes, int64_t multiple) {
  return std::max<int64_t>(multiple,
                           (64 * 1024 / std::max<int64_t>(1, row_bytes)) / multiple * multiple);
}

}  // namespace cpu

void Gemm(float* y, const float* x, int64_t m, const WeightView& w, bool accumulate) {
  LP_CHECK(m >= 0 && w.rows >= 0 && w.cols >= 0)
      << "Gemm shape m=" << m << " w=" << w.rows << "x" << w.cols;
  if (IsQuantized(w.dtype)) return cpu::QuantGemm(y, x, m, w, accumulate);  // quant_gemm.cc
  const int64_t n = w.rows;
  const int64_t k = w.cols;
  if (m == 0 || n == 0) return;
  LP_CHECK(y != nullptr && (k == 0 || (x != nullptr && w.data != nullptr)));
  const cpu::CpuOps& ops = cpu::ActiveCpuOps();
  const int64_t blocks = (n + kBlock - 1) / kBlock;
  const int64_t macs_per_block = std::max<int64_t>(1, m * k * kBlock);
  const int64_t grain = std::max<int64_t>(1, kMinMacsPerShare / macs_per_block);
  // Tokens [i, i + rows) x features [j0, j1).
  auto run = [&](int64_t i, int64_t rows, int64_t j0, int64_t j1) {
    if (w.dtype == DType::kF32) {
      ops.gemm_f32(y + i * n, x + i * k, rows, static_cast<const float*>(w.data), n, k, j0, j1,
                   accumulate);
    } else {
      ops.gemm_bf16(y + i * n, x + i * k, rows, static_cast<const uint16_t*>(w.data), n, k, j0, j1,
                    accumulate);
    }
  };
  const bool per_token = m > 1 && BatchInvariant();
  const int64_t panel = cpu::InvariantPanelRows(k * (w.dtype == DType::kF32 ? 4 : 2), kBlock);
  ThreadPool::Default().ParallelFor(
      blocks,
      [&](int64_t b0, int64_t b1) {
        const int64_t j0 = b0 * kBlock;
        const int64_t j1 = std::min(n, b1 * kBlock);
        if (!per_token) return run(0, m, j0, j1);
        for (int64_t jp = j0; jp < j1; jp += panel) {
          for (int64_t i = 0; i < m; ++i) run(i, 1, jp, std::min(j1, jp + panel));
        }
      },
      grain);
}

void GemmShared(const float* x, int64_t m, std::initializer_list<GemmOutput> outputs) {
  if (outputs.size() == 0) return;
  const WeightView& first = outputs.begin()->w;
  bool one_quantized_format = IsQuantized(first.dtype);
  for (const GemmOutput& o : outputs) {
    one_quantized_format &= o.w.dtype == first.dtype && o.w.cols == first.cols;
  }
  if (one_quantized_format) {
    return cpu::QuantGemmShared(x, m, outputs.begin(), static_cast<int>(outputs.size()),
                                /*accumulate=*/false);
  }
  for (const GemmOutput& o : outputs) Gemm(o.y, x, m, o.w);
}

}  // namespace loraplex::kernels
