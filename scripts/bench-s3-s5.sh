#!/usr/bin/env bash
# Scenarios S3 (64 rank-16 adapters, Zipf(1.0) popularity, Poisson arrivals near capacity) and S5
# (the same while one adapter is replaced every second) through loraplex-server with
# `loraplex bench`, in one run, and the change of S5 against S3 (docs/benchmarks.md, issues 5/6).
# Each run leaves OUT_DIR/<scenario>/results.json and report.html.
#
#   scripts/bench-s3-s5.sh [OUT_DIR] [RATE] [MODEL]
# RATE (requests/s) defaults to 0.8 of the capacity measured by a short closed-loop S2-like run
# (32 in flight) first. Needs a release build (LP_BUILD_DIR, default build-release) and the model.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-out/bench-s3-s5}"
rate="${2:-}"
model="${3:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
b="${LP_BUILD_DIR:-build-release}"
duration="${LP_BENCH_DURATION:-60}"
rm -rf "$out" && mkdir -p "$out"
source scripts/bench-common.sh
start_bench_server --kv_memory 1GiB
lp() { "$b/client/loraplex" "$@"; }

if [[ -z "$rate" ]]; then
  echo "== capacity: 32 in flight, 64 requests over 64 adapters (zipf 1.0)"
  lp bench --concurrency 32 --requests 64 --adapters 64 --popularity zipf:1.0 --make-adapters "$out/r16" \
    --prompt-tokens 128 --max-tokens 128 --warmup 0 --duration 3600 --quiet --json \
    --out "$out/capacity" >/dev/null
  rate="$(python3 -c "import json,sys; r=json.load(open(sys.argv[1])); p=r.get('phases', [r])[0]; print(round(0.8*p['requests_per_s'],3))" "$out/capacity/results.json")"
fi
echo "== rate $rate req/s"
echo "== S3"
lp bench --scenario S3 --rate "$rate" --adapters 64 --make-adapters "$out/r16" --duration "$duration" --quiet --json --out "$out/S3" >/dev/null
echo "== S5"
lp bench --scenario S5 --rate "$rate" --adapters 64 --make-adapters "$out/r16" --duration "$duration" \
  --quiet --json --out "$out/S5" >/dev/null

python3 - "$out" "$rate" <<'PY'
import json, os, sys
d, rate = sys.argv[1], float(sys.argv[2])
rows = []
for s in ("S3", "S5"):
    r = json.load(open(os.path.join(d, s, "results.json")))
    p = r.get("phases", [r])[0]
    rows.append((s, p))
    swaps = r.get("swaps") or {}
print(f"rate {rate} req/s, Poisson, 64 rank-16 adapters, zipf 1.0, 128+128 tokens")
print("| scenario | requests | errors | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p99 ms |")
print("|---|---|---|---|---|---|---|---|")
for s, p in rows:
    print(f"| {s} | {p['requests']} | {p['errors']} | {p['requests_per_s']:.2f} | "
          f"{p['output_tokens_per_s']:.1f} | {p['ttft']['p50']:.0f} / {p['ttft']['p99']:.0f} | "
          f"{p['tpot']['p50']:.1f} / {p['tpot']['p99']:.1f} | {p['itl']['p99']:.1f} |")
s3, s5 = rows[0][1], rows[1][1]
print(f"S5 / S3: TPOT p99 {s5['tpot']['p99'] / s3['tpot']['p99']:.2f}, ITL p99 "
      f"{s5['itl']['p99'] / s3['itl']['p99']:.2f}; S5 failed requests: {s5['errors']}")
sw = json.load(open(os.path.join(d, "S5", "results.json"))).get("swaps")
if sw:
    print("S5 swaps:", json.dumps(sw)[:300])
PY
