#!/usr/bin/env bash
# Scenario S7, one hot adapter: 32 rank-16 adapters, one ("bench-0") named by 90% of the requests
# and the other 31 sharing the rest (`loraplex bench --scenario S7`: 32 in flight, 128-token
# prompts and outputs), base weights bf16 (merging needs them unquantized; LP_DTYPE=f32 for f32).
# One server with --merge-policy auto runs three phases back to back (the machine's speed drifts by
# 10-20% between server runs, less within one): as served (the policy merges what pays), with
# bench-0 merged by hand, and with bench-0 unmerged by hand (SetAdapterMode UNMERGED: the policy
# leaves it so, as with --merge-policy off). Prints output tok/s and its ratios, the TPOT p99 of the cold adapters'
# requests, the policy's transitions, and which requests generated the same tokens as in the
# unmerged phase (the same seed: the same requests; so the prefix cache is off, or the later phases
# would reuse the first one's prompts).
#
#   scripts/bench-merge.sh [OUT_DIR] [MODEL]
#
# Environment: LP_BUILD_DIR (default build-release), LP_BENCH_DURATION (seconds per phase after a
# 5 s warm-up, default 60), LP_DTYPE (the server's --dtype: bf16, the default, or f32),
# LP_SERVER_FLAGS (more server flags, e.g. --batch_invariant), PYTHON (numpy and gguf, for the
# adapter).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-out/bench-merge}"
model="${2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
b="${LP_BUILD_DIR:-build-release}"
duration="${LP_BENCH_DURATION:-60}"
dtype="${LP_DTYPE:-bf16}"
rm -rf "$out" && mkdir -p "$out"
out="$(cd "$out" && pwd)"
"${PYTHON:-python3}" tools/make_random_adapter.py "$out/r16" --rank 16 --model "$model" >/dev/null
lp() { "$b/client/loraplex" "$@"; }

"$b/server/loraplex-server" --model "$model" --dtype "$dtype" --listen 127.0.0.1:0 \
  --port_file "$out/port" --state_dir "$out/state" --merge_policy auto --prefix_cache off \
  ${LP_SERVER_FLAGS:-} \
  >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 600); do [[ -s "$out/port" ]] && break; sleep 0.1; done
[[ -s "$out/port" ]] || { echo "loraplex-server did not start; see $out/server.log" >&2; exit 1; }
export LORAPLEX_SERVER="127.0.0.1:$(head -1 "$out/port")"
lp bench --scenario S7 --make-adapters "$out/r16" --duration "$duration" --seed 1 --quiet \
  --record-outputs --out "$out/bench" >/dev/null
kill $server 2>/dev/null || true
wait $server 2>/dev/null || true

python3 - "$out" "$dtype" <<'PY'
import json, os, re, sys
out, dtype = sys.argv[1], sys.argv[2]
r = json.load(open(os.path.join(out, "bench", "results.json")))
phases = {p["name"]: p for p in r["phases"]}
outs = {}
for line in open(os.path.join(out, "bench", "outputs.jsonl")):
    o = json.loads(line)
    outs.setdefault(o["phase"], {})[o["index"]] = o
def p99(xs):
    xs = sorted(xs)
    if not xs: return float("nan")
    k = (len(xs) - 1) * 0.99
    lo = int(k); hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)
def cold_tpot(name):
    return p99([o["tpot_ms"] for o in outs[name].values()
                if o["adapter"] != "bench-0" and "tpot_ms" in o])
auto, hand, off = "served", "hot merged by hand", "hot unmerged by hand"
print("S7: 32 rank-16 adapters, 90% of requests on bench-0, 32 in flight, 128 + 128 tokens, "
      f"{dtype} base,")
print("one server (--merge-policy auto), phases back to back")
print("| phase | output tok/s | TPOT p99 ms (cold adapters) | errors |")
print("|---|---|---|---|")
for label, name in (("as served by the policy", auto), ("bench-0 merged by hand", hand),
                    ("bench-0 unmerged by hand (as --merge-policy off)", off)):
    p = phases[name]
    print(f"| {label} | {p['output_tokens_per_s']:.1f} | {cold_tpot(name):.1f} | {p['errors']} |")
tps = {n: phases[n]["output_tokens_per_s"] for n in (auto, hand, off)}
print(f"auto / unmerged output tok/s: {tps[auto] / tps[off]:.3f}; auto / merged by hand: "
      f"{tps[auto] / tps[hand]:.3f}; merged by hand / unmerged: {tps[hand] / tps[off]:.3f}; "
      f"cold TPOT p99 auto / unmerged: {cold_tpot(auto) / cold_tpot(off):.3f}")
for name in (auto, hand):
    hot = [i for i, o in outs[name].items() if o["adapter"] == "bench-0"]
    cold = [i for i, o in outs[name].items() if o["adapter"] != "bench-0"]
    def same(ids):
        return sum(1 for i in ids if outs[off].get(i, {}).get("ids") == outs[name][i]["ids"])
    print(f"{name}: same tokens as unmerged: hot {same(hot)} of {len(hot)}, "
          f"cold {same(cold)} of {len(cold)}")
for line in open(os.path.join(out, "server.log")):
    if "merge policy:" in line or re.search(r"adapter bench-0 v1 (un)?merged$", line.strip()):
        print("  " + re.sub(r"^\S+ \S+ \S+ ", "", line.strip()))
PY
