#!/usr/bin/env bash
# loraplex against llama.cpp, the CPU peer, on the same GGUF file, in one run on one machine: S1
# decode (in-process benches and through each server, one request at a time), prefill of a
# 128-token prompt, S2 base (32 requests in flight) and S2 with 32 distinct rank-16 q,k,v,o LoRA
# adapters, then a markdown table of the ratios loraplex / llama.cpp. Both get the same number of
# threads (all cores unless LP_THREADS says otherwise) and the same workload: 128-token prompts of
# random token ids, 128 greedy output tokens ignoring EOS, prompt caching off.
#
#   scripts/bench-vs-llamacpp.sh [OUT_DIR] [MODEL]      # the comparison (default out/bench-vs-llamacpp)
#   scripts/bench-vs-llamacpp.sh --setup                # only build llama.cpp and its Python venv
#   scripts/bench-vs-llamacpp.sh --perplexity [TEXT] [MODEL]
#       llama-perplexity -c 512 on TEXT (default tests/fixtures/perplexity/text.txt); prints the PPL
#
# llama.cpp comes from the PyPI sdist of llama-cpp-python (which vendors it under vendor/llama.cpp),
# built with clang, CMake Release, GGML_NATIVE=ON (so -march=native, which defines the AMX macros on
# a CPU with AMX; -mamx-* are added where the compiler's native target lacks them) into LP_LLAMACPP_DIR (default out/llamacpp), which later runs reuse. The
# PEFT adapters become GGUF LoRA files through llama.cpp's convert_lora_to_gguf.py, run in a venv
# under the same directory on Debian's python3-torch (tools/llamacpp_convert_lora.py).
#
# Environment:
#   LP_BUILD_DIR        loraplex release build (default build-release)
#   LP_LLAMACPP_DIR     llama.cpp cache: source, build, bin/, venv/, adapters (default out/llamacpp)
#   LP_LLAMACPP_VERSION llama-cpp-python sdist version (default 0.3.36)
#   LP_THREADS          threads for both (default: all cores, nproc)
#   LP_S1_REQUESTS      requests of S1 through the servers (default 4)
#   LP_S2_REQUESTS      requests of each S2 closed loop (default 64), 32 in flight
#   LP_S2_ROUNDS        loraplex's S2 phases run this many times in turn (base, adapters, base,
#                       adapters, ...; default 2) and are pooled, so a drift of the machine's speed
#                       during the run hits both alike; the per-round ratios are printed too
#   LP_DTYPE            loraplex-server --dtype: native (the GGUF's own quantized blocks, as llama.cpp
#                       computes on them), bf16, f32, q8_0, q4_0 (default: native where the server
#                       has it, else bf16)
#   LP_QUIET_WAIT       seconds to wait before each measurement for other processes to leave the
#                       cores (default 300); LP_QUIET_BUSY: the share of all cores that counts as
#                       quiet (default 25). The share others took during each measurement is printed;
#                       above 10% the rows are disturbed (llama.cpp's spinning threads suffer most).
#   LP_PPL_CTX          --perplexity context (default 512; the text needs >= 2x as many tokens)
#   LP_ISA              native (default): llama.cpp built with GGML_NATIVE=ON, loraplex on the kernel
#                       table it picks (LP_CPU_ISA unset); avx2: both as on a CPU with AVX2 and FMA
#                       but no AVX-512 or AMX: llama.cpp built with GGML_NATIVE=OFF and only the
#                       AVX/AVX2/FMA/F16C/BMI2 paths (kept apart, in LP_LLAMACPP_DIR/bin-avx2), and
#                       loraplex with LP_CPU_ISA=avx2
# Needs: the loraplex release build, the model (scripts/fetch-model.sh), apt (clang, cmake,
# python3-torch, python3-venv are installed when missing) and pip for the sdist.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

# Progress and errors go to the original stderr (fd 3), also from commands whose output is redirected.
exec 3>&2
die() { echo "bench-vs-llamacpp: $*" >&3; exit 1; }
log() { echo "== $*" >&3; }

lcp_dir="${LP_LLAMACPP_DIR:-out/llamacpp}"
mkdir -p "$lcp_dir"
lcp_dir="$(cd "$lcp_dir" && pwd)"
lcp_version="${LP_LLAMACPP_VERSION:-0.3.36}"
b="${LP_BUILD_DIR:-build-release}"
threads="${LP_THREADS:-$(nproc)}"
lp_isa="${LP_ISA:-native}"
case "$lp_isa" in
  native) lcp_bin="$lcp_dir/bin"; lcp_build_flags=(-DGGML_NATIVE=ON); unset LP_CPU_ISA ;;
  avx2)
    lcp_bin="$lcp_dir/bin-avx2"
    lcp_build_flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
                     -DGGML_BMI2=ON -DGGML_AVX512=OFF -DGGML_AVX_VNNI=OFF)
    export LP_CPU_ISA=avx2 ;;
  *) echo "bench-vs-llamacpp: LP_ISA must be native or avx2, got '$lp_isa'" >&2; exit 1 ;;
