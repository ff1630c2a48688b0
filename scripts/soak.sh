#!/usr/bin/env bash
# Chaos soak: starts loraplex-server from a build folder (release or sanitizer) on stories260K over
# loopback, runs the seeded chaos driver (tests/soak/soak_driver.cc: cancelled, timed-out, slow,
# abandoned and disconnected streams, some for weighted mixes of two adapters, every bad request of
# the API's error table, greedy answers checked against loraplex-generate, admin churn with
# uploads, cancelled uploads, replacements, unloads, merges) for DURATION_SECONDS, then stops the
# server with SIGTERM and checks that it exits 0 within its grace period and that its log holds no
# sanitizer report.
#
#   bash scripts/soak.sh DURATION_SECONDS [--build-dir DIR] [--seed N] [--no-build] [--keep]
#
# DIR (default build-release) is a configured CMake build folder; its loraplex-soak target (which
# builds loraplex-server and loraplex-generate too) is brought up to date first unless
# --no-build. Sanitizer builds (LP_SANITIZE in DIR's cache) run the server with halt_on_error, so the
# first report stops it and fails the run. Prints the driver's counts and checks, then a last line
# "N passed, M failed"; exits 1 on any failure (work folder kept, its path printed), 2 on bad usage.
# CI: bash scripts/soak.sh 120 --build-dir build-tsan (and build-asan).
set -uo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
  exit 2
}
duration="${1:-}"
[[ "$duration" =~ ^[0-9]+$ ]] && ((duration >= 5)) || usage
shift
build_dir=build-release
seed=""
build=1
keep=0
while (($#)); do
  case "$1" in
    --build-dir) build_dir="${2:?}"; shift 2 ;;
    --build-dir=*) build_dir="${1#*=}"; shift ;;
    --seed) seed="${2:?}"; shift 2 ;;
    --seed=*) seed="${1#*=}"; shift ;;
    --no-build) build=0; shift ;;
    --keep) keep=1; shift ;;
    *) usage ;;
  esac
