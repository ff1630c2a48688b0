// The fast LoRA ops (kernels/lora.h): the batch is cut into tasks (a run of tokens sharing an
// adapter, one slice, a range of weight rows), the tasks run on ThreadPool::Default(), and each
// task is a small strided GEMM done by a micro-kernel: AVX2/FMA (lora_fast_avx2.cc, compiled with
// its own ISA flags) when the CPU has it, else a portable scalar loop.
//
// Every output element is the same dot product in every path (one weight row against one input
// row); only the summation order inside it differs from the reference.

#include <algorithm>
#include <atomic>
#include <vector>

#include "common/half.h"
#include "common/logging.h"
#include "common/thread_pool.h"
#include "kernels/lora.h"

namespace loraplex::kernels {

namespace lora_internal {
// lora_fast_avx2.cc; call only when the CPU has AVX2 and FMA.
void RowsAvx2(float* out, int64_t out_stride, const float* in, int64_t in_stride, int64_t tokens,
              const WeightView& w, int64_t row_begin, int64_t row_end, bool accumulate);
}  // namespace lora_internal

namespace {

std::atomic<bool> g_force_scalar{false};

bool CpuHasAvx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

bool UseAvx2() { return CpuHasAvx2() && !g_force_scalar.load(std::memory_order_relaxed); }

// The portable micro-kernel, same contract as RowsAvx2.
void RowsScalar(float* out, int64_t out_stride, const float* in, int64_t in_stride, int64_t tokens,
                const WeightView& w, int64_t row_begin, int64_t row_end, bool accumulate) {
  const int64_t k_len = w.cols;
  for (int64_t t = 0; t < tokens; ++t) {
    const float* xt = in + t * in_stride;
    for (int64_t n = row_begin; n < row_end; ++n) {
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      int64_t k = 0;
      if (w.dtype == DType::kF32) {
        const float* wr = static_cast<const float*>(w.data) + n * k_len;
        for (; k + 4 <= k_len; k += 4) {
          for (int i = 0; i < 4; ++i) acc[i] += wr[k + i] * xt[k + i];
        }
        for (; k < k_len; ++k) acc[0] += wr[k] * xt[k];
      } else {
        const uint16_t* wr = static_cast<const uint16_t*>(w.data) + n * k_len;
        for (; k + 4 <= k_len; k += 4) {
          for (int i = 0; i < 4; ++i) acc[i] += Bf16ToF32(wr[k + i]) * xt[k + i];
        }
        for (; k < k_len; ++k) acc[0] += Bf16ToF32(wr[k]) * xt[k];
      }
      const float s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      float* o = out + t * out_stride + n;
      *o = accumulate ? *o + s : s;
    }
  }
}

// A run of consecutive tokens that share an adapter.
struct Group {
  int64_t begin;
  int64_t end;
  int32_t adapter;
};

struct Task {
  int64_t t_begin, t_end;
  int32_t adapter;
  int32_t slice;
  int64_t row_begin, row_end;
};

// Enough multiply-adds per task that the thread hand-off is noise, few enough that a decode batch
// of 32 tokens still spreads over the cores.
constexpr int64_t kTaskMacs = 32 * 1024;
constexpr int64_t kTokenBlock = 32;

std::vector<Group> GroupsFromSegments(const LoraSegments& seg, const LoraSliceWeights& w) {
  std::vector<Group> groups;
  for (int64_t i = 0; i < seg.num_segments; ++i) {
    LP_CHECK(seg.starts[i] <= seg.starts[i + 1]) << "segment starts must ascend";
    LP_CHECK(seg.adapter[i] >= -1 && seg.adapter[i] < w.num_adapters)
        << "adapter index " << seg.adapter[i] << " of " << w.num_adapters;
    if (seg.adapter[i] >= 0 && seg.starts[i] < seg.starts[i + 1]) {
      groups.push_back({seg.starts[i], seg.starts[i + 1], seg.adapter[i]});
    }
  }
  return groups;
}

// Consecutive tokens with the same index form one group: the same dot products, better reuse.
std::vector<Group> GroupsFromTokens(const int32_t* token_adapter, int64_t n,
                                    const LoraSliceWeights& w) {
  std::vector<Group> groups;
  for (int64_t t = 0; t < n; ++t) {
    const int32_t j = token_adapter[t];
    LP_CHECK(j >= -1 && j < w.num_adapters) << "adapter index " << j << " of " << w.num_adapters;
    if (j < 0) continue;
    if (!groups.empty() && groups.back().adapter == j && groups.back().end == t) {
      ++groups.back().end;
    } else {
      groups.push_back({t, t + 1, j});
    }
  }
  return groups;
}

// shrink: W = A (rows r, cols in); expand: W = B (rows out, cols r).
std::vector<Task> MakeTasks(const std::vector<Group>& groups, const LoraSliceWeights& w,
                            bool shrink, int64_t* total_macs) {
  std::vector<Task> tasks;
  *total_macs = 0;
  for (const Group& g : groups) {
    for (int64_t s = 0; s < w.num_slices; ++s) {
      const WeightView& a = w.a[g.adapter * w.num_slices + s];
      const WeightView& b = w.b[g.adapter * w.num_slices + s];
      if (a.rows == 0) continue;
      LP_CHECK(b.cols == a.rows) << "rank of A (" << a.rows << ") and B (" << b.cols << ") differ";
      const WeightView& m = shrink ? a : b;
      for (int64_t t0 = g.begin; t0 < g.end; t0 += kTokenBlock) {
        const int64_t t1 = std::min(g.end, t0 + kTokenBlock);
        const int64_t row_macs = (t1 - t0) * std::max<int64_t>(m.cols, 1);
        const int64_t rows_per_task = std::max<int64_t>(8, kTaskMacs / row_macs);
        for (int64_t r0 = 0; r0 < m.rows; r0 += rows_per_task) {
          tasks.push_back({t0, t1, g.adapter, static_cast<int32_t>(s), r0,
                           std::min(m.rows, r0 + rows_per_task)});
        }
        *total_macs += row_macs * m.rows;
      }
    }
  }
  return tasks;
}

template <typename Fn>
void RunTasks(const std::vector<Task>& tasks, int64_t total_macs, const Fn& fn) {
  if (tasks.empty()) return;
  // Small batches stay on the calling thread.
  const int64_t grain = total_macs < 4 * kTaskMacs ? static_cast<int64_t>(tasks.size()) : 1;
  ThreadPool::Default().ParallelFor(
      static_cast<int64_t>(tasks.size()),
      [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) fn(tasks[i]);
      },
      grain);
}

void Rows(float* out, int64_t out_stride, const float* in, int64_t in_stride, int64_t tokens,
          const WeightView& w, int64_t row_begin, int64_t row_end, bool accumulate) {
  if (UseAvx2()) {
    lora_internal::RowsAvx2(out, out_stride, in, in_stride, tokens, w, row_begin, row_end,
                            accumulate);
  } else {
    RowsScalar(out, out_stride, in, in_stride, tokens, w, row_begin, row_end, accumulate);
  }
}

void Shrink(float* v, int64_t v_stride, const float* x, int64_t x_stride,
            const std::vector<Group>& groups, const LoraSliceWeights& w) {
  LP_CHECK(w.num_slices >= 1 && w.num_slices <= kMaxLoraSlices);
  for (const Group& g : groups) {
    LP_CHECK(LoraTotalRank(w, g.adapter) <= v_stride) << "v_stride " << v_stride;
  }
  int64_t macs = 0;
  std::vector<Task> tasks = MakeTasks(groups, w, /*shrink=*/true, &macs);
  RunTasks(tasks, macs, [&](const Task& k) {
    const WeightView& a = w.a[k.adapter * w.num_slices + k.slice];
    float* out = v + k.t_begin * v_stride + LoraSliceOffset(w, k.adapter, k.slice);
    Rows(out, v_stride, x + k.t_begin * x_stride, x_stride, k.t_end - k.t_begin, a, k.row_begin,
         k.row_end, /*accumulate=*/false);
  });
}

void Expand(const LoraOutput* y, const float* v, int64_t v_stride, const std::vector<Group>& groups,
            const LoraSliceWeights& w) {
  LP_CHECK(w.num_slices >= 1 && w.num_slices <= kMaxLoraSlices);
  int64_t macs = 0;
  std::vector<Task> tasks = MakeTasks(groups, w, /*shrink=*/false, &macs);
  RunTasks(tasks, macs, [&](const Task& k) {
    const WeightView& b = w.b[k.adapter * w.num_slices + k.slice];
    const float* in = v + k.t_begin * v_stride + LoraSliceOffset(w, k.adapter, k.slice);
    const LoraOutput& o = y[k.slice];
    Rows(o.data + k.t_begin * o.stride, o.stride, in, v_stride, k.t_end - k.t_begin, b, k.row_begin,
         k.row_end, /*accumulate=*/true);
  });
}

}  // namespace