esac
venv="$lcp_dir/venv"

# Debian packages, installed only when missing.
need_apt() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  ((${#missing[@]})) || return 0
  log "apt-get install ${missing[*]}"
  local sudo=""; [[ "$(id -u)" -ne 0 ]] && sudo=sudo
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" \
    >/dev/null || die "apt-get install ${missing[*]} failed"
}

# The llama.cpp source: the llama-cpp-python sdist, unpacked once under $lcp_dir/src.
lcp_src() { echo "$lcp_dir/src/llama_cpp_python-$lcp_version/vendor/llama.cpp"; }
fetch_llamacpp_source() {
  [[ -f "$(lcp_src)/CMakeLists.txt" ]] && return 0
  log "pip download llama-cpp-python==$lcp_version (sdist)"
  local dl="$lcp_dir/sdist"
  rm -rf "$dl" && mkdir -p "$dl" "$lcp_dir/src"
  python3 -m pip download --quiet --disable-pip-version-check --no-binary :all: --no-deps \
    "llama-cpp-python==$lcp_version" -d "$dl" >&2 || die "pip download llama-cpp-python==$lcp_version failed"
  local tgz=("$dl"/llama_cpp_python-*.tar.gz)
  [[ -f "${tgz[0]}" ]] || die "no sdist in $dl"
  tar -xzf "${tgz[0]}" -C "$lcp_dir/src"
  [[ -f "$(lcp_src)/CMakeLists.txt" ]] || die "the sdist has no vendor/llama.cpp ($(lcp_src))"
}

# The llama.cpp commit the sdist vendors: the first "update llama.cpp to ggml-org/llama.cpp@HASH"
# under the version's heading of its CHANGELOG (the sdist has no .git).
lcp_commit() {
  local cl="$lcp_dir/src/llama_cpp_python-$lcp_version/CHANGELOG.md"
  [[ -f "$cl" ]] || { echo unknown; return; }
  awk -v v="## [$lcp_version]" '
    index($0, v) == 1 { on = 1; next }
    on && /^## \[/ { exit }
    on && match($0, /llama\.cpp@[0-9a-f]+/) { print substr($0, RSTART + 10, RLENGTH - 10); exit }
  ' "$cl" | grep . || echo unknown
}

build_llamacpp() {
  local stamp="$lcp_bin/.built-$lcp_version"
  if [[ -f "$stamp" && -x "$lcp_bin/llama-server" && -x "$lcp_bin/llama-bench" &&
        -x "$lcp_bin/llama-perplexity" ]]; then
    return 0
  fi
  need_apt clang cmake ninja-build
  fetch_llamacpp_source
  local src bdir commit cflags=""
  src="$(lcp_src)"; bdir="$lcp_dir/build-$lcp_version"; commit="$(lcp_commit)"
  [[ "$lp_isa" == native ]] || bdir="$bdir-$lp_isa"
  # GGML_NATIVE=ON means -march=native. Where the CPU has AMX but the compiler's native target
  # does not define the AMX macros (an older clang), add them so ggml's AMX path is compiled in;
  # ggml still checks the CPU at run time.
  if [[ "$lp_isa" == native ]] && grep -qw amx_int8 /proc/cpuinfo &&
     ! clang -march=native -dM -E - </dev/null | grep -q __AMX_INT8__; then
    cflags="-mamx-tile -mamx-int8 -mamx-bf16"
  fi
  log "building llama.cpp $commit (llama-cpp-python $lcp_version) with clang in $bdir"
  CC=clang CXX=clang++ cmake -S "$src" -B "$bdir" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    "${lcp_build_flags[@]}" -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_COMMIT="$commit" -DLLAMA_BUILD_NUMBER=0 \
    -DCMAKE_C_FLAGS="$cflags" -DCMAKE_CXX_FLAGS="$cflags" >"$lcp_dir/cmake.log" 2>&1 ||
    die "cmake configure failed; see $lcp_dir/cmake.log"
  cmake --build "$bdir" -j "$(nproc)" --target llama-server llama-bench llama-perplexity \
    >"$lcp_dir/build.log" 2>&1 || die "llama.cpp build failed; see $lcp_dir/build.log"
  mkdir -p "$lcp_bin"
  cp "$bdir"/bin/llama-server "$bdir"/bin/llama-bench "$bdir"/bin/llama-perplexity "$lcp_bin/"
  echo "$commit" >"$lcp_bin/commit"
  touch "$stamp"
}

# A venv on Debian's python3 that sees python3-torch (the light torch), with what
# convert_lora_to_gguf.py and tools/make_random_adapter.py import besides.
setup_venv() {
  if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c 'import torch, numpy, safetensors, transformers' 2>/dev/null; then
    return 0
  fi
  need_apt python3 python3-venv python3-torch python3-numpy
  log "venv $venv (system site packages) + safetensors, transformers, sentencepiece"
  rm -rf "$venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    safetensors "transformers>=4.45,<5" sentencepiece protobuf >&2 ||
    die "pip install into $venv failed"
}

if [[ "${1:-}" == "--setup" ]]; then
  build_llamacpp
  setup_venv
  echo "llama.cpp $(cat "$lcp_bin/commit") in $lcp_bin; venv $venv"
  exit 0
fi

py="$venv/bin/python"
gguf_py() { PYTHONPATH="$(lcp_src)/gguf-py${PYTHONPATH:+:$PYTHONPATH}" "$py" "$@"; }

if [[ "${1:-}" == "--perplexity" ]]; then
  text="${2:-tests/fixtures/perplexity/text.txt}"
  model="${3:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
  ctx="${LP_PPL_CTX:-512}"
  [[ -f "$text" ]] || die "$text: no such file"
  [[ -f "$model" ]] || die "$model: no such file (scripts/fetch-model.sh fetches the default)"
  build_llamacpp
  log "llama-perplexity -c $ctx on $text"
  ppl_log="$(mktemp)"
  "$lcp_bin/llama-perplexity" -m "$model" -f "$text" -c "$ctx" -t "$threads" >"$ppl_log" 2>&1 ||
    { tail -20 "$ppl_log" >&2; die "llama-perplexity failed"; }
  # "Final estimate: PPL = 12.3456 +/- 0.78901"
  ppl="$(sed -n 's/.*Final estimate: PPL = \([0-9.]*\).*/\1/p' "$ppl_log" | tail -1)"
  [[ -n "$ppl" ]] || { tail -20 "$ppl_log" >&2; die "no 'Final estimate: PPL' in the output (need >= 2 x $ctx tokens)"; }
  chunks="$(grep -o 'calculating perplexity over [0-9]* chunks' "$ppl_log" | grep -o '[0-9]*' | head -1)"
  echo "llama.cpp $(cat "$lcp_bin/commit") perplexity of $(basename "$model") on $text, -c $ctx" \
       "(${chunks:-?} chunks): $(sed -n 's/.*Final estimate: \(PPL = .*\)/\1/p' "$ppl_log" | tail -1)"
  rm -f "$ppl_log"
  exit 0
fi

out="${1:-out/bench-vs-llamacpp}"
model="${2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
requests_s1="${LP_S1_REQUESTS:-4}"
requests_s2="${LP_S2_REQUESTS:-64}"
rounds_s2="${LP_S2_ROUNDS:-2}"
n_adapters=32
concurrency=32
[[ -f "$model" ]] || die "$model: no such file (scripts/fetch-model.sh fetches the default)"

build_llamacpp
setup_venv
rm -rf "$out" && mkdir -p "$out"
out="$(cd "$out" && pwd)"

# The loraplex binaries, copied into OUT so that a rebuild of the build dir during the run cannot
# swap them; a missing one, or one written in the last 20 s (a link in progress), is waited for.
lp_exes=(server/loraplex-server client/loraplex bench/decode_bench)
for _ in $(seq 120); do
  ready=1
  for exe in "${lp_exes[@]}"; do
    if [[ ! -x "$b/$exe" ]] || (($(date +%s) - $(stat -c %Y "$b/$exe") < 20)); then ready=0; fi
  done
  ((ready)) && break
  echo "waiting for the loraplex binaries in $b (missing or being rebuilt)" >&2
  sleep 5
done
((ready)) || die "loraplex binaries missing in $b: build the release tree (cmake --preset release)"
mkdir -p "$out/loraplex-bin"
for exe in "${lp_exes[@]}"; do cp -p "$b/$exe" "$out/loraplex-bin/"; done
lpb="$out/loraplex-bin"
if [[ -n "${LP_DTYPE:-}" ]]; then
  dtype="$LP_DTYPE"
elif [[ "$("$lpb/loraplex-server" --helpfull 2>&1 || true)" == *native* ]]; then
  dtype=native
else
  dtype=bf16
fi
model_abs="$(cd "$(dirname "$model")" && pwd)/$(basename "$model")"

# --- adapters ------------------------------------------------------------------------------------
# loraplex: one rank-16 q,k,v,o PEFT folder, which `loraplex bench --make-adapters` uploads as 32
# perturbed copies (as scripts/bench-serving.sh does). llama.cpp: 32 PEFT folders made the same way
# with seeds 0..31, converted to GGUF LoRA (f16, the converter's default type) and cached per model.
log "adapters"
gguf_py tools/make_random_adapter.py "$out/r16" --rank 16 --dtype f32 --model "$model" >/dev/null
ad_dir="$lcp_dir/adapters/$(basename "$model" .gguf)-r16"
mkdir -p "$ad_dir"
pairs=()
for i in $(seq 0 $((n_adapters - 1))); do
  [[ -s "$ad_dir/lora-$i.gguf" ]] && continue
  gguf_py tools/make_random_adapter.py "$ad_dir/peft-$i" --rank 16 --dtype f32 --seed "$i" \
    --model "$model" >/dev/null
  pairs+=("$ad_dir/peft-$i=$ad_dir/lora-$i.gguf.partial")
done
if ((${#pairs[@]})); then
  log "convert_lora_to_gguf.py: ${#pairs[@]} adapters"
  gguf_py tools/llamacpp_convert_lora.py --llamacpp "$(lcp_src)" --base-gguf "$model" \
    --outtype f16 "${pairs[@]}" >"$ad_dir/convert.log" 2>&1 ||
    { tail -20 "$ad_dir/convert.log" >&2; die "convert_lora_to_gguf.py failed; see $ad_dir/convert.log"; }
  for p in "${pairs[@]}"; do
    dst="${p#*=}"
    mv -f "$dst" "${dst%.partial}"
    rm -rf "${p%%=*}"
  done
fi
# One --lora with a comma-separated list: llama-server keeps only the last of repeated --lora flags.
lora_list="$(for i in $(seq 0 $((n_adapters - 1))); do printf '%s,' "$ad_dir/lora-$i.gguf"; done)"
lora_list="${lora_list%,}"

# --- machine -------------------------------------------------------------------------------------
flags="$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)"
isa=()
for f in avx2 avx512f avx512bw avx512_vnni avx_vnni avx512_bf16 amx_tile amx_int8 amx_bf16; do
  grep -qw "$f" <<<"$flags" && isa+=("$f")
done
cpu="$(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1)"
cat >"$out/machine.json" <<JSON
{"cpu": "${cpu:-unknown}", "isa": "${isa[*]}", "cores": $(nproc), "threads": $threads,
 "date": "$(date -u +%Y-%m-%dT%H:%M:%SZ)", "loadavg_start": "$(cut -d' ' -f1-3 /proc/loadavg)",
 "llamacpp_python_version": "$lcp_version", "llamacpp_commit": "$(cat "$lcp_bin/commit")",
 "llamacpp_version_line": "$("$lcp_bin/llama-server" --version 2>&1 | grep -m1 version | tr -d '"')",
 "loraplex_commit": "$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo '+local changes')",
 "loraplex_binaries_built": "$(date -u -r "$lpb/loraplex-server" +%Y-%m-%dT%H:%M:%SZ)",
 "isa_choice": "$lp_isa", "llamacpp_build": "${lcp_build_flags[*]}",
 "loraplex_kernel_table": "${LP_CPU_ISA:-auto}",
 "loraplex_dtype": "$dtype", "model": "$model", "adapter_rank": 16, "adapters": $n_adapters,
 "concurrency_s2": $concurrency, "requests_s1": $requests_s1, "requests_s2": $requests_s2,
 "prompt_tokens": 128, "output_tokens": 128}
JSON

# --- servers -------------------------------------------------------------------------------------
pids=()
cleanup() {
  local p k
  ((${#pids[@]})) || return 0
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for k in $(seq 50); do  # up to 10 s to exit, then SIGKILL
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && break; done
    kill -0 "$p" 2>/dev/null || break
    sleep 0.2
  done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_llama_server() {
  lport="$(free_port)"
  local extra=()
  "$lcp_bin/llama-server" --help >"$out/llama-server-help.txt" 2>&1 || true
  grep -q -- '--cache-ram' "$out/llama-server-help.txt" && extra+=(--cache-ram 0)
  grep -q -- '--no-webui' "$out/llama-server-help.txt" && extra+=(--no-webui)
  # 32 slots of 384 tokens (128 prompt + 128 output fit with room), continuous batching, all 32
  # adapters loaded but not applied (tools/llamacpp_load.py sets their global scales to 0; a
# request's "lora" field turns one on).
  "$lcp_bin/llama-server" -m "$model" --host 127.0.0.1 --port "$lport" -t "$threads" -tb "$threads" \
    --parallel "$concurrency" -c $((concurrency * 384)) --cont-batching --lora "$lora_list" \
    --lora-init-without-apply "${extra[@]}" >"$out/llama-server.log" 2>&1 &
  pids+=($!)
  local pid=$!
  for _ in $(seq 1200); do
    kill -0 "$pid" 2>/dev/null || { tail -20 "$out/llama-server.log" >&2; die "llama-server exited; see $out/llama-server.log"; }
    curl -sf "http://127.0.0.1:$lport/health" >/dev/null 2>&1 && return 0
    sleep 0.25
  done
  die "llama-server did not become healthy in 300 s; see $out/llama-server.log"
}

start_loraplex_server() {
  LP_NUM_THREADS="$threads" "$lpb/loraplex-server" --model "$model" --dtype "$dtype" \
    --listen 127.0.0.1:0 --port_file "$out/lp-port" --state_dir "$out/lp-state" --max_running 64 \
    --kv_memory 384MiB >"$out/loraplex-server.log" 2>&1 &
  pids+=($!)
  local pid=$!
  for _ in $(seq 1200); do
    [[ -s "$out/lp-port" ]] && break
    kill -0 "$pid" 2>/dev/null || { tail -20 "$out/loraplex-server.log" >&2; die "loraplex-server exited; see $out/loraplex-server.log"; }
    sleep 0.25
  done
  [[ -s "$out/lp-port" ]] || die "loraplex-server did not start; see $out/loraplex-server.log"
  export LORAPLEX_SERVER="127.0.0.1:$(head -1 "$out/lp-port")"
}

# The machine may be shared (other builds): before each measurement wait, up to LP_QUIET_WAIT
# seconds (default 300), until other processes use at most LP_QUIET_BUSY percent of all cores
# (default 25) over a second; measure() below records what they took while each measurement ran.
cpu_busy() {  # percent of all cores used by processes other than this run's, over one second
  local b0 o0 b1 o1
  b0="$(busy_ticks)"; o0="$(our_ticks)"; sleep 1; b1="$(busy_ticks)"; o1="$(our_ticks)"
  local x=$((100 * ((b1 - b0) - (o1 - o0)) / ($(getconf CLK_TCK) * $(nproc))))
  echo $((x < 0 ? 0 : x))
}
wait_quiet() {
  local waited=0 busy limit="${LP_QUIET_WAIT:-300}"
  while :; do
    busy="$(cpu_busy)"; waited=$((waited + 1))
    ((busy <= ${LP_QUIET_BUSY:-25})) && break
    if ((waited >= limit)); then
      log "other processes still use ${busy}% of the cores after ${limit}s; measuring $1 anyway"
      break
    fi
    if ((waited % 30 == 1)); then
      log "waiting for a quiet machine before $1: others use ${busy}% of the cores (top:" \
        "$(ps -eo pcpu=,comm= --sort=-pcpu | head -3 | awk '{printf "%s %s%%; ", $2, $1}'))"
    fi
  done
  echo "$1 $busy $waited" >>"$out/quiet.txt"
}

# CPU time (clock ticks) the system spent busy, and what this run spent: the servers, plus the
# finished children of this shell (the clients and benches, counted once waited for).
busy_ticks() { head -1 /proc/stat | awk '{print $2 + $3 + $4 + $7 + $8 + $9}'; }
our_ticks() {
  local t p
  t="$(awk '{print $16 + $17}' "/proc/$$/stat")"
  for p in "${pids[@]}"; do
    [[ -r "/proc/$p/stat" ]] && t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
  done
  echo "$t"
}
# measure NAME DESCRIPTION CMD...: waits for a quiet machine, runs CMD and appends to
# contention.txt the share of all cores that other processes took while it ran.
measure() {
  local name="$1" desc="$2"; shift 2
  wait_quiet "$name"
  log "$desc"
  local b0 o0 t0 b1 o1 t1 rc=0
  b0="$(busy_ticks)"; o0="$(our_ticks)"; t0="$(date +%s.%N)"
  "$@" || rc=$?
  b1="$(busy_ticks)"; o1="$(our_ticks)"; t1="$(date +%s.%N)"
  awk -v n="$name" -v b=$((b1 - b0)) -v o=$((o1 - o0)) -v t0="$t0" -v t1="$t1" \
      -v hz="$(getconf CLK_TCK)" -v c="$(nproc)" 'BEGIN {
        dt = t1 - t0; if (dt <= 0) dt = 1e-9
        x = (b - o) / (dt * hz * c) * 100; if (x < 0) x = 0
        printf "%s %.0f %.1f\n", n, x, dt }' >>"$out/contention.txt"
  return "$rc"
}

lload() { "$py" tools/llamacpp_load.py --port "$lport" "$@"; }
lpc() { LP_NUM_THREADS="$threads" "$lpb/loraplex" "$@"; }
common=(--prompt-tokens 128 --max-tokens 128 --warmup 0 --duration 3600 --quiet --json)

# --- in-process benches --------------------------------------------------------------------------
# llama-bench: pp128 (a 128-token prompt in one batch, from an empty context) and tg128 at depths 0
# and 128; the table takes tg128 at depth 128, the context decode_bench decodes at (128..256).
measure llama_bench "llama-bench pp128 / tg128 (depth 0 and 128), $threads threads" \
  "$lcp_bin/llama-bench" -m "$model" -t "$threads" -p 128 -n 128 -d 0,128 -r 5 -o json \
  >"$out/llama_bench.json" 2>"$out/llama_bench.log" ||
  { tail -20 "$out/llama_bench.log" >&2; die "llama-bench failed"; }
measure decode_bench "loraplex decode_bench (S1 decode step at context 128..256, prefill 128), every storage" \
  env LP_BENCH_MODEL="$model_abs" LP_NUM_THREADS="$threads" "$lpb/decode_bench" \
  --benchmark_filter="BM_S1(DecodeStep|Prefill128)/" --benchmark_min_time=2 \
  --benchmark_format=json >"$out/decode_bench.json" 2>"$out/decode_bench.log" ||
  { tail -20 "$out/decode_bench.log" >&2; die "decode_bench failed"; }

# --- through the servers -------------------------------------------------------------------------
log "starting llama-server ($n_adapters LoRA files) and loraplex-server ($dtype)"
start_llama_server
start_loraplex_server
log "adapter check: does each llama.cpp adapter change the output probabilities?"
lload --check-adapters "$n_adapters" --out "$out/llama_adapter_check.json" >/dev/null ||
  die "llama.cpp adapter check failed: $(tr -d '\n' <"$out/llama_adapter_check.json" 2>/dev/null)"
log "warm-up, one short request each"
lload --requests 1 --max-tokens 8 --out "$out/llama_warmup.json" >/dev/null
lpc bench --concurrency 1 --requests 1 --prompt-tokens 128 --max-tokens 8 --warmup 0 \
  --duration 3600 --quiet --json --out "$out/lp_warmup" >/dev/null
# Each workload runs on llama.cpp then on loraplex, back to back, so a change in the machine's load
# (it may be shared) hits both alike.
measure llama_s1 "S1 on llama-server: $requests_s1 requests, one at a time" \
  lload --concurrency 1 --requests "$requests_s1" --out "$out/llama_s1.json" >/dev/null
measure loraplex_s1 "S1 on loraplex-server: $requests_s1 requests, one at a time" \
  lpc bench --scenario S1 --requests "$requests_s1" "${common[@]}" --out "$out/lp_s1" >/dev/null
measure llama_s2_base "S2 base on llama-server: $requests_s2 requests, $concurrency in flight" \
  lload --concurrency "$concurrency" --requests "$requests_s2" --out "$out/llama_s2_base.json" >/dev/null
measure loraplex_s2 "S2 on loraplex-server: base, then $n_adapters adapters ($requests_s2 requests each, $concurrency in flight), $rounds_s2 rounds" \
  lpc bench --scenario S2 --requests "$requests_s2" --rounds "$rounds_s2" \
  --make-adapters "$out/r16" "${common[@]}" --out "$out/lp_s2" >/dev/null
measure llama_s2_adapters "S2 $n_adapters adapters on llama-server: $requests_s2 requests, $concurrency in flight" \
  lload --concurrency "$concurrency" --requests "$requests_s2" --adapters "$n_adapters" \
  --out "$out/llama_s2_adapters.json" >/dev/null
lpc info --json >"$out/lp_info.json" 2>/dev/null || true
echo "$(cut -d' ' -f1-3 /proc/loadavg)" >"$out/loadavg_end"

# --- report --------------------------------------------------------------------------------------
"$py" - "$out" <<'PY'
import json, os, sys
d = sys.argv[1]
J = lambda n: json.load(open(os.path.join(d, n)))
m = J("machine.json")
m["loadavg_end"] = open(os.path.join(d, "loadavg_end")).read().strip()
quiet = {}
if os.path.exists(os.path.join(d, "quiet.txt")):
    for line in open(os.path.join(d, "quiet.txt")):
        k, busy, waited = line.split()
        quiet[k] = int(busy)
m["cpu_busy_before_pct"] = quiet
cont = {}
if os.path.exists(os.path.join(d, "contention.txt")):
    for line in open(os.path.join(d, "contention.txt")):
        k, pct, secs = line.split()
        cont[k] = {"others_pct": float(pct), "seconds": float(secs)}
m["cpu_taken_by_others_during"] = cont

# llama-bench -o json: a list of tests with n_prompt, n_gen, n_depth and avg_ts (tokens/s).
lb = J("llama_bench.json")
def lb_ts(n_prompt, n_gen, depth):
    for t in lb:
        if t["n_prompt"] == n_prompt and t["n_gen"] == n_gen and t.get("n_depth", 0) == depth:
            return t["avg_ts"]
    raise SystemExit(f"llama-bench has no test p{n_prompt} n{n_gen} d{depth}")
l_tg = lb_ts(0, 128, 128)
l_tg0 = lb_ts(0, 128, 0)
l_pp = lb_ts(128, 0, 0)
db = J("decode_bench.json")["benchmarks"]
def db_label(b):
    # The benchmark's label names the weight storage; builds before it had an f32:0/1 argument.
    if b.get("label"):
        return b["label"]
    arg = b["name"].split("/")[1] if "/" in b["name"] else ""
    return {"f32:0": "bf16", "f32:1": "f32"}.get(arg, arg)
def pick(name, key):
    for b in db:
        if (b["name"].startswith(name + "/") and b.get("run_type", "iteration") == "iteration"
                and db_label(b) == m["loraplex_dtype"]):
            if b.get("error_occurred"):
                raise SystemExit(f"decode_bench {b['name']}: {b.get('error_message')}")
            return b[key]
    raise SystemExit(f"decode_bench has no {name} for dtype {m['loraplex_dtype']}")
lp_tg = pick("BM_S1DecodeStep", "tok/s")
lp_pp = pick("BM_S1Prefill128", "prompt_tok/s")
db_all = {f"{b['name']} [{db_label(b)}]": b.get("tok/s", b.get("prompt_tok/s")) for b in db
          if b.get("run_type", "iteration") == "iteration"}

phases = lambda r: r["phases"] if "phases" in r else [r]
lp_s1 = phases(J("lp_s1/results.json"))[0]
lp_s2_all = J("lp_s2/results.json")
ph = {p["name"]: p for p in phases(lp_s2_all)}
lp_s2b, lp_s2a = dict(ph["base"]), dict(ph["adapters"])
# With several rounds, each phase's throughput is pooled over its rounds (tokens / seconds).
for name, p in lp_s2_all.get("pooled", {}).items():
    target = lp_s2b if name == "base" else lp_s2a if name == "adapters" else None
    if target is not None:
        target["output_tokens_per_s"] = p["output_tokens_per_s"]
        target["errors"] = sum(q.get("errors", 0) for q in phases(lp_s2_all)
                               if q["name"].split(" #")[0] == name)
lp_s2_rounds = lp_s2_all.get("ratios", {}).get("adapters / base output tok/s per round", [])
l_s1, l_s2b, l_s2a = J("llama_s1.json"), J("llama_s2_base.json"), J("llama_s2_adapters.json")
check = J("llama_adapter_check.json")
info = {}
try:
    raw_info = J("lp_info.json")
    info = dict(raw_info.get("model_info", raw_info))
    info.setdefault("dtype", raw_info.get("dtype", m["loraplex_dtype"]))
except (OSError, ValueError):
    info = {"dtype": m["loraplex_dtype"]}

tps = lambda r: r["output_tokens_per_s"]
rows = [
    ("S1 decode, in-process bench (tok/s)", l_tg, lp_tg),
    ("S1 through the servers, 1 request at a time (output tok/s)", tps(l_s1), tps(lp_s1)),
    ("S1 TTFT through the servers, p50 (ms, lower is better)", l_s1["ttft"]["p50"], lp_s1["ttft"]["p50"]),
    ("prefill 128 tokens, in-process bench (prompt tok/s)", l_pp, lp_pp),
    (f"S2 base, {m['concurrency_s2']} in flight (output tok/s)", tps(l_s2b), tps(lp_s2b)),
    (f"S2 {m['adapters']} distinct rank-16 adapters, {m['concurrency_s2']} in flight (output tok/s)",
     tps(l_s2a), tps(lp_s2a)),
    ("S2 adapters / S2 base", tps(l_s2a) / tps(l_s2b), tps(lp_s2a) / tps(lp_s2b)),
]
errors = {"llama_s1": l_s1["errors"], "llama_s2_base": l_s2b["errors"],
          "llama_s2_adapters": l_s2a["errors"], "loraplex_s1": lp_s1.get("errors", 0),
          "loraplex_s2_base": lp_s2b.get("errors", 0), "loraplex_s2_adapters": lp_s2a.get("errors", 0)}
fmt = lambda v: f"{v:.2f}" if v < 10 else f"{v:.1f}"
print()
print(f"loraplex vs llama.cpp on {os.path.basename(m['model'])}, {m['date']}")
print(f"- CPU: {m['cpu']}, {m['cores']} cores, {m['threads']} threads for both; ISA: {m['isa']}")
print(f"- llama.cpp: {m['llamacpp_commit']} (vendored by llama-cpp-python {m['llamacpp_python_version']}), "
      f"clang, Release, {m['llamacpp_build']}; {m['llamacpp_version_line']}")
print(f"- loraplex: {m['loraplex_commit']} (binaries built {m['loraplex_binaries_built']}), "
      f"base weights {info['dtype']}, kernel table LP_CPU_ISA={m['loraplex_kernel_table']}")
print(f"- workload: {m['prompt_tokens']}-token prompts of random ids, {m['output_tokens']} greedy output "
      f"tokens ignoring EOS; S1 {m['requests_s1']} requests, S2 {m['requests_s2']} requests closed loop")
print(f"- load average at start {m['loadavg_start']}, at end {m['loadavg_end']}; share of all cores "
      f"other processes took during each measurement (%): " +
      ", ".join(f"{k} {v['others_pct']:.0f}" for k, v in cont.items()))
worst = max((v["others_pct"] for v in cont.values()), default=0)
if worst > 10:
    print(f"- WARNING: other processes took up to {worst:.0f}% of the cores during a measurement: "
          f"those rows are disturbed; rerun on a quiet machine")
print()
print("| | llama.cpp | loraplex | loraplex / llama.cpp |")
print("|---|---|---|---|")
for name, l, p in rows:
    print(f"| {name} | {fmt(l)} | {fmt(p)} | {p / l:.2f} |")
print()
print(f"S1 decode (bench): llama-bench tg128 at depth 128 (tg128 from an empty context: {l_tg0:.1f} tok/s) "
      f"vs decode_bench BM_S1DecodeStep (one decode step at context 128..256, greedy argmax).")
print("prefill 128: llama-bench pp128 vs decode_bench BM_S1Prefill128: both one 128-token batch "
      "in-process, logits of the last token only, no sampling, no RPC.")
if lp_s2_rounds:
    print(f"loraplex S2: base and adapters phases in turn, {len(lp_s2_rounds)} rounds, pooled; "
          f"adapters / base per round: " + ", ".join(f"{r:.2f}" for r in lp_s2_rounds) + ".")
print(f"llama.cpp adapter check: {check['loaded']} GGUF LoRA files loaded, {check['changed_output']} of "
      f"{check['adapters']} adapters change the top-5 log-probabilities of a fixed prompt (all should; "
      f"base repeatable: {check['base_repeatable']}). llama-server batches only slots with the same "
      f"LoRA set, so requests on distinct adapters are decoded in separate batches.")
wf = info.get("weight_formats") or info.get("weightFormats") or ""
if info["dtype"] == "native":
    print(f"weights: both compute on the GGUF's quantized blocks as stored (loraplex --dtype native"
          f"{': ' + wf if wf else ''}).")
else:
    print(f"weights: llama.cpp computes on the GGUF's quantized blocks as stored; loraplex-server holds "
          f"the base weights as {info['dtype']}{' (' + wf + ')' if wf and wf != info['dtype'] else ''}.")
print("decode_bench, every storage (tok/s, prompt tok/s): " +
      ", ".join(f"{k} {v:.1f}" for k, v in db_all.items() if v is not None))
print(f"errors: {errors}")
raw = {"machine": m, "rows": [{"name": n, "llamacpp": l, "loraplex": p, "ratio": p / l} for n, l, p in rows],
       "llama_bench": lb, "decode_bench": db, "decode_bench_by_storage": db_all, "llama_adapter_check": check, "errors": errors,
       "llama_s1": l_s1, "llama_s2_base": l_s2b, "llama_s2_adapters": l_s2a,
       "loraplex_s1": lp_s1, "loraplex_s2_base": lp_s2b, "loraplex_s2_adapters": lp_s2a,
       "loraplex_info": info}
with open(os.path.join(d, "results.json"), "w") as f:
    json.dump(raw, f, indent=2)
print(f"raw results: {os.path.join(d, 'results.json')}")
if any(errors.values()):
    sys.exit(1)
PY
