#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with clang (ASan + UBSan, build-fuzz/) and runs each for
# SECONDS_PER_TARGET seconds (default 30) on a copy of its seed corpus, after replaying the inputs
# that once crashed it (fuzz/regressions/<name>/). Exits non-zero on any crash, leak, UBSan report
# or timeout and prints the reproducer's path. No network needed; runs from any directory.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#   LP_FUZZ_TARGETS="gguf tokenizer" scripts/fuzz.sh 60   # a subset
#   LP_FUZZ_JOBS=4 scripts/fuzz.sh                         # build parallelism (default 2)
#
# Reproduce a finding: build-fuzz/fuzz/<name>_fuzz <reproducer>   (from any directory)
set -uo pipefail

SECONDS_PER_TARGET="${1:-30}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${ROOT}/build-fuzz"
JOBS="${LP_FUZZ_JOBS:-2}"
ALL_TARGETS="safetensors gguf peft_config tokenizer chat_template manifest generate_request load_adapter_request"
TARGETS="${LP_FUZZ_TARGETS:-${ALL_TARGETS}}"

if ! [[ "${SECONDS_PER_TARGET}" =~ ^[0-9]+$ ]] || [ "${SECONDS_PER_TARGET}" -lt 1 ]; then
  echo "usage: $0 [SECONDS_PER_TARGET]" >&2
  exit 2
fi
command -v clang++ >/dev/null || { echo "fuzz.sh: clang++ not found (apt-get install clang)" >&2; exit 2; }

# Longest input per target: a little above the largest seed, small enough to stay fast.
max_len() {
  case "$1" in
    safetensors | gguf) echo 16384 ;;
    peft_config) echo 8192 ;;
    load_adapter_request) echo 1024 ;;
    *) echo 4096 ;;
  esac
}

# --- build ----------------------------------------------------------------------------------------
build_start=$(date +%s)
mkdir -p "${BUILD}"
# -O1 and line tables as OSS-Fuzz builds; no -DNDEBUG, so asserts (nlohmann's among them) stay on.
CC=clang CXX=clang++ cmake -S "${ROOT}" -B "${BUILD}" -G Ninja -DLP_BUILD_FUZZERS=ON \
  -DLP_BUILD_TESTS=OFF -DLP_BUILD_BENCH=OFF -DLP_ENABLE_CUDA=OFF \
  -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  "-DCMAKE_CXX_FLAGS_RELWITHDEBINFO=-O1 -gline-tables-only" \
  "-DCMAKE_C_FLAGS_RELWITHDEBINFO=-O1 -gline-tables-only" >"${BUILD}/fuzz-configure.log" 2>&1 ||
  { cat "${BUILD}/fuzz-configure.log"; echo "fuzz.sh: configure failed" >&2; exit 1; }
build_targets=""
for t in ${TARGETS}; do build_targets+=" ${t}_fuzz"; done
# shellcheck disable=SC2086
cmake --build "${BUILD}" -j "${JOBS}" --target ${build_targets} ||
  { echo "fuzz.sh: build failed" >&2; exit 1; }
echo "fuzz.sh: build took $(($(date +%s) - build_start)) s"

# --- run ------------------------------------------------------------------------------------------
WORK="${BUILD}/fuzz-work"
rm -rf "${WORK}"
mkdir -p "${WORK}"
# Scratch files the targets rewrite (and fsync) per input: tmpfs when there is one.
if [ -d /dev/shm ] && [ -w /dev/shm ]; then
  SCRATCH="$(mktemp -d /dev/shm/loraplex-fuzz-run.XXXXXX)"
else
  SCRATCH="${WORK}/scratch"
  mkdir -p "${SCRATCH}"
fi
trap 'rm -rf "${SCRATCH}"' EXIT
export LP_FUZZ_ROOT="${ROOT}" LP_FUZZ_SCRATCH="${SCRATCH}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

passed=0
failed=0
summaries=()
for t in ${TARGETS}; do
  bin="${BUILD}/fuzz/${t}_fuzz"
  log="${WORK}/${t}.log"
  artifacts="${WORK}/${t}-artifacts/"
  mkdir -p "${artifacts}" "${WORK}/${t}-corpus"
  dict=()
  [ -f "${ROOT}/fuzz/${t}.dict" ] && dict=("-dict=${ROOT}/fuzz/${t}.dict")
  opts=(-timeout=10 -rss_limit_mb=2048 -max_len="$(max_len "${t}")" -artifact_prefix="${artifacts}")
  status=ok

  # 1. Inputs that once crashed must pass now.
  regressions=()
  if [ -d "${ROOT}/fuzz/regressions/${t}" ]; then
    while IFS= read -r -d '' f; do regressions+=("$f"); done \
      < <(find "${ROOT}/fuzz/regressions/${t}" -type f ! -name '*.md' -print0 | sort -z)
  fi
  if [ "${#regressions[@]}" -gt 0 ]; then
    if ! "${bin}" "${opts[@]}" "${regressions[@]}" >"${WORK}/${t}.regressions.log" 2>&1; then
      status=fail
      tail -n 40 "${WORK}/${t}.regressions.log"
      echo "fuzz.sh: ${t}: a regression input fails again; log: ${WORK}/${t}.regressions.log" >&2
    fi
  fi

  # 2. Fuzz a copy of the seeds, so that the committed corpus stays as it is.
  if [ "${status}" = ok ]; then
    cp -r "${ROOT}/fuzz/corpus/${t}/." "${WORK}/${t}-corpus/" 2>/dev/null || true
    seeds=$(find "${WORK}/${t}-corpus" -type f | wc -l)
    if ! "${bin}" "${opts[@]}" "${dict[@]}" -max_total_time="${SECONDS_PER_TARGET}" \
        -print_final_stats=1 "${WORK}/${t}-corpus" >"${log}" 2>&1; then
      status=fail
      tail -n 60 "${log}"
      repro=$(grep -oE "(Test unit written to|written to) [^ ]+" "${log}" | tail -n 1 | awk '{print $NF}')
      echo "fuzz.sh: ${t}: FAILED; reproducer: ${repro:-none written} (log: ${log})" >&2
      [ -n "${repro}" ] && echo "fuzz.sh: reproduce with: ${bin} ${repro}" >&2
    fi
  fi

  if [ "${status}" = ok ]; then
    passed=$((passed + 1))
    execs=$(grep -oE "stat::number_of_executed_units:[[:space:]]+[0-9]+" "${log}" | awk '{print $2}')
    rate=$(grep -oE "stat::average_exec_per_sec:[[:space:]]+[0-9]+" "${log}" | awk '{print $2}')
    last=$(grep -E "^#[0-9]+.*cov: " "${log}" | tail -n 1)
    cov=$(echo "${last}" | grep -oE "cov: [0-9]+" | awk '{print $2}')
    ft=$(echo "${last}" | grep -oE "ft: [0-9]+" | awk '{print $2}')
    corpus=$(find "${WORK}/${t}-corpus" -type f | wc -l)
    summaries+=("$(printf '%-21s PASS %4ss execs=%-9s exec/s=%-6s cov=%-5s ft=%-6s corpus=%s (seeds %s)' \
      "${t}" "${SECONDS_PER_TARGET}" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corpus}" "${seeds}")")
  else
    failed=$((failed + 1))
    summaries+=("$(printf '%-21s FAIL (log: %s)' "${t}" "${log}")")
  fi
done

echo
for s in "${summaries[@]}"; do echo "${s}"; done
echo "${passed} passed, ${failed} failed"
[ "${failed}" -eq 0 ]
