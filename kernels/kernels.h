// The op contract of the compute backends. Start here.
//
// Every op takes raw pointers, destination first, and runtime shapes; no framework types. The CPU
// backend implements each op twice: a readable reference (`kernels/cpu/reference.cc`, plain loops
// with shape comments) and a fast version (`kernels/cpu/`, threaded, SIMD with runtime CPU feature
// dispatch). The functions declared here are the fast ones; `loraplex::kernels::ref::` holds the
// readable twins, with identical signatures. Tests compare the two on odd sizes.
//
// Conventions:
// - Activations are f32, row-major, one row per token.
// - Weights are row-major [out, in] (PyTorch nn.Linear layout), stored f32, bf16 or in one of
//   GGUF's quantized block formats (kernels/quant.h), which Gemm multiplies with integer dot
//   products on activations quantized to int8 per block.
// - Shapes that do not fit are programmer errors (LP_CHECK), not runtime errors: callers
//   validate model and request shapes before they reach a kernel.
// - Ops run on ThreadPool::Default() and are safe to call from one thread at a time per output.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

namespace loraplex::kernels {

// kQ8_0 ... kQ6_K are GGUF/ggml block formats (layouts and helpers in kernels/quant.h).
enum class DType { kF32, kBF16, kQ8_0, kQ4_0, kQ4_1, kQ4_K, kQ5_K, kQ6_K };

// A weight matrix W[rows, cols] (rows = output features, cols = input features).
struct WeightView {
  DType dtype = DType::kF32;
  // f32 or uint16_t bf16 bits, rows * cols elements, row-major; for a quantized dtype the rows'
  // blocks as ggml stores them, rows * cols / BlockSize(dtype) blocks (cols a multiple of it).
  const void* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
};

// y[m, w.rows] = x[m, w.cols] * W^T (+ y when accumulate). x and y must not alias.
// Quantized W: the fast version quantizes each row of x to int8 per block (32 values for Q8_0,
// Q4_0, Q4_1; 256 for the K-quants; scale max|x| / 127, round to nearest even) and sums integer
// products, so it differs from ref::Gemm (W dequantized, f32 x) by that rounding of x: at most
// sum over blocks of max|x_block| / 254 * sum |w| over the block, per output.
void Gemm(float* y, const float* x, int64_t m, const WeightView& w, bool accumulate = false);

// One input, several weight matrices with its columns (q, k, v; gate, up): y_i = x * W_i^T for
// each output, exactly as a Gemm per pair, but with one split of all the outputs' rows across the
// threads and, when every W_i has the same quantized dtype, x quantized once for all of them.
struct GemmOutput {
  float* y;
  WeightView w;
};
void GemmShared(const float* x, int64_t m, std::initializer_list<GemmOutput> outputs);

// out[rows, dim] = x / sqrt(mean(x^2) + eps) * weight, per row. out may alias x.
void RmsNorm(float* out, const float* x, const float* weight, int64_t rows, int64_t dim, float eps);

// Rotary embedding in place, rotate-half (HF/NeoX) pairing: within each head, element i is paired
// with element i + head_dim/2. x is [tokens, heads, head_dim]; token t is at positions[t].
// inv_freq has head_dim/2 entries (already including any rope scaling).
void Rope(float* x, const int32_t* positions, int64_t tokens, int64_t heads, int64_t head_dim,
          const float* inv_freq);

// out[i] = silu(gate[i]) * up[i] for i < n. out may alias gate or up.
void SiluMul(float* out, const float* gate, const float* up, int64_t n);

// y[i] += x[i] for i < n.
void Add(float* y, const float* x, int64_t n);

// out[t, :] = table[ids[t], :] for t < n (table rows widened or dequantized to f32). ids must be
// < table.rows.
void Embed(float* out, const int32_t* ids, int64_t n, const WeightView& table);

// The largest of x[0, n), NaN entries skipped; -inf when n is 0 or every entry is NaN or -inf. The
// fast version keeps 16 running maxima (SIMD) instead of one (a chain of dependent compares).
float Max(const float* x, int64_t n);

// log(sum_i exp(x[i])) for n >= 1, with the maximum subtracted first (the log-softmax normaliser of
// a logit row). The fast version takes exp in f32 SIMD over chunks and sums the chunks in f64; -inf
// entries count as 0, NaN entries are skipped (as the sampler never picks them).
double LogSumExp(const float* x, int64_t n);

// sum_i exp((x[i] - max) * inv_t) for a row whose maximum is `max`: the softmax mass at
// temperature 1 / inv_t (inv_t > 0) that the sampler scales its draw by. Entries equal to `max`
// count 1 (also when it is +inf), NaN entries 0. The fast version takes exp in f32 SIMD over
// chunks and sums the chunks in f64.
double ExpMass(const float* x, int64_t n, float max, double inv_t);

// ---- paged KV cache and attention ---------------------------------------------------------------
//
// One layer's cache is two pools, K and V, each [num_blocks, block_size, n_kv_heads, head_dim] f32.
// A sequence owns a list of blocks (its block table); its token at position p lives in block
// table[p / block_size], slot p % block_size.

struct KvLayout {
  int64_t block_size = 16;
  int64_t n_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_blocks_per_seq = 0;  // row stride of the block-table array
};

// Per-token description of a batch that mixes prefill and decode of several sequences.
struct AttentionBatch {
  int64_t num_tokens = 0;
  const int32_t* token_seq = nullptr;     // [num_tokens] index of the token's sequence
  const int32_t* token_pos = nullptr;     // [num_tokens] absolute position of the token
  const int32_t* block_tables = nullptr;  // [num_seqs, layout.max_blocks_per_seq]
};

// Writes the new keys and values k, v [num_tokens, n_kv_heads, head_dim] into their cache slots.
void WriteKv(float* k_cache, float* v_cache, const float* k, const float* v,
             const AttentionBatch& batch, const KvLayout& layout);

// Causal attention: token t (query q[t] of [n_heads, head_dim]) attends to positions
// 0..token_pos[t] of its own sequence, read from the cache (so WriteKv must run first).
// GQA: query head h reads kv head h / (n_heads / n_kv_heads). out is [num_tokens,
// n_heads*head_dim]. scale is usually 1/sqrt(head_dim).
// Sliding window (Mistral): with sliding_window = W > 0, token t attends only to positions
// max(0, p - W + 1)..p, p = token_pos[t]: W keys including its own. This is transformers'
// convention (masking_utils.sliding_window_overlay: kv_idx > q_idx - W). W <= 0 = no window.
// Keys older than the window are never read, but their cache blocks stay allocated: freeing them
// is the cache owner's business and is not done today. The CUDA attention (kernels/cuda) takes no
// window yet, so a model with one must not be run there until it does.
void PagedAttention(float* out, const float* q, const float* k_cache, const float* v_cache,
                    const AttentionBatch& batch, const KvLayout& layout, int64_t n_heads,
                    float scale, int64_t sliding_window = 0);

// The same two on f16 pools (IEEE half bits, half the bytes of f32): WriteKv rounds the new keys
// and values to f16 (nearest even), PagedAttention widens each cached value to f32 as it reads
// it and computes in f32 as above. The attention equals the f32 version run on pools holding the
// f16-rounded values, up to the order of the f32 sums.
void WriteKv(uint16_t* k_cache, uint16_t* v_cache, const float* k, const float* v,
             const AttentionBatch& batch, const KvLayout& layout);
void PagedAttention(float* out, const float* q, const uint16_t* k_cache, const uint16_t* v_cache,
                    const AttentionBatch& batch, const KvLayout& layout, int64_t n_heads,
                    float scale, int64_t sliding_window = 0);

// The readable twins.
namespace ref {
void Gemm(float* y, const float* x, int64_t m, const WeightView& w, bool accumulate = false);
void RmsNorm(float* out, const float* x, const float* weight, int64_t rows, int64_t dim, float eps);
void Rope(float* x, const int32_t* positions, int64_t tokens, int64_t heads, int64_t head_dim,
          const float* inv_freq);
void SiluMul(float* out, const float* gate, const float* up, int64_t n);
void Add(float* y, const float* x, int64_t n);
void Embed(float* out, const int32_t* ids, int64_t n, const WeightView& table);
float Max(const float* x, int64_t n);
double LogSumExp(const float* x, int64_t n);
double ExpMass(const float* x, int64_t n, float max, double inv_t);
void WriteKv(float* k_cache, float* v_cache, const float* k, const float* v,
             const AttentionBatch& batch, const KvLayout& layout);
void PagedAttention(float* out, const float* q, const float* k_cache, const float* v_cache,
                    const AttentionBatch& batch, const KvLayout& layout, int64_t n_heads,
                    float scale, int64_t sliding_window = 0);
}  // namespace ref

// Which fast path the CPU backend dispatches to: "amx" (the avx512 table, with AMX tiles for
// quantized GEMMs of many tokens), "avx512", "avx2" or "scalar". Chosen once per process: the best
// table the CPU (checked at runtime, so one binary runs on any x86-64) and the build support;
// LP_CPU_ISA=scalar|avx2|avx512|amx in the environment asks for another, for debugging and for
// comparing them (a table this CPU cannot run falls back to the best supported). There is no
// AVX512-BF16 (vdpbf16ps) table: with f32 activations split into bf16 parts to stay within f32
// accuracy it measured 2.3-3.9x slower than the AVX-512 FMA loops at 128 tokens
// (docs/benchmarks.md).
const char* CpuKernelIsa();

// Batch invariance (loraplex-server --batch-invariant): when on, the CPU kernels compute each
// token's row of a call with the same operations in the same order as if the token were alone in
// the call. GEMMs on f32, bf16 and quantized weights run their one-token loops token by token
// over panels of weight rows (no token tiles, no AMX tiles, no tokens-in-lanes prefill), and the
// LoRA ops keep every adapter's tokens on the per-token micro-kernel tiles (no GEMM for an
// adapter of many tokens). The other ops already work per token (norms, RoPE, attention per
// query). A request's logits then do not depend on what shares its steps: the batch size, other
// requests' prompts and adapters, or how its own prompt was cut into chunks. The price is the
// batched paths' speed (docs/benchmarks.md). Off by default; process-wide; set it before serving.
void SetBatchInvariant(bool on);
bool BatchInvariant();

}  // namespace loraplex::kernels
