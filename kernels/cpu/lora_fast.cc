// The fast LoRA ops (kernels/lora.h).
//
// 1. Tokens are grouped by adapter (a counting sort of the per-token indices; SGMV segments are
//    first spelled out per token), so each adapter's A and B are streamed once per call however
//    its tokens are spread over the batch: in decode every token is usually its own adapter, and
//    the op is bound by reading 32 adapters' weights, not by arithmetic.
// 2. Each token's input row is packed once (x for the shrink, shared by all slices; v for the
//    expand) in the layout the micro-kernel wants (lora_internal.h).
// 3. The work is cut into tiles of (adapter, slice, block of its tokens, block of weight rows), an
//    output tile per task, and the threads of ThreadPool::Default() pull tiles from a shared
//    counter: one token per adapter still spreads over the cores, and a core slowed by another
//    process takes fewer tiles instead of holding up the step.
// 4. A tile is a small strided GEMM done by the micro-kernel: AVX2/FMA (lora_fast_avx2.cc,
//    compiled with its own ISA flags) when the CPU has it, else the portable one below.
// 5. An adapter with many tokens in the call (a prefill segment) is a real GEMM: its slices go
//    through the blocked, threaded Gemm instead (in place for a packed segment, else gathered
//    into a block and scattered back), which is 2-3x faster there than tiles whose micro-kernel
//    reuses a weight row for at most 2 tokens (lora_bench BM_PrefillSgmv, docs/benchmarks.md).
// 6. Shrink and expand in one call (ShrinkExpand, what the model runs): each adapter of few tokens
//    is one task that packs its tokens' x, shrinks into a v of its own and expands at once; an
//    adapter of many tokens (a prompt) is cut into blocks of 32 tokens, each task two small GEMMs
//    on its thread; all in one parallel region. Against the two ops in turn this halves the
//    regions, moves the serial packing onto the workers and replaces a threaded GEMM per adapter
//    and slice: 1.5-1.9x faster on one decode layer of 32 q,k,v,o adapters of rank 64-8 (lora_bench
//    BM_LayerLora against BM_LayerLoraTwoPhase), 1.1-3.8x on prompts (BM_PrefillSgmvFused).

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "common/half.h"
#include "common/logging.h"
#include "common/thread_pool.h"
#include "kernels/cpu/cpu_ops.h"
#include "kernels/cpu/lora_internal.h"
#include "kernels/lora.h"

