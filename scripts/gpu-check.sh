#!/usr/bin/env bash
# gpu-check.sh OUT_DIR [MODEL.gguf]
#
# The first thing to run on a machine with an NVIDIA GPU. Offline by design: it needs only this
# repository, the CUDA toolkit (/usr/local/cuda or nvcc on PATH) and the Debian packages of
# scripts/setup.sh, already installed; nothing is downloaded. It
#   1. configures a release build with CUDA for this GPU only (CMAKE_CUDA_ARCHITECTURES=native),
#   2. builds only the CUDA tests, loraplex-generate and the benchmarks it runs,
#   3. runs the tests with LP_REQUIRE_CUDA=1, so that a test that cannot see the GPU FAILS instead
#      of skipping: every CUDA op against the CPU reference, the CUDA model against the CPU model
#      (stories260K, tiny-llama variants, PEFT adapters unmerged/merged/evicted) and
#      loraplex-generate --device cuda reproducing stories260K's greedy story,
#   4. runs bench/cuda_bench (SGMV/BGMV bandwidth vs device-to-device copy, GEMM vs cublasGemmEx),
#   5. end to end on the GPU with MODEL (e.g. SmolLM2-135M-Instruct): S1 (bench/decode_bench, one
#      sequence decoding) and S2 (bench/s2_bench, 32 sequences with 32 distinct rank-16 adapters
#      vs the same batch without adapters), both with LP_BENCH_DEVICE=cuda; skipped without MODEL,
# writes every log to OUT_DIR and prints a short table last. Budget: under 8 minutes; each step has
# its own timeout. Exit status: 0 when every step that ran passed.
set -uo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 OUT_DIR [MODEL.gguf]" >&2
  exit 2
fi
out="$(mkdir -p "$1" && cd "$1" && pwd)"
model="${2:-}"
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# Overridable for dry runs on a machine without a GPU (where "native" cannot be detected), e.g.
# LP_GPU_BUILD_DIR=build-cuda LP_GPU_CHECK_ARCH="80;90": then every test must fail, not skip.
build="${LP_GPU_BUILD_DIR:-$root/build-gpu}"
arch="${LP_GPU_CHECK_ARCH:-native}"
jobs="$(nproc)"
start_s=$SECONDS
declare -A result   # step -> PASS / FAIL / SKIP text for the closing table
status=0

log() { echo "[gpu-check $((SECONDS - start_s))s] $*" | tee -a "$out/gpu-check.log"; }
fail() { result[$1]="FAIL: $2"; status=1; log "$1 FAILED: $2"; }

# ---- 0. the machine ---------------------------------------------------------------------------
if ! command -v nvcc >/dev/null && [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="/usr/local/cuda/bin:$PATH"
fi
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git -C "$root" rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi 2>&1 || echo "nvidia-smi not available"
  nvcc --version 2>&1 || echo "nvcc not found"
  cmake --version | head -1
} > "$out/machine.log"
gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
       | head -1)"
log "GPU: ${gpu:-none reported by nvidia-smi}; logs in $out"

# ---- 1. configure -------------------------------------------------------------------------------
log "configure $build (CUDA, arch $arch)"
if timeout 180 cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DLP_ENABLE_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$arch" -DLP_BUILD_TESTS=ON \
    -DLP_BUILD_BENCH=ON > "$out/configure.log" 2>&1; then
  result[configure]="PASS"
else
  fail configure "see configure.log"
fi

# ---- 2. build only the CUDA targets ----------------------------------------------------------
targets=(cuda_kernels_test cuda_rmsnorm_test cuda_bench cuda_model_test cuda_device_test
         loraplex-generate decode_bench s2_bench)
if [[ "${result[configure]}" == PASS ]]; then
  log "build ${targets[*]} with $jobs jobs"
  if timeout 330 cmake --build "$build" -j "$jobs" --target "${targets[@]}" \
      > "$out/build.log" 2>&1; then
    result[build]="PASS"
  else
    fail build "see build.log (last lines: $(tail -3 "$out/build.log" | tr '\n' ' '))"
  fi
else
  result[build]="SKIP (configure failed)"
fi

# ---- 3. tests: every CUDA op against the CPU reference; no skipping ---------------------------
run_test() {  # name binary
  local name="$1" bin="$2"
  if [[ "${result[build]}" != PASS ]]; then result[$name]="SKIP (build failed)"; return; fi
  log "test $name"
  if LP_REQUIRE_CUDA=1 timeout 240 "$bin" --gtest_output="xml:$out/$name.xml" \
      > "$out/$name.log" 2>&1; then
    result[$name]="PASS ($(grep -c '^\[       OK \]' "$out/$name.log") tests)"
  else
    local failed
    failed="$(grep -E '^\[  FAILED  \] [A-Za-z0-9_./]+$' "$out/$name.log" | sort -u)"
    local why="$(echo "$failed" | grep -c .) failed: $(echo "$failed" | head -3 \
                 | sed 's/^\[  FAILED  \] //' | tr '\n' ' ')"
    if grep -q "no CUDA device found" "$out/$name.log"; then why="the GPU is not visible; $why"; fi
    fail "$name" "$why(see $name.log)"
  fi
}
# Tests read ../shared and tests/fixtures relative to the repository root.
run_test cuda_kernels_test "$build/tests/kernels/cuda_kernels_test"
run_test cuda_rmsnorm_test "$build/tests/kernels/cuda_rmsnorm_test"
run_test cuda_model_test "$build/tests/model/cuda_model_test"
run_test cuda_device_test "$build/tests/model/cuda_device_test"

