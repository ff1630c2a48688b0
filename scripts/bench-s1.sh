#!/usr/bin/env bash
# Scenario S1 on the CPU: streaming-read bandwidth and SmolLM2 decode in one run, and the ratio of
# the weight bytes the decode streams per second to that bandwidth. Needs a release build
# (build-release) and the model (scripts/fetch-model.sh).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bin="${LP_BUILD_DIR:-build-release}/bench"
bw_json="$(mktemp)"; dec_json="$(mktemp)"
"$bin/bandwidth_bench" --benchmark_filter='BM_StreamRead' --benchmark_min_time=1 \
  --benchmark_format=json > "$bw_json"
"$bin/decode_bench" --benchmark_min_time=3 --benchmark_format=json > "$dec_json"
python3 - "$bw_json" "$dec_json" <<'PY'
import json, sys
bw = json.load(open(sys.argv[1]))["benchmarks"]
dec = json.load(open(sys.argv[2]))["benchmarks"]
best_bw = max(b.get("bytes_per_second", 0) for b in bw) / 1e9
print(f"stream read bandwidth (best of 1 thread / all threads): {best_bw:.2f} GB/s")
for b in dec:
    if "DecodeStep" in b["name"]:
        dtype = b.get("label", "?")
        tps = b["tok/s"]; gbs = b["weight_GB/s"]
        print(f"S1 decode {dtype}: {tps:.1f} tok/s, {gbs:.2f} GB/s of weights = "
              f"{gbs / best_bw:.2f} of the bandwidth bound ({best_bw / (b['weight_MB'] / 1e3):.1f} tok/s)")
    elif "Prefill" in b["name"]:
        dtype = b.get("label", "?")
        print(f"S1 prefill 128 {dtype}: {b['prompt_tok/s']:.0f} prompt tok/s")
PY