namespace loraplex::kernels {

namespace lora_internal {
namespace {

// The portable micro-kernel: natural order, zero padding, four partial sums per dot product.
void PackScalar(float* dst, const float* src, int64_t k_len, DType /*dtype*/) {
  int64_t k = 0;
  for (; k < k_len; ++k) dst[k] = src[k];
  for (; k < PackedLength(k_len); ++k) dst[k] = 0.0f;
}

template <typename T>
float Widen(T w) {
  if constexpr (sizeof(T) == 2) {
    return Bf16ToF32(w);
  } else {
    return w;
  }
}

template <typename T>
void TileScalarT(const Tile& tile) {
  const int64_t k_len = tile.w->cols;
  const T* w = static_cast<const T*>(tile.w->data);
  for (int64_t i = 0; i < tile.num_tokens; ++i) {
    const float* x = tile.in[i];  // zero-padded to a multiple of 4 (of 8, in fact)
    for (int64_t n = tile.row_begin; n < tile.row_end; ++n) {
      const T* wr = w + n * k_len;
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      int64_t k = 0;
      for (; k + 4 <= k_len; k += 4) {
        for (int j = 0; j < 4; ++j) acc[j] += Widen(wr[k + j]) * x[k + j];
      }
      for (int j = 0; k < k_len; ++k, ++j) acc[j] += Widen(wr[k]) * x[k];
      const float s = (acc[0] + acc[1]) + (acc[2] + acc[3]);
      float* o = tile.out[i] + n;
      *o = tile.accumulate ? *o + s : s;
    }
  }
}

void TileScalar(const Tile& tile) {
  if (tile.w->dtype == DType::kF32) {
    TileScalarT<float>(tile);
  } else {
    TileScalarT<uint16_t>(tile);
  }
}

}  // namespace

const MicroKernel& ScalarKernel() {
  static const MicroKernel kernel{&PackScalar, &TileScalar, "scalar"};
  return kernel;
}

}  // namespace lora_internal

namespace {

using lora_internal::MicroKernel;
using lora_internal::PackedLength;
using lora_internal::Tile;

std::atomic<bool> g_force_scalar{false};

bool CpuHasAvx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
#else
  return false;
#endif
}

const MicroKernel& Kernel() {
#if defined(__x86_64__) || defined(__i386__)
  if (CpuHasAvx2() && !g_force_scalar.load(std::memory_order_relaxed)) {
    return lora_internal::Avx2Kernel();
  }
#endif
  return lora_internal::ScalarKernel();
}

// Enough multiply-adds per tile that taking it from the shared counter is noise, few enough that
// a decode batch (32 tokens x 3 slices, ~10^4..10^5 MACs each) gives every core many tiles.
constexpr int64_t kTileMacs = 32 * 1024;
// Tokens of one adapter per tile: their packed inputs (and the tile's weight rows) stay in L2.
constexpr int64_t kTokenBlock = 64;
// Rows of a tile are a multiple of the micro-kernels' row block.
constexpr int64_t kRowAlign = 8;
// Tokens of one adapter from which its slices go through Gemm rather than tiles. Measured
// (lora_bench, AVX-512 Xeon, 2 threads): 512 prompt tokens in segments of 16 take 0.55x the tiles'
// time at rank 64 and 0.92x at rank 16; at 8 tokens Gemm still wins at rank 64 prefill but loses
// to the tiles for decode groups streaming adapters from DRAM (BM_GroupedDecode, 1.15-1.3x).
constexpr int64_t kGemmMinTokens = 16;
// kGemmMinTokens, or never under BatchInvariant() (kernels.h): the tiles compute every token alone.
int64_t GemmMinTokens() {
  return BatchInvariant() ? std::numeric_limits<int64_t>::max() : kGemmMinTokens;
}

// All tokens of one adapter (in `order`), for one slice.
struct Job {
  int32_t adapter;
  int32_t slice;
  int64_t order_first;  // the job's tokens are order[order_first, order_first + count)
  int64_t first;        // and its pointers in[first, first + count), out[...]
  int64_t count;
  const WeightView* w;  // A (shrink) or B (expand)
};

// All tokens of one adapter: order[first, first + count).
struct Group {
  int32_t adapter;
  int64_t first, count;
};

struct Task {
  int32_t job;
  int64_t t_begin, t_end;  // within the job's tokens
  int64_t row_begin, row_end;
};

// One task of the fused ShrinkExpand: tokens [begin, end) of group `group` (order[first + i]).
struct FusedTask {
  int32_t group;
  int64_t begin, end;
};

// Reused per calling thread, so a warm step allocates nothing.
struct Scratch {
  std::vector<int32_t> per_token;  // SGMV segments spelled out per token
  std::vector<int64_t> count;      // tokens per adapter
  std::vector<int64_t> order;      // token ids grouped by adapter, ascending within a group
  std::vector<Group> groups;
  std::vector<Job> jobs;
  std::vector<Task> tasks;
  std::vector<float> packed_x;   // the shrink's packed x rows
  std::vector<float> packed_v;   // the expand's packed v rows
  std::vector<float> v;          // the two-phase ShrinkExpand's v
  std::vector<FusedTask> fused;  // ShrinkExpand's tasks
  std::vector<const float*> in;  // per (job, token)
  std::vector<float*> out;       // per (job, token)
  std::vector<Job> gemm_jobs;    // the jobs of kGemmMinTokens tokens or more
  std::vector<float> gemm_in, gemm_out;
};

Scratch& ThreadScratch() {
  thread_local Scratch s;
  return s;
}

// Groups tokens [0, n) by adapter: s->order holds the token ids, s->groups one (adapter, first,
// count) per adapter that has tokens, in adapter order.
void GroupTokens(const int32_t* token_adapter, int64_t n, const LoraSliceWeights& w, Scratch* s) {
  s->count.assign(w.num_adapters + 1, 0);
  for (int64_t t = 0; t < n; ++t) {
    const int32_t j = token_adapter[t];
    LP_CHECK(j >= -1 && j < w.num_adapters) << "adapter index " << j << " of " << w.num_adapters;
    if (j >= 0) ++s->count[j + 1];
  }
  s->groups.clear();
  for (int64_t j = 0; j < w.num_adapters; ++j) {
    if (s->count[j + 1] > 0) {
      s->groups.push_back({static_cast<int32_t>(j), s->count[j], s->count[j + 1]});
    }
    s->count[j + 1] += s->count[j];  // count[j] becomes adapter j's first slot in order
  }
  s->order.resize(s->count[w.num_adapters]);
  for (int64_t t = 0; t < n; ++t) {
    if (token_adapter[t] >= 0) s->order[s->count[token_adapter[t]]++] = t;
  }
}

const int32_t* SpellOut(const LoraSegments& seg, const LoraSliceWeights& w, int64_t* n,
                        Scratch* s) {
  *n = seg.num_segments > 0 ? seg.starts[seg.num_segments] : 0;
  s->per_token.assign(*n, -1);
  for (int64_t i = 0; i < seg.num_segments; ++i) {
    LP_CHECK(seg.starts[i] <= seg.starts[i + 1]) << "segment starts must ascend";
    LP_CHECK(seg.adapter[i] >= -1 && seg.adapter[i] < w.num_adapters)
        << "adapter index " << seg.adapter[i] << " of " << w.num_adapters;
    std::fill(s->per_token.begin() + seg.starts[i], s->per_token.begin() + seg.starts[i + 1],
              seg.adapter[i]);
  }
  return s->per_token.data();
}

// Jobs for every (group, targeted slice); W = A for the shrink, B for the expand.
void MakeJobs(const LoraSliceWeights& w, bool shrink, Scratch* s) {
  LP_CHECK(w.num_slices >= 1 && w.num_slices <= kMaxLoraSlices);
  s->jobs.clear();
  int64_t first = 0;
  for (const Group& g : s->groups) {
    for (int64_t sl = 0; sl < w.num_slices; ++sl) {
      const WeightView& a = w.a[g.adapter * w.num_slices + sl];
      const WeightView& b = w.b[g.adapter * w.num_slices + sl];
      if (a.rows == 0) continue;
      LP_CHECK(b.cols == a.rows) << "rank of A (" << a.rows << ") and B (" << b.cols << ") differ";
      s->jobs.push_back(
          {g.adapter, static_cast<int32_t>(sl), g.first, first, g.count, shrink ? &a : &b});
      first += g.count;
    }
  }
  s->in.resize(first);
  s->out.resize(first);
}

// Moves the jobs with at least kGemmMinTokens tokens from s->jobs to s->gemm_jobs.
void SplitOffGemmJobs(Scratch* s) {
  s->gemm_jobs.clear();
  size_t kept = 0;
  for (size_t i = 0; i < s->jobs.size(); ++i) {
    if (s->jobs[i].count >= GemmMinTokens()) {
      s->gemm_jobs.push_back(s->jobs[i]);
    } else {
      s->jobs[kept++] = s->jobs[i];
    }
  }
  s->jobs.resize(kept);
}

// One job as a GEMM over its tokens t: out row t (at out + t * out_stride, job.w->rows floats)
// = or += W (in row t at in + t * in_stride, job.w->cols floats). The rows are read and written
// in place when the tokens are consecutive and the rows packed (an SGMV segment), else gathered
// into a block and the result scattered back.
void GemmJob(const Job& job, const float* in, int64_t in_stride, float* out, int64_t out_stride,
             bool accumulate, Scratch* s) {
  const WeightView& m = *job.w;
  const int64_t* tokens = s->order.data() + job.order_first;
  bool consecutive = true;
  for (int64_t i = 1; consecutive && i < job.count; ++i) consecutive = tokens[i] == tokens[0] + i;
  const float* x = in + tokens[0] * in_stride;
  if (!consecutive || in_stride != m.cols) {
    s->gemm_in.resize(job.count * m.cols);
    for (int64_t i = 0; i < job.count; ++i) {
      const float* row = in + tokens[i] * in_stride;
      std::copy(row, row + m.cols, s->gemm_in.begin() + i * m.cols);
    }
    x = s->gemm_in.data();
  }
  if (consecutive && out_stride == m.rows) {
    Gemm(out + tokens[0] * out_stride, x, job.count, m, accumulate);
    return;
  }
  s->gemm_out.resize(job.count * m.rows);
  Gemm(s->gemm_out.data(), x, job.count, m);
  for (int64_t i = 0; i < job.count; ++i) {
    const float* row = s->gemm_out.data() + i * m.rows;
    float* dst = out + tokens[i] * out_stride;
    if (accumulate) {
      Add(dst, row, m.rows);
    } else {
      std::copy(row, row + m.rows, dst);
    }
  }
}

// Cuts the jobs into tiles; returns the total multiply-adds.
int64_t MakeTasks(Scratch* s) {
  s->tasks.clear();
  int64_t total = 0;
  for (size_t i = 0; i < s->jobs.size(); ++i) {
    const Job& job = s->jobs[i];
    const WeightView& m = *job.w;
    for (int64_t t0 = 0; t0 < job.count; t0 += kTokenBlock) {
      const int64_t t1 = std::min(job.count, t0 + kTokenBlock);
      const int64_t row_macs = (t1 - t0) * std::max<int64_t>(m.cols, 1);
      int64_t rows = std::max<int64_t>(kRowAlign, kTileMacs / row_macs);
      rows = (rows + kRowAlign - 1) / kRowAlign * kRowAlign;
      for (int64_t r0 = 0; r0 < m.rows; r0 += rows) {
        s->tasks.push_back({static_cast<int32_t>(i), t0, t1, r0, std::min(m.rows, r0 + rows)});
      }
      total += row_macs * m.rows;
    }
  }
  return total;
}

void RunTasks(const MicroKernel& kernel, bool accumulate, int64_t total_macs, const Scratch& s) {
  const int64_t n = static_cast<int64_t>(s.tasks.size());
  if (n == 0) return;
  std::atomic<int64_t> next{0};
  auto drain = [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      const Task& task = s.tasks[i];
      const Job& job = s.jobs[task.job];
      Tile tile;
      tile.w = job.w;
      tile.row_begin = task.row_begin;
      tile.row_end = task.row_end;
      tile.in = s.in.data() + job.first + task.t_begin;
      tile.out = s.out.data() + job.first + task.t_begin;
      tile.num_tokens = task.t_end - task.t_begin;
      tile.accumulate = accumulate;
      kernel.tile(tile);
    }
  };
  ThreadPool& pool = ThreadPool::Default();
  // Small ops stay on the calling thread; otherwise one share per thread, each pulling tiles.
  const int64_t shares = total_macs < 4 * kTileMacs ? 1 : std::min<int64_t>(pool.num_threads(), n);
  if (shares <= 1) {
    drain(0, 1);
  } else {
    pool.ParallelFor(shares, drain, 1);
  }
}