# ---- 4. kernel benchmarks ---------------------------------------------------------------------
if [[ "${result[build]}" == PASS ]]; then
  log "bench cuda_bench"
  if LP_REQUIRE_CUDA=1 timeout 180 "$build/bench/cuda_bench" --benchmark_min_time=0.2 \
      --benchmark_out="$out/cuda_bench.json" --benchmark_out_format=json \
      > "$out/cuda_bench.log" 2>&1; then
    result[cuda_bench]="PASS"
  else
    fail cuda_bench "see cuda_bench.log"
  fi
else
  result[cuda_bench]="SKIP (build failed)"
fi

# ---- 5. end to end: S1 (base decode) and S2 (32 distinct adapters) on the GPU ----------------
# In-process benchmarks of the model on the device (no server: nothing to start or wait for); the
# scenarios of docs/benchmarks.md. S2's ratio is 32 distinct rank-16 adapters over no adapter, both
# measured in this run.
bench_value() {  # json_file name_prefix counter -> value of the first match (empty when absent)
  python3 - "$@" <<'PY' 2>/dev/null
import json, sys
path, name, counter = sys.argv[1:4]
for b in json.load(open(path)).get("benchmarks", []):
    if b.get("name", "").startswith(name) and counter in b:
        print("%.1f" % b[counter]); break
PY
}
if [[ -z "$model" ]]; then
  result[e2e_s1]="SKIP (no MODEL argument)"
  result[e2e_s2]="SKIP (no MODEL argument)"
elif [[ ! -f "$model" ]]; then
  fail e2e_s1 "model file $model does not exist"
  result[e2e_s2]="SKIP (no model)"
elif [[ "${result[build]}" != PASS ]]; then
  result[e2e_s1]="SKIP (build failed)"
  result[e2e_s2]="SKIP (build failed)"
else
  log "e2e S1 (decode_bench on cuda, $model)"
  if LP_BENCH_DEVICE=cuda LP_BENCH_MODEL="$model" timeout 120 "$build/bench/decode_bench" \
      --benchmark_filter='BM_S1DecodeStep/f32:0/' --benchmark_min_time=2 \
      --benchmark_out="$out/s1.json" --benchmark_out_format=json > "$out/s1.log" 2>&1 \
      && ! grep -q "error_occurred.*true" "$out/s1.json"; then
    result[e2e_s1]="PASS: $(bench_value "$out/s1.json" BM_S1DecodeStep/f32:0/ tok/s) tok/s (bf16, 1 sequence)"
  else
    fail e2e_s1 "see s1.log"
  fi
  log "e2e S2 (s2_bench on cuda, $model)"
  if LP_BENCH_DEVICE=cuda LP_BENCH_MODEL="$model" timeout 180 "$build/bench/s2_bench" \
      --benchmark_filter='BM_S2Decode32/adapters:(0/rank:0|1/rank:16)/' --benchmark_min_time=2 \
      --benchmark_out="$out/s2.json" --benchmark_out_format=json > "$out/s2.log" 2>&1 \
      && ! grep -q "error_occurred.*true" "$out/s2.json"; then
    base="$(bench_value "$out/s2.json" BM_S2Decode32/adapters:0/rank:0/ out_tok/s)"
    lora="$(bench_value "$out/s2.json" BM_S2Decode32/adapters:1/rank:16/ out_tok/s)"
    ratio="$(python3 -c "print('%.2f' % ($lora / $base))" 2>/dev/null)"
    result[e2e_s2]="PASS: $lora out tok/s with 32 distinct rank-16 adapters, $base without: ratio ${ratio:-?}"
  else
    fail e2e_s2 "see s2.log"
  fi
fi

# ---- the table, last ----------------------------------------------------------------------------
{
  echo
  echo "== gpu-check summary ($(date -u +%Y-%m-%d), ${gpu:-unknown GPU}, $((SECONDS - start_s)) s)"
  for step in configure build cuda_kernels_test cuda_rmsnorm_test cuda_model_test \
      cuda_device_test cuda_bench e2e_s1 e2e_s2; do
    printf '%-20s %s\n' "$step" "${result[$step]:-SKIP}"
  done
  if [[ -f "$out/cuda_bench.log" ]]; then
    sed -n '/^== cuda_bench summary/,$p' "$out/cuda_bench.log"
  fi
  echo "logs: $out"
} | tee "$out/summary.txt"
exit $status