void SgmvShrink(float* v, int64_t v_stride, const float* x, int64_t x_stride,
                const LoraSegments& segments, const LoraSliceWeights& w) {
  Shrink(v, v_stride, x, x_stride, GroupsFromSegments(segments, w), w);
}

void SgmvExpand(const LoraOutput* y, const float* v, int64_t v_stride, const LoraSegments& segments,
                const LoraSliceWeights& w) {
  Expand(y, v, v_stride, GroupsFromSegments(segments, w), w);
}

void BgmvShrink(float* v, int64_t v_stride, const float* x, int64_t x_stride,
                const int32_t* token_adapter, int64_t num_tokens, const LoraSliceWeights& w) {
  Shrink(v, v_stride, x, x_stride, GroupsFromTokens(token_adapter, num_tokens, w), w);
}

void BgmvExpand(const LoraOutput* y, const float* v, int64_t v_stride, const int32_t* token_adapter,
                int64_t num_tokens, const LoraSliceWeights& w) {
  Expand(y, v, v_stride, GroupsFromTokens(token_adapter, num_tokens, w), w);
}

const char* LoraKernelIsa() { return UseAvx2() ? "avx2" : "scalar"; }

void SetLoraForceScalar(bool force) { g_force_scalar.store(force, std::memory_order_relaxed); }

}  // namespace loraplex::kernels