void Shrink(float* v, int64_t v_stride, const float* x, int64_t x_stride,
            const int32_t* token_adapter, int64_t n, const LoraSliceWeights& w) {
  Scratch& s = ThreadScratch();
  GroupTokens(token_adapter, n, w, &s);
  for (const Group& g : s.groups) {
    LP_CHECK(LoraTotalRank(w, g.adapter) <= v_stride) << "v_stride " << v_stride;
  }
  MakeJobs(w, /*shrink=*/true, &s);
  if (s.jobs.empty()) return;
  const int64_t in = s.jobs[0].w->cols;  // x's width
  for (const Job& job : s.jobs) {
    LP_CHECK(job.w->cols == in) << "A of adapter " << job.adapter << " has " << job.w->cols
                                << " columns, another has " << in;
  }
  SplitOffGemmJobs(&s);
  for (const Job& job : s.gemm_jobs) {
    GemmJob(job, x, x_stride, v + LoraSliceOffset(w, job.adapter, job.slice), v_stride,
            /*accumulate=*/false, &s);
  }
  if (s.jobs.empty()) return;
  const MicroKernel& kernel = Kernel();
  // x rows packed once per token and weight dtype (the layouts may differ), shared by all slices;
  // only the tokens of groups left to the tiles.
  const int64_t len = PackedLength(in);
  const int64_t tokens = static_cast<int64_t>(s.order.size());
  bool has[2] = {false, false};  // f32, bf16
  for (const Job& job : s.jobs) has[job.w->dtype == DType::kBF16] = true;
  s.packed_x.resize(2 * tokens * len);
  for (int d = 0; d < 2; ++d) {
    if (!has[d]) continue;
    for (const Group& g : s.groups) {
      if (g.count >= GemmMinTokens()) continue;
      for (int64_t i = g.first; i < g.first + g.count; ++i) {
        kernel.pack(s.packed_x.data() + (d * tokens + i) * len, x + s.order[i] * x_stride, in,
                    d ? DType::kBF16 : DType::kF32);
      }
    }
  }
  for (const Job& job : s.jobs) {
    const int64_t off = LoraSliceOffset(w, job.adapter, job.slice);
    const float* packed = s.packed_x.data() + (job.w->dtype == DType::kBF16) * tokens * len;
    for (int64_t i = 0; i < job.count; ++i) {
      const int64_t slot = job.order_first + i;
      s.in[job.first + i] = packed + slot * len;
      s.out[job.first + i] = v + s.order[slot] * v_stride + off;
    }
  }
  RunTasks(kernel, /*accumulate=*/false, MakeTasks(&s), s);
}

