#!/usr/bin/env bash
# Scenario S9, a shared system prompt: 8 rank-16 adapters, each with its own 512-token system
# prompt that all its requests share, then a short user turn (32 tokens) and 32 generated tokens;
# 4 requests in flight, 96 in all (`loraplex bench --scenario S9`). Run once with
# --prefix-cache on and once with off (a fresh server each, the same seed, so the same requests),
# in one run: TTFT, the hit rate from GetEngineStats, and which requests generated the same tokens
# with the cache as without. Then 32 requests one at a time (same seed; a fresh server each), whose
# tokens must all be the same: at 4 in flight, which steps batch which decodes depends on timing,
# and the quantized kernels round a lone row (GEMV) differently from a batched one, so some greedy
# choices among near-ties differ between any two runs, cache or not.
#
#   scripts/bench-prefix.sh [OUT_DIR] [MODEL]
#
# Environment: LP_BUILD_DIR (default build-release), LP_BENCH_REQUESTS (default 96), PYTHON
# (numpy, for the adapter).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-out/bench-prefix}"
model="${2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
b="${LP_BUILD_DIR:-build-release}"
requests="${LP_BENCH_REQUESTS:-96}"
rm -rf "$out" && mkdir -p "$out"
out="$(cd "$out" && pwd)"
"${PYTHON:-python3}" tools/make_random_adapter.py "$out/r16" --rank 16 --model "$model" >/dev/null
lp() { "$b/client/loraplex" "$@"; }

# A fresh server per run: its log, state and port under $out/CACHE-RUN; the bench's files in
# $out/CACHE/RUN.
run() {
  local cache=$1 name=$2
  shift 2
  local d="$out/$cache/$name"
  mkdir -p "$d"
  "$b/server/loraplex-server" --model "$model" --listen 127.0.0.1:0 --port_file "$d/port" \
    --state_dir "$d/state" --prefix_cache "$cache" >"$d/server.log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  for _ in $(seq 600); do [[ -s "$d/port" ]] && break; sleep 0.1; done
  [[ -s "$d/port" ]] || { echo "loraplex-server did not start; see $d/server.log" >&2; exit 1; }
  export LORAPLEX_SERVER="127.0.0.1:$(head -1 "$d/port")"
  echo "== prefix cache $cache: $name"
  lp bench --scenario S9 --make-adapters "$out/r16" --seed 1 --quiet --record-outputs \
    --out "$d" "$@" >/dev/null
  lp stats --json >"$d/stats.json"
  kill $server 2>/dev/null || true
  wait $server 2>/dev/null || true
}
for cache in on off; do
  run "$cache" bench --requests "$requests"
  run "$cache" alone --concurrency 1 --requests 32
done

python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
def outputs(c, run):
    ids = {}
    for line in open(os.path.join(out, c, run, "outputs.jsonl")):
        o = json.loads(line)
        ids[o["index"]] = (o["code"], o["ids"])
    return ids
def load(c):
    r = json.load(open(os.path.join(out, c, "bench", "results.json")))
    s = json.load(open(os.path.join(out, c, "bench", "stats.json")))
    return r, s, outputs(c, "bench")
def same(a, b):
    return sum(1 for i, v in a.items() if v[0] == 0 and b.get(i) == v)
on, off = load("on"), load("off")
alone_on, alone_off = outputs("on", "alone"), outputs("off", "alone")
print(f"S9: {on[0]['config']['adapters']} adapters, 512-token system prompt each, "
      f"32-token user turns, 32 output tokens, 4 in flight, {len(on[2])} requests")
print("| prefix cache | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | output tok/s | hit rate | errors |")
print("|---|---|---|---|---|---|---|")
for name, (r, s, _) in (("on", on), ("off", off)):
    hits = int(s.get("prefixCacheHitTokens", s.get("prefix_cache_hit_tokens", 0)))
    looked = int(s.get("prefixCacheLookupTokens", s.get("prefix_cache_lookup_tokens", 0)))
    rate = f"{100 * hits / looked:.1f}%" if looked else "-"
    print(f"| {name} | {r['ttft']['p50']:.0f} | {r['ttft']['p99']:.0f} | {r['e2e']['p50']:.0f} | "
          f"{r['output_tokens_per_s']:.1f} | {rate} | {r['errors']} |")
print(f"TTFT p50 off / on: {off[0]['ttft']['p50'] / on[0]['ttft']['p50']:.2f}x; "
      f"same tokens at 4 in flight: {same(on[2], off[2])} of {len(off[2])} requests; "
      f"one at a time: {same(alone_on, alone_off)} of {len(alone_off)}")
PY
