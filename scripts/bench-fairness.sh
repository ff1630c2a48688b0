#!/usr/bin/env bash
# Scenario S8, the noisy neighbour: 8 rank-16 adapters; 7 "steady" ones send a low Poisson rate
# together (LP_STEADY x capacity, spread uniformly), and one "flooder" sends 10x its fair share
# (10/8 x capacity) in an open loop at the same time. Per admission policy (--fairness vtc, then
# fifo; a fresh server each), the steady adapters' TTFT is measured alone and beside the flood, in
# one run; the figure is their TTFT p99 with the flood over without it.
#
#   scripts/bench-fairness.sh [OUT_DIR] [MODEL]
#
# Capacity (requests/s) is measured first by a closed-loop run (16 in flight) over the 8 adapters
# (LP_RATE gives it instead).
# Environment: LP_BUILD_DIR (default build-release), LP_BENCH_DURATION (seconds per open-loop
# phase, default 60), LP_STEADY (default 0.3), LP_POLICIES (default "vtc vtc-cap0 fifo"; vtc-capN
# adds --max-running-per-adapter N, so vtc-cap0 is vtc without the default share cap), PYTHON
# (numpy and gguf).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-out/bench-fairness}"
model="${2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
b="${LP_BUILD_DIR:-build-release}"
duration="${LP_BENCH_DURATION:-60}"
steady_share="${LP_STEADY:-0.3}"
rm -rf "$out" && mkdir -p "$out"
out="$(cd "$out" && pwd)"
"${PYTHON:-python3}" tools/make_random_adapter.py "$out/r16" --rank 16 --model "$model" >/dev/null
lp() { "$b/client/loraplex" "$@"; }
shape=(--prompt-tokens 128 --max-tokens 64 --warmup 0 --quiet --json)
steady=bench-1,bench-2,bench-3,bench-4,bench-5,bench-6,bench-7

rate="${LP_RATE:-}"
policies="${LP_POLICIES:-vtc vtc-cap0 fifo}"
for policy in $policies; do
  d="$out/$policy"
  mkdir -p "$d"
  flags=(--fairness "${policy%%-*}")
  [[ "$policy" == *-cap* ]] && flags+=(--max_running_per_adapter "${policy##*-cap}")
  "$b/server/loraplex-server" --model "$model" --listen 127.0.0.1:0 --port_file "$d/port" \
    --state_dir "$d/state" --max_running 64 --max_queue 1024 "${flags[@]}" \
    >"$d/server.log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  for _ in $(seq 600); do [[ -s "$d/port" ]] && break; sleep 0.1; done
  [[ -s "$d/port" ]] || { echo "loraplex-server did not start; see $d/server.log" >&2; exit 1; }
  export LORAPLEX_SERVER="127.0.0.1:$(head -1 "$d/port")"
  echo "== $policy: 8 adapters uploaded, capacity"
  lp bench --concurrency 16 --requests 48 --adapters 8 --popularity uniform \
    --make-adapters "$out/r16" --keep-adapters "${shape[@]}" --duration 3600 \
    --out "$d/capacity" >/dev/null
  if [[ -z "$rate" ]]; then
    rate="$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); p=r.get('phases', [r])[0]; print(p['requests_per_s'])" "$d/capacity/results.json")"
  fi
  steady_rate="$(python3 -c "print(round($steady_share * $rate, 3))")"
  flood_rate="$(python3 -c "print(round(10 / 8 * $rate, 3))")"
  echo "== $policy: steady alone ($steady_rate req/s over 7 adapters)"
  lp bench --rate "$steady_rate" --adapters "$steady" --popularity uniform --duration "$duration" \
    --seed 1 "${shape[@]}" --out "$d/alone" >/dev/null
  echo "== $policy: steady beside a flood ($flood_rate req/s on bench-0)"
  lp bench --rate "$flood_rate" --adapters bench-0 --duration "$duration" --seed 2 \
    --request-deadline 3600 "${shape[@]}" --out "$d/flood" >/dev/null &
  flood=$!
  lp bench --rate "$steady_rate" --adapters "$steady" --popularity uniform --duration "$duration" \
    --seed 1 --request-deadline 3600 "${shape[@]}" --out "$d/beside" >/dev/null
  wait $flood
  kill $server 2>/dev/null || true
  wait $server 2>/dev/null || true
done

python3 - "$out" "$rate" "$policies" <<'PY'
import json, os, sys
out, rate, policies = sys.argv[1], float(sys.argv[2]), sys.argv[3].split()
def phase(p):
    r = json.load(open(p))
    return r.get("phases", [r])[0]
print(f"capacity {rate:.2f} req/s (closed loop, 16 in flight, 128 prompt + 64 output tokens)")
print("| policy | steady TTFT p50 / p99 alone ms | beside the flood ms | p99 beside / alone | "
      "steady errors | flood req/s done | flood TTFT p50 ms |")
print("|---|---|---|---|---|---|---|")
for pol in policies:
    a, b, f = (phase(os.path.join(out, pol, x, "results.json")) for x in ("alone", "beside", "flood"))
    print(f"| {pol} | {a['ttft']['p50']:.0f} / {a['ttft']['p99']:.0f} | "
          f"{b['ttft']['p50']:.0f} / {b['ttft']['p99']:.0f} | {b['ttft']['p99'] / a['ttft']['p99']:.2f} | "
          f"{b['errors']} | {f['requests_per_s']:.2f} | {f['ttft']['p50']:.0f} |")
PY