void Expand(const LoraOutput* y, const float* v, int64_t v_stride, const int32_t* token_adapter,
            int64_t n, const LoraSliceWeights& w) {
  Scratch& s = ThreadScratch();
  GroupTokens(token_adapter, n, w, &s);
  MakeJobs(w, /*shrink=*/false, &s);
  SplitOffGemmJobs(&s);
  for (const Job& job : s.gemm_jobs) {
    GemmJob(job, v + LoraSliceOffset(w, job.adapter, job.slice), v_stride, y[job.slice].data,
            y[job.slice].stride, /*accumulate=*/true, &s);
  }
  if (s.jobs.empty()) return;
  const MicroKernel& kernel = Kernel();
  // v rows packed per (token, slice): each slice has its own rank and B's dtype.
  int64_t total = 0;
  for (const Job& job : s.jobs) total += job.count * PackedLength(job.w->cols);
  s.packed_v.resize(total);
  float* packed = s.packed_v.data();
  for (const Job& job : s.jobs) {
    const int64_t r = job.w->cols, len = PackedLength(r);
    const int64_t off = LoraSliceOffset(w, job.adapter, job.slice);
    const LoraOutput& o = y[job.slice];
    for (int64_t i = 0; i < job.count; ++i) {
      const int64_t t = s.order[job.order_first + i];
      kernel.pack(packed, v + t * v_stride + off, r, job.w->dtype);
      s.in[job.first + i] = packed;
      s.out[job.first + i] = o.data + t * o.stride;
      packed += len;
    }
  }
  RunTasks(kernel, /*accumulate=*/true, MakeTasks(&s), s);
}