done
[[ "$build_dir" = /* ]] || build_dir="$root/$build_dir"
[[ -f "$build_dir/CMakeCache.txt" ]] || {
  echo "soak.sh: $build_dir is not a configured build folder" >&2
  exit 2
}
shared="${LP_SHARED_DIR:-$root/../shared}"
model="$shared/models/stories260K/stories260K.gguf"
[[ -f "$model" ]] || { echo "soak.sh: $model is missing" >&2; exit 2; }
sanitizer="$(sed -n 's/^LP_SANITIZE:[A-Z]*=//p' "$build_dir/CMakeCache.txt")"

if ((build)); then
  cmake --build "$build_dir" -j "$(nproc)" --target loraplex-soak || exit 1
fi
server_bin="$build_dir/server/loraplex-server"
generate_bin="$build_dir/client/loraplex-generate"
driver_bin="$build_dir/tests/soak/loraplex-soak"
for b in "$server_bin" "$generate_bin" "$driver_bin"; do
  [[ -x "$b" ]] || { echo "soak.sh: $b is not built" >&2; exit 1; }
done

work="$(mktemp -d "${TMPDIR:-/tmp}/lp-soak.XXXXXX")"
mkdir -p "$work/adapters" "$work/state"
# The server's --adapter-dir: copies of the fixtures (LoadAdapter by path) and, made by the driver,
# bad folders (soak-bad/). Copies, not links: links out of the root are PERMISSION_DENIED.
for f in qv all_linear rank1 rank64 layers patterns regex; do
  cp -r "tests/fixtures/peft/stories260k/$f" "$work/adapters/"
done
token="soak-$RANDOM$RANDOM$RANDOM"
echo "$token" >"$work/admin-token"
grace=20
upload_limit=1048576

# Sanitizer options of the server (its only consumer: the driver's own reports are off or
# irrelevant), and resource thresholds of the driver per build (reasons in soak_driver.cc; here
# only what the sanitizers add).
server_env=()
driver_env=()
slack=()
case "$sanitizer" in
  thread)
    server_env=("TSAN_OPTIONS=halt_on_error=1 history_size=4 second_deadlock_stack=1 suppressions=$root/tests/tsan.supp")
    # TSan keeps shadow memory and access history for every address the server touched and never
    # gives them back, so RSS grows with the soak's address churn, not with leaks.
    slack=(--rss-slack-frac 0.5 --rss-slack-mib 256)
    # TSan runs the server 5-15x slower; on 2 busy cores a probe once took 2.4 s with nothing
    # held up. The freeze this guards against lasted 60 s, so 5 s still catches it.
    slack+=(--max-probe-s 5)
    ;;
  address)
    server_env=("ASAN_OPTIONS=halt_on_error=1 detect_leaks=1 abort_on_error=0"
      "UBSAN_OPTIONS=halt_on_error=1 print_stacktrace=1")
    # The driver's gRPC client keeps process-lifetime objects; its leaks are not under test.
    driver_env=("ASAN_OPTIONS=detect_leaks=0")
    # ASan's quarantine holds up to 256 MiB of freed memory before reusing it.
    slack=(--rss-slack-frac 0.5 --rss-slack-mib 320)
    slack+=(--max-probe-s 5)  # as for TSan: a sanitizer's slowdown, not a wait behind another call
    ;;
  undefined)
    server_env=("UBSAN_OPTIONS=halt_on_error=1 print_stacktrace=1")
    ;;
esac

server_flags=(
  "--model=$model" --dtype=f32
  --listen=127.0.0.1:0 --metrics-listen=127.0.0.1:0 "--port-file=$work/port"
  "--state-dir=$work/state" "--adapter-dir=$work/adapters" "--admin-token-file=$work/admin-token"
  # 2 slots for 4 churned adapters (plus a pinned one): evictions and reloads all the time.
  --max-loaded-adapters=2 "--max-adapter-bytes=$upload_limit" --max-batch-tokens=128
  # Blocks of 4 tokens: the driver's short prompts share full blocks, so the prefix cache serves
  # K/V all the time, across replacements, merges and cancellations. 2048 of them (10 MiB): the
  # cache keeps what it can, so it fills the pool within the warm-up (whose RSS the checks compare
  # against) and then evicts idle blocks all the time.
  --kv-block-size=4 --kv-blocks=2048
  "--shutdown-grace-s=$grace"
)
echo "soak.sh: ${sanitizer:-release} build $build_dir, ${duration} s, work folder $work"
env "${server_env[@]}" "$server_bin" "${server_flags[@]}" 2>"$work/server.log" &
server_pid=$!

alive() { # the server has not exited (a zombie counts as exited, and so does a reaped one)
  local stat  # read once: bash may reap the server between two looks at /proc
  stat="$(cat "/proc/$server_pid/stat" 2>/dev/null)" || return 1
  [[ -n "$stat" && ! "$stat" =~ ^[0-9]+\ \(.*\)\ Z ]]
}
cleanup() {
  if alive; then kill -KILL "$server_pid" 2>/dev/null; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

passed=0
failed=0
check() { # check OK TEXT
  if [[ "$1" == 1 ]]; then
    echo "PASS $2"
    passed=$((passed + 1))
  else
    echo "FAIL $2"
    failed=$((failed + 1))
  fi
}

port=""
for ((i = 0; i < 1200; ++i)); do # 120 s: a TSan server loads slowly
  [[ -s "$work/port" ]] && port="$(head -1 "$work/port")" && break
  alive || break
  sleep 0.1
done
driver_rc=1
if [[ -z "$port" ]]; then
  echo "soak.sh: the server did not come up; its log:"
  tail -50 "$work/server.log"
  check 0 "the server starts"
else
  seed_flag=()
  [[ -n "$seed" ]] && seed_flag=(--seed "$seed")
  env "${driver_env[@]}" "$driver_bin" --server "127.0.0.1:$port" --server-pid "$server_pid" \
    --duration "$duration" "${seed_flag[@]}" --generate-bin "$generate_bin" --model "$model" \
    --adapter-root "$work/adapters" --admin-token "$token" --upload-limit "$upload_limit" \
    --violations-file "$work/violations.txt" "${slack[@]}" 2>&1 | tee "$work/driver.log"
  driver_rc=${PIPESTATUS[0]}
  seed="$(sed -n 's/^soak: seed \([0-9]*\),.*/\1/p' "$work/driver.log" | head -1)"
  last="$(tail -1 "$work/driver.log")"
  if [[ "$last" =~ ^([0-9]+)\ passed,\ ([0-9]+)\ failed$ ]]; then
    passed=$((passed + BASH_REMATCH[1]))
    failed=$((failed + BASH_REMATCH[2]))
  else
    check 0 "the driver finishes (exit status $driver_rc)"
  fi
fi

# SIGTERM: the server must exit 0 within its grace period (plus the metrics endpoint's 2 s poll
# and some slack for a sanitizer's exit-time work).
echo "== SIGTERM"
if alive; then
  kill -TERM "$server_pid"
  start=$EPOCHREALTIME
  limit=$((grace + 10))
  since() { awk "BEGIN { printf \"%.1f\", $EPOCHREALTIME - $start }"; }
  while alive && awk "BEGIN { exit !($(since) < $limit) }"; do sleep 0.1; done
  took="$(since)"
  if alive; then
    kill -KILL "$server_pid"
    wait "$server_pid" 2>/dev/null
    check 0 "the server exits 0 on SIGTERM within ${limit} s (still running after ${took} s)"
  else
    wait "$server_pid"
    status=$?
    check "$([[ $status == 0 ]] && echo 1 || echo 0)" \
      "the server exits 0 on SIGTERM within ${limit} s (status $status after ${took} s)"
  fi
else
  wait "$server_pid"
  check 0 "the server is running at the end (it exited with status $? during the soak)"
fi

reports="$(grep -nE 'ThreadSanitizer|AddressSanitizer|runtime error:|LeakSanitizer' "$work/server.log" | head -5)"
if [[ -n "$reports" ]]; then
  check 0 "no sanitizer report in the server log"
  first="$(echo "$reports" | head -1 | cut -d: -f1)"
  sed -n "$((first > 2 ? first - 2 : 1)),$((first + 80))p" "$work/server.log"
else
  check 1 "no sanitizer report in the server log (${sanitizer:-release} build)"
fi

echo "reproduce: bash scripts/soak.sh $duration --build-dir $build_dir --seed ${seed:-?}"
if ((failed > 0 || keep)); then
  echo "work folder kept: $work (server.log, driver.log, violations.txt, state/)"
else
  rm -rf "$work"
fi
echo "$passed passed, $failed failed"
((failed == 0))
