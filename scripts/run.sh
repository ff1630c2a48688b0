#!/usr/bin/env bash
# README's run command: installs the build dependencies, fetches SmolLM2-135M-Instruct, builds the
# release binaries, starts loraplex-server on it with the demo adapters of adapters/examples
# registered and the OpenAI-compatible HTTP API on 127.0.0.1:8000, makes a few real calls with the
# bundled client and one over HTTP, and leaves the server running in the foreground (Ctrl-C stops
# it gracefully).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
model="$(bash scripts/fetch-model.sh)"
bld="${LP_BUILD_DIR:-build-release}"
cmake -S . -B "$bld" -G Ninja -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$bld" -j "$(nproc)" --target loraplex-server loraplex loraplex-generate

listen="${LORAPLEX_LISTEN:-127.0.0.1:50051}"
http="${LORAPLEX_HTTP_LISTEN:-127.0.0.1:8000}"
state="${LORAPLEX_STATE_DIR:-$root/out/state}"
mkdir -p "$state"
names=()
specs=()
for a in adapters/examples/*/; do
  if [[ -f "$a/adapter_config.json" && -f "$a/adapter_model.safetensors" ]]; then
    names+=("$(basename "$a")")
    specs+=("$(basename "$a")=${a%/}")
  fi
done
adapter_flags=()
# --adapter takes a comma-separated list of NAME=DIR.
((${#specs[@]})) && adapter_flags=(--adapter "$(IFS=,; echo "${specs[*]}")")
echo "== starting loraplex-server on $model ($listen)"
./$bld/server/loraplex-server --model "$model" --listen "$listen" \
  --adapter-dir "$root/adapters/examples" --state-dir "$state" \
  --metrics-listen 127.0.0.1:9090 --http-listen "$http" "${adapter_flags[@]}" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server' INT TERM
export LORAPLEX_SERVER="$listen"
for _ in $(seq 1 120); do
  ./$bld/client/loraplex health > /dev/null 2>&1 && break
  sleep 1
done
./$bld/client/loraplex info
echo "== loraplex generate (base model)"
./$bld/client/loraplex generate --chat --max-tokens 64 \
  "Give me one tip for sleeping better."
for name in "${names[@]+"${names[@]}"}"; do
  echo "== loraplex generate --adapter $name"
  ./$bld/client/loraplex generate --chat --adapter "$name" --max-tokens 64 \
    "Give me one tip for sleeping better."
done
./$bld/client/loraplex adapters list
if ((${#names[@]})); then
  echo "== POST http://$http/v1/chat/completions (the OpenAI API, model ${names[0]})"
  curl -sS "http://$http/v1/chat/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"${names[0]}\", \"max_tokens\": 64, \"temperature\": 0,
         \"messages\": [{\"role\": \"user\", \"content\": \"Name a colour.\"}]}"
  echo
fi
echo "== server running on $listen, OpenAI API on http://$http/v1 (metrics on" \
  "127.0.0.1:9090/metrics); Ctrl-C to stop"
wait $server