// Tasks from which ShrinkExpand fuses: each thread needs a few to balance; below that the
// two-phase ops split the work finer.
constexpr int64_t kFusedMinTasksPerThread = 2;
constexpr int64_t kFusedMinTasks = 8;

std::atomic<int64_t> g_fused_calls{0};

// Tokens per task of an adapter with kGemmMinTokens tokens or more (a prompt) in the fused
// ShrinkExpand: the block's x rows and v stay in L2 while A and B (tens of KB at the usual ranks)
// are read again per block.
constexpr int64_t kFusedTokenBlock = 32;

// A fused task's own buffers, reused per worker thread.
struct FusedScratch {
  std::vector<float> packed_x;  // [2 dtypes][count][PackedLength(in)]
  std::vector<float> v;         // [count][total rank]
  std::vector<float> packed_v;  // [count][PackedLength(r)] for one slice
  std::vector<const float*> in;
  std::vector<float*> out;
  std::vector<float> rows_x;  // a token block's x rows, gathered
  std::vector<float> rows_y;  // its expand, before it is scattered
};

FusedScratch& ThreadFusedScratch() {
  thread_local FusedScratch s;
  return s;
}

// y += B (sign A x) for the tokens of one group (fewer than kGemmMinTokens), every slice: the
// same tiles as the two-phase ops run on the same packed rows, so the same bits.
void FusedGroup(const MicroKernel& kernel, const Group& g, const int64_t* order,
                const LoraOutput* y, const float* x, int64_t x_stride, const LoraSliceWeights& w,
                bool negate) {
  FusedScratch& f = ThreadFusedScratch();
  const int64_t n = g.count, ns = w.num_slices;
  const WeightView* a = w.a + g.adapter * ns;
  const WeightView* b = w.b + g.adapter * ns;
  const int64_t total_rank = LoraTotalRank(w, g.adapter);
  int64_t in = 0;
  bool has[2] = {false, false};  // f32, bf16 A matrices
  for (int64_t sl = 0; sl < ns; ++sl) {
    if (a[sl].rows == 0) continue;
    LP_CHECK(b[sl].cols == a[sl].rows)
        << "rank of A (" << a[sl].rows << ") and B (" << b[sl].cols << ") differ";
    in = a[sl].cols;
    has[a[sl].dtype == DType::kBF16] = true;
  }
  const int64_t len = PackedLength(in);
  f.packed_x.resize(2 * n * len);
  f.v.resize(n * total_rank);
  f.in.resize(n);
  f.out.resize(n);
  for (int d = 0; d < 2; ++d) {
    if (!has[d]) continue;
    for (int64_t i = 0; i < n; ++i) {
      kernel.pack(f.packed_x.data() + (d * n + i) * len, x + order[g.first + i] * x_stride, in,
                  d ? DType::kBF16 : DType::kF32);
    }
  }
  Tile tile;
  tile.num_tokens = n;
  tile.in = f.in.data();
  tile.out = f.out.data();
  int64_t off = 0;
  for (int64_t sl = 0; sl < ns; ++sl) {
    if (a[sl].rows == 0) continue;
    LP_CHECK(a[sl].cols == in) << "A of adapter " << g.adapter << " has " << a[sl].cols
                               << " columns, another has " << in;
    const float* packed = f.packed_x.data() + (a[sl].dtype == DType::kBF16) * n * len;
    for (int64_t i = 0; i < n; ++i) {
      f.in[i] = packed + i * len;
      f.out[i] = f.v.data() + i * total_rank + off;
    }
    tile.w = &a[sl];
    tile.row_begin = 0;
    tile.row_end = a[sl].rows;
    tile.accumulate = false;
    kernel.tile(tile);
    off += a[sl].rows;
  }
  if (negate) {
    for (float& e : f.v) e = -e;
  }
  off = 0;
  for (int64_t sl = 0; sl < ns; ++sl) {
    const int64_t r = a[sl].rows;
    if (r == 0) continue;
    const int64_t rlen = PackedLength(r);
    f.packed_v.resize(n * rlen);
    for (int64_t i = 0; i < n; ++i) {
      kernel.pack(f.packed_v.data() + i * rlen, f.v.data() + i * total_rank + off, r, b[sl].dtype);
      f.in[i] = f.packed_v.data() + i * rlen;
      f.out[i] = y[sl].data + order[g.first + i] * y[sl].stride;
    }
    tile.w = &b[sl];
    tile.row_begin = 0;
    tile.row_end = b[sl].rows;
    tile.accumulate = true;
    kernel.tile(tile);
    off += r;
  }
}

