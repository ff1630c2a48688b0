#!/usr/bin/env bash
# Serving overhead and resident memory (issue 4, docs/benchmarks.md): scenarios S1 and S2 run
# in-process on the engine (bench/engine_bench) and through loraplex-server with `loraplex bench`
# as the client in another process, back to back in one run, with the same workload (128-token
# prompts, 128 greedy output tokens, S1 one request at a time, S2 32 in flight each with its own
# rank-16 q,k,v,o adapter); then the server's resident memory with 64 rank-16 adapters loaded
# against the bytes of weights + KV pool + adapters it reports.
#
#   scripts/bench-serving.sh [OUT_DIR] [MODEL]
# Needs a release build (LP_BUILD_DIR, default build-release) and the model (scripts/fetch-model.sh).
# LP_DTYPE: the --dtype of the base weights, in-process and in the server (default native).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
out="${1:-out/bench-serving}"
model="${2:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
b="${LP_BUILD_DIR:-build-release}"
requests_s1="${LP_S1_REQUESTS:-4}"
requests_s2="${LP_S2_REQUESTS:-64}"
rm -rf "$out" && mkdir -p "$out"
source scripts/bench-common.sh
start_bench_server --kv_memory 384MiB --metrics_listen 127.0.0.1:0
client() { "$b/client/loraplex" "$@"; }
common=(--prompt-tokens 128 --max-tokens 128 --warmup 0 --duration 3600 --quiet --json)

echo "== S1 in-process"
"$b/bench/engine_bench" --model "$model" --dtype "${LP_DTYPE:-native}" --concurrency 1 --requests "$requests_s1" | tee "$out/s1_inproc.json"
echo "== S1 server"
client bench --scenario S1 --requests "$requests_s1" "${common[@]}" --out "$out/s1_server" >/dev/null
echo "== S2 in-process, base then 32 adapters"
"$b/bench/engine_bench" --model "$model" --dtype "${LP_DTYPE:-native}" --concurrency 32 --requests "$requests_s2" | tee "$out/s2_inproc_base.json"
"$b/bench/engine_bench" --model "$model" --dtype "${LP_DTYPE:-native}" --concurrency 32 --requests "$requests_s2" \
  --adapter_dir "$out/r16" --adapters 32 | tee "$out/s2_inproc_adapters.json"
echo "== S2 server, base then 32 adapters"
client bench --scenario S2 --requests "$requests_s2" --make-adapters "$out/r16" "${common[@]}" \
  --out "$out/s2_server" >/dev/null
echo "== memory: 64 rank-16 adapters loaded, after a round of requests over all of them"
client bench --concurrency 32 --adapters 64 --popularity distinct --requests 64 \
  --prompt-tokens 128 --max-tokens 16 --make-adapters "$out/r16" --keep-adapters --warmup 0 \
  --duration 3600 --quiet --json --out "$out/mem_run" >/dev/null
grep -E 'VmRSS|VmHWM|RssAnon|RssFile' "/proc/$server/status" | tee "$out/proc_status.txt"
client info --json >"$out/info.json"
client adapters list --json >"$out/adapters.json"
# loraplex_memory_bytes{part=...}: what the server itself counts (weights, KV pool, scratch,
# adapters), refreshed every metrics interval.
sleep 1
curl -s "http://127.0.0.1:$(sed -n 2p "$out/port")/metrics" >"$out/metrics.txt" || true

python3 - "$out" <<'PY'
import json, os, sys
d = sys.argv[1]
J = lambda n: json.load(open(os.path.join(d, n)))
# results.json of `loraplex bench`: a "phases" list when the scenario has several, else one phase.
phases = lambda r: r["phases"] if "phases" in r else [r]
s1_in = J("s1_inproc.json")["output_tokens_per_s"]
s1_srv = phases(J("s1_server/results.json"))[0]["output_tokens_per_s"]
s2b_in = J("s2_inproc_base.json")["output_tokens_per_s"]
s2a_in = J("s2_inproc_adapters.json")["output_tokens_per_s"]
ph = {p["name"]: p for p in phases(J("s2_server/results.json"))}
s2b_srv, s2a_srv = ph["base"]["output_tokens_per_s"], ph["adapters"]["output_tokens_per_s"]
errs = sum(p["errors"] for p in ph.values())
print("| scenario | in-process tok/s | server tok/s | server / in-process |")
print("|---|---|---|---|")
print(f"| S1 base, 1 request | {s1_in:.1f} | {s1_srv:.1f} | {s1_srv / s1_in:.2f} |")
print(f"| S2 base, 32 in flight | {s2b_in:.1f} | {s2b_srv:.1f} | {s2b_srv / s2b_in:.2f} |")
print(f"| S2 32 rank-16 adapters | {s2a_in:.1f} | {s2a_srv:.1f} | {s2a_srv / s2a_in:.2f} |")
print(f"S2 adapters/base: in-process {s2a_in / s2b_in:.2f}, server {s2a_srv / s2b_srv:.2f}; "
      f"server errors: {errs}")
info = J("info.json")
info = info.get("model_info", info)
kv_bytes_per_token = 2 * info["num_layers"] * info["num_kv_heads"] * info["head_dim"] * 4  # f32 cache
kv = info["kv_blocks_total"] * info["kv_block_size"] * kv_bytes_per_token
ads = J("adapters.json")
ads = ads.get("adapters", ads) if isinstance(ads, dict) else ads
resident = [a for a in ads if a.get("residency") in ("DEVICE", "HOST")]
ad_bytes = sum(int(a.get("bytes", 0)) for a in resident)
st = dict(l.split(":", 1) for l in open(os.path.join(d, "proc_status.txt")))
kb = lambda k: int(st[k].split()[0]) * 1024
w = int(info["weight_bytes"])
total = w + kv + ad_bytes
print(f"weights {w / 2**20:.1f} MiB + KV pool {kv / 2**20:.1f} MiB + {len(resident)} adapters "
      f"{ad_bytes / 2**20:.1f} MiB = {total / 2**20:.1f} MiB")
parts = {}
for line in open(os.path.join(d, "metrics.txt")):
    if line.startswith('loraplex_memory_bytes{part="'):
        key, value = line.split()
        parts[key.split('"')[1]] = float(value)
if parts:
    print("/metrics loraplex_memory_bytes: " + ", ".join(
        f"{k} {v / 2**20:.1f} MiB" for k, v in sorted(parts.items())))
print(f"VmRSS {kb('VmRSS') / 2**20:.1f} MiB (anon {kb('RssAnon') / 2**20:.1f}, file "
      f"{kb('RssFile') / 2**20:.1f}), VmHWM {kb('VmHWM') / 2**20:.1f} MiB: "
      f"RSS / sum = {kb('VmRSS') / total:.2f}, HWM / sum = {kb('VmHWM') / total:.2f}")
PY
