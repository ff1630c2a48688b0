#!/usr/bin/env bash
# Rank compression at registration (`--max-rank`, docs/adapters.md): rank-R adapters served as
# trained and compressed to lower ranks, in one run on one server.
#
#  1. Agreement with the full rank: every adapter given is registered as trained and again with
#     --max-rank for each rank in LP_RANKS; the same fixed chat prompts run greedy (128 tokens,
#     EOS ignored) through each. Per rank: relative Frobenius error of the update (GetAdapter),
#     the share of prompts whose output is identical to the full rank's, the share of generated
#     tokens equal position by position, and the mean |logprob gap| of the chosen token over the
#     positions before the first difference (where both saw the same context, so the gap is the
#     compression's alone).
#  2. Throughput: `loraplex bench --scenario S2` (32 streams in flight, 32 distinct perturbed
#     copies of the first adapter, 128-token prompts and outputs) as trained and at each rank,
#     one after another on the same server, each with its own base phase (adapters/base ratio).
#
#   scripts/bench-compression.sh OUT_DIR ADAPTER_DIR...
#
# The adapters are PEFT folders of one rank (rank 64 in docs/benchmarks.md: made by
# tools/train_demo_adapters.py --rank 64, see there). Environment: LP_BUILD_DIR (default
# build-release), LP_MODEL (default models/SmolLM2-135M-Instruct.Q4_1.gguf), LP_RANKS (default
# "16 8"), LP_S2_REQUESTS (default 64), LP_PROMPTS (default: the 24 below).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
[[ $# -ge 2 ]] || { sed -n 2,21p "$0"; exit 2; }
out="$1"; shift
b="${LP_BUILD_DIR:-build-release}"
model="${LP_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}"
ranks=(${LP_RANKS:-16 8})
requests="${LP_S2_REQUESTS:-64}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
adapter_root="$out/adapters"
rm -rf "$adapter_root" "$out/state"
mkdir -p "$adapter_root"
names=()
for dir in "$@"; do
  [[ -f "$dir/adapter_config.json" ]] || { echo "bench-compression: $dir is not a PEFT folder" >&2; exit 2; }
  n="$(basename "$dir")"
  cp -r "$dir" "$adapter_root/$n"
  names+=("$n")
done
trained_rank="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["r"])' "$1/adapter_config.json")"
lpc() { "$b/client/loraplex" "$@" --server "$LORAPLEX_SERVER"; }

"$b/server/loraplex-server" --model "$model" --listen 127.0.0.1:0 --port_file "$out/port" \
  --state_dir "$out/state" --adapter_dir "$adapter_root" --max_running 64 --kv_memory 384MiB \
  --max_lora_rank "$trained_rank" >"$out/server.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true' EXIT
for _ in $(seq 1200); do
  [[ -s "$out/port" ]] && break
  kill -0 $pid 2>/dev/null || { tail -20 "$out/server.log" >&2; exit 1; }
  sleep 0.25
done
export LORAPLEX_SERVER="127.0.0.1:$(head -1 "$out/port")"

# --- 1. agreement --------------------------------------------------------------------------------
for n in "${names[@]}"; do
  lpc adapters load "$n-full" "$n" >/dev/null
  lpc adapters get "$n-full" --json >"$out/$n-full.info.json"
  for r in "${ranks[@]}"; do
    lpc adapters load "$n-r$r" "$n" --max-rank "$r" >/dev/null
    lpc adapters get "$n-r$r" --json >"$out/$n-r$r.info.json"
  done
done
prompts_file="${LP_PROMPTS:-$out/prompts.txt}"
if [[ -z "${LP_PROMPTS:-}" ]]; then
  cat >"$prompts_file" <<'EOF'
What is a volcano?
Tell me one fact about the moon.
Why do people like music?
How does rain form?
What is the capital of Japan?
Describe a cat in two sentences.
What is photosynthesis?
Give me a tip for learning to cook.
Why is the sky blue?
What do bees make?
Explain what a computer does.
What is the tallest mountain on Earth?
How do birds fly?
What is a good breakfast?
Tell me about the ocean.
What is gravity?
Why do we sleep?
Name three colours of the rainbow.
What does a doctor do?
How do plants grow?
What is the sun made of?
Tell me a fact about elephants.
What is a library for?
How do you make tea?
EOF
fi
for n in "${names[@]}"; do
  for v in full "${ranks[@]/#/r}"; do
    : >"$out/$n-$v.gen.jsonl"
    while IFS= read -r p; do
      [[ -n "$p" ]] || continue
      lpc generate --chat --adapter "$n-$v" --max-tokens 128 --ignore-eos --logprobs 1 --json \
        "$p" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)))' \
        >>"$out/$n-$v.gen.jsonl"
    done <"$prompts_file"
  done
done

# --- 2. throughput -------------------------------------------------------------------------------
for r in 0 "${ranks[@]}"; do
  lpc bench --scenario S2 --requests "$requests" --make-adapters "$adapter_root/${names[0]}" \
    --max-rank "$r" --quiet --out "$out/s2-r$r" >/dev/null
done
lpc info --json >"$out/info.json"

# --- report --------------------------------------------------------------------------------------
python3 scripts/bench_compression_report.py "$out" "$trained_rank" "${ranks[*]}" "${names[@]}"