// One thread's GEMM: y[i, :] (+)= W x[i] for i < m, x [m, w.cols] and y [m, w.rows] packed.
void GemmOneThread(float* y, const float* x, int64_t m, const WeightView& w, bool accumulate) {
  const cpu::CpuOps& ops = cpu::ActiveCpuOps();
  if (w.dtype == DType::kF32) {
    ops.gemm_f32(y, x, m, static_cast<const float*>(w.data), w.rows, w.cols, 0, w.rows, accumulate);
  } else {
    ops.gemm_bf16(y, x, m, static_cast<const uint16_t*>(w.data), w.rows, w.cols, 0, w.rows,
                  accumulate);
  }
}

// y += B (sign A x) for tokens [begin, end) of a group with kGemmMinTokens tokens or more, every
// slice, as small GEMMs on this thread: in place when the tokens are consecutive and the rows
// packed (a prompt's segment), else gathered and scattered.
void FusedBlock(const Group& g, int64_t begin, int64_t end, const int64_t* order,
                const LoraOutput* y, const float* x, int64_t x_stride, const LoraSliceWeights& w,
                bool negate) {
  FusedScratch& f = ThreadFusedScratch();
  const int64_t m = end - begin, ns = w.num_slices;
  const int64_t* tokens = order + g.first + begin;
  const WeightView* a = w.a + g.adapter * ns;
  const WeightView* b = w.b + g.adapter * ns;
  bool consecutive = true;
  for (int64_t i = 1; consecutive && i < m; ++i) consecutive = tokens[i] == tokens[0] + i;
  const float* xb = nullptr;
  int64_t in = 0;
  for (int64_t sl = 0; sl < ns; ++sl) {
    if (a[sl].rows == 0) continue;
    LP_CHECK(b[sl].cols == a[sl].rows)
        << "rank of A (" << a[sl].rows << ") and B (" << b[sl].cols << ") differ";
    LP_CHECK(xb == nullptr || a[sl].cols == in)
        << "A of adapter " << g.adapter << " has " << a[sl].cols << " columns, another has " << in;
    in = a[sl].cols;
    if (xb == nullptr) {
      xb = x + tokens[0] * x_stride;
      if (!consecutive || x_stride != in) {
        f.rows_x.resize(m * in);
        for (int64_t i = 0; i < m; ++i) {
          const float* row = x + tokens[i] * x_stride;
          std::copy(row, row + in, f.rows_x.begin() + i * in);
        }
        xb = f.rows_x.data();
      }
    }
    const int64_t r = a[sl].rows, out = b[sl].rows;
    f.v.resize(m * r);
    GemmOneThread(f.v.data(), xb, m, a[sl], /*accumulate=*/false);
    if (negate) {
      for (float& e : f.v) e = -e;
    }
    if (consecutive && y[sl].stride == out) {
      GemmOneThread(y[sl].data + tokens[0] * y[sl].stride, f.v.data(), m, b[sl], true);
      continue;
    }
    f.rows_y.resize(m * out);
    GemmOneThread(f.rows_y.data(), f.v.data(), m, b[sl], /*accumulate=*/false);
    for (int64_t i = 0; i < m; ++i) {
      Add(y[sl].data + tokens[i] * y[sl].stride, f.rows_y.data() + i * out, out);
    }
  }
}

