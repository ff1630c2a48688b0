#!/usr/bin/env bash
# gpu-check.sh OUT_DIR [MODEL.gguf]
#
# The first thing to run on a machine with an NVIDIA GPU. Offline by design: it needs only this
# repository, the CUDA toolkit (/usr/local/cuda or nvcc on PATH) and the Debian packages of
# scripts/setup.sh, already installed; nothing is downloaded. It
#   1. configures a release build with CUDA for this GPU only (CMAKE_CUDA_ARCHITECTURES=native),
#   2. builds only the CUDA tests and the CUDA benchmark,
#   3. runs the tests with LP_REQUIRE_CUDA=1, so that a test that cannot see the GPU FAILS instead
#      of skipping,
#   4. runs bench/cuda_bench (SGMV/BGMV bandwidth vs device-to-device copy, GEMM vs cublasGemmEx),
#   5. runs the end-to-end S1/S2 section (not yet integrated: see below),
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
targets=(cuda_kernels_test cuda_rmsnorm_test cuda_bench)
if [[ "${result[configure]}" == PASS ]]; then
  log "build ${targets[*]} with $jobs jobs"
  if timeout 300 cmake --build "$build" -j "$jobs" --target "${targets[@]}" \
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
# >>> LEAD: fill in once the CUDA forward pass is integrated (model/ on kernels/cuda). Expected:
# >>> build loraplex-generate / loraplex-server, run S1 and S2 (docs/benchmarks.md scenarios) with
# >>> "$model" and --device cuda, the stories260K greedy story and the PEFT goldens on the GPU, and
# >>> set result[e2e] to PASS / FAIL with the tokens/s figures. Keep it under ~3 minutes.
if [[ -n "$model" && ! -f "$model" ]]; then
  fail e2e "model file $model does not exist"
else
  result[e2e]="not yet integrated (the CUDA forward pass is pending; model: ${model:-none given})"
  log "e2e S1/S2: not yet integrated"
fi
# <<< LEAD

# ---- the table, last ----------------------------------------------------------------------------
{
  echo
  echo "== gpu-check summary ($(date -u +%Y-%m-%d), ${gpu:-unknown GPU}, $((SECONDS - start_s)) s)"
  for step in configure build cuda_kernels_test cuda_rmsnorm_test cuda_bench e2e; do
    printf '%-20s %s\n' "$step" "${result[$step]:-SKIP}"
  done
  if [[ -f "$out/cuda_bench.log" ]]; then
    sed -n '/^== cuda_bench summary/,$p' "$out/cuda_bench.log"
  fi
  echo "logs: $out"
} | tee "$out/summary.txt"
exit $status
