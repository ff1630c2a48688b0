#!/usr/bin/env bash
# gpu-check.sh OUT_DIR [MODEL.gguf]
#
# The first thing to run on a machine with an NVIDIA GPU. Offline by design: nothing is downloaded.
# It needs this repository, the CUDA driver and libraries, and either
#   - the CUDA toolkit (/usr/local/cuda or nvcc on PATH) and the Debian packages of scripts/setup.sh,
#     already installed: then it builds here, or
#   - LP_GPU_PREBUILT=PACK_DIR, a pack made by scripts/gpu-pack.sh on a machine that has those
#     packages (for GPU machines that lack them, like the device tool's): then it runs those binaries
#     with the shared libraries packed beside them, and steps 1 and 2 are skipped.
# It
#   1. configures a release build with CUDA for this GPU only (CMAKE_CUDA_ARCHITECTURES=native),
#   2. builds only the CUDA tests, the binaries and the benchmarks it runs (scripts/gpu-targets.sh),
#   3. runs the tests with LP_REQUIRE_CUDA=1, so that a test that cannot see the GPU FAILS instead
#      of skipping: every CUDA op against the CPU reference, the CUDA model against the CPU model
#      (stories260K, tiny-llama variants, PEFT adapters unmerged/merged/evicted) and
#      loraplex-generate --device cuda reproducing stories260K's greedy story,
#   4. runs bench/cuda_bench (SGMV/BGMV bandwidth vs device-to-device copy, GEMM vs cublasGemmEx),
#   5. end to end on the GPU with MODEL (e.g. SmolLM2-135M-Instruct): S1 (bench/decode_bench, one
#      sequence decoding) and S2 (bench/s2_bench, 32 sequences with 32 distinct rank-16 adapters
#      vs the same batch without adapters), both with LP_BENCH_DEVICE=cuda, then
#   6. the same scenarios through loraplex-server --device cuda with `loraplex bench` as the client
#      (S1 one request at a time, S2 32 in flight, base then 32 distinct rank-16 adapters uploaded
#      over gRPC); 5 and 6 are skipped without MODEL,
# writes every log to OUT_DIR and prints a short table last. Budget: under 8 minutes; each step has
# its own timeout. LP_GPU_CHECK_ONLY=e2e runs steps 5 and 6 alone (when the model file comes in a
# second call). Exit status: 0 when every step that ran passed.
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
# The CUDA runtime and cuBLAS that the binaries load: where the loader cannot find them, look in
# the usual toolkit folders and in pip's nvidia-* packages (a PyTorch image keeps them there).
find_cuda_lib() {  # soname -> prepends the first folder that holds it to LD_LIBRARY_PATH
  local so="$1" d
  if ldconfig -p 2>/dev/null | grep -q "$so"; then return 0; fi
  for d in ${LD_LIBRARY_PATH//:/ }; do [[ -e "$d/$so" ]] && return 0; done
  for d in /usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib \
      $(ls -d /usr/local/lib/python3*/dist-packages/nvidia/*/lib /opt/*/.venv/lib/python3*/site-packages/nvidia/*/lib \
             /usr/lib/python3/dist-packages/nvidia/*/lib 2>/dev/null); do
    if [[ -e "$d/$so" ]]; then export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; return 0; fi
  done
  d="$(find / -xdev -name "$so" -not -path '/proc/*' 2>/dev/null | head -1)"
  if [[ -n "$d" ]]; then export LD_LIBRARY_PATH="$(dirname "$d")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"; return 0; fi
  return 1
}
for so in libcudart.so.13 libcublas.so.13 libcublasLt.so.13; do
  find_cuda_lib "$so" || echo "warning: $so not found on this machine" >> "$out/machine.log"
done
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >> "$out/machine.log"

# A prebuilt pack (scripts/gpu-pack.sh): unpack it, use its binaries, libraries and test models.
prebuilt=""
if [[ -n "${LP_GPU_PREBUILT:-}" ]]; then
  prebuilt="$(cd "$LP_GPU_PREBUILT" && pwd)/unpacked"
  if [[ ! -f "$prebuilt/PACKED" ]]; then
    mkdir -p "$prebuilt"
    if command -v xz >/dev/null; then
      tar -C "$prebuilt" -xJf "$LP_GPU_PREBUILT/pack.tar.xz"
    else
      python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        "$LP_GPU_PREBUILT/pack.tar.xz" "$prebuilt"
    fi
  fi
  build="$prebuilt/build"
  export LD_LIBRARY_PATH="$prebuilt/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  # This machine's libstdc++ when it is new enough, else the one packed with the binaries.
  if LD_LIBRARY_PATH="$LD_LIBRARY_PATH" ldd "$build/tests/kernels/cuda_kernels_test" 2>&1 \
      | grep -q "version .GLIBCXX\|version .CXXABI\|version .GCC\|libstdc++.*not found"; then
    export LD_LIBRARY_PATH="$prebuilt/lib-std:$LD_LIBRARY_PATH"
  fi
  if [[ ! -d "${LP_SHARED_DIR:-$root/../shared}/models/stories260K" ]]; then
    export LP_SHARED_DIR="$prebuilt/shared"
  fi
  export LP_GENERATE_BIN="$build/client/loraplex-generate" LP_SERVER_BIN="$build/server/loraplex-server"
  { echo "prebuilt pack:"; cat "$prebuilt/PACKED"; echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
    for b in "$build"/*/*; do [[ -x "$b" && -f "$b" ]] && ldd "$b" 2>&1 | grep "not found" \
      | sed "s|^|$(basename "$b"): |"; done; } >> "$out/machine.log"
fi
only="${LP_GPU_CHECK_ONLY:-}"
test_timeout="${LP_GPU_TEST_TIMEOUT:-240}"   # seconds per test binary
# Dry runs without a GPU: LP_GPU_E2E_DEVICE=cpu runs steps 5 and 6 on the CPU, with
# LP_GPU_S2_REQUESTS fewer requests (S2 runs half of them without adapters, half with).
e2e_device="${LP_GPU_E2E_DEVICE:-cuda}"
s2_requests="${LP_GPU_S2_REQUESTS:-128}"

gpu="$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null \
       | head -1)"
log "GPU: ${gpu:-none reported by nvidia-smi}; logs in $out"

# ---- 1. configure -------------------------------------------------------------------------------
if [[ -n "$prebuilt" ]]; then
  result[configure]="SKIP (prebuilt: $(sed -n 's/^commit: //p' "$prebuilt/PACKED"))"
  result[build]="PASS (prebuilt on $(sed -n 's/^host: //p' "$prebuilt/PACKED" | cut -d, -f1))"
  log "prebuilt pack $LP_GPU_PREBUILT: $(tr '\n' ' ' < "$prebuilt/PACKED")"
else
  log "configure $build (CUDA, arch $arch)"
  if timeout 180 cmake -S "$root" -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
      -DLP_ENABLE_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=$arch" -DLP_BUILD_TESTS=ON \
      -DLP_BUILD_BENCH=ON > "$out/configure.log" 2>&1; then
    result[configure]="PASS"
  else
    fail configure "see configure.log"
  fi
fi

# ---- 2. build only the CUDA targets ----------------------------------------------------------
# shellcheck source=gpu-targets.sh
source "$root/scripts/gpu-targets.sh"
targets=("${LP_GPU_TARGETS[@]}")
if [[ -n "$prebuilt" ]]; then
  :
elif [[ "${result[configure]}" == PASS ]]; then
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
built=0
[[ "${result[build]}" == PASS* ]] && built=1

# ---- 3. tests: every CUDA op against the CPU reference; no skipping ---------------------------
run_test() {  # name binary
  local name="$1" bin="$2"
  if [[ $built == 0 ]]; then result[$name]="SKIP (build failed)"; return; fi
  if [[ "$only" == e2e ]]; then result[$name]="SKIP (LP_GPU_CHECK_ONLY=e2e)"; return; fi
  log "test $name"
  if LP_REQUIRE_CUDA=1 timeout "$test_timeout" "$bin" --gtest_output="xml:$out/$name.xml" \
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
if [[ "$only" == e2e ]]; then
  result[cuda_bench]="SKIP (LP_GPU_CHECK_ONLY=e2e)"
elif [[ $built == 1 ]]; then
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
elif [[ $built == 0 ]]; then
  result[e2e_s1]="SKIP (build failed)"
  result[e2e_s2]="SKIP (build failed)"
else
  log "e2e S1 (decode_bench on $e2e_device, $model)"
  if LP_BENCH_DEVICE=$e2e_device LP_BENCH_MODEL="$model" timeout 120 "$build/bench/decode_bench" \
      --benchmark_filter='BM_S1DecodeStep/f32:0/' --benchmark_min_time=2 \
      --benchmark_out="$out/s1.json" --benchmark_out_format=json > "$out/s1.log" 2>&1 \
      && ! grep -q "error_occurred.*true" "$out/s1.json"; then
    result[e2e_s1]="PASS: $(bench_value "$out/s1.json" BM_S1DecodeStep/f32:0/ tok/s) tok/s (bf16, 1 sequence)"
    # The same with CUDA graphs (off by default until they have run on a GPU), for the ratio.
    if [[ "$e2e_device" == cuda ]] && LP_CUDA_GRAPHS=1 LP_BENCH_DEVICE=cuda LP_BENCH_MODEL="$model" \
        timeout 60 "$build/bench/decode_bench" --benchmark_filter='BM_S1DecodeStep/f32:0/' \
        --benchmark_min_time=2 --benchmark_out="$out/s1_graphs.json" \
        --benchmark_out_format=json > "$out/s1_graphs.log" 2>&1; then
      result[e2e_s1]+="; $(bench_value "$out/s1_graphs.json" BM_S1DecodeStep/f32:0/ tok/s) with LP_CUDA_GRAPHS=1"
    fi
  else
    fail e2e_s1 "see s1.log"
  fi
  log "e2e S2 (s2_bench on $e2e_device, $model)"
  if LP_BENCH_DEVICE=$e2e_device LP_BENCH_MODEL="$model" timeout 180 "$build/bench/s2_bench" \
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

# ---- 6. through the server: loraplex-server --device cuda, `loraplex bench` as the client ------
# The workload of scripts/bench-serving.sh: 128-token prompts, 128 greedy output tokens; S1 one
# request at a time, S2 32 in flight, base then each with its own rank-16 q,k,v,o adapter (made with
# numpy by tools/make_random_adapter.py in SmolLM2-135M's shapes, uploaded over gRPC).
if [[ -z "$model" || ! -f "$model" || $built == 0 ]]; then
  result[server_s1_s2]="SKIP (no model or no build)"
else
  srv="$out/server"
  rm -rf "$srv" && mkdir -p "$srv"
  log "server S1/S2 (loraplex-server --device $e2e_device, $model)"
  if ! python3 "$root/tools/make_random_adapter.py" "$srv/r16" --rank 16 --dtype f32 \
      > "$srv/make_adapter.log" 2>&1; then
    fail server_s1_s2 "could not make the rank-16 adapter (see server/make_adapter.log)"
  else
    "$build/server/loraplex-server" --model "$model" --device "$e2e_device" --listen 127.0.0.1:0 \
      --port_file "$srv/port" --state_dir "$srv/state" --max_running 64 \
      > "$srv/server.log" 2>&1 &
    server_pid=$!
    for _ in $(seq 600); do [[ -s "$srv/port" ]] && break; sleep 0.1; done
    if [[ ! -s "$srv/port" ]]; then
      fail server_s1_s2 "loraplex-server did not start (see server/server.log: $(tail -2 "$srv/server.log" | tr '\n' ' '))"
    else
      export LORAPLEX_SERVER="127.0.0.1:$(head -1 "$srv/port")"
      common=(--prompt-tokens 128 --max-tokens 128 --warmup 0 --duration 3600 --quiet --json)
      if timeout 60 "$build/client/loraplex" bench --scenario S1 --requests 8 "${common[@]}" \
          --out "$srv/s1" > "$srv/s1.log" 2>&1 \
         && timeout 120 "$build/client/loraplex" bench --scenario S2 --requests "$s2_requests" \
          --make-adapters "$srv/r16" "${common[@]}" --out "$srv/s2" > "$srv/s2.log" 2>&1; then
        result[server_s1_s2]="$(python3 - "$srv" <<'PY' 2>&1
import json, os, sys
d = sys.argv[1]
phases = lambda r: r["phases"] if "phases" in r else [r]
s1 = phases(json.load(open(os.path.join(d, "s1/results.json"))))[0]
ph = {p["name"]: p for p in phases(json.load(open(os.path.join(d, "s2/results.json"))))}
b, a = ph["base"], ph["adapters"]
errs = s1["errors"] + b["errors"] + a["errors"]
print("%s: S1 %.1f out tok/s; S2 %.1f base, %.1f with 32 adapters (ratio %.2f); %d errors" % (
    "PASS" if errs == 0 else "FAIL", s1["output_tokens_per_s"], b["output_tokens_per_s"],
    a["output_tokens_per_s"], a["output_tokens_per_s"] / b["output_tokens_per_s"], errs))
PY
)"
        [[ "${result[server_s1_s2]}" == PASS* ]] || fail server_s1_s2 "${result[server_s1_s2]}"
      else
        fail server_s1_s2 "loraplex bench failed (see server/s1.log, server/s2.log, server/server.log)"
      fi
    fi
    kill "$server_pid" 2>/dev/null; wait "$server_pid" 2>/dev/null
  fi
fi

# ---- the table, last ----------------------------------------------------------------------------
{
  echo
  echo "== gpu-check summary ($(date -u +%Y-%m-%d), ${gpu:-unknown GPU}, $((SECONDS - start_s)) s)"
  for step in configure build cuda_kernels_test cuda_rmsnorm_test cuda_model_test \
      cuda_device_test cuda_bench e2e_s1 e2e_s2 server_s1_s2; do
    printf '%-20s %s\n' "$step" "${result[$step]:-SKIP}"
  done
  if [[ -f "$out/cuda_bench.log" ]]; then
    sed -n '/^== cuda_bench summary/,$p' "$out/cuda_bench.log"
  fi
  echo "logs: $out"
} | tee "$out/summary.txt"
exit $status