// y += B (sign A x). Fused when the call has enough tasks to share out: one parallel region
// whose tasks are whole adapters of few tokens (each packs its x rows, shrinks into a v of its own
// and expands) and blocks of kFusedTokenBlock tokens of adapters with many (small GEMMs on one
// thread), longest first, instead of two regions with serial packing between and a threaded GEMM
// per adapter and slice. Else the shrink into a v of its own, the sign, and the expand.
void ShrinkExpand(const LoraOutput* y, const float* x, int64_t x_stride,
                  const int32_t* token_adapter, int64_t n, const LoraSliceWeights& w, bool negate) {
  Scratch& s = ThreadScratch();
  GroupTokens(token_adapter, n, w, &s);
  ThreadPool& pool = ThreadPool::Default();
  s.fused.clear();
  for (size_t i = 0; i < s.groups.size(); ++i) {
    const Group& g = s.groups[i];
    if (g.count < GemmMinTokens()) continue;
    for (int64_t t = 0; t < g.count; t += kFusedTokenBlock) {
      s.fused.push_back({static_cast<int32_t>(i), t, std::min(g.count, t + kFusedTokenBlock)});
    }
  }
  const size_t blocks = s.fused.size();
  for (size_t i = 0; i < s.groups.size(); ++i) {
    if (s.groups[i].count < GemmMinTokens()) {
      s.fused.push_back({static_cast<int32_t>(i), 0, s.groups[i].count});
    }
  }
  const int64_t num_tasks = static_cast<int64_t>(s.fused.size());
  if (num_tasks < std::max<int64_t>(kFusedMinTasks, kFusedMinTasksPerThread * pool.num_threads())) {
    int64_t v_stride = 0;
    for (const Group& g : s.groups) v_stride = std::max(v_stride, LoraTotalRank(w, g.adapter));
    if (v_stride == 0) return;
    // Shrink and Expand group the tokens again in the same scratch; v is ours.
    std::vector<float> v = std::move(s.v);
    v.resize(n * v_stride);
    Shrink(v.data(), v_stride, x, x_stride, token_adapter, n, w);
    if (negate) {
      for (int64_t t = 0; t < n; ++t) {
        if (token_adapter[t] < 0) continue;
        const int64_t r = LoraTotalRank(w, token_adapter[t]);
        for (int64_t i = 0; i < r; ++i) v[t * v_stride + i] = -v[t * v_stride + i];
      }
    }
    Expand(y, v.data(), v_stride, token_adapter, n, w);
    s.v = std::move(v);
    return;
  }
  g_fused_calls.fetch_add(1, std::memory_order_relaxed);
  const MicroKernel& kernel = Kernel();
  std::atomic<int64_t> next{0};
  auto drain = [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < num_tasks;) {
      const FusedTask& task = s.fused[i];
      const Group& g = s.groups[task.group];
      if (static_cast<size_t>(i) < blocks) {
        FusedBlock(g, task.begin, task.end, s.order.data(), y, x, x_stride, w, negate);
      } else {
        FusedGroup(kernel, g, s.order.data(), y, x, x_stride, w, negate);
      }
    }
  };
  pool.ParallelFor(pool.num_threads(), drain, 1);
}

}  // namespace

