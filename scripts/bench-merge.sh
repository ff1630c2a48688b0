#!/usr/bin/env bash
# Scenario S7, one hot adapter: 32 rank-16 adapters, one ("bench-0") named by 90% of the requests
# and the other 31 sharing the rest (`loraplex bench --scenario S7`: 32 in flight, 128-token
# prompts and outputs). Base weights bf16 (merging needs them unquantized). A fresh server with
# --merge-policy off runs two phases: as served (unmerged) and with bench-0 merged by hand; one with
# --merge-policy auto runs the phase as served (the policy merges what pays). Prints output tok/s
# and its ratios, the TPOT p99 of the cold adapters' requests, the policy's transitions, and which
# requests generated the same tokens as the unmerged run.
#
#   scripts/bench-merge.sh [OUT_DIR] [MODEL]
#
# Environment: LP_BUILD_DIR (default build-release), LP_BENCH_DURATION (seconds per phase after a
# 5 s warm-up, default 60), PYTHON (numpy, for the adapter).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-out/bench-merge}"
model="${2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
b="${LP_BUILD_DIR:-build-release}"
duration="${LP_BENCH_DURATION:-60}"
rm -rf "$out" && mkdir -p "$out"
out="$(cd "$out" && pwd)"
"${PYTHON:-python3}" tools/make_random_adapter.py "$out/r16" --rank 16 --model "$model" >/dev/null
lp() { "$b/client/loraplex" "$@"; }

for policy in off auto; do
  d="$out/$policy"
  mkdir -p "$d"
  "$b/server/loraplex-server" --model "$model" --dtype bf16 --listen 127.0.0.1:0 \
    --port_file "$d/port" --state_dir "$d/state" --merge_policy "$policy" >"$d/server.log" 2>&1 &
  server=$!
  trap 'kill $server 2>/dev/null || true' EXIT
  for _ in $(seq 600); do [[ -s "$d/port" ]] && break; sleep 0.1; done
  [[ -s "$d/port" ]] || { echo "loraplex-server did not start; see $d/server.log" >&2; exit 1; }
  export LORAPLEX_SERVER="127.0.0.1:$(head -1 "$d/port")"
  echo "== --merge-policy $policy"
  phases=()
  [[ "$policy" == auto ]] && phases=(--no-hand-merge)
  lp bench --scenario S7 --make-adapters "$out/r16" --duration "$duration" --seed 1 --quiet \
    --record-outputs "${phases[@]}" --out "$d/bench" >/dev/null
  kill $server 2>/dev/null || true
  wait $server 2>/dev/null || true
done

python3 - "$out" <<'PY'
import json, os, re, sys
out = sys.argv[1]
def load(policy):
    r = json.load(open(os.path.join(out, policy, "bench", "results.json")))
    phases = {p["name"]: p for p in r.get("phases", [r])}
    outs = {}
    for line in open(os.path.join(out, policy, "bench", "outputs.jsonl")):
        o = json.loads(line)
        outs.setdefault(o["phase"], {})[o["index"]] = o
    log = open(os.path.join(out, policy, "server.log")).read()
    return phases, outs, log
def p99(xs):
    xs = sorted(xs)
    if not xs: return float("nan")
    k = (len(xs) - 1) * 0.99
    lo = int(k); hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
def cold_tpot(outs):
    return p99([o["tpot_ms"] for o in outs.values() if o["adapter"] != "bench-0" and "tpot_ms" in o])
off_p, off_o, _ = load("off")
auto_p, auto_o, auto_log = load("auto")
off, hand, auto = off_p["served"], off_p["hot merged by hand"], auto_p["served"]
print("S7: 32 rank-16 adapters, 90% of requests on bench-0, 32 in flight, 128 + 128 tokens, bf16")
print("| phase | output tok/s | TPOT p99 ms (cold adapters) | errors |")
print("|---|---|---|---|")
for name, p, o in (("--merge-policy off", off, off_o["served"]),
                   ("bench-0 merged by hand", hand, off_o["hot merged by hand"]),
                   ("--merge-policy auto", auto, auto_o["served"])):
    print(f"| {name} | {p['output_tokens_per_s']:.1f} | {cold_tpot(o):.1f} | {p['errors']} |")
print(f"auto / off output tok/s: {auto['output_tokens_per_s'] / off['output_tokens_per_s']:.3f}; "
      f"auto / merged by hand: {auto['output_tokens_per_s'] / hand['output_tokens_per_s']:.3f}; "
      f"cold TPOT p99 auto / off: {cold_tpot(auto_o['served']) / cold_tpot(off_o['served']):.3f}")
same = sum(1 for i, o in auto_o["served"].items()
           if o["code"] == 0 and off_o["served"].get(i, {}).get("ids") == o["ids"])
print(f"same tokens as the unmerged run: {same} of {len(auto_o['served'])} requests")
for line in auto_log.splitlines():
    if "merge policy:" in line:
        print("  " + re.sub(r"^\S+ \S+ \S+ ", "", line))
PY
