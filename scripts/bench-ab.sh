#!/usr/bin/env bash
# A/B check of two builds on S2 (32 requests in flight, 128-token prompts, 128 greedy output
# tokens), in-process (bench/engine_bench) and through loraplex-server (`loraplex bench --scenario
# S2`), base model then 32 distinct rank-16 adapters. The two builds run interleaved, ROUNDS times
# (A, B, A, B, ...), so that drift on a shared machine hits both alike; prints each build's median
# tok/s per workload and the ratio B / A. For "no behaviour change" refactors: the ratio should be
# within the spread of the rounds.
#
#   scripts/bench-ab.sh BUILD_A BUILD_B [ROUNDS] [OUT_DIR] [MODEL]
# Each build dir needs bench/engine_bench, server/loraplex-server; the client of BUILD_B drives both
# servers. The model: scripts/fetch-model.sh. PYTHON (default python3) must have numpy and gguf
# for tools/make_random_adapter.py.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
a="${1:?BUILD_A}"
bb="${2:?BUILD_B}"
rounds="${3:-3}"
out="${4:-out/bench-ab}"
model="${5:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
requests="${LP_S2_REQUESTS:-64}"
rm -rf "$out" && mkdir -p "$out"
"${PYTHON:-python3}" tools/make_random_adapter.py "$out/r16" --rank 16 --dtype f32 --model "$model" >/dev/null
client="$bb/client/loraplex"

server=""
trap '[[ -n "$server" ]] && kill "$server" 2>/dev/null || true' EXIT
serve() {  # serve BUILD TAG: starts that build's server; sets LORAPLEX_SERVER
  rm -rf "$out/state-$2" "$out/port-$2"
  "$1/server/loraplex-server" --model "$model" --listen 127.0.0.1:0 --port_file "$out/port-$2" \
    --state_dir "$out/state-$2" --max_running 64 --kv_memory 384MiB \
    --metrics_listen 127.0.0.1:0 >"$out/server-$2.log" 2>&1 &
  server=$!
  for _ in $(seq 600); do [[ -s "$out/port-$2" ]] && break; sleep 0.1; done
  [[ -s "$out/port-$2" ]] || { echo "server $1 did not start; see $out/server-$2.log" >&2; exit 1; }
  export LORAPLEX_SERVER="127.0.0.1:$(head -1 "$out/port-$2")"
}
unserve() { kill "$server"; wait "$server" 2>/dev/null || true; server=""; }

for r in $(seq "$rounds"); do
  for side in A B; do
    build="$a"; [[ $side == B ]] && build="$bb"
    tag="$side$r"
    echo "== round $r, $side ($build)"
    "$build/bench/engine_bench" --model "$model" --concurrency 32 --requests "$requests" \
      >"$out/inproc_base_$tag.json"
    "$build/bench/engine_bench" --model "$model" --concurrency 32 --requests "$requests" \
      --adapter_dir "$out/r16" --adapters 32 >"$out/inproc_adapters_$tag.json"
    serve "$build" "$tag"
    "$client" bench --scenario S2 --requests "$requests" --make-adapters "$out/r16" \
      --prompt-tokens 128 --max-tokens 128 --warmup 0 --duration 3600 --quiet --json \
      --out "$out/server_$tag" >/dev/null
    unserve
  done
done

python3 - "$out" "$rounds" "$a" "$bb" <<'PY'
import json, os, statistics, sys
d, rounds, a, b = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
J = lambda n: json.load(open(os.path.join(d, n)))
phases = lambda r: r["phases"] if "phases" in r else [r]
rows = {}
for side in "AB":
    for r in range(1, rounds + 1):
        t = f"{side}{r}"
        ph = {p["name"]: p for p in phases(J(f"server_{t}/results.json"))}
        errors = sum(p["errors"] for p in ph.values())
        if errors:
            sys.exit(f"bench-ab: {errors} errors in round {r}, build {side}")
        for k, v in [("S2 base, in-process", J(f"inproc_base_{t}.json")["output_tokens_per_s"]),
                     ("S2 32 adapters, in-process",
                      J(f"inproc_adapters_{t}.json")["output_tokens_per_s"]),
                     ("S2 base, server", ph["base"]["output_tokens_per_s"]),
                     ("S2 32 adapters, server", ph["adapters"]["output_tokens_per_s"])]:
            rows.setdefault(k, {"A": [], "B": []})[side].append(v)
print(f"A = {a}, B = {b}, {rounds} interleaved rounds; output tok/s, median (min-max)")
print(f"| workload | A | B | B / A |")
print(f"|---|---|---|---|")
for k, v in rows.items():
    ma, mb = statistics.median(v["A"]), statistics.median(v["B"])
    fmt = lambda xs, m: f"{m:.1f} ({min(xs):.1f}-{max(xs):.1f})"
    print(f"| {k} | {fmt(v['A'], ma)} | {fmt(v['B'], mb)} | **{mb / ma:.3f}** |")
PY