void SgmvShrink(float* v, int64_t v_stride, const float* x, int64_t x_stride,
                const LoraSegments& segments, const LoraSliceWeights& w) {
  int64_t n = 0;
  const int32_t* per_token = SpellOut(segments, w, &n, &ThreadScratch());
  Shrink(v, v_stride, x, x_stride, per_token, n, w);
}

void SgmvExpand(const LoraOutput* y, const float* v, int64_t v_stride, const LoraSegments& segments,
                const LoraSliceWeights& w) {
  int64_t n = 0;
  const int32_t* per_token = SpellOut(segments, w, &n, &ThreadScratch());
  Expand(y, v, v_stride, per_token, n, w);
}

void BgmvShrink(float* v, int64_t v_stride, const float* x, int64_t x_stride,
                const int32_t* token_adapter, int64_t num_tokens, const LoraSliceWeights& w) {
  Shrink(v, v_stride, x, x_stride, token_adapter, num_tokens, w);
}

void BgmvExpand(const LoraOutput* y, const float* v, int64_t v_stride, const int32_t* token_adapter,
                int64_t num_tokens, const LoraSliceWeights& w) {
  Expand(y, v, v_stride, token_adapter, num_tokens, w);
}

void SgmvShrinkExpand(const LoraOutput* y, const float* x, int64_t x_stride,
                      const LoraSegments& segments, const LoraSliceWeights& w, bool negate) {
  int64_t n = 0;
  const int32_t* per_token = SpellOut(segments, w, &n, &ThreadScratch());
  // ShrinkExpand groups in the same scratch; per_token lives in it untouched by the grouping.
  ShrinkExpand(y, x, x_stride, per_token, n, w, negate);
}

void BgmvShrinkExpand(const LoraOutput* y, const float* x, int64_t x_stride,
                      const int32_t* token_adapter, int64_t num_tokens, const LoraSliceWeights& w,
                      bool negate) {
  ShrinkExpand(y, x, x_stride, token_adapter, num_tokens, w, negate);
}

int64_t LoraFusedCallsForTesting() { return g_fused_calls.load(std::memory_order_relaxed); }

const char* LoraKernelIsa() { return Kernel().name; }

void SetLoraForceScalar(bool force) { g_force_scalar.store(force, std::memory_order_relaxed); }

}  // namespace loraplex::kernels
