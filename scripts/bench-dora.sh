#!/usr/bin/env bash
# What DoRA costs next to plain LoRA of the same shapes, in one run on one server:
#  - throughput: `loraplex bench --scenario S2` (32 streams in flight, 32 distinct perturbed
#    copies, 128-token prompts and outputs) with rank-16 q,k,v,o LoRA adapters and with the same
#    A and B as DoRA adapters (tools/make_random_adapter.py [--dora], same seed), alternating
#    LP_ROUNDS times; each bench run has its own base phase, so adapters/base is drift-free;
#  - registration: the "load" phase of each upload (parse, convert, and for DoRA the row norms of
#    W + s B A from the base, read through the engine thread), from the server's log.
#
#   scripts/bench-dora.sh OUT_DIR
#
# Environment: LP_BUILD_DIR (default build-release), LP_MODEL (default
# models/SmolLM2-135M-Instruct.Q4_1.gguf), LP_ROUNDS (default 2), LP_S2_REQUESTS (default 64),
# PYTHON (default python3; needs numpy).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[[ $# -eq 1 ]] || { sed -n 2,15p "$0"; exit 2; }
out="$1"
b="${LP_BUILD_DIR:-build-release}"
model="${LP_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
rounds="${LP_ROUNDS:-2}"
requests="${LP_S2_REQUESTS:-64}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
rm -rf "$out/state" "$out/lora" "$out/dora"
"${PYTHON:-python3}" tools/make_random_adapter.py "$out/lora" --rank 16 >/dev/null
"${PYTHON:-python3}" tools/make_random_adapter.py "$out/dora" --rank 16 --dora >/dev/null

"$b/server/loraplex-server" --model "$model" --listen 127.0.0.1:0 --port_file "$out/port" \
  --state_dir "$out/state" --max_running 64 --kv_memory 384MiB >"$out/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1200); do
  [[ -s "$out/port" ]] && break
  kill -0 $pid 2>/dev/null || { tail -20 "$out/server.log" >&2; exit 1; }
  sleep 0.25
done
server="127.0.0.1:$(head -1 "$out/port")"
for r in $(seq "$rounds"); do
  for kind in lora dora; do
    "$b/client/loraplex" bench --server "$server" --scenario S2 --requests "$requests" \
      --make-adapters "$out/$kind" --quiet --out "$out/s2-$kind-$r" >/dev/null
  done
done
"$b/client/loraplex" info --server "$server" --json >"$out/info.json"

python3 - "$out" "$rounds" <<'PY'
import json, re, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def ms(text):
    v, unit = re.match(r"([0-9.]+)(ms|us|s)", text).groups()
    return float(v) * {"ms": 1, "us": 1e-3, "s": 1e3}[unit]
loads = {"lora": [], "dora": []}
for line in open(f"{out}/server.log"):
    m = re.search(r"registered from upload.*load ([0-9.]+(?:ms|us|s))", line)
    if m:
        loads["dora" if ", DoRA," in line else "lora"].append(ms(m.group(1)))
info = json.load(open(f"{out}/info.json"))
print(f"model {info.get('model_path', '?')}, {info.get('weight_formats', '?')}; rank-16 q,k,v,o adapters, S2 "
      f"({rounds} rounds, alternating)")
print("| round | adapters | output tok/s, adapters | output tok/s, base | adapters / base |")
print("|---|---|---|---|---|")
ratios = {"lora": [], "dora": []}
tok_s = {"lora": [], "dora": []}
for r in range(1, rounds + 1):
    for k in ("lora", "dora"):
        ph = {p["name"]: p for p in json.load(open(f"{out}/s2-{k}-{r}/results.json"))["phases"]}
        a, base = ph["adapters"]["output_tokens_per_s"], ph["base"]["output_tokens_per_s"]
        ratios[k].append(a / base)
        tok_s[k].append(a)
        print(f"| {r} | {k.upper()} | {a:.1f} | {base:.1f} | {a / base:.3f} |")
print()
d, l = statistics.mean(ratios["dora"]), statistics.mean(ratios["lora"])
print(f"DoRA / LoRA: {d / l:.3f} from the mean adapters/base ratios, "
      f"{statistics.mean(tok_s['dora']) / statistics.mean(tok_s['lora']):.3f} from the mean "
      f"adapters tok/s")
for k in ("lora", "dora"):
    if loads[k]:
        print(f"registration load phase, {k.upper()}: median {statistics.median(loads[k]):.1f} ms "
              f"over {len(loads[k])} uploads")
PY
